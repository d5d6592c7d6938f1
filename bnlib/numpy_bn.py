"""Batch normalization in NumPy: forward, backward and a layer with PyTorch's semantics.

Defined in chapters:
    chapters/02_bn_transform.ipynb       batch_norm_forward (the transform, Algorithm 1 of the paper)
    chapters/03_bn_backward.ipynb        batch_norm_backward, batch_norm_backward_staged
    chapters/04_train_vs_inference.ipynb BatchNorm (running statistics, train/eval), batch_norm_inference

Conventions (the same as torch.nn.BatchNorm1d/2d/3d):

* x has shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); axis 1 is the channel
  (feature) axis and the statistics of channel c are taken over every other axis,
  axes = (0, 2, 3, ...), m = N * prod(spatial) values per channel.
* The batch variance used to normalise is the biased one (divisor m); eps goes inside the
  square root: x_hat = (x - mu) / sqrt(var + eps), y = gamma * x_hat + beta.
* The running variance stores the unbiased estimate var * m / (m - 1).

Numerics: float16 input is computed in float32 (like torch); float32 and float64 in
themselves, with every per-channel sum accumulated in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = [
    "BNCache",
    "BatchNorm",
    "batch_norm_backward",
    "batch_norm_backward_staged",
    "batch_norm_forward",
    "batch_norm_inference",
]


class BNCache(NamedTuple):
    """What the forward pass saves for the backward pass.

    Defined in: chapters/03_bn_backward.ipynb

    Fields (C = number of channels):
      x           : the input array itself (a reference, not a copy), shape (N, C, *spatial);
                    only the staged backward reads it (to rebuild xmu = x - mu).
      x_hat       : normalised input, shape of x, in the compute dtype (float32 for
                    float16/float32 input, float64 for float64).
      mu          : (C,) mean used to normalise (batch mean, or running mean in eval).
      var         : (C,) variance used to normalise (biased batch variance, or running var).
      inv_std     : (C,) 1 / sqrt(var + eps).
      gamma, beta : (C,) scale and shift, or None when absent (no affine).
      eps         : the eps used.
      axes        : the reduced axes (0, 2, 3, ...), i.e. every axis but 1.
      batch_stats : True if mu and var are the batch statistics (training), False if
                    they were given constants (inference with running estimates).
    """

    x: np.ndarray
    x_hat: np.ndarray
    mu: np.ndarray
    var: np.ndarray
    inv_std: np.ndarray
    gamma: np.ndarray | None
    beta: np.ndarray | None
    eps: float
    axes: tuple[int, ...]
    batch_stats: bool


# ----------------------------------------------------------------------------------------
# Per-channel helpers: arrays of shape (1, C, 1, ...) broadcast against x of shape (N, C, ...)
# ----------------------------------------------------------------------------------------

def _sum(a, axes):
    """Per-channel sum over axes, shape (1, C, 1, ...), in a's dtype, accurate to float64 accumulation.

    The spatial axes (contiguous rows) are summed first in a's dtype, which NumPy does pairwise
    (error growing like log(row length)) and twice as fast as converting every element to float64;
    the rows' sums are then added up in float64.
    """
    rows = a.sum(axis=axes[1:], keepdims=True) if len(axes) > 1 else a
    return rows.sum(axis=0, keepdims=True, dtype=np.float64).astype(a.dtype)


def _mean(a, axes):
    """Per-channel mean over axes, shape (1, C, 1, ...), in a's dtype."""
    return _sum(a, axes) / _count(a, axes)


def _count(a, axes) -> int:
    """m: the number of values per channel (1 for an empty batch, whose sums are all 0)."""
    return max(1, math.prod(a.shape[i] for i in axes))


def _channel(a, like):
    """(C,) per-channel values -> (1, C, 1, ...) in like's dtype, to broadcast against like."""
    return np.asarray(a, like.dtype).reshape((1, -1) + (1,) * (like.ndim - 2))


