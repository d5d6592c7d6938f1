"""Checker for the coding exercise of chapters/01_why_normalize.ipynb (feature standardisation).

- :func:`check_standardize`: a reader's NumPy ``fn(X_train, X_test, eps) -> (Z_train, Z_test)`` that
  standardises the columns (features) of both arrays with the **training** statistics:
  ``Z = (X - mu_train) / sqrt(var_train + eps)``, ``mu_train`` and ``var_train`` (biased, divisor n) taken over
  the rows (examples) of ``X_train``, one per feature.

The checker runs the reader's function on several cases against an independent float64 reference. At the
first failing case it prints which case and which output (Z_train or Z_test) failed, the largest error and
where, and the likely cause, found by comparing the output with every combination of the classic mistakes:
test statistics for the test set, statistics over the wrong axis, dividing by the variance instead of the
standard deviation, eps missing or outside the square root, the unbiased variance. It returns True/False.

Defined in: chapters/01_why_normalize.ipynb
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from bnlib.exercises.harness import Case, Mistake, run

__all__ = ["check_standardize"]


def _stats(X: np.ndarray, axis: int, ddof: int) -> tuple[np.ndarray, np.ndarray]:
    mu = X.mean(axis=axis, keepdims=True)
    m = X.shape[axis]
    var = ((X - mu) ** 2).sum(axis=axis, keepdims=True) / (m - ddof)
    return mu, var


def _variant(X_train, X_test, eps, *, test_stats="train", axis=0, ddof=0, denom="sqrt_inside"):
    """Standardisation with one choice per ingredient; the defaults are correct.

    test_stats : "train" (the test set uses the training mu and var: correct) or "test" (its own).
    axis       : 0 (statistics over the examples, one per feature: correct) or 1 (one per example).
    ddof       : 0 (biased variance: correct) or 1 (unbiased).
    denom      : "sqrt_inside" (sqrt(var + eps): correct), "sqrt_outside" (sqrt(var) + eps),
                 "sqrt_none" (sqrt(var): no eps), "var" (var + eps: the square root forgotten),
                 "var_none" (var).
    """

    def apply(X, mu, var):
        with np.errstate(divide="ignore", invalid="ignore"):
            d = {
                "sqrt_inside": np.sqrt(var + eps),
                "sqrt_outside": np.sqrt(var) + eps,
                "sqrt_none": np.sqrt(var),
                "var": var + eps,
                "var_none": var,
            }[denom]
            return (X - mu) / d

    mu, var = _stats(X_train, axis, ddof)
    Z_train = apply(X_train, mu, var)
    if test_stats == "test" or axis == 1:  # per-example statistics can only come from the example itself
        mu, var = _stats(X_test, axis, ddof)
    Z_test = apply(X_test, mu, var)
    return Z_train, Z_test


_CAUSES = {
    ("test_stats", "test"): "the test set was standardised with its own mean and variance; use the training "
                            "statistics for both (the test set stands for data you have not seen: its "
                            "statistics are not available when the model is fitted)",
    ("axis", 1): "the statistics were taken over the wrong axis (one mean per example, axis=1); take them over "
                 "the examples, one per feature: X_train.mean(axis=0), X_train.var(axis=0)",
    ("ddof", 1): "you used the unbiased variance (divisor n - 1, ddof=1); use the biased one (divisor n, "
                 "np.var's default), the convention batch normalization uses",
    ("denom", "sqrt_outside"): "eps is outside the square root ((X - mu) / (sqrt(var) + eps)); "
                               "use (X - mu) / sqrt(var + eps)",
    ("denom", "sqrt_none"): "eps is missing: divide by sqrt(var + eps), not sqrt(var) (a constant feature has "
                            "var = 0 and gives 0/0 = NaN)",
    ("denom", "var"): "you divided by the variance (var + eps) instead of the standard deviation "
                      "sqrt(var + eps)",
    ("denom", "var_none"): "you divided by the variance instead of the standard deviation, and without eps: "
                           "divide by sqrt(var + eps)",
}

_CORRECT = {"test_stats": "train", "axis": 0, "ddof": 0, "denom": "sqrt_inside"}


def _mistakes(case):
    """Every combination of the classic mistakes, fewest first (the table the harness matches)."""
    X_train, X_test, eps = case.args
    choices = {
        "test_stats": ["train", "test"],
        "axis": [0, 1],
        "ddof": [0, 1],
        "denom": ["sqrt_inside", "sqrt_outside", "sqrt_none", "var", "var_none"],
    }
    combos = [dict(zip(choices, vals)) for vals in itertools.product(*choices.values())]
    combos = [c for c in combos if not (c["axis"] == 1 and c["test_stats"] == "test")]  # the same thing
    combos.sort(key=lambda c: sum(c[k] != _CORRECT[k] for k in c))
    for combo in combos[1:]:
        yield Mistake([_CAUSES[(k, v)] for k, v in combo.items() if v != _CORRECT[k]],
                      lambda case, combo=combo: _variant(X_train, X_test, eps, **combo))


def _raise_hint(e, case):
    if "broadcast" in str(e):
        return ("statistics over the wrong axis: one mean per example (axis=1) does not fit the test set; take "
                "one mean per feature, X_train.mean(axis=0)")
    return None


def _cases() -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(name, X_train, X_test, eps): features on different scales, test data drawn from a shifted distribution."""
    rng = np.random.default_rng(1)
    cases = []
    # A: 4 features on very different scales and offsets; the test set is shifted and rescaled
    mu, s = np.array([0.0, 50.0, -3.0, 1e3]), np.array([1.0, 10.0, 0.1, 200.0])
    cases.append(("A: 40 training / 15 test examples, 4 features on different scales",
                  mu + s * rng.normal(size=(40, 4)), 1.5 * mu + 2.0 + 0.7 * s * rng.normal(size=(15, 4)), 1e-5))
    # B: a small-variance feature and a large eps, where the place of eps matters
    mu, s = np.array([2.0, -1.0, 0.5]), np.array([0.01, 1.0, 0.003])
    cases.append(("B: 30 / 10 examples, small variances, eps=1e-4",
                  mu + s * rng.normal(size=(30, 3)), mu + s * rng.normal(size=(10, 3)) + 0.02, 1e-4))
    # C: a constant feature (variance 0): only eps keeps the result finite
    Xtr = rng.normal(size=(25, 3)) * [1.0, 3.0, 1.0] + [0.0, 1.0, 0.0]
    Xtr[:, 2] = 7.0
    Xte = rng.normal(size=(6, 3)) * [1.0, 3.0, 1.0]
    Xte[:, 2] = 8.0
    cases.append(("C: 25 / 6 examples, feature 2 is constant in the training set", Xtr, Xte, 1e-5))
    return cases


def check_standardize(fn: Callable, verbose: bool = True) -> bool:
    """Check ``fn(X_train, X_test, eps) -> (Z_train, Z_test)``: standardisation with training statistics.

    X_train has shape (n_train, d), X_test (n_test, d). Runs three cases against an independent float64
    reference; prints one line per passing case and, at the first failure, the case, the output, the largest
    error, where it is, and the likely cause. Returns True if every output agrees to 1e-10.
    """
    cases = [Case(name, (X_train, X_test, eps), _variant(X_train, X_test, eps), 1e-10)
             for name, X_train, X_test, eps in _cases()]
    return run(fn, cases, inputs=("X_train", "X_test", "eps"), outputs=("Z_train", "Z_test"),
               mistakes=_mistakes, raise_hints=_raise_hint,
               unknown="every column of Z_train should have mean 0 and variance var / (var + eps) (just under 1)",
               summary="Z_train and Z_test agree with the reference (max |error| <= 1e-10)", verbose=verbose)
