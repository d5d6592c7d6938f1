"""The checker of chapter 02's coding exercise accepts a correct batchnorm_forward and diagnoses each wrong one.

Every wrong implementation below is written out by hand (independently of the checker's own variants), and
the test asserts both the verdict and the diagnosis the checker prints.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnlib.exercises.ch02 import _cases, _reference, check_batchnorm_forward


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _cshape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def correct(x, gamma, beta, eps=1e-5):
    ax = _axes(x)
    mu = x.mean(axis=ax, keepdims=True)
    var = x.var(axis=ax, keepdims=True)
    return gamma.reshape(_cshape(x)) * (x - mu) / np.sqrt(var + eps) + beta.reshape(_cshape(x))


def unbiased(x, gamma, beta, eps=1e-5):
    ax = _axes(x)
    mu = x.mean(axis=ax, keepdims=True)
    var = x.var(axis=ax, keepdims=True, ddof=1)
    return gamma.reshape(_cshape(x)) * (x - mu) / np.sqrt(var + eps) + beta.reshape(_cshape(x))


def over_features(x, gamma, beta, eps=1e-5):
    """Normalises each example over its features (axis 1 and beyond) instead of over the batch."""
    ax = tuple(range(1, x.ndim))
    mu = x.mean(axis=ax, keepdims=True)
    var = x.var(axis=ax, keepdims=True)
    return gamma.reshape(_cshape(x)) * (x - mu) / np.sqrt(var + eps) + beta.reshape(_cshape(x))


def eps_outside(x, gamma, beta, eps=1e-5):
    ax = _axes(x)
    mu = x.mean(axis=ax, keepdims=True)
    std = x.std(axis=ax, keepdims=True)
    return gamma.reshape(_cshape(x)) * (x - mu) / (std + eps) + beta.reshape(_cshape(x))


def no_affine(x, gamma, beta, eps=1e-5):
    ax = _axes(x)
    mu = x.mean(axis=ax, keepdims=True)
    var = x.var(axis=ax, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def axis0_only(x, gamma, beta, eps=1e-5):
    """Correct for (N, C); for (N, C, H, W) reduces only axis 0, one statistic per channel and position."""
    mu = x.mean(axis=0, keepdims=True)
    var = x.var(axis=0, keepdims=True)
    return gamma.reshape(_cshape(x)) * (x - mu) / np.sqrt(var + eps) + beta.reshape(_cshape(x))


def no_sqrt(x, gamma, beta, eps=1e-5):
    ax = _axes(x)
    mu = x.mean(axis=ax, keepdims=True)
    var = x.var(axis=ax, keepdims=True)
    return gamma.reshape(_cshape(x)) * (x - mu) / (var + eps) + beta.reshape(_cshape(x))


def unbiased_and_no_affine(x, gamma, beta, eps=1e-5):
    ax = _axes(x)
    return (x - x.mean(axis=ax, keepdims=True)) / np.sqrt(x.var(axis=ax, keepdims=True, ddof=1) + eps)


def no_keepdims(x, gamma, beta, eps=1e-5):
    """Works for (N, C) by luck of broadcasting, fails for (N, C, L)."""
    ax = _axes(x)
    return gamma * (x - x.mean(axis=ax)) / np.sqrt(x.var(axis=ax) + eps) + beta


def in_place(x, gamma, beta, eps=1e-5):
    ax = _axes(x)
    x -= x.mean(axis=ax, keepdims=True)
    x /= np.sqrt((x**2).mean(axis=ax, keepdims=True) + eps)
    return gamma.reshape(_cshape(x)) * x + beta.reshape(_cshape(x))


def float32(x, gamma, beta, eps=1e-5):
    return correct(x.astype(np.float32), gamma.astype(np.float32), beta.astype(np.float32), eps)


def returns_tuple(x, gamma, beta, eps=1e-5):
    return correct(x, gamma, beta, eps), None


def stub(x, gamma, beta, eps=1e-5):
    raise NotImplementedError


def test_reference_equals_torch():
    """The checker's own reference is torch.nn.functional.batch_norm in training mode (float64)."""
    import torch
    for _, x, gamma, beta, eps in _cases():
        y_t = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, torch.from_numpy(gamma),
                                             torch.from_numpy(beta), training=True, eps=eps).numpy()
        assert np.max(np.abs(_reference(x, gamma, beta, eps) - y_t)) < 1e-12


def test_correct_passes(capsys):
    assert check_batchnorm_forward(correct) is True
    out = capsys.readouterr().out
    assert "all 5 cases pass" in out
    assert out.count(": ok") == 5


def test_library_passes(capsys):
    """bnlib.numpy_bn.batch_norm_forward (returning y) passes too."""
    from bnlib import numpy_bn
    assert check_batchnorm_forward(lambda x, g, b, eps: numpy_bn.batch_norm_forward(x, g, b, eps)[0]) is True


def test_silent():
    assert check_batchnorm_forward(correct, verbose=False) is True
    assert check_batchnorm_forward(unbiased, verbose=False) is False


@pytest.mark.parametrize(
    "fn, case, expected",
    [
        (unbiased, "case A", ["unbiased variance"]),
        (over_features, "case A", ["over the features of each example", "LayerNorm"]),
        (eps_outside, "case A", ["eps is outside the square root"]),
        (no_affine, "case A", ["you forgot gamma and beta"]),
        (axis0_only, "case C", ["reduced over axis 0 only", "N * prod(spatial)"]),
        (no_sqrt, "case A", ["forgot the square root"]),
        (unbiased_and_no_affine, "case A", ["unbiased variance", "you forgot gamma and beta"]),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_wrong_value_diagnosed(capsys, fn, case, expected):
    assert check_batchnorm_forward(fn) is False
    out = capsys.readouterr().out
    assert f"{case}: (" in out and "y differs from the reference" in out
    assert out.index(f"{case}: (") < out.index("y differs")
    assert "max |error| =" in out
    for phrase in expected:
        assert phrase in out
    assert "not a mistake this checker recognises" not in out


def test_eps_outside_is_caught_by_the_small_variance_case_alone(capsys):
    """With eps=1e-5 and unit variances the eps slip is 1e-5 relative; case B makes it large."""
    name, x, gamma, beta, eps = _cases()[1]
    assert np.max(np.abs(eps_outside(x, gamma, beta, eps) - _reference(x, gamma, beta, eps))) > 1e-2


def test_axis0_only_passes_2d_cases_first(capsys):
    """Reducing axis 0 is right for (N, C): the checker passes A and B and then fails at the 3D case."""
    assert check_batchnorm_forward(axis0_only) is False
    out = capsys.readouterr().out
    assert "case A: (N, C) = (16, 5): ok" in out and "case B" in out


def test_unknown_mistake(capsys):
    def scaled(x, gamma, beta, eps=1e-5):
        return 1.5 * correct(x, gamma, beta, eps)

    assert check_batchnorm_forward(scaled) is False
    out = capsys.readouterr().out
    assert "not a mistake this checker recognises" in out


@pytest.mark.parametrize(
    "fn, expected",
    [
        (no_keepdims, ["raised ValueError", "broadcast", "keepdims=True"]),
        (in_place, ["your function modified x in place"]),
        (float32, ["y has dtype float32, expected float64"]),
        (returns_tuple, ["returned a tuple of 2, expected y only"]),
        (stub, ["NotImplementedError: fill in the stub"]),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_other_failures_diagnosed(capsys, fn, expected):
    assert check_batchnorm_forward(fn) is False
    out = capsys.readouterr().out
    for phrase in expected:
        assert phrase in out