def _vector(a, dtype):
    """gamma or beta as a (C,) array in dtype, or None."""
    return None if a is None else np.asarray(a, dtype).reshape(-1)


# ----------------------------------------------------------------------------------------
# The transform and its gradient
# ----------------------------------------------------------------------------------------

def batch_norm_forward(x, gamma, beta, eps=1e-5):
    """Batch-norm transform with batch statistics (training mode, Algorithm 1 of the paper).

    Defined in: chapters/02_bn_transform.ipynb

    For each channel c (axis 1), over the m values of that channel:
        mu = mean(x),  var = mean((x - mu)**2)  (biased),  inv_std = 1 / sqrt(var + eps)
        x_hat = (x - mu) * inv_std,  y = gamma * x_hat + beta
    The variance is computed in two passes, first the mean, then the mean of the squared
    deviations from it (the deviations re-centred once to cancel the rounding of the mean),
    which stays accurate when a channel's mean is much larger than its spread.

    Inputs:
    - x: array of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), floating point
    - gamma: scale, shape (C,), or None for no scale (gamma = 1)
    - beta: shift, shape (C,), or None for no shift (beta = 0)
    - eps: > 0, added to the variance inside the square root

    Returns a tuple of:
    - y: array of the shape and dtype of x (a new array)
    - cache: BNCache for batch_norm_backward / batch_norm_backward_staged

    Raises the exception types and messages of torch.nn.functional.batch_norm(..., training=True).
    """
    x_in, x, axes = _check_forward(x, gamma, beta, eps)  # x: the input in the compute dtype
    mu = _mean(x, axes)                     # (1, C, 1, ...)
    xmu = x - mu
    xmu -= _mean(xmu, axes)                 # 0 up to the rounding of mu to x's dtype: removes it
    var = _mean(xmu**2, axes)               # biased: divisor m
    inv_std = 1 / np.sqrt(var + eps)
    x_hat = xmu * inv_std
    y = _scale_shift(x_hat, gamma, beta)    # gamma * x_hat + beta
    cache = BNCache(x_in, x_hat, mu.ravel(), var.ravel(), inv_std.ravel(), _vector(gamma, x.dtype),
                    _vector(beta, x.dtype), eps, axes, batch_stats=True)
    return y.astype(x_in.dtype, copy=False), cache


def batch_norm_inference(x, mean, var, gamma, beta, eps=1e-5):
    """Batch-norm transform with given statistics (inference with the running estimates).

    Defined in: chapters/04_train_vs_inference.ipynb

        x_hat = (x - mean) / sqrt(var + eps),  y = gamma * x_hat + beta

    Inputs:
    - x: array of shape (N, C) or (N, C, *spatial); any N, including 1
    - mean, var: (C,) per-channel statistics (e.g. running_mean, running_var)
    - gamma, beta: (C,) or None
    - eps: >= 0

    Returns a tuple of:
    - y: array of the shape and dtype of x
    - cache: BNCache with batch_stats=False; batch_norm_backward then treats mean and var
      as constants: dx = dy * gamma * inv_std.
    """
    x_in, x, axes = _check_inference(x, mean, var, gamma, beta, eps)  # x: in the compute dtype
    mu, var = _channel(mean, x), _channel(var, x)  # (1, C, 1, ...)
    inv_std = 1 / np.sqrt(var + eps)
    x_hat = (x - mu) * inv_std
    y = _scale_shift(x_hat, gamma, beta)    # gamma * x_hat + beta
    cache = BNCache(x_in, x_hat, mu.ravel(), var.ravel(), inv_std.ravel(), _vector(gamma, x.dtype),
                    _vector(beta, x.dtype), eps, axes, batch_stats=False)
    return y.astype(x_in.dtype, copy=False), cache


def _scale_shift(x_hat, gamma, beta):
    """y = gamma * x_hat + beta, with gamma = 1 and beta = 0 when None (always a new array)."""
    y = x_hat.copy() if gamma is None else _channel(gamma, x_hat) * x_hat
    if beta is not None:
        y += _channel(beta, x_hat)          # in place: one full-size array fewer
    return y


