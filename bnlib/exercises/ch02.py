"""Checker for the coding exercise of chapters/02_bn_transform.ipynb (the batch-norm transform).

- :func:`check_batchnorm_forward`: a reader's NumPy ``fn(x, gamma, beta, eps) -> y``, the training-mode
  batch-norm transform (Algorithm 1 of the paper) for ``x`` of shape (N, C) or (N, C, *spatial).

The checker runs the reader's function on several cases (2D, 3D and 4D inputs, a small-variance case with a
large eps, a batch of two) against an independent float64 reference. On the first failing case it prints
which case and which output failed, the largest error, and the likely cause, found by comparing the reader's
output with every combination of the classic mistakes (unbiased variance, wrong axes, eps outside the square
root or missing, no square root, missing or swapped gamma/beta). It returns True or False.

Defined in: chapters/02_bn_transform.ipynb
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from bnlib.exercises.harness import Case, Mistake, run

__all__ = ["check_batchnorm_forward"]


def _channel_shape(x: np.ndarray) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector along axis 1 of x: (1, C, 1, ...)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _variant(x, gamma, beta, eps, *, axes="batch", ddof=0, eps_mode="inside", affine="both"):
    """Batch norm with one choice per ingredient; the defaults are the correct transform.

    axes     : "batch" (every axis but 1: correct), "example" (every axis but 0: per example, LayerNorm's
               axes), "axis0" (axis 0 only: one statistic per channel and position), "all" (one global
               statistic).
    ddof     : 0 (biased variance: correct) or 1 (unbiased).
    eps_mode : "inside" (sqrt(var + eps): correct), "outside" (sqrt(var) + eps), "none" (sqrt(var)),
               "nosqrt" (var + eps, the square root forgotten).
    affine   : "both" (gamma * x_hat + beta: correct), "none", "gamma" (no beta), "beta" (no gamma),
               "swapped" (beta * x_hat + gamma).
    """
    red = {
        "batch": (0,) + tuple(range(2, x.ndim)),
        "example": tuple(range(1, x.ndim)),
        "axis0": (0,),
        "all": tuple(range(x.ndim)),
    }[axes]
    mu = x.mean(axis=red, keepdims=True)
    m = int(np.prod([x.shape[a] for a in red]))
    var = ((x - mu) ** 2).sum(axis=red, keepdims=True) / (m - ddof) if m - ddof > 0 else np.full_like(mu, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = {
            "inside": np.sqrt(var + eps),
            "outside": np.sqrt(var) + eps,
            "none": np.sqrt(var),
            "nosqrt": var + eps,
        }[eps_mode]
        x_hat = (x - mu) / denom
    g, b = gamma.reshape(_channel_shape(x)), beta.reshape(_channel_shape(x))
    return {
        "both": g * x_hat + b,
        "none": x_hat,
        "gamma": g * x_hat,
        "beta": x_hat + b,
        "swapped": b * x_hat + g,
    }[affine]


def _reference(x, gamma, beta, eps):
    """The correct transform: biased variance over every axis but 1, eps inside the root, then gamma, beta."""
    return _variant(x, gamma, beta, eps)


_CAUSES = {
    ("ddof", 1): "you used the unbiased variance (divisor m - 1: np.var(..., ddof=1), or torch.var's default); "
                 "batch norm normalises with the biased variance (divisor m), as in Algorithm 1",
    ("axes", "example"): "you took the statistics over the features of each example (every axis but 0) "
                         "instead of over the batch: those are LayerNorm's axes; batch norm averages over "
                         "axis 0 (and the spatial axes), one mean per feature/channel",
    ("axes", "axis0"): "you reduced over axis 0 only, which gives one mean per channel AND position "
                       "(mu of shape (1, C, *spatial)); a channel's statistics pool the N * prod(spatial) "
                       "values of that channel: axis=(0,) + tuple(range(2, x.ndim))",
    ("axes", "all"): "you took one mean and variance over the whole array; batch norm has one per channel "
                     "(reduce every axis but 1)",
    ("eps_mode", "outside"): "eps is outside the square root ((x - mu) / (sqrt(var) + eps)); "
                             "use (x - mu) / sqrt(var + eps)",
    ("eps_mode", "none"): "eps is missing: divide by sqrt(var + eps), not sqrt(var)",
    ("eps_mode", "nosqrt"): "you divided by var + eps and forgot the square root: divide by sqrt(var + eps)",
    ("affine", "none"): "you forgot gamma and beta: the output is x_hat, it should be gamma * x_hat + beta",
    ("affine", "gamma"): "you forgot beta: y = gamma * x_hat + beta",
    ("affine", "beta"): "you forgot gamma: y = gamma * x_hat + beta",
    ("affine", "swapped"): "gamma and beta are swapped: y = gamma * x_hat + beta (gamma scales, beta shifts)",
}


def _mistakes(case):
    """Every combination of the classic mistakes, fewest first."""
    x, gamma, beta, eps = case.args
    choices = {
        "axes": ["batch", "example", "all"] + (["axis0"] if x.ndim > 2 else []),
        "ddof": [0, 1],
        "eps_mode": ["inside", "outside", "none", "nosqrt"],
        "affine": ["both", "none", "gamma", "beta", "swapped"],
    }
    correct = {"axes": "batch", "ddof": 0, "eps_mode": "inside", "affine": "both"}
    combos = [dict(zip(choices, vals)) for vals in itertools.product(*choices.values())]
    combos.sort(key=lambda c: sum(c[k] != correct[k] for k in c))
    for combo in combos[1:]:
        yield Mistake([_CAUSES[(k, v)] for k, v in combo.items() if v != correct[k]],
                      lambda case, combo=combo: _variant(x, gamma, beta, eps, **combo))


def _raise_hint(e, case):
    x = case.args[0]
    if "broadcast" in str(e):
        return (f"a (C,) vector (mu, var, gamma or beta) does not broadcast against x of shape {x.shape}; keep "
                f"the reduced axes (keepdims=True) and reshape gamma and beta to {_channel_shape(x)}, i.e. "
                f"(1, C) + (1,) * (x.ndim - 2)")
    return None


def _cases() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]]:
    """(name, x, gamma, beta, eps); N, C and the spatial sizes all differ so that wrong axes show."""
    rng = np.random.default_rng(2)
    cases = []
    for name, shape, scale, eps in [
        ("A: (N, C) = (16, 5)", (16, 5), 1.0, 1e-5),
        ("B: (N, C) = (8, 3), small variances, eps=1e-3", (8, 3), 0.02, 1e-3),
        ("C: (N, C, L) = (4, 3, 7)", (4, 3, 7), 1.0, 1e-5),
        ("D: (N, C, H, W) = (4, 3, 5, 6)", (4, 3, 5, 6), 1.0, 1e-5),
        ("E: (N, C) = (2, 4), a batch of two", (2, 4), 1.0, 1e-5),
    ]:
        C = shape[1]
        cs = (1, C) + (1,) * (len(shape) - 2)
        offset = rng.uniform(-5, 5, size=cs)
        spread = scale * rng.uniform(0.5, 3.0, size=cs)
        pattern = rng.normal(size=(1, 1) + shape[2:])  # a per-position pattern shared by the channels
        x = offset + spread * (rng.normal(size=shape) + pattern)
        gamma = rng.uniform(0.5, 2.0, size=C)
        beta = rng.uniform(-2.0, 2.0, size=C)
        cases.append((name, x, gamma, beta, eps))
    return cases


def check_batchnorm_forward(fn: Callable, verbose: bool = True) -> bool:
    """Check ``fn(x, gamma, beta, eps) -> y``, the batch-norm transform with batch statistics.

    x has shape (N, C) or (N, C, *spatial); gamma and beta have shape (C,). Runs five cases against an
    independent float64 reference; prints one line per passing case and, at the first failure, which case,
    the largest error, where it is, and the likely cause. Returns True if every case agrees to 1e-10.
    """
    cases = [Case(name, (x, gamma, beta, eps), _reference(x, gamma, beta, eps), 1e-10)
             for name, x, gamma, beta, eps in _cases()]
    return run(fn, cases, inputs=("x", "gamma", "beta", "eps"), outputs=("y",), mistakes=_mistakes,
               raise_hints=_raise_hint,
               unknown="compare the mean and variance of each output channel y[:, c] with beta[c] and "
                       "gamma[c]**2 * var / (var + eps)",
               summary="y agrees with the reference (max |error| <= 1e-10)", verbose=verbose)
