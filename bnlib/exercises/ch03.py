"""Checkers for the coding exercises of the chapter on the backward pass of batch norm.

Defined in: chapters/03_bn_backward.ipynb

    check_bn_backward(fn)          fn(dy, x, gamma, eps) -> (dx, dgamma, dbeta), the compact backward
    check_numerical_gradient(fn)   fn(f, x, h) -> gradient of the scalar function f at x (central differences)

Each checker runs the reader's function on several cases against a reference, prints a precise
diagnosis of the first failure (which case, which output, the largest error, the likely cause) and
returns True or False. The likely cause is found by comparing the reader's result with the result of
each common mistake, computed here on the same inputs.
"""

from __future__ import annotations

import numpy as np

from bnlib.exercises.harness import Case, Mistake, run

__all__ = ["check_bn_backward", "check_numerical_gradient"]


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------

def _rel(a, b) -> float:
    """Largest absolute difference relative to the largest magnitude of b (0 when both are 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


# ----------------------------------------------------------------------------------------
# Exercise: the compact backward pass
# ----------------------------------------------------------------------------------------

def _bn_cases():
    """(name, x, gamma, eps) cases; N != C everywhere so that a wrong axis changes shapes."""
    rng = np.random.default_rng(3)
    cases = []
    x = rng.normal(1.0, 2.0, size=(6, 4))
    cases.append(("(N, C) = (6, 4)", x, rng.uniform(0.5, 2.0, 4), 1e-5))
    x = rng.normal(-0.5, 1.5, size=(3, 4, 2, 5))
    cases.append(("(N, C, H, W) = (3, 4, 2, 5)", x, rng.uniform(0.5, 2.0, 4), 1e-5))
    # small variance, of the order of eps: where eps must sit inside the square root
    x = rng.normal(0.3, 3e-3, size=(8, 3))
    cases.append(("(N, C) = (8, 3), std 3e-3 (variance comparable to eps)", x, rng.uniform(0.5, 2.0, 3), 1e-5))
    x = rng.normal(2.0, 1.0, size=(2, 3, 7))
    cases.append(("(N, C, L) = (2, 3, 7), eps = 0.1", x, rng.uniform(0.5, 2.0, 3), 0.1))
    return cases


def _axes(x):
    return (0,) + tuple(range(2, x.ndim))


def _bc(a, x):
    """(C,) -> (1, C, 1, ...) broadcasting against x."""
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    return np.asarray(a).reshape(shape)


def _reference(dy, x, gamma, eps):
    from bnlib.numpy_bn import batch_norm_backward, batch_norm_forward

    _, cache = batch_norm_forward(x, gamma, np.zeros_like(gamma), eps)
    return batch_norm_backward(dy, cache)


def _variant(dy, x, gamma, eps, *, axes=None, ddof_var=0, mean_div=0, eps_mode="inside",
             use_gamma=True, mean_term=True, xhat_term=True, dgamma_from="x_hat", reduce="sum"):
    """The backward pass with one deliberate change; the defaults give the correct result."""
    axes = _axes(x) if axes is None else axes
    m = int(np.prod([x.shape[a] for a in axes]))
    mu = x.mean(axis=axes, keepdims=True)
    xmu = x - mu
    var = (xmu**2).sum(axis=axes, keepdims=True) / (m - ddof_var)
    if eps_mode == "inside":
        inv_std = 1.0 / np.sqrt(var + eps)
    elif eps_mode == "none":
        inv_std = 1.0 / np.sqrt(var)
    else:  # "outside"
        inv_std = 1.0 / (np.sqrt(var) + eps)
    x_hat = xmu * inv_std
    g = _bc(gamma, x) if use_gamma else 1.0
    n = m - mean_div
    dx = dy.copy()
    if mean_term:
        dx = dx - dy.sum(axis=axes, keepdims=True) / n
    if xhat_term:
        dx = dx - x_hat * (dy * x_hat).sum(axis=axes, keepdims=True) / n
    dx = g * inv_std * dx
    red = (lambda a: a.sum(axis=axes)) if reduce == "sum" else (lambda a: a.mean(axis=axes))
    dgamma = red(dy * (x_hat if dgamma_from == "x_hat" else xmu))
    dbeta = red(dy)
    return dx, dgamma, dbeta


# (key, variant options, the likely cause shown to the reader)
_BN_MISTAKES = [
    ("no x_hat term", dict(xhat_term=False),
     "the term - x_hat * mean(dy * x_hat) is missing from dx: the variance depends on x too, "
     "so the path x -> var -> inv_std -> x_hat contributes (see the derivation of the compact formula)"),
    ("no mean term", dict(mean_term=False),
     "the term - mean(dy) is missing from dx: the mean depends on x too, so the path x -> mu contributes"),
    ("no terms", dict(mean_term=False, xhat_term=False),
     "dx = gamma * inv_std * dy treats mu and var as constants (that is the eval-mode gradient); "
     "in training both depend on x: subtract mean(dy) and x_hat * mean(dy * x_hat)"),
    ("no gamma", dict(use_gamma=False),
     "dx is missing the factor gamma: dL/dx_hat = gamma * dL/dy"),
    ("eps ignored", dict(eps_mode="none"),
     "inv_std ignores eps: use 1 / sqrt(var + eps), the same inv_std as the forward pass"),
    ("eps outside", dict(eps_mode="outside"),
     "eps is outside the square root: use 1 / sqrt(var + eps), not 1 / (sqrt(var) + eps)"),
    ("unbiased variance", dict(ddof_var=1),
     "the variance uses the unbiased divisor m - 1: batch norm normalises with the biased variance, "
     "mean((x - mu)**2) (np.var's default ddof=0)"),
    ("n-1 in mean terms", dict(mean_div=1),
     "the mean terms divide by m - 1: mean(dy) and mean(dy * x_hat) are plain means over the m values "
     "of a channel (the m - 1 of an unbiased variance has no place here)"),
    ("dgamma from x - mu", dict(dgamma_from="xmu"),
     "dgamma uses x - mu instead of x_hat: dgamma = sum(dy * x_hat)"),
    ("means for dgamma/dbeta", dict(reduce="mean"),
     "dgamma and dbeta are means; they are sums over the batch (and spatial) axes: "
     "every value of a channel adds its contribution"),
]


def _wrong_axis_variants(x):
    """Reductions over the wrong axes, for inputs where the shapes still come out right."""
    out = []
    if x.ndim > 2:
        out.append(("batch axis only", dict(axes=(0,)),
                    "the sums/means run over axis 0 only: for (N, C, *spatial) input a channel's statistics "
                    "and sums run over the batch AND the spatial axes, axis=(0, 2, 3, ...)"))
    return out


def _bn_mistakes(case):
    dy, x, gamma, eps = case.args
    for _, opts, cause in _BN_MISTAKES:
        yield Mistake(cause, lambda case, opts=opts: _variant(dy, x, gamma, eps, **opts))
    for _, opts, cause in _wrong_axis_variants(x):  # about dx only: its dgamma and dbeta have other shapes
        yield Mistake(cause, lambda case, opts=opts: (_variant(dy, x, gamma, eps, **opts)[0], None, None))


def _bn_shape_hint(label, o, case):
    x = case.args[1]
    C = x.shape[1]
    if label == "dx":
        return "dx has the shape of x"
    if o.size == C:
        return f"Return a flat (C,) array: sum without keepdims, or reshape with {label}.reshape(-1)"
    if o.shape == (C,) + x.shape[2:]:
        return f"Your sum ran over axis 0 only; for (N, C, *spatial) input sum over the spatial axes too: axis={_axes(x)}"
    return (f"Reduce over every axis except the channel axis 1: axis={_axes(x)} here (a shape of {o.shape} means "
            f"the sum ran over the wrong axes)")


def check_bn_backward(fn, verbose: bool = True, tol: float = 1e-8) -> bool:
    """Check a reader's compact batch-norm backward pass.

    Defined in: chapters/03_bn_backward.ipynb (exercise ex-bwd-compact)

    fn(dy, x, gamma, eps) -> (dx, dgamma, dbeta), for x of shape (N, C) or (N, C, *spatial), gamma of
    shape (C,), training-mode statistics (biased variance over every axis but 1). The function computes
    the forward statistics it needs from x itself.

    Runs fn on four cases against bnlib.numpy_bn.batch_norm_backward (float64), prints the first failure
    with its likely cause (missing terms, missing gamma, eps, unbiased variance, wrong axis, ...) and
    returns True if every output agrees to a relative error below tol.
    """
    rng = np.random.default_rng(30)
    cases = []
    for k, (name, x, gamma, eps) in enumerate(_bn_cases(), 1):
        dy = rng.normal(size=x.shape)
        cases.append(Case(f"{k}: {name}", (dy, x, gamma, eps), tuple(_reference(dy, x, gamma, eps)), tol))
    return run(fn, cases, inputs=("dy", "x", "gamma", "eps"), outputs=("dx", "dgamma", "dbeta"),
               mistakes=_bn_mistakes, rel=True, shape_hint=_bn_shape_hint,
               mutation_hints={"dy": "work on new arrays (dx = dy - ..., not dy -= ...)",
                               "x": "compute on new arrays (x_hat = (x - mu) * inv_std, not x -= mu)"},
               unknown="compare with dx = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat)), "
                       "dgamma = sum(dy * x_hat), dbeta = sum(dy), means and sums over every axis but 1",
               summary=f"dx, dgamma and dbeta agree with the reference (relative error below {tol:.0e})",
               verbose=verbose)


# ----------------------------------------------------------------------------------------
# Exercise: a numerical gradient by central differences
# ----------------------------------------------------------------------------------------

def _sin_loss(w):
    """f(x) = sum(w * sin(x)): its gradient is w * cos(x), and the central difference with step h is
    exactly w * cos(x) * sin(h) / h (sin(x + h) - sin(x - h) = 2 cos(x) sin(h))."""
    return lambda x: float(np.sum(w * np.sin(x)))


def _step_of(g, exact):
    """The step h' for which g == exact * sin(h') / h' (central differences on sum(w * sin(x))), or None."""
    mask = np.abs(exact) > 0.1 * np.max(np.abs(exact))
    r = float(np.median(g[mask] / exact[mask]))
    if not 0.0 < 1.0 - r < 0.5:
        return None
    h_eff = float(np.sqrt(6.0 * (1.0 - r)))
    for _ in range(5):  # Newton steps on sin(h)/h = r, from the series guess
        h_eff -= (np.sin(h_eff) / h_eff - r) / ((h_eff * np.cos(h_eff) - np.sin(h_eff)) / h_eff**2)
    return h_eff if _rel(g, exact * np.sin(h_eff) / h_eff) < 1e-4 else None