def batch_norm_backward(dy, cache):
    """Backward pass of batch norm, compact formula.

    Defined in: chapters/03_bn_backward.ipynb

    Per channel, with m values and sums over them:
        dbeta  = sum(dy)
        dgamma = sum(dy * x_hat)
        dx     = gamma * inv_std / m * (m * dy - dbeta - x_hat * dgamma)
    With constant statistics (cache.batch_stats False, inference): dx = gamma * inv_std * dy.

    Inputs:
    - dy: upstream gradient, shape of x
    - cache: BNCache from batch_norm_forward or batch_norm_inference

    Returns a tuple of:
    - dx: shape and dtype of x
    - dgamma: (C,), or None if gamma was None
    - dbeta: (C,), or None if beta was None
    """
    dy, x_hat, gamma, inv_std, axes = _backward_inputs(dy, cache)  # gamma, inv_std: (1, C, 1, ...)
    m = _count(x_hat, axes)
    dbeta = _sum(dy, axes)
    dgamma = _sum(dy * x_hat, axes)
    if cache.batch_stats:
        dx = gamma * inv_std / m * (m * dy - dbeta - x_hat * dgamma)
    else:                                   # inference: mu and inv_std are constants
        dx = gamma * inv_std * dy
    return _gradients(dx, dgamma, dbeta, cache)


def batch_norm_backward_staged(dy, cache):
    """Backward pass of batch norm, node by node through the graph of Algorithm 1.

    Defined in: chapters/03_bn_backward.ipynb

    Forward graph (per channel, mean() over the m values of the channel):
        mu = mean(x);  xmu = x - mu;  var = mean(xmu**2);  inv_std = (var + eps)**-0.5
        x_hat = xmu * inv_std;  y = gamma * x_hat + beta
    Each line below is the chain rule for one node, visited in reverse order. Same inputs
    and results as batch_norm_backward (it makes more full-size temporaries).

    Inputs:
    - dy: upstream gradient, shape of x
    - cache: BNCache from batch_norm_forward (or batch_norm_inference)

    Returns a tuple of:
    - dx: shape and dtype of x
    - dgamma: (C,), or None if gamma was None
    - dbeta: (C,), or None if beta was None
    """
    dy, x_hat, gamma, inv_std, axes = _backward_inputs(dy, cache)  # gamma, inv_std: (1, C, 1, ...)
    m = _count(x_hat, axes)
    # y = gamma * x_hat + beta
    dbeta = _sum(dy, axes)
    dgamma = _sum(dy * x_hat, axes)
    dx_hat = dy * gamma
    if not cache.batch_stats:               # inference: mu and inv_std are constants
        # x_hat = (x - mu) * inv_std
        dx = dx_hat * inv_std
    else:
        x, mu = cache.x.astype(x_hat.dtype, copy=False), _channel(cache.mu, x_hat)
        xmu = x - mu                        # the forward node xmu, recomputed
        # x_hat = xmu * inv_std
        dxmu = dx_hat * inv_std             # path 1 into xmu
        dinv_std = _sum(dx_hat * xmu, axes)
        # inv_std = (var + eps) ** -0.5
        dvar = -0.5 * inv_std**3 * dinv_std
        # var = mean(xmu ** 2)
        dxmu = dxmu + 2 * xmu * dvar / m    # path 2 into xmu
        # xmu = x - mu
        dx = dxmu                           # path 1 into x
        dmu = -_sum(dxmu, axes)
        # mu = mean(x)
        dx = dx + dmu / m                   # path 2 into x
    return _gradients(dx, dgamma, dbeta, cache)


