"""Batch Normalization as a ``torch.autograd.Function``: drop-in replacements for
``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.functional.batch_norm``.

Defined in: chapters/06_bn_pytorch.ipynb

Public objects
--------------
BatchNormFunction           autograd.Function, hand-written backward, twice differentiable.
BatchNormFunctionSavedXHat  the naive variant that saves x_hat: first derivative right,
                            second derivative silently wrong (for the chapter's demonstration).
batch_norm                  same signature, semantics and error messages as F.batch_norm.
BatchNorm1d/2d/3d           nn.Modules with torch's constructor, state_dict, repr and checks.
convert_batchnorm           swap torch.nn.BatchNorm*d <-> bnlib BatchNorm*d in a model.

Shapes: input (N, C, *spatial) with spatial = () for BatchNorm1d on (N, C), (L,) for
(N, C, L), (H, W) for BatchNorm2d and (D, H, W) for BatchNorm3d.  Statistics are per
channel over the M = N * prod(spatial) elements of every dim except dim 1.

Numerics (why the computation is laid out the way it is)
---------------------------------------------------------
* Forward statistics are **two-pass**: first the mean mu (one reduction), then the biased
  variance as sum((x - mu)^2) / M over the centred tensor x - mu.  The one-pass formula
  E[x^2] - mu^2 cancels catastrophically in float32 when |mu| >> sigma: for N(0,1)+100,
  E[x^2] ~ 1e4 has a float32 spacing of ~1e-3, so the variance would lose ~3 of its 7
  digits.  Centring first keeps the variance accurate to a few ulps whatever the offset
  (a shifted one-pass scheme would need the same centred temporary here).  The centred
  tensor is the output buffer: ``y = (x - mu)`` then ``y *= w*invstd``, ``y += b`` in
  place, so a constant channel gives exactly ``b`` (torch's ``x*alpha + beta`` gives
  b + O(ulp(x))).
* Per-channel sums of contiguous (N, C, *S) data are one float32 (cascade) sum or 2-norm
  per (n, c) plane, then the N plane results are added in float64; other layouts use
  torch's strided reductions.  Per-channel scalars (invstd, scale, the backward's k's) are
  formed in float64 and rounded once.
* Backward needs sum(dy) and sum(dy * (x - mu)).  The latter is computed exactly as
  written, in the buffer that becomes dx (no sum(dy*x) - mu*sum(dy) cancellation), and
  dx = dy*k1 + x*k2 + k3 with per-channel k1 = w*invstd,
  k2 = -k1*invstd^2*sum(dy*(x-mu))/M, k3 = -k1*sum(dy)/M - mu*k2 is then written over it.
* Result: float64 agrees with torch to ~1e-15; in float32 our error against a float64
  reference is at most torch's own (for N(0,1)+100 on (1024, 64): y 2e-6 vs torch's
  1.3e-5, dgamma 7e-6 vs 5e-5 relative), so "parity" with torch is bounded by torch's
  error (tests/test_torch_bn_parity.py).
* float16/bfloat16 inputs are computed in float32 and returned in the input dtype
  (torch's CPU "mixed" behaviour).  Running variance is updated with the unbiased
  variance var * M / (M - 1), in place, under ``torch.no_grad()``.

Backward, two paths (see :class:`BatchNormFunction`): an ordinary ``.backward()`` runs
with grad mode off and takes the fast path above; with ``create_graph=True`` (grad mode
on inside backward) the compact formula is evaluated with differentiable torch ops on
mean/var/x_hat recomputed from the saved x, so second derivatives are right.

Speed: the only input-sized allocations are y (forward) and dx (backward), as in torch's
kernel; every other pass works in place.  Filling a fresh big tensor costs more than a
whole arithmetic pass (one page fault per 4 KiB), so on Linux bnlib asks for transparent
huge pages on these two buffers (``USE_HUGEPAGES``, as NumPy does for its arrays).  With
4 KiB pages for both, bnlib's forward+backward takes about torch's time; with huge pages
about half (bench/bench_torch_bn.py, which reports both).

Memory kept for backward: the input x itself (not a copy) plus per-channel mean and
variance (and the weight).  Nothing input-sized is allocated for autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "BatchNormFunction",
    "BatchNormFunctionSavedXHat",
    "batch_norm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "convert_batchnorm",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- helpers
def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _bshape(x: Tensor) -> list[int]:
    """(1, C, 1, ..., 1): broadcasts a per-channel vector against x."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def _is_plain(t: Tensor) -> bool:
    """True for ordinary tensors (not functorch wrappers such as vmap's BatchedTensor)."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _new_like(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Uninitialised tensor shaped like x in torch BN's output layout: channels_last(_3d)
    when x is channels-last-contiguous (and not plain contiguous), else contiguous."""
    fmt = torch.contiguous_format
    if _is_plain(x) and not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            fmt = torch.channels_last
        elif x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            fmt = torch.channels_last_3d
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
    if USE_HUGEPAGES and out.device.type == "cpu":
        _advise_hugepages(out)
    return out


