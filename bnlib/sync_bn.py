"""Batch normalization across processes: ``SyncBatchNorm`` on ``torch.distributed``, any device, any backend.

Defined in: chapters/09_sync_bn.ipynb

Public objects
--------------
SyncBatchNorm            ``torch.nn.SyncBatchNorm``'s interface, running on CPU (gloo) as on GPUs.
SyncBatchNormFunction    the autograd.Function: one all-gather in forward, one all-reduce in backward.
sync_batch_norm          the functional form (statistics over every rank of ``group``).
convert_sync_batchnorm   swap every BatchNorm*d (bnlib's or torch's) of a model for :class:`SyncBatchNorm`.
local_stats, merge_stats one rank's (count, mean, M2) and Chan et al.'s merge of several.
record_collectives       a context manager that logs every collective this module issues (for counting).

Shapes: x is (N_r, C, *S) on rank r (N_r may differ between ranks, and may be 0); per-channel vectors are (C,).
The statistics are those of the concatenated batch: m = sum over ranks of N_r * prod(S) values per channel.

Forward.  Each rank sends ``[C, dtype code, m_r, mean_r (C), M2_r (C)]`` in float64 (2C + 3 numbers) with one
``all_gather``; every rank then merges the W packets with Chan et al.'s formula, the same arithmetic in the same
order on every rank, so all ranks get the same bits::

    m = sum_r m_r,   mu = sum_r m_r mean_r / m,   M2 = sum_r M2_r + sum_r m_r (mean_r - mu)^2,   var = M2 / m

Every term of M2 is >= 0: nothing cancels, unlike the one-all-reduce design ``[m, sum x, sum x^2]`` whose
``sum x^2 / m - mu^2`` loses the digits of var when |mu| >> sigma (the chapter measures it).  The price: each
rank receives W (2C + 3) numbers instead of 2C + 1.  The header (C and the dtype) turns a disagreement between
ranks into an error on every rank instead of a silent mix or a hang.

Backward.  One ``all_reduce`` (sum) of ``[sum dy, sum dy * x_hat]`` over the local values (2C numbers, in the
computation dtype), then chapter 3's compact formula with the global sums and the global m::

    dx = gamma * inv_std * (dy - sum(dy) / m - x_hat * sum(dy * x_hat) / m)

dgamma = sum(dy * x_hat) and dbeta = sum(dy) are returned as the *local* sums: summing them over ranks gives
the gradient of the concatenated batch, and DistributedDataParallel's gradient all-reduce does that (it averages,
as it averages every other gradient).  The backward is not differentiable again (``once_differentiable``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from bnlib.torch_bn import _channel_dims, _channel_shape, _check_inputs, _in_float32_if_half, batch_norm

__all__ = [
    "SyncBatchNorm",
    "SyncBatchNormFunction",
    "sync_batch_norm",
    "convert_sync_batchnorm",
    "local_stats",
    "merge_stats",
    "record_collectives",
]

# dtype <-> a small integer sent in the forward packet (exact in float64)
_DTYPE_CODE = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}

_LOGS: list[list[dict]] = []
# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there)
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@contextlib.contextmanager
def record_collectives() -> Iterator[list[dict]]:
    """Log every collective this module issues inside the ``with`` block.

    Defined in: chapters/09_sync_bn.ipynb

    Yields a list that fills with ``{"op": "all_gather" | "all_reduce", "where": "forward" | "backward" |
    "check", "numel": numbers sent by this rank, "bytes": bytes sent by this rank, "received": numbers this
    rank receives}``, one dict per call.
    """
    log: list[dict] = []
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)


def _log(op: str, where: str, t: Tensor, received: int) -> None:
    for log in _LOGS:
        log.append({"op": op, "where": where, "numel": t.numel(), "bytes": t.numel() * t.element_size(),
                    "received": received})


def _all_gather(t: Tensor, group, where: str) -> Tensor:
    """(W, *t.shape): every rank's ``t``, in rank order."""
    world = dist.get_world_size(group)
    out = t.new_empty(world * t.numel())
    _log("all_gather", where, t, out.numel())
    _gather_single(out, t.contiguous().view(-1), group=group)
    return out.view(world, *t.shape)