def _numgrad_mistakes(case):
    f, x, h = case.args
    exact, target = case.data["exact"], case.data["target"]
    central = exact * np.sin(h) / h
    fwd, bwd = np.empty_like(x), np.empty_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        fwd[i] = (f(xp) - f(x)) / h
        bwd[i] = (f(x) - f(xm)) / h
    yield Mistake("forward differences (f(x + h) - f(x)) / h: their error is of order h (here "
                  f"{_rel(fwd, exact):.1e}); central differences (f(x + h) - f(x - h)) / (2h) cancel the "
                  "h term and err by order h**2", lambda case: fwd)
    yield Mistake("backward differences (f(x) - f(x - h)) / h: their error is of order h; use central "
                  "differences (f(x + h) - f(x - h)) / (2h)", lambda case: bwd)
    yield Mistake("you divide by h instead of 2h: x + h and x - h are 2h apart", lambda case: 2 * central)
    yield Mistake("you divide by 4h (or step by h/2): x + h and x - h are 2h apart, divide by 2h",
                  lambda case: central / 2)
    if target == "central":
        yield Mistake(f"your result does not depend on the step h = {h:g} that was passed: use the argument h "
                      "rather than a step of your own", lambda case: exact)
    got = np.asarray(case.data["got"][0], dtype=np.float64)
    h_eff = _step_of(got, exact) if _rel(got, exact) < 0.5 else None
    if h_eff is not None:
        yield Mistake(f"the result looks like central differences with a step of about {h_eff:.1g} instead of "
                      f"the h = {h:g} that was passed: use the argument h as the step",
                      lambda case: exact * np.sin(h_eff) / h_eff)