#: Ask Linux for transparent huge pages on the big fresh CPU buffers (y, dx) that bnlib
#: allocates.  Filling a fresh 51 MB tensor costs ~12,500 page faults with 4 KiB pages --
#: several times the arithmetic of a pass (bench/bench_torch_bn.py); with 2 MiB pages it
#: is a few dozen.  NumPy does the same for its arrays; torch's own allocator only does
#: it with the environment variable THP_MEM_ALLOC_ENABLE=1.  Set to False to compare.
USE_HUGEPAGES = True
_HUGEPAGE_MIN_BYTES = 4 << 20
_madvise = None


def _advise_hugepages(t: Tensor) -> None:
    """madvise(MADV_HUGEPAGE) on t's (not yet touched) storage; silently a no-op where
    unsupported (non-Linux, THP disabled, small tensors)."""
    global _madvise
    nbytes = t.untyped_storage().nbytes()
    if nbytes < _HUGEPAGE_MIN_BYTES:
        return
    if _madvise is None:
        _madvise = _load_madvise()
    if not _madvise:
        return
    page = 4096
    ptr = t.untyped_storage().data_ptr()
    start = (ptr + page - 1) // page * page
    end = (ptr + nbytes) // page * page
    if end > start:
        _madvise(start, end - start, 14)  # 14 = MADV_HUGEPAGE


def _load_madvise():
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[madvise]" not in f.read():  # "[always]": nothing to ask; "[never]": no use
                return False
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return False


def _planes(a: Tensor):
    """(N*C, S) view of a contiguous (N, C, *S) tensor with S > 1, else None."""
    if a.dim() < 3 or a.numel() == 0 or not _is_plain(a) or not a.is_contiguous():
        return None
    N, C = a.shape[0], a.shape[1]
    S = a.numel() // (N * C)
    return a.view(N * C, S) if S > 1 else None


def _channel_sum(a: Tensor) -> Tensor:
    """Per-channel sum over dims (0, 2, ...), returned as float64 (C,).

    Contiguous data: one float32 (cascade) sum per (n, c) plane, then the N plane sums
    are added in float64.  Otherwise torch's strided sum over the reduced dims.
    """
    p = _planes(a)
    if p is not None:
        return p.sum(1).view(a.shape[0], a.shape[1]).sum(0, dtype=torch.float64)
    return a.sum(_reduce_dims(a)).to(torch.float64)


def _channel_sumsq(a: Tensor) -> Tensor:
    """Per-channel sum of squares over dims (0, 2, ...), float64 (C,), no temporary."""
    p = _planes(a)
    if p is not None:
        n = torch.linalg.vector_norm(p, dim=1).to(torch.float64)
        return (n * n).view(a.shape[0], a.shape[1]).sum(0)
    n = torch.linalg.vector_norm(a, dim=_reduce_dims(a)).to(torch.float64)
    return n * n


def _centred(x: Tensor, mean: Tensor) -> Tensor:
    """New tensor x - mean in torch BN's output layout (see _new_like)."""
    if not _is_plain(x):
        return x - mean
    return torch.sub(x, mean, out=_new_like(x, x.dtype))