def local_stats(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """One rank's per-channel (m, mean, M2) of x (N, C, *S): m = N * prod(S) values, M2 = sum of (x - mean)^2.

    Defined in: chapters/09_sync_bn.ipynb

    Two passes over x, in x's dtype (float32 for half inputs): mu0 = mean(x), then the deviations d = x - mu0
    give M2 = sum(d^2) - m * mean(d)^2 (no cancellation: mean(d) is tiny) and the mean mu0 + mean(d), returned
    in float64 so that it keeps the digits float32 would round away (they matter to the merge when |mean| is
    large).  M2 is in x's dtype.  A rank with no values returns m = 0 and zeros, which the merge weighs by 0.
    """
    x = _in_float32_if_half(x)
    C = x.shape[1]
    m = x.numel() // C if C else 0
    if m == 0:
        return 0, x.new_zeros(C, dtype=torch.float64), x.new_zeros(C)
    dims = _channel_dims(x)
    mu0 = x.mean(dims, keepdim=True)
    d = x - mu0
    d_mean = d.mean(dims)
    m2 = d.square().sum(dims) - m * d_mean.square()
    return m, mu0.view(-1).double() + d_mean.double(), m2


def merge_stats(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge W ranks' statistics (Chan, Golub and LeVeque): counts (W,), means (W, C), m2s (W, C).

    Defined in: chapters/09_sync_bn.ipynb

    Returns (m, mu, M2) of the union: m = sum counts (scalar tensor), mu (C,), M2 (C,) with
    ``M2 = sum_r M2_r + sum_r m_r (mean_r - mu)^2``, a sum of non-negative terms.  Ranks with count 0 add
    nothing.  The biased variance is M2 / m, the unbiased one M2 / (m - 1).
    """
    w = counts.to(means.dtype).unsqueeze(1)  # (W, 1)
    m = w.sum()
    mu = (w * means).sum(0) / m
    m2 = m2s.sum(0) + (w * (means - mu).square()).sum(0)
    return m, mu, m2


class SyncBatchNormFunction(torch.autograd.Function):
    """y = (x - mu) / sqrt(var + eps) * gamma + beta with mu, var over the batches of every rank of ``group``.

    Defined in: chapters/09_sync_bn.ipynb

    ``SyncBatchNormFunction.apply(x, weight, bias, eps, group)`` -> ``(y, mu, var, m)``.  x: (N_r, C, *S),
    N_r may be 0; weight, bias: (C,) or None.  y: x's shape and dtype; mu, var: (C,) global biased statistics
    (non-differentiable); m: the global count, a float64 scalar tensor.  Communication: one all-gather of
    2C + 3 float64 numbers in forward, one all-reduce of 2C numbers in backward (see the module docstring).
    Raises RuntimeError on every rank if the ranks disagree on the dtype, ValueError if the global count is 1.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        x32 = _in_float32_if_half(x)
        C, shape = x.shape[1], _channel_shape(x)
        m_r, mean_r, m2_r = local_stats(x32)
        packet = torch.cat([x32.new_tensor([C, _DTYPE_CODE[x.dtype], m_r], dtype=torch.float64),
                            mean_r.to(torch.float64), m2_r.to(torch.float64)])
        packets = _all_gather(packet, group, "forward")  # (W, 2C + 3)
        codes = packets[:, 1].long().tolist()
        if len(set(codes)) > 1:
            names = ", ".join(f"rank {r}: {_CODE_DTYPE[c]}" for r, c in enumerate(codes))
            raise RuntimeError(f"SyncBatchNorm: the ranks disagree on the input dtype ({names}); every rank must "
                               f"run the same model in the same dtype")
        m, mu64, m2_64 = merge_stats(packets[:, 2], packets[:, 3:3 + C], packets[:, 3 + C:])
        if m <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(m)} value(s) per "
                             f"channel over all ranks (input size {x.size()} on this rank)")
        mu, var = mu64.to(x32.dtype), (m2_64 / m).to(x32.dtype)
        inv_std = torch.rsqrt(var.view(shape) + eps)
        x_hat = (x32 - mu.view(shape)) * inv_std
        y = x_hat if weight is None else x_hat * weight.view(shape)
        y = y if bias is None else y + bias.view(shape)
        ctx.save_for_backward(x, weight, mu, var)
        ctx.eps, ctx.group, ctx.m = eps, group, float(m)
        ctx.mark_non_differentiable(mu, var, m)
        return y.to(x.dtype), mu, var, m

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmu, _dvar, _dm):
        x, weight, mu, var = ctx.saved_tensors
        dims, shape = _channel_dims(x), _channel_shape(x)
        x32, dy = _in_float32_if_half(x), _in_float32_if_half(dy)
        C = x.shape[1]
        inv_std = torch.rsqrt(var.view(shape) + ctx.eps)
        x_hat = (x32 - mu.view(shape)) * inv_std
        dbeta = dy.sum(dims)  # local sums: (C,) each
        dgamma = (dy * x_hat).sum(dims)
        sums = torch.cat([dbeta, dgamma])
        _log("all_reduce", "backward", sums, sums.numel())
        dist.all_reduce(sums, group=ctx.group)  # global sum(dy), sum(dy * x_hat)
        sum_dy, sum_dy_xhat = sums[:C].view(shape), sums[C:].view(shape)
        gamma = 1.0 if weight is None else weight.view(shape)
        dx = gamma * inv_std * (dy - sum_dy / ctx.m - x_hat * sum_dy_xhat / ctx.m)
        need_x, need_gamma, need_beta = ctx.needs_input_grad[:3]
        return (dx.to(x.dtype) if need_x else None, dgamma if need_gamma else None,
                dbeta if need_beta else None, None, None)