def _backward_inputs(dy, cache: BNCache):
    """Checked dy in the compute dtype, x_hat, gamma (1 if None) and inv_std as (1, C, 1, ...), axes."""
    dy = np.asarray(dy)
    if dy.shape != cache.x.shape:
        raise ValueError(f"dy must have the shape of x {cache.x.shape}, got {dy.shape}")
    if dy.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"dy must be a floating-point array, got dtype {dy.dtype}")
    x_hat = cache.x_hat
    gamma = 1 if cache.gamma is None else _channel(cache.gamma, x_hat)
    return dy.astype(x_hat.dtype, copy=False), x_hat, gamma, _channel(cache.inv_std, x_hat), cache.axes


def _gradients(dx, dgamma, dbeta, cache: BNCache):
    """(dx in x's dtype, dgamma (C,) or None, dbeta (C,) or None), as the backward passes return them."""
    dgamma = None if cache.gamma is None else dgamma.ravel().astype(cache.gamma.dtype)
    dbeta = None if cache.beta is None else dbeta.ravel().astype(cache.beta.dtype)
    return dx.astype(cache.x.dtype, copy=False), dgamma, dbeta


# ----------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------

class BatchNorm:
    """Batch-norm layer with the semantics of torch.nn.BatchNorm1d/2d/3d, in NumPy.

    Defined in: chapters/04_train_vs_inference.ipynb

    Accepts any input of shape (N, C) or (N, C, *spatial) with C = num_features.

    Training (self.training True): normalises with the batch statistics and updates
        running_mean <- (1 - f) * running_mean + f * mu
        running_var  <- (1 - f) * running_var  + f * var * m / (m - 1)   (unbiased)
    in place, with f = momentum, or f = 1 / num_batches_tracked when momentum is None
    (cumulative average; num_batches_tracked is incremented first).
    Eval: normalises with running_mean and running_var (nothing is updated).
    track_running_stats=False: running_mean, running_var, num_batches_tracked are None and
    batch statistics are used in train and eval.

    Inputs:
    - num_features: C
    - eps: added to the variance inside the square root
    - momentum: f above, or None for the cumulative average
    - affine: learnable weight (gamma, init 1) and bias (beta, init 0); None if False
    - track_running_stats: keep running estimates (init mean 0, var 1)
    - dtype: dtype of weight, bias and running statistics (np.float32 like torch)

    Attributes: weight, bias, running_mean, running_var (arrays (C,) or None),
    num_batches_tracked (int or None), training (bool), dweight, dbias (set by backward).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32):
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"dtype must be float16, float32 or float64, got {self.dtype}")
        self.training = True
        C = self.num_features
        self.weight = np.ones(C, self.dtype) if affine else None
        self.bias = np.zeros(C, self.dtype) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(C, self.dtype)
            self.running_var = np.ones(C, self.dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.dweight = self.dbias = None
        self._cache = None

    def reset_running_stats(self):
        """running_mean = 0, running_var = 1, num_batches_tracked = 0 (in place)."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self):
        """Reset the running statistics, weight = 1 and bias = 0 (in place)."""
        self.reset_running_stats()
        if self.affine:
            self.weight[...] = 1
            self.bias[...] = 0

    def train(self, mode=True):
        """Set training mode (mode=True) or eval mode; returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set eval mode (use the running estimates); returns self."""
        return self.train(False)

    def forward(self, x):
        """Normalise x of shape (N, C, *spatial); returns y of the same shape and dtype."""
        # the same decisions as torch.nn.modules.batchnorm._BatchNorm.forward
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if pass_buffers else None
        running_var = self.running_var if pass_buffers else None
        x = _check_layer_input(self, x, running_mean, running_var, use_batch_stats)

        if not use_batch_stats:
            y, self._cache = batch_norm_inference(
                x, running_mean, running_var, self.weight, self.bias, self.eps)
            return y

        factor = 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked += 1
            factor = 1 / self.num_batches_tracked if self.momentum is None else self.momentum
        y, self._cache = batch_norm_forward(x, self.weight, self.bias, self.eps)
        m = x.size // max(x.shape[1], 1)
        if self.training and running_mean is not None and m > 0:
            mu = self._cache.mu.astype(np.float64)
            unbiased_var = self._cache.var.astype(np.float64) * m / (m - 1)
            running_mean[...] = (1 - factor) * running_mean + factor * mu
            running_var[...] = (1 - factor) * running_var + factor * unbiased_var
        return y

    __call__ = forward

    def backward(self, dy):
        """Backward of the last forward: returns dx, stores dweight and dbias ((C,) or None)."""
        if self._cache is None:
            raise RuntimeError("BatchNorm.backward called before forward")
        dx, self.dweight, self.dbias = batch_norm_backward(dy, self._cache)
        return dx

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats})")