def _stats_and_output(x, weight, bias, eps):
    """Training forward: returns (y, mean, var); y in x's dtype, mean/var (C,) biased.

    Two passes over x for the statistics (sum, then sum of squares of the centred x)
    and the centred tensor doubles as the output buffer: the only input-sized
    allocation is y itself.
    """
    cdt = _compute_dtype(x)
    bs = _bshape(x)
    M = x.numel() // x.shape[1]
    mean64 = _channel_sum(x) / M  # pass 1: mean (float32 planes, float64 total)
    mean = mean64.to(cdt)
    y = _centred(x.to(cdt), mean.view(bs))  # centred x: the only big allocation
    var64 = _channel_sumsq(y) / M  # pass 2: sum((x - mean)^2), no cancellation
    scale64 = torch.rsqrt(var64 + eps)
    if weight is not None:
        scale64 = scale64 * weight.to(torch.float64)
    scale = scale64.to(cdt).view(bs)
    if bias is None:
        y.mul_(scale)
    elif _is_plain(y):  # y = b + y*scale in place: one pass
        torch.addcmul(bias.to(cdt).view(bs), y, scale, out=y)
    else:
        y = torch.addcmul(bias.to(cdt).view(bs), y, scale)
    return y.to(x.dtype), mean, var64.to(cdt)


def _eval_output(x, weight, bias, mean, var, eps):
    """Eval forward with given statistics: y = x*scale + shift, per-channel scale/shift."""
    cdt = _compute_dtype(x)
    bs = _bshape(x)
    scale64 = torch.rsqrt(var.to(torch.float64) + eps)
    if weight is not None:
        scale64 = scale64 * weight.to(torch.float64)
    shift64 = -mean.to(torch.float64) * scale64
    if bias is not None:
        shift64 = shift64 + bias.to(torch.float64)
    x = x.to(cdt)
    if _is_plain(x):
        y = torch.mul(x, scale64.to(cdt).view(bs), out=_new_like(x, cdt))
    else:
        y = torch.mul(x, scale64.to(cdt).view(bs))
    y.add_(shift64.to(cdt).view(bs))
    return y.to(x.dtype)


def _backward_differentiable(x, weight, dy, mean, var, training, eps):
    """The compact formula written with differentiable torch ops (used when create_graph).

    Training: mean, var, invstd and x_hat are recomputed from x, so a second
    differentiation sees how they depend on x.
      dbeta  = sum(dy)                dgamma = sum(dy * x_hat)
      dx     = w * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))
    Eval: x_hat = (x - running_mean) * invstd with constant statistics; dx = w*invstd*dy.
    """
    cdt = _compute_dtype(x)
    x = x.to(cdt)
    dy = dy.to(cdt)
    dims = _reduce_dims(x)
    bs = _bshape(x)
    if training:
        mu = x.mean(dims, keepdim=True)
        xc = x - mu
        invstd = torch.rsqrt((xc * xc).mean(dims, keepdim=True) + eps)
    else:
        xc = x - mean.to(cdt).view(bs)
        invstd = torch.rsqrt(var.to(cdt).view(bs) + eps)
    x_hat = xc * invstd
    dbeta = dy.sum(dims)
    dgamma = (dy * x_hat).sum(dims)
    w = invstd if weight is None else weight.to(cdt).view(bs) * invstd
    if training:
        M = x.numel() // x.shape[1]
        dx = w * (dy - dbeta.view(bs) / M - x_hat * dgamma.view(bs) / M)
    else:
        dx = w * dy
    return dx, dgamma, dbeta


