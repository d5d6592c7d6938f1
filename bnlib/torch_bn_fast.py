"""The speed path of :func:`bnlib.torch_bn.batch_norm`: the same training-mode batch norm in fewer operations.

Defined in: chapters/06_bn_pytorch.ipynb (its last section; not printed there: the chapters print
``bnlib/torch_bn.py``), measured in chapters/appendix_performance.ipynb

Speed only, not the lesson.  :class:`bnlib.torch_bn.BatchNormFunction` is the batch norm this book teaches,
one line per equation.  Eager PyTorch pays a few microseconds for every operation and a fresh tensor for
every line, so on the (60, 300) batches of the MNIST chapter that readable Function costs several times the
native kernel, and on a 51 MB feature map every new input-sized tensor is memory the operating system maps
page by page (glibc on Linux).  :class:`FastBatchNormFunction` computes the same statistics with the same
algorithm and the same backward formula, and differs only in how the work is spelled:

* ``forward(ctx, ...)`` in one method, the older way of writing a Function.  ``Function.apply`` binds the
  arguments to ``forward``'s signature with :mod:`inspect` on every call when ``setup_context`` is defined;
  without it the call itself is cheaper (``bench/bench_torch_bn.py`` times both forms of an empty Function).
  torch.func needs ``setup_context``, so it gets the readable Function: see :func:`use_fast_path`.
* fewer passes over the big tensor, in memory it has just created: y = d * k + shift is one ``addcmul``
  written over d's square once it is summed, and the backward's dx is one ``addcmul`` on a fresh tensor
  that the next two lines update in place, so that a forward and backward pass allocate five input-sized
  tensors instead of fourteen;
* per-channel factors folded together before they touch the big tensor (``k = gamma * inv_std``), and
  kept as (C,) vectors, which broadcast against an (N, C) input without a view;
* sums instead of means, with each 1/m folded into the operation that uses it (``alpha=``, ``value=``), because
  on a small batch a sum is a cheaper call than a mean; an (N, C) input is reduced over the int ``0``, which is
  cheaper to pass than a list (``bench/bench_torch_bn.py`` times the speed path against the native kernel);
* the running statistics updated inside ``forward``, so that the Function has one output instead of three.

Same math: the corrected two-pass variance of :func:`bnlib.torch_bn._batch_stats` (mean, then the mean of
the squared deviations, minus the square of their mean), the compact backward
``dx = gamma*inv_std * (dy - dbeta/m - x_hat*dgamma/m)`` with x_hat = (x - mu) * inv_std recomputed from the
saved x (its inv_std folded into the per-channel factors), and x plus
per-channel vectors as the only tensors kept for backward.  When the backward pass is itself differentiated
(``create_graph=True``), :meth:`FastBatchNormFunction.backward` hands over to the readable backward, which
recomputes the statistics from x so that second derivatives are right.

``tests/test_torch_bn_upstream.py``, ``_grad.py``, ``_module.py`` and ``_parity.py`` run every test on both
paths (:func:`disabled` switches this one off); ``tests/test_torch_bn_fast.py`` compares the two directly.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from bnlib.torch_bn import _VMAP_UNBATCHED_BUFFERS, BatchNormFunction, _channel_dims

__all__ = ["FastBatchNormFunction", "use_fast_path", "disabled", "ENABLED"]

ENABLED = True  # False: batch_norm always uses the readable Function (see :func:`disabled`)


def use_fast_path(input: Tensor, training: bool) -> bool:
    """True where :class:`FastBatchNormFunction` may stand in for the readable Function.

    Training mode with float32/float64 input (half inputs are computed in float32 by the readable
    Function), in eager mode only: not while ``torch.compile`` traces (the compiler fuses the readable
    Function's operations itself), not inside torch.func transforms (vmap, grad, jacrev: they need
    ``setup_context``, the same test ``Function.apply`` makes) and not while forward-mode AD is on (the
    readable Function has the ``jvp``).
    """
    return (ENABLED and training and not torch.compiler.is_compiling()
            and input.dtype in (torch.float32, torch.float64)
            and not torch._C._are_functorch_transforms_active()
            and torch.autograd.forward_ad._current_level < 0)


@contextlib.contextmanager
def disabled():
    """``with disabled(): ...`` runs :func:`bnlib.torch_bn.batch_norm` on the readable Function only."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before


class FastBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over dim 1; ``apply(x, weight, bias, running_mean, running_var, momentum, eps)``.

    x: (N, C, *S) float32/float64; weight, bias: (C,) or None; running_mean, running_var: (C,) or None,
    updated in place (unbiased variance, m = N * prod(S) values per channel).  Returns y, x's shape.
    Saved for backward: x, weight, and per channel mu, inv_std and k = gamma * inv_std.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        dims, m, c = _sum_dims(x), x.numel() // x.shape[1], _broadcast(x)
        # sums, with the 1/m of each mean folded into the next operation (a sum is cheaper than a mean)
        x_sum = x.sum(dims)
        d = torch.sub(x, c(x_sum), alpha=1 / m)  # x - mu0, mu0 = x_sum / m
        d_sum = d.sum(dims)  # m * the rounding error of mu0 (corrected two-pass)
        d2 = d * d  # its memory receives y below
        var = d2.sum(dims).addcmul_(d_sum, d_sum, value=-1 / m).div_(m)  # mean(d^2) - mean(d)^2
        inv_std = var.add(eps).rsqrt_()
        k = inv_std if weight is None else inv_std * weight  # gamma * inv_std
        shift = d_sum.mul(k).mul_(-1 / m) if bias is None else torch.addcmul(bias, d_sum, k, value=-1 / m)
        y = torch.addcmul(c(shift), d, c(k), out=d2)  # (x - mu0 - d_sum/m) * inv_std * gamma + beta
        mu = x_sum.add_(d_sum).div_(m)  # mu0 + d_sum/m
        if running_mean is not None:
            try:
                running_mean.lerp_(mu, momentum)
                running_var.lerp_(var * (m / (m - 1)), momentum)
            except RuntimeError as e:  # legacy vmap over the input but not over the buffers
                raise RuntimeError(_VMAP_UNBATCHED_BUFFERS) from e
        ctx.save_for_backward(x, weight, mu, inv_std, k)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mu, inv_std, k = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the readable backward is twice differentiable
            return BatchNormFunction.backward(_ReadableCtx(ctx, x, weight), dy, None, None)
        dims, m, c = _sum_dims(x), x.numel() // x.shape[1], _broadcast(x)
        x_centered = x - c(mu)  # x_hat / inv_std
        dbeta = dy.sum(dims)
        dgamma = (dy * x_centered).sum(dims).mul_(inv_std)
        need_x, need_gamma, need_beta = ctx.needs_input_grad[:3]
        dx = None
        if need_x:  # dx = k * (dy - dbeta/m - x_hat*dgamma/m), on a fresh tensor of dy's batch shape
            # (under autograd.grad(is_grads_batched=True) dy carries a batch dim that x does not)
            dx = torch.addcmul(dy, x_centered, c(dgamma * inv_std), value=-1 / m)
            dx = dx.add_(c(dbeta), alpha=-1 / m).mul_(c(k))
        return (dx, dgamma if need_gamma else None, dbeta if need_beta else None, None, None, None, None)


def _sum_dims(x: Tensor):
    """The dims a statistic is taken over: the int 0 for an (N, C) input (cheaper to dispatch than a list), else
    :func:`bnlib.torch_bn._channel_dims`."""
    return 0 if x.dim() == 2 else _channel_dims(x)


def _broadcast(x: Tensor):
    """A function that shapes a per-channel (C,) vector to broadcast against x: (C, 1, ..., 1), or (C,) itself
    when x is (N, C) (a view costs a microsecond or two, as much as a small operation)."""
    if x.dim() == 2:
        return lambda t: t
    shape = (-1,) + (1,) * (x.dim() - 2)
    return lambda t: t.view(shape)


class _ReadableCtx:
    """What :meth:`BatchNormFunction.backward` reads from its ctx, for a call from the speed path.  Its saved mu
    and var are not needed: when the backward is differentiated it recomputes both from x."""

    def __init__(self, ctx, x, weight):
        self.saved_tensors = (x, weight, None, None)
        self.training, self.eps, self.needs_input_grad = True, ctx.eps, ctx.needs_input_grad
