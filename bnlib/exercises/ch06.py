"""Checker for the coding exercise of chapters/06_bn_pytorch.ipynb.

:func:`check_normalize_function` takes a reader's ``torch.autograd.Function`` whose ``apply(x, eps)``
returns x_hat = (x - mean) / sqrt(var + eps) per column of an (N, D) tensor (biased variance over dim 0, no
gamma or beta) with a hand-written backward, and checks, case by case: output type, shape and dtype; forward
values; the first derivative dx; the second derivative (the backward must itself be differentiable);
and finally ``gradcheck`` and ``gradgradcheck``. It prints a diagnosis of the first failure (which case,
which output, the largest error, the likely cause) and returns True or False.

Defined in: chapters/06_bn_pytorch.ipynb
"""

from __future__ import annotations

import torch

__all__ = ["check_normalize_function"]


def _x_hat(x: torch.Tensor, eps: float, *, correction: int = 0, eps_outside: bool = False,
           dim: int = 0, center: bool = True) -> torch.Tensor:
    """Independent reference built from differentiable torch ops (autograd gives its derivatives)."""
    mu = x.mean(dim, keepdim=True)
    var = x.var(dim, keepdim=True, correction=correction)
    num = x - mu if center else x
    return num / (var.sqrt() + eps) if eps_outside else num / (var + eps).sqrt()


def _dx_variants(x: torch.Tensor, dy: torch.Tensor, eps: float) -> dict[str, torch.Tensor]:
    """Backward formulas with a term missing or mis-scaled: {diagnosis: the dx it gives}."""
    N = x.shape[0]
    with torch.no_grad():
        inv_std = 1 / (x.var(0, correction=0) + eps).sqrt()
        xh = (x - x.mean(0)) * inv_std
        m_dy = dy.mean(0)
        m_dyx = (dy * xh).mean(0)
        return {
            "both correction terms are missing: dx = dy / sigma is the derivative with mu and sigma held "
            "fixed; they depend on x too": dy * inv_std,
            "the mean term is missing: subtract mean(dy) (the path through mu)": (dy - xh * m_dyx) * inv_std,
            "the projection term is missing: subtract x_hat * mean(dy * x_hat) (the path through sigma)":
                (dy - m_dy) * inv_std,
            "you summed where the formula averages: the correction terms are mean(dy) and "
            "x_hat * mean(dy * x_hat), i.e. sums divided by N": (dy - N * m_dy - xh * N * m_dyx) * inv_std,
            "the projection term has the wrong sign: dx = (dy - mean(dy) - x_hat * mean(dy * x_hat)) / sigma":
                (dy - m_dy + xh * m_dyx) * inv_std,
            "dx is multiplied by sigma instead of divided by it": (dy - m_dy - xh * m_dyx) / inv_std,
        }


_FORWARD_CAUSES = {
    "you used the unbiased variance (divisor N - 1); batch norm normalises with the biased one "
    "(torch: x.var(0, correction=0) or unbiased=False)": dict(correction=1),
    "eps is outside the square root: divide by sqrt(var + eps)": dict(eps_outside=True),
    "you normalised over dim 1 (per row) instead of dim 0 (per column, over the batch)": dict(dim=1),
    "you did not subtract the mean": dict(center=False),
}


def _fmt_err(err: float, tol: float) -> str:
    """An error for a message: its value when it matters, a bound when it is rounding (machine-dependent digits)."""
    return f"{err:.3g}" if err > tol else f"< {tol:.0e} (rounding)"


def _cases():
    g = torch.Generator().manual_seed(11)
    return [
        ("(8, 3) float64", (torch.randn(8, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5],
                            dtype=torch.float64) + torch.tensor([0.0, 5.0, -2.0], dtype=torch.float64)), 1e-5),
        ("(5, 4) float64, eps=0.5", torch.randn(5, 4, generator=g, dtype=torch.float64) * 0.7 + 1.5, 0.5),
        ("(6, 2) float32", torch.randn(6, 2, generator=g, dtype=torch.float32) * 2 - 1, 1e-5),
    ]