def _backward_fast(x, weight, dy, mean, var, training, eps, need_x, need_w):
    """No-graph backward: per-channel sum(dy), sum(dy*(x-mean)), then dx in place.

    The buffer for dx first holds (x - mean) * dy, whose per-channel sum is the exact
    centred dot product (no E[dy*x] - mean*E[dy] cancellation); it is then overwritten
    with dx = dy*k1 + x*k2 + k3.  One input-sized allocation in total.
    """
    cdt = _compute_dtype(x)
    x = x.to(cdt)
    dy = dy.to(cdt)
    bs = _bshape(x)
    M = x.numel() // x.shape[1]
    mean64 = mean.to(torch.float64)
    invstd64 = torch.rsqrt(var.to(torch.float64) + eps)
    sum_dy = _channel_sum(dy)
    w64 = invstd64 if weight is None else weight.to(torch.float64) * invstd64
    buf = None
    dot = None
    if need_w or (need_x and training):
        buf = _centred(x, mean.view(bs))
        buf.mul_(dy)
        dot = _channel_sum(buf)  # sum(dy * (x - mean))
    dx = None
    if need_x:
        k1 = w64
        if training:
            k2 = -k1 * invstd64 * invstd64 * dot / M
            k3 = -k1 * sum_dy / M - mean64 * k2
            k1, k2, k3 = (k.to(cdt).view(bs) for k in (k1, k2, k3))
            if _is_plain(buf):  # two passes over the dx buffer
                dx = torch.addcmul(k3, x, k2, out=buf).addcmul_(dy, k1)
            else:
                dx = torch.addcmul(k3, x, k2).addcmul_(dy, k1)
        else:
            k1 = k1.to(cdt).view(bs)
            dx = torch.mul(dy, k1, out=_new_like(x, cdt)) if _is_plain(x) else dy * k1
    dgamma = (dot * invstd64).to(cdt) if need_w else None
    return dx, dgamma, sum_dy.to(cdt)


# ------------------------------------------------------------------ autograd.Function
class BatchNormFunction(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, per channel (dim 1).

    Defined in: chapters/06_bn_pytorch.ipynb

    ``BatchNormFunction.apply(x, weight, bias, running_mean, running_var, training, eps)``
    -> ``(y, mean, var)``.  x: (N, C, *S); weight, bias: (C,) or None; running_mean,
    running_var: (C,) or None (used as the statistics when ``training`` is False).
    y has x's shape, dtype and memory format; mean, var: (C,) biased batch statistics
    (train) or copies of the running buffers (eval), non-differentiable.  The running
    buffers are *not* updated here; :func:`batch_norm` does that.

    Saved for backward: x itself (no copy), weight and the per-channel mean/var.

    Backward is the compact formula
    ``dx = w*invstd*(dy - mean(dy) - x_hat*mean(dy*x_hat))``, ``dgamma = sum(dy*x_hat)``,
    ``dbeta = sum(dy)``.  Two implementations of it:

    * ``torch.is_grad_enabled()`` is False (ordinary ``.backward()``): a fast path from the
      saved per-channel mean/var -- sum(dy) and sum(dy*(x-mean)) per channel, then
      dx = dy*k1 + x*k2 + k3 written in place into the one dx buffer.
    * ``torch.is_grad_enabled()`` is True (``create_graph=True``, ``gradgradcheck``,
      ``torch.func`` higher-order transforms): mean, var, invstd and x_hat are recomputed
      *from the saved x* with differentiable torch ops, so autograd can differentiate the
      backward itself.

    Why not save x_hat?  Autograd differentiates ``backward`` by recording the ops it runs.
    A tensor saved from forward enters that record as a constant: x_hat depends on x, but
    the graph built during backward does not know it, so d(dx)/dx misses every term that
    flows through x_hat, mean and invstd.  ``gradcheck`` (first derivatives) still passes,
    but ``gradgradcheck`` reports a Jacobian mismatch and ``autograd.grad(...,
    create_graph=True)`` silently returns a wrong second derivative
    (see :class:`BatchNormFunctionSavedXHat`).  Saving x and recomputing fixes it.

    Forward-mode AD (``jvp``) is implemented; ``generate_vmap_rule=True`` gives vmap.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, eps):
        if training:
            return _stats_and_output(x, weight, bias, eps)
        y = _eval_output(x, weight, bias, running_mean, running_var, eps)
        cdt = _compute_dtype(x)
        return y, running_mean.to(cdt).clone(), running_var.to(cdt).clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, running_mean, running_var, training, eps = inputs
        _, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.save_for_forward(x, weight, mean, var)
        ctx.training = training
        ctx.eps = eps

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, var = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if dy is None:
            return None, None, None, None, None, None, None
        if torch.is_grad_enabled():
            dx, dw, db = _backward_differentiable(
                x, weight, dy, mean, var, ctx.training, ctx.eps
            )
        else:
            dx, dw, db = _backward_fast(
                x, weight, dy, mean, var, ctx.training, ctx.eps, need_x, need_w
            )
        dx = dx.to(x.dtype) if need_x else None
        dw = dw.to(weight.dtype) if need_w else None
        db = db.to(weight.dtype if weight is not None else db.dtype) if need_b else None
        return dx, dw, db, None, None, None, None

    @staticmethod
    def jvp(ctx, tx, tw, tb, trm, trv, _t, _e):
        # tangents of running_mean/var (zeros under torch.func) are ignored: the
        # statistics are constants; batch_norm() rejects dual running buffers.
        x, weight, mean, var = ctx.saved_tensors
        cdt = _compute_dtype(x)
        dims, bs = _reduce_dims(x), _bshape(x)
        xf = x.to(cdt)
        invstd = torch.rsqrt(var.view(bs) + ctx.eps)
        x_hat = (xf - mean.view(bs)) * invstd
        w = torch.ones_like(invstd) if weight is None else weight.to(cdt).view(bs)
        ty = torch.zeros_like(xf)
        if tx is not None:
            tx = tx.to(cdt)
            if ctx.training:
                t_hat = invstd * (
                    tx
                    - tx.mean(dims, keepdim=True)
                    - x_hat * (tx * x_hat).mean(dims, keepdim=True)
                )
            else:
                t_hat = invstd * tx
            ty = ty + w * t_hat
        if tw is not None:
            ty = ty + tw.to(cdt).view(bs) * x_hat
        if tb is not None:
            ty = ty + tb.to(cdt).view(bs)
        return ty.to(x.dtype), None, None


