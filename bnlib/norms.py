"""When the batch is small: layer, instance and group norm, batch renormalization and ghost batch norm.

Defined in: chapters/08_small_batches.ipynb

One function with a choice of axes
----------------------------------
Every normalisation here standardises groups of values with the biased mean and variance of the group and
then applies a learned affine map; they differ only in *which* values form a group. For x of shape
``(N, C, *S)``, with G groups of C/G channels::

    batch norm     per channel c          over (N, *S)         statistics shared by the batch
    layer norm     per example n          over ``(C, *S)``         (torch: over the last dims in normalized_shape)
    instance norm  per (n, c)             over (*S)
    group norm     per (n, group)         over (C/G, *S)       G = 1: layer norm; G = C: instance norm

Layer, instance and group norm are batch norm applied to a *view* of x: reshape x to (1, R, M), where each of
the R rows holds the M values of one group, and batch norm's channels are then the groups. That is what this
module does: the NumPy functions call :func:`bnlib.numpy_bn.batch_norm_forward` / ``batch_norm_backward`` on
the view (chapters 2 and 3), the torch functions call :class:`bnlib.torch_bn.BatchNormFunction` (chapter 6),
so forward, the compact backward and its second derivative come from the code already proven. Only the affine
map differs: its weight and bias live on another axis (per channel for instance and group norm, per element of
``normalized_shape`` for layer norm), so they are applied outside, after the standardisation.

Batch renormalization (Ioffe 2017) and ghost batch norm (Hoffer et al. 2017) keep batch norm's per-channel
statistics and change what they are computed from (ghost: virtual sub-batches) or what they are corrected with
(renorm: the running statistics, through r and d).

NumPy semantics are torch's (shapes, defaults, running statistics, error types and messages for bad shapes and
groups), with one documented limit inherited from ``batch_norm_forward``: eps must be > 0 (torch's layer and
group norm also accept eps = 0).

Sections: NumPy (functions, layers), torch (functions, drop-in modules), batch renorm, ghost batch norm, the
small-batch grid (the seed CNN with the norm swapped) and the transfer runs (a small CNN) of the chapter.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

import torch
from torch import nn
from torch.nn import functional as F

from bnlib import torch_bn
from bnlib.mnist import batch_indices, cnn_data, evaluate, progress_bar
from bnlib.models import SeedCNN
from bnlib.numpy_bn import BNCache, batch_norm_backward, batch_norm_forward, batch_norm_inference

__all__ = [
    # NumPy
    "NormCache",
    "layer_norm_forward",
    "group_norm_forward",
    "instance_norm_forward",
    "norm_backward",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    # torch
    "layer_norm",
    "group_norm",
    "instance_norm",
    "TorchLayerNorm",
    "TorchGroupNorm",
    "TorchInstanceNorm1d",
    "TorchInstanceNorm2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "renorm_limits",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "norm_factories",
    "small_batch_model",
    "SmallCNN",
    "SmallBatchConfig",
    "small_batch_data",
    "small_batch_run",
    "small_batch_grid",
    "freeze_bn",
    "adapt_bn",
    "finetune_run",
    "shift_images",
    "adabn_run",
    "transfer_experiments",
]

# ==========================================================================================================
# NumPy
# ==========================================================================================================

class NormCache(NamedTuple):
    """What a NumPy forward saves for :func:`norm_backward`.

    Defined in: chapters/08_small_batches.ipynb

    Fields:
      bn      : BNCache of batch norm on the (1, R, M) view (x_hat, inv_std, ... of the R groups).
      shape   : x's shape.
      weight, bias : the affine parameters (weight_shape) in the compute dtype, or None.
      affine_shape : shape in which weight and bias broadcast against x, e.g. (1, C, 1, 1) or (C, H, W).
      affine_axes  : the axes of x that dweight and dbias are summed over.
    """

    bn: BNCache
    shape: tuple
    weight: np.ndarray | None
    bias: np.ndarray | None
    affine_shape: tuple
    affine_axes: tuple


def _standardize(x, rows: int, eps: float):
    """Batch norm of the (1, rows, M) view of x, no affine: returns (x_hat in x's shape, BNCache).

    M = 1 (one value per group, which batch norm refuses): x_hat = x - mean = 0, as in torch; the cache makes
    batch_norm_backward return dx = 0, the compact formula with m = 1.
    """
    view = x.reshape(1, rows, -1)
    if view.shape[2] == 1:
        xc = view.astype(np.promote_types(x.dtype, np.float32))
        zero = np.zeros(rows, xc.dtype)
        cache = BNCache(view, np.zeros_like(xc), xc.ravel(), zero, zero + 1 / np.sqrt(eps), None, None, eps,
                        (0, 2), batch_stats=True)
        return np.zeros_like(x), cache
    x_hat, cache = batch_norm_forward(view, None, None, eps)
    return x_hat.reshape(x.shape), cache


def _affine(x_hat, weight, bias, affine_shape):
    """y = weight * x_hat + bias with weight and bias reshaped to affine_shape (each may be None)."""
    y = x_hat if weight is None else x_hat * np.asarray(weight, x_hat.dtype).reshape(affine_shape)
    return y if bias is None else y + np.asarray(bias, x_hat.dtype).reshape(affine_shape)


def _channel_affine(x):
    """(affine_shape, affine_axes) of a per-channel (C,) weight for x of shape ``(N, C, *S)``."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2), (0,) + tuple(range(2, x.ndim))


def _as_float(x):
    x = np.asarray(x)
    if x.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"expected a floating-point array (float16, float32 or float64), got dtype {x.dtype}")
    return x


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer norm over the last ``len(normalized_shape)`` axes of x, like ``torch.nn.functional.layer_norm``.

    Defined in: chapters/08_small_batches.ipynb

    x: ``(*, *normalized_shape)``; weight, bias: normalized_shape or None. Each of the ``prod(*)`` rows is standardised
    over its prod(normalized_shape) values (biased variance, eps inside the root), then
    y = weight * x_hat + bias elementwise. Returns (y of x's shape and dtype, NormCache).
    Raises torch's RuntimeError for a shape that does not end in normalized_shape or a weight of another shape.
    """
    x = _as_float(x)
    shape = (int(normalized_shape),) if np.isscalar(normalized_shape) else tuple(int(s) for s in normalized_shape)
    k = len(shape)
    if x.ndim < k or tuple(x.shape[x.ndim - k:]) != shape:
        raise RuntimeError(f"Given normalized_shape={_shape_str(shape)}, expected input with shape "
                           f"[*, {', '.join(str(s) for s in shape)}], but got input of size{_shape_str(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(np.shape(p)) != shape:
            raise RuntimeError(f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                               f"{_shape_str(np.shape(p))} and normalized_shape = {_shape_str(shape)}")
    rows = math.prod(x.shape[: x.ndim - k])
    x_hat, bn = _standardize(x, rows, eps)
    affine_shape, affine_axes = shape, tuple(range(x.ndim - k))
    y = _affine(x_hat, weight, bias, affine_shape)
    cache = NormCache(bn, x.shape, _vec(weight, x_hat), _vec(bias, x_hat), affine_shape, affine_axes)
    return y.astype(x.dtype, copy=False), cache


def _vec(p, like):
    return None if p is None else np.asarray(p, like.dtype)


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm, like ``torch.nn.functional.group_norm``.

    Defined in: chapters/08_small_batches.ipynb

    x: ``(N, C, *S)`` with C divisible by G = num_groups; weight, bias: (C,) or None. Each example's channels are
    split into G consecutive groups of C/G; each (example, group) is standardised over its C/G * prod(S)
    values, then y = weight[c] * x_hat + bias[c] per channel. Returns (y of x's shape and dtype, NormCache).
    Raises torch's errors for fewer than 2 dimensions, C not divisible by G, and weight/bias of the wrong size.
    """
    x = _as_float(x)
    if x.ndim < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {x.ndim}")
    N, C = x.shape[:2]
    size = [N * C // num_groups, num_groups] + list(x.shape[2:])
    if size[0] * math.prod(size[2:]) == 1:  # torch's _verify_batch_size on this list
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    if C % num_groups != 0:
        raise RuntimeError(f"Expected number of channels in input to be divisible by num_groups, but got input "
                           f"of shape {_shape_str(x.shape)} and num_groups={num_groups}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (np.ndim(p) != 1 or np.size(p) != C):
            raise RuntimeError(f"Expected {name} to be a vector of size equal to the number of channels in input, "
                               f"but got {name} of shape {_shape_str(np.shape(p))} and input of shape "
                               f"{_shape_str(x.shape)}")
    x_hat, bn = _standardize(x, N * num_groups, eps)
    affine_shape, affine_axes = _channel_affine(x)
    y = _affine(x_hat, weight, bias, affine_shape)
    cache = NormCache(bn, x.shape, _vec(weight, x_hat), _vec(bias, x_hat), affine_shape, affine_axes)
    return y.astype(x.dtype, copy=False), cache


def instance_norm_forward(x, running_mean=None, running_var=None, weight=None, bias=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5):
    """Instance norm, like ``torch.nn.functional.instance_norm``.

    Defined in: chapters/08_small_batches.ipynb

    x: ``(N, C, *S)``; running_mean, running_var, weight, bias: (C,) or None.
    use_input_stats=True: each (n, c) is standardised over its prod(S) values; if the running buffers are
    given they are updated in place with the mean over the N examples of the per-instance statistics::

        running_mean <- (1 - momentum) * running_mean + momentum * mean_n(mu[n, c])
        running_var  <- (1 - momentum) * running_var  + momentum * mean_n(var[n, c] * M / (M - 1))

    with M = prod(S) (what torch does: batch norm on the ``(1, N*C, *S)`` view with the buffers repeated N times).
    use_input_stats=False: normalise with the running buffers. Returns (y of x's shape and dtype, NormCache).
    """
    x = _as_float(x)
    if use_input_stats and math.prod(x.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size "
                         f"torch.Size({list(x.shape)})")
    N, C = x.shape[:2]
    for name, p in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if p is not None and np.size(p) != C:
            raise RuntimeError(f"{name} should contain {N * C} elements not {N * np.size(p)}")
    view = x.reshape(1, N * C, -1)
    if use_input_stats:
        x_hat, bn = batch_norm_forward(view, None, None, eps)
        if running_mean is not None:
            M = view.shape[2]
            mu = bn.mu.astype(np.float64).reshape(N, C).mean(0)
            var = (bn.var.astype(np.float64) * M / (M - 1)).reshape(N, C).mean(0)
            running_mean[...] = (1 - momentum) * running_mean + momentum * mu
            running_var[...] = (1 - momentum) * running_var + momentum * var
    else:
        x_hat, bn = batch_norm_inference(view, np.tile(running_mean, N), np.tile(running_var, N), None, None, eps)
    x_hat = x_hat.reshape(x.shape)
    affine_shape, affine_axes = _channel_affine(x)
    y = _affine(x_hat, weight, bias, affine_shape)
    cache = NormCache(bn, x.shape, _vec(weight, x_hat), _vec(bias, x_hat), affine_shape, affine_axes)
    return y.astype(x.dtype, copy=False), cache


def norm_backward(dy, cache: NormCache):
    """Backward of layer, group and instance norm: ``(dx, dweight, dbias)`` (None for an absent parameter).

    Defined in: chapters/08_small_batches.ipynb

    The affine part first, summed over the axes the parameters are shared across:
        dbias = sum(dy),  dweight = sum(dy * x_hat),  dx_hat = weight * dy
    then batch norm's compact backward (:func:`bnlib.numpy_bn.batch_norm_backward`) on the (1, R, M) view:
        dx = inv_std / M * (M * dx_hat - sum(dx_hat) - x_hat * sum(dx_hat * x_hat))   per group of M values.
    """
    dy = np.asarray(dy)
    if dy.shape != tuple(cache.shape):
        raise ValueError(f"dy must have the shape of x {tuple(cache.shape)}, got {dy.shape}")
    x_hat = cache.bn.x_hat.reshape(cache.shape)
    dy = dy.astype(x_hat.dtype, copy=False)
    dbias = None if cache.bias is None else _sum_to(dy, cache)
    dweight = None if cache.weight is None else _sum_to(dy * x_hat, cache)
    dx_hat = dy if cache.weight is None else dy * cache.weight.reshape(cache.affine_shape)
    dx, _, _ = batch_norm_backward(dx_hat.reshape(cache.bn.x_hat.shape), cache.bn)
    return dx.reshape(cache.shape).astype(cache.bn.x.dtype, copy=False), dweight, dbias


def _sum_to(a, cache: NormCache):
    """a summed over cache.affine_axes (accumulated in float64), shaped like the parameter."""
    s = a.sum(axis=cache.affine_axes, dtype=np.float64)
    return s.reshape(cache.weight.shape if cache.weight is not None else cache.bias.shape).astype(a.dtype)


class _NumpyNorm:
    """train/eval flags and backward shared by the NumPy layers."""

    training = True
    _cache = None

    def train(self, mode=True):
        """Set training mode (mode=True) or eval mode; returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set eval mode; returns self."""
        return self.train(False)

    def backward(self, dy):
        """Backward of the last forward: returns dx, stores dweight and dbias (None without affine)."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        dx, self.dweight, self.dbias = norm_backward(dy, self._cache)
        return dx

    def __call__(self, x):
        return self.forward(x)


class LayerNorm(_NumpyNorm):
    """``torch.nn.LayerNorm`` in NumPy: normalises over the last dims given by ``normalized_shape``.

    Defined in: chapters/08_small_batches.ipynb

    LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, dtype=np.float32);
    weight (ones) and bias (zeros) of shape normalized_shape. Same computation in train and eval.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, dtype=np.float32):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps, self.elementwise_affine = shape, eps, elementwise_affine
        self.weight = np.ones(shape, dtype) if elementwise_affine else None
        self.bias = np.zeros(shape, dtype) if elementwise_affine and bias else None
        self.dweight = self.dbias = None

    def forward(self, x):
        """y of x's shape, x: ``(*, *normalized_shape)``."""
        y, self._cache = layer_norm_forward(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return y


class GroupNorm(_NumpyNorm):
    """``torch.nn.GroupNorm`` in NumPy.

    Defined in: chapters/08_small_batches.ipynb

    GroupNorm(num_groups, num_channels, eps=1e-5, affine=True, dtype=np.float32); weight (ones), bias (zeros):
    (C,). Raises torch's ValueError if num_channels is not divisible by num_groups.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=np.float32):
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self.weight = np.ones(num_channels, dtype) if affine else None
        self.bias = np.zeros(num_channels, dtype) if affine else None
        self.dweight = self.dbias = None

    def forward(self, x):
        """y of x's shape, x: ``(N, C, *S)``."""
        y, self._cache = group_norm_forward(x, self.num_groups, self.weight, self.bias, self.eps)
        return y


class _InstanceNorm(_NumpyNorm):
    """``torch.nn.InstanceNorm{1,2}d`` in NumPy (the defaults differ from batch norm's: affine=False,
    track_running_stats=False). Unbatched input ``(C, *S)`` is accepted, as in torch."""

    spatial_dims = 1

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False,
                 dtype=np.float32):
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = np.ones(num_features, dtype) if affine else None
        self.bias = np.zeros(num_features, dtype) if affine else None
        self.running_mean = np.zeros(num_features, dtype) if track_running_stats else None
        self.running_var = np.ones(num_features, dtype) if track_running_stats else None
        self.dweight = self.dbias = None

    def forward(self, x):
        """y of x's shape, x: ``(N, C, *S)`` or unbatched ``(C, *S)``."""
        x = _as_float(x)
        d = self.spatial_dims
        if x.ndim not in (d + 1, d + 2):
            raise ValueError(f"expected {d + 1}D or {d + 2}D input (got {x.ndim}D input)")
        unbatched = x.ndim == d + 1
        feature_dim = x.ndim - (d + 1)
        if x.shape[feature_dim] != self.num_features and self.affine:
            raise ValueError(f"expected input's size at dim={feature_dim} to match num_features"
                             f" ({self.num_features}), but got: {x.shape[feature_dim]}.")
        xb = x[None] if unbatched else x
        y, self._cache = instance_norm_forward(
            xb, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps)
        if unbatched:
            self._cache = self._cache._replace(shape=x.shape, affine_shape=self._cache.affine_shape[1:],
                                               affine_axes=tuple(a - 1 for a in self._cache.affine_axes[1:]))
            return y[0]
        return y


class InstanceNorm1d(_InstanceNorm):
    """``torch.nn.InstanceNorm1d`` in NumPy: input (N, C, L) or (C, L).

    Defined in: chapters/08_small_batches.ipynb
    """

    spatial_dims = 1


class InstanceNorm2d(_InstanceNorm):
    """``torch.nn.InstanceNorm2d`` in NumPy: input (N, C, H, W) or (C, H, W).

    Defined in: chapters/08_small_batches.ipynb
    """

    spatial_dims = 2


# ==========================================================================================================
# torch
# ==========================================================================================================

def _standardize_t(x, rows: int, eps: float):
    """BatchNormFunction on the (1, rows, M) view, no affine, no buffers: x_hat in x's shape."""
    fn = (torch_bn.BatchNormFunction if torch.compiler.is_compiling()
          else torch_bn.BatchNormFunctionWithJvp)
    x_hat, _, _ = fn.apply(x.reshape(1, rows, -1), None, None, None, None, True, eps)
    return x_hat.reshape(x.shape)


def _affine_t(x_hat, weight, bias, shape):
    y = x_hat if weight is None else x_hat * weight.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Drop-in for ``torch.nn.functional.layer_norm``: batch norm of the (1, rows, M) view, then the
    elementwise affine map. Same errors as torch for shapes.

    Defined in: chapters/08_small_batches.ipynb
    """
    shape = (int(normalized_shape),) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k:]) != shape:
        raise RuntimeError(f"Given normalized_shape={_shape_str(shape)}, expected input with shape "
                           f"[*, {', '.join(str(s) for s in shape)}], but got input of size"
                           f"{_shape_str(input.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != shape:
            raise RuntimeError(f"Expected {name} to be of same shape as normalized_shape, but got {name} of "
                               f"shape {_shape_str(p.shape)} and normalized_shape = {_shape_str(shape)}")
    rows = math.prod(input.shape[: input.dim() - k])
    return _affine_t(_standardize_t(input, rows, eps), weight, bias, shape)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Drop-in for ``torch.nn.functional.group_norm`` (same errors).

    Defined in: chapters/08_small_batches.ipynb
    """
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()}")
    N, C = input.shape[:2]
    size = [N * C // num_groups, num_groups] + list(input.shape[2:])
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    if C % num_groups != 0:
        raise RuntimeError(f"Expected number of channels in input to be divisible by num_groups, but got "
                           f"input of shape {_shape_str(input.shape)} and num_groups={num_groups}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 1 or p.numel() != C):
            raise RuntimeError(f"Expected {name} to be a vector of size equal to the number of channels in "
                               f"input, but got {name} of shape {_shape_str(p.shape)} and input of shape "
                               f"{_shape_str(input.shape)}")
    shape = [1, C] + [1] * (input.dim() - 2)
    return _affine_t(_standardize_t(input, N * num_groups, eps), weight, bias, shape)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """Drop-in for ``torch.nn.functional.instance_norm``: :func:`bnlib.torch_bn.batch_norm` on the
    ``(1, N*C, *S)`` view with the buffers and parameters repeated N times, then the buffers averaged back over
    the N examples (what ATen does).

    Defined in: chapters/08_small_batches.ipynb
    """
    if use_input_stats:
        size = input.size()
        if math.prod(size[2:]) == 1:
            raise ValueError(f"Expected more than 1 spatial element when training, got input size {size}")
    N, C = input.shape[:2]
    rep = (lambda t: None if t is None else t.repeat(N))
    rm, rv = rep(running_mean), rep(running_var)
    y = torch_bn.batch_norm(input.reshape(1, N * C, *input.shape[2:]), rm, rv, rep(weight), rep(bias),
                            use_input_stats, momentum, eps)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.copy_(rm.view(N, C).mean(0))
        if running_var is not None:
            running_var.copy_(rv.view(N, C).mean(0))
    return y.reshape(input.shape)


class TorchLayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by bnlib's :func:`layer_norm` (a subclass that overrides forward).

    Defined in: chapters/08_small_batches.ipynb
    """

    def forward(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class TorchGroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` computed by bnlib's :func:`group_norm` (a subclass that overrides forward).

    Defined in: chapters/08_small_batches.ipynb
    """

    def forward(self, input):
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class _BnlibInstance:
    def _apply_instance_norm(self, input):
        return instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                             self.training or not self.track_running_stats,
                             self.momentum if self.momentum is not None else 0.0, self.eps)


class TorchInstanceNorm1d(_BnlibInstance, nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` computed by bnlib's :func:`instance_norm` (torch's forward and checks,
    bnlib's computation).

    Defined in: chapters/08_small_batches.ipynb
    """


class TorchInstanceNorm2d(_BnlibInstance, nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` computed by bnlib's :func:`instance_norm`.

    Defined in: chapters/08_small_batches.ipynb
    """

# ------------------------------------------------------------------------------------ batch renorm
class _BatchRenorm:
    """Batch renormalization (Ioffe 2017), on top of batch norm's module (parameters, buffers, checks).

    Training, per channel, with the biased batch statistics mu_B, var_B and the running ones (before this
    step's update), sigma_B = sqrt(var_B + eps), sigma = sqrt(running_var + eps):
        r = clip(sigma_B / sigma, 1 / r_max, r_max),  d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
        x_hat = (x - mu_B) / sigma_B * r + d,  y = weight * x_hat + bias
    r and d are constants for the gradient (stop_gradient). The running statistics are updated as batch
    norm's (unbiased variance, momentum). r_max = 1, d_max = 0 is batch norm; unclipped (r and d inside
    their bounds) the training output equals what eval mode computes with the running statistics.
    Eval: batch norm with the running statistics. ``last_r``, ``last_d``: (C,) of the last training step.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.01, affine=True, r_max=1.0, d_max=0.0,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.last_r = self.last_d = None

    def extra_repr(self):
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training:
            return torch_bn.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                       False, 0.0, self.eps)
        torch_bn._check_inputs(input, self.running_mean, self.running_var, self.weight, self.bias, True,
                               0.0, self.eps)
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        fn = (torch_bn.BatchNormFunction if torch.compiler.is_compiling()
              else torch_bn.BatchNormFunctionWithJvp)
        x_hat, mu, var = fn.apply(input, None, None, None, None, True, self.eps)
        shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
        with torch.no_grad():
            sigma = torch.sqrt(self.running_var + self.eps)
            r = (torch.sqrt(var + self.eps) / sigma).clamp(1 / self.r_max, self.r_max)
            d = ((mu - self.running_mean) / sigma).clamp(-self.d_max, self.d_max)
            self.last_r, self.last_d = r.clone(), d.clone()
            m = input.numel() // input.shape[1]
            self.running_mean.mul_(1 - factor).add_(factor * mu)
            self.running_var.mul_(1 - factor).add_(factor * m / (m - 1) * var)
        x_hat = x_hat * r.to(x_hat.dtype).view(shape) + d.to(x_hat.dtype).view(shape)
        return _affine_t(x_hat, self.weight, self.bias, shape)


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    """Batch renormalization over (N, C) or (N, C, L); a subclass of ``torch.nn.BatchNorm1d``
    (see :class:`BatchRenorm2d`).

    Defined in: chapters/08_small_batches.ipynb
    """


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    """Batch renormalization (Ioffe 2017) over (N, C, H, W); a subclass of ``torch.nn.BatchNorm2d``.

    BatchRenorm2d(num_features, eps=1e-5, momentum=0.01, affine=True, r_max=1.0, d_max=0.0). Training:
    x_hat = (x - mu_B) / sigma_B * r + d with r = clip(sigma_B / sigma, 1/r_max, r_max),
    d = clip((mu_B - mu) / sigma, -d_max, d_max) (constants for the gradient), mu and sigma from the
    running statistics; set ``r_max``, ``d_max`` every step from a schedule (:func:`renorm_limits`).
    Eval: batch norm with the running statistics. ``last_r``, ``last_d`` hold the last step's r and d.

    Defined in: chapters/08_small_batches.ipynb
    """

# ------------------------------------------------------------------------------- ghost batch norm
class _GhostBatchNorm:
    """Ghost batch norm (Hoffer, Hubara and Soudry 2017): batch statistics over virtual sub-batches.

    Training: the batch of N is split into G = N / ghost_batch_size consecutive ghost batches; each is
    normalised with its own statistics (one batch norm on the ``(B, G*C, *S)`` view, weight and bias shared);
    the running statistics are updated once per step with the mean over the G ghost batches of their mean
    and unbiased variance. G = 1 is batch norm. Eval: batch norm with the running statistics.
    """

    def __init__(self, num_features, ghost_batch_size, eps=1e-5, momentum=0.1, affine=True, device=None,
                 dtype=None):
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        self.ghost_batch_size = int(ghost_batch_size)

    def extra_repr(self):
        return super().extra_repr() + f", ghost_batch_size={self.ghost_batch_size}"

    def forward(self, input):
        self._check_input_dim(input)
        if not self.training:
            return torch_bn.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                       False, 0.0, self.eps)
        N, C, B = input.shape[0], input.shape[1], self.ghost_batch_size
        if N % B != 0:
            raise ValueError(f"batch size {N} is not a multiple of ghost_batch_size {B}")
        G = N // B
        rest = list(input.shape[2:])
        view = input.reshape(G, B, C, *rest).transpose(0, 1).reshape(B, G * C, *rest)
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        rm, rv = self.running_mean.repeat(G), self.running_var.repeat(G)
        rep = (lambda t: None if t is None else t.repeat(G))
        y = torch_bn.batch_norm(view, rm, rv, rep(self.weight), rep(self.bias), True, factor, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(rm.view(G, C).mean(0))
            self.running_var.copy_(rv.view(G, C).mean(0))
        return y.reshape(B, G, C, *rest).transpose(0, 1).reshape(input.shape)


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """Ghost batch norm over (N, C) or (N, C, L); a subclass of ``torch.nn.BatchNorm1d``
    (see :class:`GhostBatchNorm2d`).

    Defined in: chapters/08_small_batches.ipynb
    """


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """Ghost batch norm (Hoffer et al. 2017) over (N, C, H, W); a subclass of ``torch.nn.BatchNorm2d``.

    GhostBatchNorm2d(num_features, ghost_batch_size, eps=1e-5, momentum=0.1, affine=True). Training: each
    run of ``ghost_batch_size`` consecutive examples is normalised with its own statistics; the running
    statistics move once per step towards the mean of the ghost batches' statistics. N must be a multiple
    of ghost_batch_size. Eval: batch norm with the running statistics.

    Defined in: chapters/08_small_batches.ipynb
    """


def renorm_limits(step: int, total: int, warmup: float = 0.125, r_max: float = 3.0, d_max: float = 5.0,
                  r_end: float = 1.0, d_end: float = 0.625) -> tuple[float, float]:
    """(r_max, d_max) at ``step`` of ``total``: Ioffe (2017)'s schedule, scaled to a run of ``total`` steps.

    Defined in: chapters/08_small_batches.ipynb

    The paper keeps r_max = 1, d_max = 0 (batch norm) for the first 5k of its steps, then relaxes them linearly
    to reach r_max = 3 at 40k steps and d_max = 5 at 25k. As fractions of a 40k-step run: warm-up 1/8, r_max
    reaches its final value at the end (r_end = 1), d_max at 25/40 = 0.625 of the run (d_end).
    """
    t = step / max(total, 1)
    if t <= warmup:
        return 1.0, 0.0
    r = 1.0 + (r_max - 1.0) * min(1.0, (t - warmup) / (r_end - warmup))
    d = d_max * min(1.0, (t - warmup) / (d_end - warmup))
    return r, d


# ==========================================================================================================
# The experiment: the seed CNN, trained with small batches
# ==========================================================================================================

def _norm_layer(norm: str, C: int, groups: int):
    if norm == "none":
        return nn.Identity()
    if norm == "bn":
        return nn.BatchNorm2d(C)
    if norm == "gn":
        return TorchGroupNorm(groups, C)
    if norm == "ln":
        return TorchGroupNorm(1, C)
    if norm == "renorm":
        return BatchRenorm2d(C)
    raise ValueError(f"unknown norm {norm!r}: use none, bn, gn, ln or renorm")


def norm_factories(norm: str, groups: int = 4):
    """``(layer_1d, layer_2d)``: what :class:`bnlib.models.SeedCNN` puts where its BN layers go, for ``norm``.

    Defined in: chapters/08_small_batches.ipynb

    ``"bn"``: torch's BatchNorm1d/2d (equal to bnlib's, chapter 6); ``"gn"``: ``nn.GroupNorm(groups, C)``;
    ``"ln"``: ``nn.GroupNorm(1, C)`` (layer norm over (C, H, W), or over the C features after fc1, with a
    per-channel affine map); ``"renorm"``: :class:`BatchRenorm1d` / :class:`BatchRenorm2d`. torch's GroupNorm
    (equal to :class:`TorchGroupNorm`, proven in the chapter) because its fused kernels are faster, and the
    seed CNN at batch 2 is what the grid's budget is spent on. ``"none"`` has no factories (None, None).
    """
    if norm == "none":
        return None, None
    if norm == "bn":
        return nn.BatchNorm1d, nn.BatchNorm2d
    if norm in ("gn", "ln"):
        g = groups if norm == "gn" else 1
        return (lambda C: nn.GroupNorm(g, C)), (lambda C: nn.GroupNorm(g, C))
    if norm == "renorm":
        return BatchRenorm1d, BatchRenorm2d
    raise ValueError(f"unknown norm {norm!r}: use none, bn, gn, ln or renorm")


def small_batch_model(norm: str, groups: int = 4) -> SeedCNN:
    """The seed CNN of chapters 6 and 7 (:class:`bnlib.models.SeedCNN`, dropout kept) with ``norm`` where
    its BN layers sit (after each conv and after fc1, before the ReLU; :func:`norm_factories`); no norm
    layers for ``"none"``.

    Defined in: chapters/08_small_batches.ipynb
    """
    d1, d2 = norm_factories(norm, groups)
    return SeedCNN(bn=norm != "none", bn_layer=d1, bn2d_layer=d2)


class SmallCNN(nn.Module):
    """conv(1→8, 3×3) → norm → ReLU → maxpool 2 → conv(8→16, 3×3) → norm → ReLU → maxpool 2 → fc(400→10).

    The network of the fine-tuning and AdaBN runs (:func:`finetune_run`, :func:`adabn_run`,
    ``results/small_batch_transfer.json``): seconds per run, and they only need a BN network (the grid uses the
    seed CNN, :func:`small_batch_model`). ``norm``: ``"none"``, ``"bn"`` (torch's BatchNorm2d, proven equal to
    bnlib's in chapter 6), ``"gn"`` (GroupNorm with ``groups`` groups), ``"ln"`` (GroupNorm with one group:
    layer norm over (C, H, W) with a per-channel affine map), ``"renorm"`` (:class:`BatchRenorm2d`).
    Convolutions have no bias when a norm follows. Input (N, 1, 28, 28).

    Defined in: chapters/08_small_batches.ipynb
    """

    def __init__(self, norm: str = "bn", groups: int = 4, channels: tuple = (8, 16)):
        super().__init__()
        c1, c2 = channels
        bias = norm == "none"
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, bias=bias), _norm_layer(norm, c1, groups), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, bias=bias), _norm_layer(norm, c2, groups), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten())
        self.fc = nn.Linear(c2 * 25, 10)

    def forward(self, x):
        return self.fc(self.features(x))


