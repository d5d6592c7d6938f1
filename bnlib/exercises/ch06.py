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

import inspect

import torch

from bnlib.exercises.harness import Case, Diagnosis, Mistake, call, run

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


def _cases():
    g = torch.Generator().manual_seed(11)
    return [
        ("(8, 3) float64", (torch.randn(8, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5],
                            dtype=torch.float64) + torch.tensor([0.0, 5.0, -2.0], dtype=torch.float64)), 1e-5),
        ("(5, 4) float64, eps=0.5", torch.randn(5, 4, generator=g, dtype=torch.float64) * 0.7 + 1.5, 0.5),
        ("(6, 2) float32", torch.randn(6, 2, generator=g, dtype=torch.float32) * 2 - 1, 1e-5),
    ]


_OUTPUTS = ("x_hat", "dx", "d<dx, v>/dx", "d<dx, v>/d(dy)")


def _derivatives(forward, x, eps, dy, v):
    """(x_hat, dx, d<dx, v>/dx, d<dx, v>/d(dy)) of ``forward(x, eps)`` by autograd (x and dy get requires_grad)."""
    x.requires_grad_(True)
    dy.requires_grad_(True)
    y = forward(x, eps)
    (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    ddx, ddy = torch.autograd.grad(dx, (x, dy), v, allow_unused=True)
    zero = torch.zeros_like(x)
    return (y.detach(), dx.detach(), zero if ddx is None else ddx.detach(), zero if ddy is None else ddy.detach())


def _backward_source(fn_class) -> str:
    try:
        return inspect.getsource(fn_class.backward)
    except (OSError, TypeError):
        return ""


def _adapter(fn_class):
    """The reader's Function as a function of (x, eps, dy, v) giving the four outputs, or a Diagnosis."""

    def run_function(x, eps, dy, v):
        x.requires_grad_(True)
        dy.requires_grad_(True)
        y = fn_class.apply(x, eps)
        if isinstance(y, tuple):
            raise Diagnosis(f"apply returned a tuple of {len(y)}; return x_hat only (save what backward needs with "
                            f"ctx.save_for_backward, in forward or setup_context)")
        if not isinstance(y, torch.Tensor):
            raise Diagnosis(f"apply returned {type(y).__name__}, expected a tensor")
        if y.shape != x.shape:
            raise Diagnosis(f"x_hat has shape {tuple(y.shape)}, expected {tuple(x.shape)} (keep the batch "
                            f"dimension; the statistics broadcast with keepdim=True)")
        if y.dtype != x.dtype:
            raise Diagnosis(f"x_hat has dtype {y.dtype}, expected {x.dtype}: compute in the input's dtype (a float64 "
                            f"constant or torch.tensor(...) without dtype= can change it)")
        if y.grad_fn is None:
            raise Diagnosis(f"the output has no grad_fn: call {fn_class.__name__}.apply(x, eps), and do not detach "
                            f"or convert to NumPy inside forward's return")
        (dx,) = torch.autograd.grad(y, x, dy, create_graph=True)
        if dx.grad_fn is None:
            raise Diagnosis("dx has no grad_fn, so it cannot be differentiated again: backward ran outside autograd "
                            "(NumPy, .detach(), .item(), torch.no_grad()). Write backward with torch operations on "
                            "tensors that require grad")
        if dx.shape != x.shape or dx.dtype != x.dtype:
            return y.detach(), dx.detach(), None, None
        ddx, ddy = torch.autograd.grad(dx, (x, dy), v, allow_unused=True)
        zero = torch.zeros_like(x)
        return (y.detach(), dx.detach(), zero if ddx is None else ddx.detach(), zero if ddy is None else ddy.detach())

    return run_function


def _mistakes_for(fn_class):
    source = _backward_source(fn_class)
    detached = next((t for t in (".detach()", ".data", "no_grad", ".numpy()") if t in source), None)

    def mistakes(case):
        x, eps, dy, v = case.args
        for cause, kw in _FORWARD_CAUSES.items():
            yield Mistake(cause, lambda case, kw=kw: (_x_hat(x, eps, **kw), None, None, None))
        for cause, dx in _dx_variants(x, dy, eps).items():
            yield Mistake(cause, lambda case, dx=dx: (None, dx.to(x.dtype), None, None))
        if detached:
            cause = (f"d<dx, v>/dx is exactly zero: your backward uses {detached} on x (or on what it computes "
                     f"from x), so autograd does not see that dx depends on x. Recompute mu, sigma and x_hat from "
                     f"the saved x itself, without {detached}")
        else:
            cause = ("d<dx, v>/dx is exactly zero: backward uses x_hat or 1/sigma saved from forward. forward runs "
                     "without autograd, so those tensors are constants: dx no longer depends on x. Save the input x "
                     "and recompute mu, sigma and x_hat in backward with differentiable torch ops")
        yield Mistake(cause, lambda case: (None, None, torch.zeros_like(x), None))
        got, want = case.data["got"], case.expected
        if torch.allclose(got[0], want[0], atol=case.tol[0], rtol=0) and \
                torch.allclose(got[1], want[1], atol=case.tol[1], rtol=0):
            yield Mistake("backward uses some tensor computed in forward (x_hat, mu or 1/sigma) as a constant: its "
                          "dependence on x is lost. Save x and recompute them in backward",
                          lambda case: (None, None, got[2], got[3]))

    return mistakes


def _raise_hint(e, case):
    if "incorrect number of gradients" in str(e):
        return "backward must return one gradient per input of forward: (dx, None), None for eps"
    return None


def _unknown(case, bad):
    if "x_hat" in bad:
        return "x_hat = (x - x.mean(0)) / sqrt(x.var(0, correction=0) + eps), statistics over dim 0"
    return "the compact form is dx = (dy - mean(dy) - x_hat * mean(dy * x_hat)) / sqrt(var + eps), means over dim 0"


def check_normalize_function(fn_class, verbose: bool = True) -> bool:
    """Check a ``torch.autograd.Function`` subclass with ``apply(x, eps) -> x_hat`` for (N, D) inputs.

    Cases: (8, 3) and (5, 4) float64 (the second with eps=0.5, where eps matters), and (6, 2) float32.
    Compared: x_hat, dx = d<x_hat, dy>/dx and the second derivative d<dx, v>/dx, d<dx, v>/d(dy), against
    autograd through an independent formula. Tolerances: 1e-10 in float64, 1e-5 in float32 (100 times more for
    the second derivative); then gradcheck and gradgradcheck in float64. Returns True if everything passes.
    """
    if not (isinstance(fn_class, type) and issubclass(fn_class, torch.autograd.Function)):
        if verbose:
            print(f"expected a subclass of torch.autograd.Function (pass the class, not an instance or a function), "
                  f"got {fn_class!r}")
        return False
    gen = torch.Generator().manual_seed(12)
    cases = []
    for name, x0, eps in _cases():
        tol = 1e-10 if x0.dtype == torch.float64 else 1e-5
        dy = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(x0.dtype)
        v = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(x0.dtype)
        ref = _derivatives(_x_hat, x0.clone(), eps, dy.clone(), v)
        cases.append(Case(name, (x0, eps, dy, v), ref, (tol, tol, 100 * tol, 100 * tol)))

    def after(case):
        x0, eps = case.args[:2]
        if x0.dtype != torch.float64:
            return None
        xs = x0[:4].clone().requires_grad_(True)
        f = lambda t: fn_class.apply(t, eps)  # noqa: E731
        for check in (torch.autograd.gradcheck, torch.autograd.gradgradcheck):
            ok, res = call(lambda: check(f, (xs,), raise_exception=False), (), ("x",))
            if not ok:
                return f"torch.autograd.{check.__name__} on the first 4 rows: {res[0]}"
            if not res:
                return (f"torch.autograd.{check.__name__} fails on the first 4 rows; run it with "
                        f"raise_exception=True to see the mismatching Jacobian")
        return None

    return run(_adapter(fn_class), cases, inputs=("x", "eps", "dy", "v"), outputs=_OUTPUTS,
               mistakes=_mistakes_for(fn_class), raise_hints=_raise_hint, unknown=_unknown,
               after=after, summary="forward, dx, the second derivative, gradcheck and gradgradcheck",
               verbose=verbose)