class BatchNormFunctionSavedXHat(torch.autograd.Function):
    """Deliberately naive BN Function that saves x_hat and invstd from forward.

    Defined in: chapters/06_bn_pytorch.ipynb

    ``BatchNormFunctionSavedXHat.apply(x, weight, bias, eps)`` -> y, training-mode batch
    statistics only, no running buffers.  x: (N, C, *S), weight and bias: (C,).

    Its backward uses the same compact formula as :class:`BatchNormFunction`, but from the
    saved x_hat.  First derivatives are right (``gradcheck`` passes); second derivatives
    are silently wrong (``gradgradcheck`` fails) because x_hat and invstd are constants
    to the graph recorded while backward runs.  For teaching only.
    """

    @staticmethod
    def forward(x, weight, bias, eps):
        dims, bs = _reduce_dims(x), _bshape(x)
        mean = x.mean(dims, keepdim=True)
        invstd = torch.rsqrt(((x - mean) ** 2).mean(dims, keepdim=True) + eps)
        x_hat = (x - mean) * invstd
        return x_hat * weight.view(bs) + bias.view(bs), x_hat, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, eps = inputs
        _, x_hat, invstd = output
        ctx.mark_non_differentiable(x_hat, invstd)
        ctx.save_for_backward(weight, x_hat, invstd)

    @staticmethod
    def backward(ctx, dy, _dxhat, _dinvstd):
        weight, x_hat, invstd = ctx.saved_tensors
        dims, bs = _reduce_dims(x_hat), _bshape(x_hat)
        M = x_hat.numel() // x_hat.shape[1]
        dbeta = dy.sum(dims)
        dgamma = (dy * x_hat).sum(dims)
        dx = weight.view(bs) * invstd * (
            dy - dbeta.view(bs) / M - x_hat * dgamma.view(bs) / M
        )
        return dx, dgamma, dbeta, None


# -------------------------------------------------------------------- functional API
_TYPE_NAMES = {}


def _scalar_name(dtype: torch.dtype) -> str:
    """torch's C++ ScalarType name: torch.float32 -> 'Float', torch.int64 -> 'Long'."""
    if dtype not in _TYPE_NAMES:
        _TYPE_NAMES[dtype] = torch.empty(0, dtype=dtype).type()[len("torch."):-len("Tensor")]
    return _TYPE_NAMES[dtype]