def check_numerical_gradient(fn, verbose: bool = True) -> bool:
    """Check a reader's numerical gradient by central differences.

    Defined in: chapters/03_bn_backward.ipynb (exercise ex-bwd-numgrad)

    fn(f, x, h) -> array of x's shape whose element i is (f(x + h e_i) - f(x - h e_i)) / (2 h), for a
    scalar function f and a float64 array x of any shape. fn must leave x as it found it.

    Cases: f(x) = sum(w * sin(x)) on a vector and a matrix with h = 1e-5 (compared with the exact gradient
    w * cos(x)), and with h = 1e-2 (compared with the exact central difference w * cos(x) * sin(h) / h, which
    tells the scheme and the step apart). Prints the first failure with its likely cause (forward or backward
    differences, dividing by h instead of 2h, ignoring h, not restoring x, ...) and returns True/False.
    """
    rng = np.random.default_rng(31)
    raw = [
        ("1: x of shape (5,), h = 1e-5", rng.uniform(-2, 2, 5), 1e-5, "gradient"),
        ("2: x of shape (3, 4), h = 1e-5", rng.uniform(-2, 2, (3, 4)), 1e-5, "gradient"),
        ("3: x of shape (2, 3, 2), h = 1e-2", rng.uniform(-2, 2, (2, 3, 2)), 1e-2, "central"),
    ]
    cases = []
    for name, x, h, target in raw:
        w = rng.uniform(0.5, 2.0, x.shape)
        exact = w * np.cos(x)
        ref = exact if target == "gradient" else exact * np.sin(h) / h
        cases.append(Case(name, (_sin_loss(w), x, h), ref, 1e-8 if target == "gradient" else 1e-9,
                          data={"exact": exact, "target": target}))

    def raise_hint(e, case):
        if case.args[1].ndim > 1 and isinstance(e, (IndexError, TypeError, ValueError)):
            return "does your loop handle x of any shape? np.ndindex(x.shape) visits every index"
        return None

    def unknown(case, bad):
        hint = ("element i must be (f(x + h e_i) - f(x - h e_i)) / (2h), with x restored between elements")
        if case.args[1].ndim > 1:
            hint += ("; does your loop visit every element of a multi-dimensional x? np.ndindex(x.shape) "
                     "gives every index tuple")
        return hint

    return run(fn, cases, inputs=("f", "x", "h"), outputs=("the gradient",), mistakes=_numgrad_mistakes,
               rel=True, raise_hints=raise_hint, unknown=unknown,
               mutation_hints={"x": "save the old value and restore it after the two evaluations: old = x[i]; "
                                    "x[i] = old + h; ...; x[i] = old (adding h back is not exact in floating "
                                    "point), or perturb a copy"},
               summary="central differences, the step used as given, x left unchanged", verbose=verbose)
