"""Numerical gradients by central differences, and the relative error used to compare them.

Defined in chapter: chapters/03_bn_backward.ipynb

Use float64: with h = 1e-6 the central difference has a truncation error of order h**2 and
a rounding error of order eps_machine / h, about 1e-10 relative in float64 (in float32 it
would be about 0.1).
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_gradients", "numerical_gradient", "rel_error"]

TINY = np.finfo(np.float64).tiny  # 2.2e-308, keeps rel_error(0, 0) = 0 instead of 0/0


def numerical_gradient(f, x, dy=None, h=1e-6):
    """Central-difference gradient of L(x) = sum(f(x) * dy) with respect to x.

    Defined in: chapters/03_bn_backward.ipynb

        dL/dx[i] ~ (L(x + h e_i) - L(x - h e_i)) / (2 h)

    Each entry x[i] is changed in place, f(x) evaluated, and x[i] restored (also if f
    raises), so f may be a closure that reads x. 2 * x.size calls of f.

    Inputs:
    - f: function of x returning a scalar or an array (of any shape)
    - x: floating-point array, any shape; modified during the call, restored after
    - dy: upstream gradient of the shape of f(x), or None for all ones, i.e. the gradient
      of sum(f(x)) (for a scalar f: its plain gradient)
    - h: step

    Returns:
    - grad: array of the shape of x, float64
    """
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        raise TypeError("numerical_gradient needs x as a floating-point np.ndarray (it is changed in place)")
    grad = np.zeros(x.shape, dtype=np.float64)

    def loss():
        out = np.asarray(f(x), dtype=np.float64)
        return float(out.sum()) if dy is None else float(np.sum(out * dy))

    for i in np.ndindex(x.shape):
        old = x[i]
        try:
            x[i] = old + h
            loss_plus = loss()
            x[i] = old - h
            loss_minus = loss()
        finally:
            x[i] = old
        grad[i] = (loss_plus - loss_minus) / (2 * h)
    return grad


def rel_error(a, b):
    """Normwise relative error between two arrays of the same shape.

    Defined in: chapters/03_bn_backward.ipynb

        rel_error(a, b) = max_i |a_i - b_i| / max( max_i (|a_i| + |b_i|), TINY )

    with TINY = np.finfo(np.float64).tiny, so that two all-zero arrays give 0. It is
    symmetric and scale invariant (rel_error(s*a, s*b) = rel_error(a, b)), lies in [0, 1],
    and, unlike an elementwise ratio, is not blown up by entries that are nearly zero
    (such as the per-channel sums of dx). Values near 1e-16 are float64 round-off; 1e-2
    or more is a wrong gradient.

    Inputs:
    - a, b: arrays (or scalars) of the same shape

    Returns:
    - float
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error needs arrays of the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a) + np.abs(b))), TINY))


def check_gradients(f, inputs, grads, dy=None, h=1e-6):
    """Compare analytic gradients with numerical ones, input by input.

    Defined in: chapters/03_bn_backward.ipynb

    Inputs:
    - f: function called as f(**inputs), returning a scalar or an array
    - inputs: dict name -> float64 array (each is perturbed in place, then restored)
    - grads: dict name -> analytic gradient of sum(f(**inputs) * dy) w.r.t. inputs[name];
      only the names in grads are checked
    - dy: upstream gradient of the shape of f's output, or None (all ones)
    - h: step of the central differences

    Returns:
    - dict name -> rel_error(grads[name], numerical gradient)

    Example:
        errors = check_gradients(
            lambda x, gamma, beta: batch_norm_forward(x, gamma, beta)[0],
            {"x": x, "gamma": gamma, "beta": beta},
            {"x": dx, "gamma": dgamma, "beta": dbeta}, dy)
    """
    errors = {}
    for name, analytic in grads.items():
        numeric = numerical_gradient(lambda _: f(**inputs), inputs[name], dy=dy, h=h)
        errors[name] = rel_error(analytic, numeric)
    return errors