def check_normalize_function(fn_class, verbose: bool = True) -> bool:
    """Check a ``torch.autograd.Function`` subclass with ``apply(x, eps) -> x_hat`` for (N, D) inputs.

    Cases: (8, 3) and (5, 4) float64 (the second with eps=0.5, where eps matters), and (6, 2) float32.
    Tolerances: 1e-10 in float64, 1e-5 in float32. Returns True if everything passes.
    """
    say = print if verbose else (lambda *a, **k: None)
    if not (isinstance(fn_class, type) and issubclass(fn_class, torch.autograd.Function)):
        say(f"expected a subclass of torch.autograd.Function (pass the class, not an instance or a function), "
            f"got {fn_class!r}")
        return False
    gen = torch.Generator().manual_seed(12)
    for name, x0, eps in _cases():
        tol = 1e-10 if x0.dtype == torch.float64 else 1e-5
        x = x0.clone().requires_grad_(True)
        # ---- forward
        try:
            y = fn_class.apply(x, eps)
        except Exception as e:
            say(f"case {name}: {fn_class.__name__}.apply(x, eps) raised {type(e).__name__}: {e}")
            return False
        if isinstance(y, tuple):
            say(f"case {name}: apply returned a tuple of {len(y)}; return x_hat only "
                f"(save what backward needs with ctx.save_for_backward, in forward or setup_context)")
            return False
        if not isinstance(y, torch.Tensor):
            say(f"case {name}: expected a tensor, got {type(y).__name__}")
            return False
        if y.shape != x.shape:
            say(f"case {name}: output shape {tuple(y.shape)}, expected {tuple(x.shape)} "
                f"(keep the batch dimension; the statistics broadcast with keepdim=True)")
            return False
        if y.dtype != x.dtype:
            say(f"case {name}: output dtype {y.dtype}, expected {x.dtype}: compute in the input's dtype "
                f"(a float64 constant or torch.tensor(...) without dtype= can change it)")
            return False
        ref = _x_hat(x, eps)
        err = float((y.detach() - ref.detach()).abs().max())
        if err > tol:
            say(f"case {name}: forward x_hat differs from the reference, max |error| = {err:.3g}")
            causes = [c for c, kw in _FORWARD_CAUSES.items()
                      if torch.allclose(y.detach(), _x_hat(x.detach(), eps, **kw), atol=tol, rtol=0)]
            for c in causes:
                say(f"  likely cause: {c}")
            return False
        if y.grad_fn is None:
            say(f"case {name}: the output has no grad_fn: call {fn_class.__name__}.apply(x, eps), "
                f"and do not detach or convert to NumPy inside forward's return")
            return False
        # ---- first derivative
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).requires_grad_(True)
        try:
            (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
        except Exception as e:
            say(f"case {name}: backward raised {type(e).__name__}: {e}")
            if "incorrect number of gradients" in str(e):
                say("  likely cause: backward must return one gradient per input of forward: (dx, None), "
                    "None for eps")
            return False
        (dx_ref,) = torch.autograd.grad(ref, x, dy, create_graph=True)
        if dx.shape != x.shape or dx.dtype != x.dtype:
            say(f"case {name}: dx has shape {tuple(dx.shape)} and dtype {dx.dtype}; expected x's "
                f"{tuple(x.shape)}, {x.dtype}")
            return False
        err = float((dx.detach() - dx_ref.detach()).abs().max())
        if err > tol:
            say(f"case {name}: dx differs from autograd's, max |error| = {err:.3g}")
            causes = [c for c, v in _dx_variants(x.detach(), dy.detach(), eps).items()
                      if torch.allclose(dx.detach(), v.to(x.dtype), atol=tol, rtol=0)]
            for c in causes:
                say(f"  likely cause: {c}")
            if not causes:
                say("  not a mistake this checker recognises: the compact form is "
                    "dx = (dy - mean(dy) - x_hat * mean(dy * x_hat)) / sqrt(var + eps), means over dim 0")
            return False
        # ---- second derivative: differentiate <dx, v> with respect to x and dy
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
        if dx.grad_fn is None:
            say(f"case {name}: dx has no grad_fn, so it cannot be differentiated again: backward ran "
                f"outside autograd (NumPy, .detach(), .item(), torch.no_grad()). Write backward with "
                f"torch operations on tensors that require grad")
            return False
        ddx, ddy = torch.autograd.grad(dx, (x, dy), v, allow_unused=True)
        ddx_ref, ddy_ref = torch.autograd.grad(dx_ref, (x, dy), v)
        ddx = torch.zeros_like(x) if ddx is None else ddx
        ddy = torch.zeros_like(x) if ddy is None else ddy
        err_x = float((ddx - ddx_ref).abs().max())
        err_dy = float((ddy - ddy_ref).abs().max())
        if err_x > 100 * tol or err_dy > 100 * tol:
            say(f"case {name}: the second derivative is wrong (backward is not differentiable as written): "
                f"max |error| {_fmt_err(err_x, 100 * tol)} in d<dx, v>/dx, {_fmt_err(err_dy, 100 * tol)} in d<dx, v>/d(dy)")
            if float(ddx.abs().max()) == 0.0:
                say("  likely cause: d<dx, v>/dx is exactly zero: backward uses x_hat or 1/sigma saved from "
                    "forward. forward runs without autograd, so those tensors are constants: dx no longer "
                    "depends on x. Save the input x and recompute mu, sigma and x_hat in backward with "
                    "differentiable torch ops")
            else:
                say("  likely cause: backward uses some tensor computed in forward (x_hat, mu or 1/sigma) as a "
                    "constant: its dependence on x is lost. Save x and recompute them in backward")
            return False
        # ---- torch's own checks (float64 only)
        if x.dtype == torch.float64:
            xs = x0[:4].clone().requires_grad_(True)
            f = lambda t: fn_class.apply(t, eps)  # noqa: E731
            ok1 = torch.autograd.gradcheck(f, (xs,), raise_exception=False)
            ok2 = torch.autograd.gradgradcheck(f, (xs,), raise_exception=False)
            if not (ok1 and ok2):
                say(f"case {name}: torch.autograd.{'gradcheck' if not ok1 else 'gradgradcheck'} fails on the "
                    f"first 4 rows; run it with raise_exception=True to see the mismatching Jacobian")
                return False
    say(f"all {len(_cases())} cases pass: forward, dx, the second derivative, gradcheck and gradgradcheck")
    return True