def _synced(group) -> bool:
    """True inside a process group of more than one rank (else SyncBatchNorm is plain batch norm)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _check_local(input, running_mean, running_var, weight, bias, momentum, eps):
    """torch's input checks for training mode, except "more than 1 value per channel", which is global here."""
    values = input.numel() // max(input.shape[1], 1) if input.dim() >= 2 else input.numel()
    if values == 1:  # one value on this rank is fine if other ranks have more: check a two-row view instead
        input = input.expand(2, *input.shape[1:])
    _check_inputs(input, running_mean, running_var, weight, bias, True, momentum, eps)


def sync_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5, group=None) -> Tensor:
    """:func:`bnlib.torch_bn.batch_norm` with the batch statistics of every rank of ``group`` (None: the world).

    Defined in: chapters/09_sync_bn.ipynb

    input: (N_r, C, *S) on rank r; the other arguments as in ``torch.nn.functional.batch_norm``.  In training
    mode inside a process group of more than one rank: normalise with the statistics of the concatenated batch
    (m = sum_r N_r prod(S) values per channel) and update the running buffers (the same on every rank) with
    mu and the unbiased ``var * m / (m - 1)``.  Otherwise (eval mode, no process group, one rank): exactly
    :func:`bnlib.torch_bn.batch_norm`.  Every rank of the group must call it (a rank that does not leaves the
    others waiting until the process group's timeout).
    """
    if not (training and _synced(group)):
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    _check_local(input, running_mean, running_var, weight, bias, momentum, eps)
    y, mu, var, m = SyncBatchNormFunction.apply(input, weight, bias, eps, group)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_((1 - momentum) * running_mean + momentum * mu)
            running_var.copy_((1 - momentum) * running_var + momentum * (var.double() * m / (m - 1)).to(var.dtype))
    return y


def _check_same_channels(input: Tensor, num_features: int, group) -> None:
    """One fixed-size all-gather of (C, input dims) per module, before the first synchronised forward.

    Packets of different sizes would crash gloo (it aborts the process) or hang another backend, so the ranks
    first compare the sizes they are about to send, and all raise the same error if they differ.
    """
    header = torch.tensor([num_features, input.shape[1], input.dim()], dtype=torch.int64, device=input.device)
    headers = _all_gather(header, group, "check").tolist()
    if any(h != headers[0] for h in headers):
        names = ", ".join(f"rank {r}: C={h[1]} (num_features={h[0]}), {h[2]}-D input" for r, h in enumerate(headers))
        raise RuntimeError(f"SyncBatchNorm: the ranks disagree on the number of channels or the input's dims "
                           f"({names}); every rank must run the same model on inputs of the same layout")


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` that also runs on CPU (gloo) and with any backend, computed by bnlib.

    Defined in: chapters/09_sync_bn.ipynb

    Same constructor as torch's, ``SyncBatchNorm(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None)``, and the same parameters, buffers, state_dict, repr and input
    checks.  A subclass of torch's ``_BatchNorm`` (like every torch batch-norm layer) but not of
    ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses that class on CPU.  Input (N_r, C, *S), any
    N_r >= 0 per rank.  Training mode inside a process group of more than one rank: :func:`sync_batch_norm`
    (the first such forward also checks that every rank has the same C); otherwise plain batch norm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    _channels_checked = False

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_buffers else None
        running_var = self.running_var if use_buffers else None
        if not self.training:  # eval mode: nothing to synchronise
            return batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor,
                              self.eps)
        group = self.process_group or dist.group.WORLD
        if _synced(group) and not self._channels_checked:
            _check_same_channels(input, self.num_features, group)
            self._channels_checked = True
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, True, factor, self.eps,
                               group)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Same as :func:`convert_sync_batchnorm` (torch's classmethod, returning bnlib's class)."""
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """Replace every BatchNorm{1,2,3}d (torch's, bnlib's, or torch's SyncBatchNorm) by :class:`SyncBatchNorm`.

    Defined in: chapters/09_sync_bn.ipynb

    The new layers share the old ones' Parameter and buffer objects (an optimiser built before keeps working)
    and keep the train/eval flag.  Returns ``module`` (changed in place), or the new layer if ``module`` itself
    is a batch-norm layer.
    """
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, device="meta",
                            bias=module.bias is not None if module.affine else True)
        new._parameters.update(module._parameters)
        new._buffers.update(module._buffers)
        new.train(module.training)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child, process_group)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
