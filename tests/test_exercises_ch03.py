"""The checkers of chapters/03_bn_backward.ipynb: they accept a correct solution and diagnose each mistake they claim to.

Every wrong implementation below is written independently of the checker's own mistake models, the way a
reader would write it.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnlib.exercises.ch03 import check_bn_backward, check_numerical_gradient


# ----------------------------------------------------------------------------------------
# check_bn_backward
# ----------------------------------------------------------------------------------------

def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _bc(a, x):
    return a.reshape((1, -1) + (1,) * (x.ndim - 2))


def bn_backward(dy, x, gamma, eps, *, axes=None, ddof=0, mean_div=None, eps_mode="inside", use_gamma=True,
                mean_term=True, xhat_term=True, dgamma_axes=None, inplace=False):
    """A reader-style compact backward with switches for the mistakes."""
    axes = _axes(x) if axes is None else axes
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True, ddof=ddof)
    std = {"inside": np.sqrt(var + eps), "none": np.sqrt(var), "outside": np.sqrt(var) + eps}[eps_mode]
    x_hat = (x - mu) / std
    m = x.size // x.shape[1] if len(axes) == x.ndim - 1 else int(np.prod([x.shape[a] for a in axes]))
    n = m if mean_div is None else mean_div(m)
    dgamma_axes = axes if dgamma_axes is None else dgamma_axes
    dbeta = dy.sum(axis=dgamma_axes)
    dgamma = (dy * x_hat).sum(axis=dgamma_axes)
    g = _bc(gamma, x) if use_gamma else 1.0
    sum_dy = dy.sum(axis=axes, keepdims=True)
    sum_dy_xhat = (dy * x_hat).sum(axis=axes, keepdims=True)
    if inplace:
        dy *= g / std
        dx = dy
    else:
        dx = g / std * dy
    if mean_term:
        dx = dx - g / std * sum_dy / n
    if xhat_term:
        dx = dx - g / std * x_hat * sum_dy_xhat / n
    return dx, dgamma, dbeta


def test_bn_checker_accepts_correct(capsys):
    assert check_bn_backward(bn_backward) is True
    assert "all 4 cases pass" in capsys.readouterr().out


def test_bn_checker_accepts_textbook_formula(capsys):
    def textbook(dy, x, gamma, eps):
        axes = _axes(x)
        m = x.size // x.shape[1]
        mu = x.mean(axis=axes, keepdims=True)
        inv_std = 1 / np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + eps)
        x_hat = (x - mu) * inv_std
        dx = _bc(gamma, x) * inv_std / m * (m * dy - dy.sum(axis=axes, keepdims=True)
                                           - x_hat * (dy * x_hat).sum(axis=axes, keepdims=True))
        return dx, (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)

    assert check_bn_backward(textbook) is True


@pytest.mark.parametrize(
    "opts, expected",
    [
        (dict(xhat_term=False), "x_hat * mean(dy * x_hat) is missing"),
        (dict(mean_term=False), "- mean(dy) is missing"),
        (dict(mean_term=False, xhat_term=False), "treats mu and var as constants"),
        (dict(use_gamma=False), "missing the factor gamma"),
        (dict(eps_mode="none"), "inv_std ignores eps"),
        (dict(eps_mode="outside"), "eps is outside the square root"),
        (dict(ddof=1), "unbiased divisor m - 1"),
        (dict(mean_div=lambda m: m - 1), "the mean terms divide by m - 1"),
        (dict(inplace=True), "your function modified dy in place"),
    ],
)
def test_bn_checker_diagnoses(capsys, opts, expected):
    assert check_bn_backward(lambda dy, x, g, eps: bn_backward(dy, x, g, eps, **opts)) is False
    out = capsys.readouterr().out
    assert expected in out, out
    assert "case 1" in out or "case 3" in out or "case 4" in out


def test_bn_checker_eps_mistake_found_on_small_variance(capsys):
    # the eps mistakes are caught already on case 1; on the small-variance case they are gross errors
    fn = lambda dy, x, g, eps: bn_backward(dy, x, g, eps, eps_mode="none")
    assert check_bn_backward(fn) is False
    assert "relative error" in capsys.readouterr().out


def test_bn_checker_diagnoses_wrong_axis_2d(capsys):
    # (N, C) input, sums over axis 1 (per sample) instead of axis 0
    fn = lambda dy, x, g, eps: bn_backward(dy, x, g, eps, axes=(1,) if x.ndim == 2 else _axes(x))
    assert check_bn_backward(fn) is False
    out = capsys.readouterr().out
    assert "dgamma has shape (6,), expected (4,)" in out and "Reduce over every axis except the channel axis 1" in out


def test_bn_checker_diagnoses_batch_axis_only_in_dgamma(capsys):
    # forgets the spatial axes in dgamma/dbeta of a 4-d input
    fn = lambda dy, x, g, eps: bn_backward(dy, x, g, eps, dgamma_axes=(0,))
    assert check_bn_backward(fn) is False
    out = capsys.readouterr().out
    assert "case 2" in out and "Your sum ran over axis 0 only" in out


def test_bn_checker_diagnoses_batch_axis_only_in_statistics(capsys):
    # statistics and dx over axis 0 only, dgamma/dbeta over the right axes: shapes come out right
    def fn(dy, x, g, eps):
        dx, _, _ = bn_backward(dy, x, g, eps, axes=(0,))
        _, dgamma, dbeta = bn_backward(dy, x, g, eps)
        return dx, dgamma, dbeta

    assert check_bn_backward(fn) is False
    out = capsys.readouterr().out
    assert "case 2" in out and "dx differs from the reference" in out and "run over axis 0 only" in out


def test_bn_checker_diagnoses_keepdims(capsys):
    def keepdims(dy, x, g, eps):
        dx, dgamma, dbeta = bn_backward(dy, x, g, eps)
        return dx, _bc(dgamma, x), _bc(dbeta, x)

    assert check_bn_backward(keepdims) is False
    assert "dgamma has shape (1, 4), expected (4,). Return a flat (C,) array" in capsys.readouterr().out


def test_bn_checker_diagnoses_dgamma_mistakes(capsys):
    def means(dy, x, g, eps):
        dx, dgamma, dbeta = bn_backward(dy, x, g, eps)
        m = x.size // x.shape[1]
        return dx, dgamma / m, dbeta / m

    assert check_bn_backward(means) is False
    assert "they are sums over the batch" in capsys.readouterr().out

    def from_xmu(dy, x, g, eps):
        dx, _, dbeta = bn_backward(dy, x, g, eps)
        return dx, (dy * (x - x.mean(axis=0))).sum(axis=0), dbeta

    assert check_bn_backward(from_xmu) is False
    assert "dgamma uses x - mu instead of x_hat" in capsys.readouterr().out


def test_bn_checker_reports_unknown_mistake_and_errors(capsys):
    fn = lambda dy, x, g, eps: tuple(o * 1.01 for o in bn_backward(dy, x, g, eps))
    assert check_bn_backward(fn) is False
    out = capsys.readouterr().out
    assert "not a mistake this checker recognises" in out and "relative error = 0.01" in out

    def raises(dy, x, g, eps):
        raise NotImplementedError("todo")

    assert check_bn_backward(raises) is False
    assert "raises raises NotImplementedError: fill in the stub" in capsys.readouterr().out

    assert check_bn_backward(lambda dy, x, g, eps: bn_backward(dy, x, g, eps)[0]) is False
    assert "returned a NumPy array, expected a tuple of 3: (dx, dgamma, dbeta)" in capsys.readouterr().out


def test_bn_checker_dx_only_with_nones(capsys):
    """(dx, None, None): the reader skipped dgamma and dbeta; not 'the sum ran over the wrong axes'."""
    def dx_only(dy, x, g, eps):
        return bn_backward(dy, x, g, eps)[0], None, None

    assert check_bn_backward(dx_only) is False
    out = capsys.readouterr().out
    assert "dgamma is None, expected a NumPy array of shape (4,)" in out, out
    assert "wrong axes" not in out


def test_bn_checker_two_tuple(capsys):
    def two(dy, x, g, eps):
        dx, dgamma, _ = bn_backward(dy, x, g, eps)
        return dx, dgamma

    assert check_bn_backward(two) is False
    assert "returned a tuple of 2, expected a tuple of 3: (dx, dgamma, dbeta)" in capsys.readouterr().out


def test_bn_checker_float32_result(capsys):
    """Right formula in single precision: named as a dtype problem, not 'no common mistake'."""
    def single(dy, x, g, eps):
        return tuple(o.astype(np.float32) for o in bn_backward(dy, x, g, eps))

    assert check_bn_backward(single) is False
    out = capsys.readouterr().out
    assert "dx has dtype float32, expected float64" in out, out
    assert "not a mistake" not in out


def test_bn_checker_mutated_x(capsys):
    """x -= mu in place: the message names x, not dy."""
    def centres_x(dy, x, g, eps):
        axes = _axes(x)
        mu = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        x -= mu
        x_hat = x / np.sqrt(var + eps)
        inv_std = _bc(g, x) / np.sqrt(var + eps)
        dx = inv_std * (dy - dy.mean(axis=axes, keepdims=True)
                        - x_hat * (dy * x_hat).mean(axis=axes, keepdims=True))
        return dx, (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)

    assert check_bn_backward(centres_x) is False
    out = capsys.readouterr().out
    assert "your function modified x in place" in out and "dy -=" not in out, out


def test_bn_checker_silent_when_not_verbose(capsys):
    assert check_bn_backward(bn_backward, verbose=False) is True
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------------------
# check_numerical_gradient
# ----------------------------------------------------------------------------------------

def numgrad(f, x, h, *, scheme="central", divide=2.0, step=None, restore="exact", flat_only=False):
    """A reader-style numerical gradient with switches for the mistakes."""
    step = h if step is None else step
    grad = np.zeros_like(x)
    indices = range(x.shape[0]) if flat_only else np.ndindex(x.shape)
    for i in indices:
        old = x[i]
        if restore == "add":  # the add-back pattern: x[i] += h; x[i] -= 2h; x[i] += h (not exact)
            x[i] += step
            fp = f(x)
            x[i] -= 2 * step
            fm = f(x)
            x[i] += step
            grad[i] = (fp - fm) / (divide * step)
            continue
        x[i] = old + step
        fp = f(x)
        x[i] = old - step if scheme == "central" else old
        fm = f(x)
        if restore == "exact":
            x[i] = old
        grad[i] = (fp - fm) / (divide * step if scheme == "central" else step)
    return grad


def test_numgrad_checker_accepts_correct(capsys):
    assert check_numerical_gradient(numgrad) is True
    assert "all 3 cases pass" in capsys.readouterr().out


def test_numgrad_checker_accepts_copying_solution():
    def on_copies(f, x, h):
        g = np.empty_like(x)
        for i in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[i] += h
            xm[i] -= h
            g[i] = (f(xp) - f(xm)) / (2 * h)
        return g

    assert check_numerical_gradient(on_copies, verbose=False) is True


@pytest.mark.parametrize(
    "opts, expected",
    [
        (dict(scheme="forward"), "forward differences"),
        (dict(divide=1.0), "divide by h instead of 2h"),
        (dict(divide=4.0), "divide by 4h"),
        (dict(step=1e-6), "does not depend on the step h = 0.01"),
        (dict(step=1e-1), "central differences with a step of about 0.1"),
        (dict(restore="none"), "your function modified x in place; save the old value"),
        (dict(restore="add"), "your function modified x in place; save the old value"),
        (dict(flat_only=True), "case 2"),
    ],
)
def test_numgrad_checker_diagnoses(capsys, opts, expected):
    fn = lambda f, x, h: numgrad(f, x, h, **opts)

    assert check_numerical_gradient(fn) is False
    out = capsys.readouterr().out
    assert expected in out, out


def test_numgrad_checker_diagnoses_backward_and_shape(capsys):
    def backward(f, x, h):
        g = np.empty_like(x)
        for i in np.ndindex(x.shape):
            xm = x.copy()
            xm[i] -= h
            g[i] = (f(x) - f(xm)) / h
        return g

    assert check_numerical_gradient(backward) is False
    assert "backward differences" in capsys.readouterr().out

    assert check_numerical_gradient(lambda f, x, h: numgrad(f, x, h).ravel()) is False
    assert "return an array of x's shape (5,)" not in capsys.readouterr().out  # 1-d passes case 1 ...
    assert check_numerical_gradient(lambda f, x, h: numgrad(f, x, h).ravel(), verbose=True) is False
    assert "case 2" in capsys.readouterr().out  # ... and the (3, 4) case reports the shape