@dataclass
class SmallBatchConfig:
    """The small-batch experiment's grid and budget (the chapter explains each choice).

    Defined in: chapters/08_small_batches.ipynb
    """

    batch_sizes: tuple = (2, 4, 8, 16, 64)
    norms: tuple = ("none", "bn", "gn", "ln", "renorm")
    seeds: tuple = (0, 1, 2)
    examples: int = 3_000          # examples seen by every run, whatever its batch size
    train_size: int = 10_000       # a fixed random subset of the 60k training images
    test_size: int = 1_000         # a fixed random subset of the 10k test images
    base_lr: float = 0.05          # SGD + momentum 0.9 at batch size 64 (chapter 7's seed CNN) ...
    base_batch: int = 64           # ... scaled as base_lr * sqrt(B / base_batch)
    momentum: float = 0.9
    groups: int = 4
    data_seed: int = 0             # the choice of the subsets
    threads: int = 1

    def lr(self, batch_size: int) -> float:
        """Square-root scaling: lr(B) = base_lr * sqrt(B / base_batch)."""
        return self.base_lr * math.sqrt(batch_size / self.base_batch)

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def small_batch_data(cfg=None, root=None):
    """Standardised MNIST subsets ``(x_train, y_train, x_test, y_test)`` of ``cfg.train_size`` and
    ``cfg.test_size`` images (a fixed seeded choice, the same for every run): :func:`bnlib.mnist.cnn_data`.

    Defined in: chapters/08_small_batches.ipynb
    """
    return cnn_data(cfg or SmallBatchConfig(), root)