# ----------------------------------------------------------------------------------------
# Input checks (exception types and messages equal to torch's where torch has one)
# ----------------------------------------------------------------------------------------

def _check_forward(x, gamma, beta, eps):
    """Checks of F.batch_norm(training=True); returns x, x in the compute dtype, the reduced axes."""
    x = _check_input(x)
    _verify_batch_size(x.shape)
    _check_eps(eps, training=True)
    _check_channels(x, weight=gamma, bias=beta)
    return x, _compute(x), _axes(x)


def _check_inference(x, mean, var, gamma, beta, eps):
    """Checks of F.batch_norm(training=False); returns x, x in the compute dtype, the reduced axes."""
    x = _check_input(x)
    _check_eps(eps, training=False)
    _check_channels(x, running_mean=mean, running_var=var, weight=gamma, bias=beta)
    return x, _compute(x), _axes(x)


def _check_layer_input(layer, x, running_mean, running_var, use_batch_stats):
    """The checks of torch's _BatchNorm.forward, in torch's order; returns x as an array."""
    x = _check_input(x)
    if use_batch_stats:
        _verify_batch_size(x.shape)
    _check_eps(layer.eps, training=use_batch_stats)
    _check_channels(x, running_mean=running_mean, running_var=running_var,
                    weight=layer.weight, bias=layer.bias)
    # float16 input with float32 parameters is allowed, as in torch ("mixed")
    if x.dtype != layer.dtype and not (x.dtype == np.float16 and layer.dtype == np.float32):
        raise RuntimeError(
            "mixed dtype (CPU): all inputs must share same datatype. "
            f"(input {x.dtype}, layer {layer.dtype}: use x.astype(np.{layer.dtype}) "
            f"or BatchNorm(..., dtype=np.{x.dtype}))"
        )
    return x


def _compute(x):
    """x in the compute dtype: float16 in float32, float32 and float64 as they are (no copy)."""
    return x.astype(np.promote_types(x.dtype, np.float32), copy=False)


def _axes(x) -> tuple[int, ...]:
    """The reduced axes (0, 2, 3, ...): every axis but the channel axis 1."""
    return (0,) + tuple(range(2, x.ndim))


def _check_input(x, what: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(
            f"batch norm needs a floating-point {what} (float16, float32 or float64), "
            f"got dtype {x.dtype}; convert it first, e.g. {what}.astype(np.float32)"
        )
    if x.ndim < 2:
        raise ValueError(
            f"batch norm needs {what} of shape (N, C) or (N, C, *spatial), got shape "
            f"{x.shape} ({x.ndim} dim); add the missing axis, e.g. {what}[:, None] "
            f"for N samples of one feature or {what}[None] for one sample"
        )
    return x


def _verify_batch_size(shape) -> None:
    """torch's _verify_batch_size: batch statistics need more than one value per channel."""
    if shape[0] * int(np.prod(shape[2:], dtype=np.int64)) == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, "
            f"got input size torch.Size({list(shape)})"
        )


def _check_eps(eps, training: bool) -> None:
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _check_channels(x, **per_channel) -> None:
    """torch's check_dims_match_num_input_features, for each named (C,) array that is not None."""
    C = x.shape[1]
    for name, a in per_channel.items():
        if a is not None and np.size(a) != C:
            raise RuntimeError(f"{name} should contain {C} elements not {np.size(a)}")