def _has_forward_grad(t: Tensor) -> bool:
    """True when t is a forward-mode AD dual tensor (torch.autograd.forward_ad)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    try:
        return torch.autograd.forward_ad.unpack_dual(t).tangent is not None
    except RuntimeError:
        return False


def _check_args(input, running_mean, running_var, weight, bias, training):
    """torch's checks, in torch's order, with torch's messages (after the eps checks)."""
    named = (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    )
    if input.dim() < 2:
        for name, t in named:
            if t is not None:
                raise RuntimeError(f"{name} should contain 0 elements not {t.numel()}")
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
    C = input.shape[1]
    for name, t in named:
        if t is not None:
            if t.numel() != C:
                raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
        elif not training and name in ("running_mean", "running_var"):
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must either both be None or neither be None"
        )
    for name, t in named[:2]:
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"The function 'native_batch_norm' is not differentiable with respect to "
                f"argument '{name}'. This input cannot have requires_grad True."
            )
    if not training and any(
        t is not None and _has_forward_grad(t) for t in (running_mean, running_var)
    ) and any(t is not None and _has_forward_grad(t) for t in (input, weight, bias)):
        raise RuntimeError(  # torch checks this in eval mode only
            "batch_norm is not differentiable wrt running_mean and running_var, "
            "they cannot have forward grad defined"
        )
    if not input.is_floating_point():
        raise NotImplementedError(
            f'"batch_norm" not implemented for \'{_scalar_name(input.dtype)}\''
        )
    params = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    if params and params[0].dtype != input.dtype:  # torch's "mixed type" branch
        for t in params:
            if t.dtype != torch.float32:
                raise RuntimeError(
                    "mixed dtype (CPU): expect parameter to have scalar type of Float"
                )
        if input.dtype not in _LOW_PRECISION:
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
    else:
        for t in params:
            if t.dtype != input.dtype:
                raise RuntimeError(
                    f"expected scalar type {_scalar_name(input.dtype)} "
                    f"but found {_scalar_name(t.dtype)}"
                )


_VMAP_MSG = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, "
    "which will be updated in place, were not batched.\nIf you are using a module and do "
    "not need eval mode, please set `track_running_stats` to be False.If you are using a "
    "prebuilt module and do not need eval mode, please see the functorch website for "
    "resources on how to patch your module to work with vmap"
)


def _vmapped_input_unbatched_stats(input, running_mean, running_var) -> bool:
    """torch.func.vmap over the input while the running buffers (updated in place) are not."""
    f = torch._C._functorch
    if not f.is_functorch_wrapped_tensor(input):
        return False
    return not (f.is_batchedtensor(running_mean) and f.is_batchedtensor(running_var)) and (
        f.is_batchedtensor(input)
    )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch Normalization over dim 1, a drop-in for ``torch.nn.functional.batch_norm``.

    Defined in: chapters/06_bn_pytorch.ipynb

    input: (N, C, *S).  running_mean, running_var: (C,) or None.  weight, bias: (C,) or
    None.  Returns y with input's shape, dtype and (channels_last) memory format.

    training=True: normalise with the biased batch statistics and, if the running buffers
    are given, update them in place (under no_grad):
    ``r_mean = (1-momentum)*r_mean + momentum*mean``,
    ``r_var = (1-momentum)*r_var + momentum*var*M/(M-1)`` (unbiased), M = N*prod(S).
    training=False: normalise with the running buffers.  Errors and messages are torch's
    (batch of one value per channel, eps, channel counts, dtypes, differentiable buffers).
    The computation is :class:`BatchNormFunction`, not torch's kernel.
    """
    if momentum is None:
        raise TypeError(
            "batch_norm(): argument 'momentum' (position 7) must be float, not NoneType"
        )
    if training:
        size = input.size()
        size_prods = size[0]
        for i in range(len(size) - 2):
            size_prods *= size[i + 2]
        if size_prods == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {size}"
            )
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")

    if input.numel() == 0:  # torch: input.clone() * weight[0] + bias[0], stats untouched
        y = input.clone()
        if weight is not None:
            y = y * weight[0]
        if bias is not None:
            y = y + bias[0]
        return y

    _check_args(input, running_mean, running_var, weight, bias, training)
    if training and running_mean is not None and _vmapped_input_unbatched_stats(
        input, running_mean, running_var
    ):
        raise RuntimeError(_VMAP_MSG)
    y, mean, var = BatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, bool(training), eps
    )
    if training and running_mean is not None:
        M = input.numel() // input.shape[1]
        with torch.no_grad():
            unbiased = var * (M / (M - 1)) if M > 1 else var
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
            running_var.copy_(momentum * unbiased + (1 - momentum) * running_var)
    return y


# ----------------------------------------------------------------------------- modules
class _BnlibBatchNorm(_BatchNorm):
    """torch's ``_BatchNorm`` (parameters, buffers, state_dict, repr, loading of old
    checkpoints) with ``forward`` re-implemented on top of bnlib's :func:`batch_norm`."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:  # exponential moving average
                    exponential_average_factor = self.momentum
        # batch statistics in training mode, and in eval mode when both buffers are None
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        # buffers are passed only when they are updated or used for normalisation
        use_buffers = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )


