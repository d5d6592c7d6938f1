"""The checker of chapter 01's coding exercise accepts a correct standardize and diagnoses each wrong one.

Every wrong implementation below is written out by hand (independently of the checker's own variants), and
the test asserts both the verdict and the diagnosis the checker prints.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnlib.exercises.ch01 import _cases, check_standardize


def correct(X_train, X_test, eps=1e-5):
    mu, var = X_train.mean(axis=0), X_train.var(axis=0)
    return (X_train - mu) / np.sqrt(var + eps), (X_test - mu) / np.sqrt(var + eps)


def correct_loop(X_train, X_test, eps=1e-5):
    """Another correct way: explicit sums, a loop over features."""
    Z_train, Z_test = np.empty_like(X_train), np.empty_like(X_test)
    n = len(X_train)
    for j in range(X_train.shape[1]):
        mu = X_train[:, j].sum() / n
        var = ((X_train[:, j] - mu) ** 2).sum() / n
        Z_train[:, j] = (X_train[:, j] - mu) / (var + eps) ** 0.5
        Z_test[:, j] = (X_test[:, j] - mu) / (var + eps) ** 0.5
    return Z_train, Z_test


def stats_of_test_set(X_train, X_test, eps=1e-5):
    def z(X):
        return (X - X.mean(axis=0)) / np.sqrt(X.var(axis=0) + eps)
    return z(X_train), z(X_test)


def wrong_axis(X_train, X_test, eps=1e-5):
    mu, var = X_train.mean(axis=1, keepdims=True), X_train.var(axis=1, keepdims=True)
    return (X_train - mu) / np.sqrt(var + eps), (X_test - mu) / np.sqrt(var + eps)


def wrong_axis_each(X_train, X_test, eps=1e-5):
    """Per-example statistics, each set with its own (no broadcast error, still wrong)."""
    def z(X):
        return (X - X.mean(axis=1, keepdims=True)) / np.sqrt(X.var(axis=1, keepdims=True) + eps)
    return z(X_train), z(X_test)


def by_variance(X_train, X_test, eps=1e-5):
    mu, var = X_train.mean(axis=0), X_train.var(axis=0)
    return (X_train - mu) / (var + eps), (X_test - mu) / (var + eps)


def no_eps(X_train, X_test, eps=1e-5):
    mu, sd = X_train.mean(axis=0), X_train.std(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (X_train - mu) / sd, (X_test - mu) / sd


def eps_outside(X_train, X_test, eps=1e-5):
    mu, sd = X_train.mean(axis=0), X_train.std(axis=0)
    return (X_train - mu) / (sd + eps), (X_test - mu) / (sd + eps)


def unbiased(X_train, X_test, eps=1e-5):
    mu, var = X_train.mean(axis=0), X_train.var(axis=0, ddof=1)
    return (X_train - mu) / np.sqrt(var + eps), (X_test - mu) / np.sqrt(var + eps)


def in_place(X_train, X_test, eps=1e-5):
    mu, var = X_train.mean(axis=0), X_train.var(axis=0)
    X_train -= mu
    X_train /= np.sqrt(var + eps)
    return X_train, (X_test - mu) / np.sqrt(var + eps)


def only_train(X_train, X_test, eps=1e-5):
    mu, var = X_train.mean(axis=0), X_train.var(axis=0)
    return (X_train - mu) / np.sqrt(var + eps)


def float32(X_train, X_test, eps=1e-5):
    """Right formula, computed in single precision: the values agree to 1e-7 only."""
    Xtr, Xte = X_train.astype(np.float32), X_test.astype(np.float32)
    mu, var = Xtr.mean(axis=0), Xtr.var(axis=0)
    return (Xtr - mu) / np.sqrt(var + eps), (Xte - mu) / np.sqrt(var + eps)


def returns_list(X_train, X_test, eps=1e-5):
    mu, var = X_train.mean(axis=0), X_train.var(axis=0)
    return [(X_train - mu) / np.sqrt(var + eps), (X_test - mu) / np.sqrt(var + eps)]


def stub(X_train, X_test, eps=1e-5):
    raise NotImplementedError


@pytest.mark.parametrize("fn", [correct, correct_loop])
def test_accepts_correct(fn, capsys):
    assert check_standardize(fn) is True
    assert "all 3 cases pass" in capsys.readouterr().out


@pytest.mark.parametrize(
    "fn, expected",
    [
        (stats_of_test_set, "its own mean and variance"),
        (wrong_axis, "wrong axis"),
        (wrong_axis_each, "wrong axis"),
        (by_variance, "divided by the variance"),
        (no_eps, "eps is missing"),
        (eps_outside, "eps is outside the square root"),
        (unbiased, "unbiased variance"),
        (in_place, "your function modified X_train in place"),
        (only_train, "returned a NumPy array, expected a tuple of 2: (Z_train, Z_test)"),
        (returns_list, "returned list, expected a tuple of 2"),
        (float32, "Z_train has dtype float32, expected float64"),
        (stub, "NotImplementedError"),
    ],
)
def test_diagnoses_each_mistake(fn, expected, capsys):
    assert check_standardize(fn) is False
    out = capsys.readouterr().out
    assert expected in out, out


def test_wrong_set_is_named(capsys):
    """Using test statistics leaves Z_train right: the checker must point at Z_test."""
    check_standardize(stats_of_test_set)
    assert "Z_test differs" in capsys.readouterr().out


def test_cases_expose_every_mistake():
    """Each case set must make the mistakes distinguishable: the wrong variants differ from the correct one."""
    for fn in (stats_of_test_set, by_variance, eps_outside, unbiased):
        assert any(
            not np.allclose(np.asarray(a), np.asarray(b), equal_nan=True)
            for _, Xtr, Xte, eps in _cases()
            for a, b in zip(fn(Xtr.copy(), Xte.copy(), eps), correct(Xtr, Xte, eps))
        ), fn.__name__


def test_silent():
    assert check_standardize(correct, verbose=False) is True