def small_batch_run(norm, batch_size, seed, data, cfg=None, progress=False):
    """Train one :func:`small_batch_model` for ``cfg.examples`` examples in batches of ``batch_size``; evaluate.

    Returns ``{"test_accuracy" (eval mode), "train_mode_accuracy" (test batches of ``batch_size`` in
    training mode, i.e. with their own batch statistics; None without batch statistics), "batch1_accuracy"
    (eval mode, one image at a time, on the first 200 test images), "eval_accuracy_200" (eval mode, the
    same 200 images in one batch), "diverged", "seconds"}``.

    Defined in: chapters/08_small_batches.ipynb
    """
    cfg = cfg or SmallBatchConfig()
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = small_batch_model(norm, cfg.groups)
    steps = cfg.examples // batch_size
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr(batch_size), momentum=cfg.momentum)
    model.train()
    t0, diverged = time.perf_counter(), False
    for step, idx in enumerate(progress_bar(batch_indices(x.shape[0], batch_size, seed, steps), total=steps,
                                            desc=f"{norm} B={batch_size}", progress=progress)):
        if norm == "renorm":
            for mod in model.modules():
                if isinstance(mod, _BatchRenorm):
                    mod.r_max, mod.d_max = renorm_limits(step, steps)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if not math.isfinite(loss.item()):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out = {"diverged": diverged, "seconds": time.perf_counter() - t0}
    out["test_accuracy"] = evaluate(model, xt, yt)[1]
    batch_stats = norm in ("bn", "renorm")
    out["train_mode_accuracy"] = evaluate(model, xt, yt, batch_size, train_mode=True)[1] if batch_stats \
        else None
    model.eval()
    with torch.no_grad():
        one = torch.cat([model(xt[i: i + 1]) for i in range(200)]).argmax(1)
        full = model(xt[:200]).argmax(1)
    out["batch1_accuracy"] = (one == yt[:200]).float().mean().item()
    out["eval_accuracy_200"] = (full == yt[:200]).float().mean().item()
    out["model"] = model
    return out