class BatchNorm1d(_BnlibBatchNorm):
    """Drop-in for ``torch.nn.BatchNorm1d`` over (N, C) or (N, C, L) input.

    Defined in: chapters/06_bn_pytorch.ipynb

    ``BatchNorm1d(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, device=None, dtype=None)``.  Subclasses torch's
    ``_BatchNorm`` for parameters (weight, bias), buffers (running_mean, running_var,
    num_batches_tracked: int64, 0-dim), state_dict (version 2), repr and loading; the
    forward computation is bnlib's :func:`batch_norm`.  momentum=None: cumulative average.
    """

    def _check_input_dim(self, input):
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BnlibBatchNorm):
    """Drop-in for ``torch.nn.BatchNorm2d`` over (N, C, H, W) input.

    Defined in: chapters/06_bn_pytorch.ipynb

    Same constructor, state and behaviour as :class:`BatchNorm1d`; computation by
    :func:`batch_norm`.  channels_last input gives channels_last output.
    """

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(_BnlibBatchNorm):
    """Drop-in for ``torch.nn.BatchNorm3d`` over (N, C, D, H, W) input.

    Defined in: chapters/06_bn_pytorch.ipynb

    Same constructor, state and behaviour as :class:`BatchNorm1d`; computation by
    :func:`batch_norm`.
    """

    def _check_input_dim(self, input):
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


_TO_BNLIB = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH = {v: k for k, v in _TO_BNLIB.items()}


def _swap(bn: _BatchNorm, cls: type) -> _BatchNorm:
    new = cls(
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        device="meta",
        bias=bn.bias is not None if bn.affine else True,
    )
    # share the very same Parameter / buffer objects: optimisers keep working
    for name, p in bn._parameters.items():
        new._parameters[name] = p
    for name, b in bn._buffers.items():
        new._buffers[name] = b
    new.track_running_stats = bn.track_running_stats
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


def convert_batchnorm(module: torch.nn.Module, to: str = "bnlib") -> torch.nn.Module:
    """Replace every BatchNorm{1,2,3}d in ``module`` by the other implementation.

    Defined in: chapters/06_bn_pytorch.ipynb

    ``to="bnlib"``: ``torch.nn.BatchNorm1d/2d/3d`` -> ``bnlib.torch_bn.BatchNorm1d/2d/3d``.
    ``to="torch"``: the reverse.  Works recursively and in place on submodules; returns the
    converted module (a new object only when ``module`` itself is a BatchNorm).  Each new
    layer shares the old layer's Parameter and buffer tensors (so values, device, dtype
    and optimiser references are kept) and copies eps, momentum, affine,
    track_running_stats and the training flag.  Subclasses other than exactly these six
    classes (SyncBatchNorm, LazyBatchNorm, user subclasses) are left alone.
    """
    if to == "bnlib":
        mapping = _TO_BNLIB
    elif to == "torch":
        mapping = _TO_TORCH
    else:
        raise ValueError(f"convert_batchnorm: to must be 'bnlib' or 'torch', got {to!r}")
    cls = mapping.get(type(module))
    if cls is not None:
        return _swap(module, cls)
    for name, child in module.named_children():
        new_child = convert_batchnorm(child, to)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