def small_batch_grid(cfg=None, data=None, progress=True):
    """Every (norm, batch size, seed) of ``cfg``: a JSON-ready dict
    ``{"config", "runs": [{"norm", "batch_size", "seed", "lr", "steps", ...small_batch_run's numbers}]}``.

    Defined in: chapters/08_small_batches.ipynb
    """
    cfg = cfg or SmallBatchConfig()
    torch.set_num_threads(cfg.threads)
    data = data or small_batch_data(cfg)
    runs = []
    for norm in cfg.norms:
        for B in cfg.batch_sizes:
            for seed in cfg.seeds:
                r = small_batch_run(norm, B, seed, data, cfg)
                r.pop("model")
                runs.append({"norm": norm, "batch_size": B, "seed": seed, "lr": cfg.lr(B),
                             "steps": cfg.examples // B, **r})
                if progress:
                    print(f"{norm:7s} B={B:3d} seed={seed}: test acc {r['test_accuracy']:.4f} "
                          f"({r['seconds']:.1f} s)", flush=True)
    return {"config": cfg.as_dict(), "runs": runs}



# ==========================================================================================================
# Fine-tuning and shifted test data: frozen statistics and AdaBN
# ==========================================================================================================

def _bn_modules(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_bn(model):
    """Put every batch-norm layer of ``model`` (BatchNorm*d and its subclasses) in eval mode, in place.

    Defined in: chapters/08_small_batches.ipynb

    Its running statistics stop changing and normalise the activations (weight and bias still train, unless
    their requires_grad is False). ``model.train()`` undoes this: call freeze_bn after every model.train().
    Returns model.
    """
    for bn in _bn_modules(model):
        bn.eval()
    return model


@torch.no_grad()
def adapt_bn(model, x, batch_size: int = 64):
    """AdaBN (Li et al. 2016): re-estimate every batch-norm layer's running statistics on data ``x``, in place.

    Defined in: chapters/08_small_batches.ipynb

    The statistics are reset and replaced by the average over the batches of ``x`` (in order, ``batch_size``
    each) of the batch mean and unbiased variance (momentum None: a cumulative average); only the BN layers run
    in training mode (dropout stays off); no weight changes. The layers' momentum is restored and the model is
    left in eval mode. Returns model.
    """
    model.eval()
    bns = _bn_modules(model)
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for i in range(0, x.shape[0], batch_size):
        model(x[i: i + batch_size])
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return model.eval()


def _train(model, x, y, batch_size, examples, lr, seed, momentum=0.9, after_train=None):
    """SGD + momentum on (x, y) for ``examples`` examples in batches of ``batch_size``; after_train(model) is
    called after model.train() (e.g. freeze_bn)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    model.train()
    if after_train is not None:
        after_train(model)
    for idx in batch_indices(x.shape[0], batch_size, seed, examples // batch_size):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def finetune_run(seed, data, batch_size: int = 4, source_examples: int = 6_000, target_examples: int = 2_000,
                 lr: float = 0.01):
    """Train a BN :class:`SmallCNN` on digits 0-4 (batches of 64), then fine-tune two copies of it on digits 5-9
    with small batches and a fresh classifier head: one with its BN layers updating (training mode), one with
    them frozen (:func:`freeze_bn`).

    Defined in: chapters/08_small_batches.ipynb

    data: (x_train, y_train, x_test, y_test) as from :func:`small_batch_data`. Fine-tuning sees only the
    first 500 training images of digits 5-9 (a small target set), ``target_examples`` examples in all. Returns
    ``{"source_accuracy"}`` (digits 0-4 after pre-training), ``"updating"`` and ``"frozen"`` (digits 5-9 after
    fine-tuning), test accuracies in eval mode.
    """
    import copy

    x, y, xt, yt = data
    src, tgt = y < 5, y >= 5
    torch.manual_seed(seed)
    model = SmallCNN("bn")
    _train(model, x[src], y[src], 64, source_examples, 0.05, seed)
    out = {"source_accuracy": evaluate(model, xt[yt < 5], yt[yt < 5])[1]}
    xs, ys = x[tgt][:500], y[tgt][:500]
    for name, after in (("updating", None), ("frozen", freeze_bn)):
        tuned = copy.deepcopy(model)
        torch.manual_seed(seed + 1000)
        tuned.fc.reset_parameters()  # a fresh classifier head, as in transfer learning
        _train(tuned, xs, ys, batch_size, target_examples, lr, seed + 1000, after_train=after)
        out[name] = evaluate(tuned, xt[yt >= 5], yt[yt >= 5])[1]
    return out


def shift_images(x, kind: str):
    """A shifted test domain for standardised MNIST images x (N, 1, 28, 28).

    Defined in: chapters/08_small_batches.ipynb

    ``"contrast"``: half the contrast on a brighter background, pixel p -> 0.5 p + 0.4 (in [0, 1] units), an
    affine map of every input value; ``"rotate"``: every digit rotated by 30 degrees (bilinear, zero padding in
    pixel units).
    """
    from bnlib.data import MNIST_MEAN, MNIST_STD

    p = x * MNIST_STD + MNIST_MEAN                      # back to [0, 1] pixels
    if kind == "contrast":
        p = 0.5 * p + 0.4
    elif kind == "rotate":
        a = math.radians(30.0)
        theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype)
        grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
        p = F.grid_sample(p, grid, align_corners=False, padding_mode="zeros")
    else:
        raise ValueError(f"unknown shift {kind!r}: use 'contrast' or 'rotate'")
    return (p - MNIST_MEAN) / MNIST_STD


def adabn_run(seed, data, shifts=("contrast", "rotate"), examples: int = 6_000, batch_size: int = 64):
    """Train a BN :class:`SmallCNN` on MNIST; test it on clean digits and on each shifted test set
    (:func:`shift_images`), with the training statistics and after :func:`adapt_bn` on the shifted images.

    Defined in: chapters/08_small_batches.ipynb

    Returns ``{"clean": acc, shift: {"source_stats": acc, "adapted": acc}}`` (eval mode).
    """
    import copy

    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = SmallCNN("bn")
    _train(model, x, y, batch_size, examples, 0.05, seed)
    out = {"clean": evaluate(model, xt, yt)[1]}
    for kind in shifts:
        xs = shift_images(xt, kind)
        out[kind] = {"source_stats": evaluate(model, xs, yt)[1],
                     "adapted": evaluate(adapt_bn(copy.deepcopy(model), xs, batch_size), xs, yt)[1]}
    return out


def transfer_experiments(seeds=(0, 1, 2), progress: bool = True) -> dict:
    """:func:`finetune_run` and :func:`adabn_run` for every seed, on :func:`small_batch_data`'s subsets of
    10,000 training and 2,000 test images (data_seed 0).

    Defined in: chapters/08_small_batches.ipynb

    Returns the JSON-ready ``{"config": {...}, "finetune": [per seed], "adabn": [per seed]}``.
    """
    torch.set_num_threads(1)
    data = small_batch_data(SmallBatchConfig(train_size=10_000, test_size=2_000, data_seed=0))
    out = {"config": {"seeds": list(seeds), "finetune": {"batch_size": 4, "source_examples": 6_000,
                                                          "target_examples": 2_000, "target_images": 500,
                                                          "lr": 0.01},
                      "adabn": {"examples": 6_000, "batch_size": 64, "shifts": ["contrast", "rotate"]}},
           "finetune": [], "adabn": []}
    for seed in seeds:
        out["finetune"].append(finetune_run(seed, data))
        out["adabn"].append(adabn_run(seed, data))
        if progress:
            print(f"seed {seed}: fine-tune {out['finetune'][-1]}, AdaBN {out['adabn'][-1]}", flush=True)
    return out
