"""Batch normalization in NumPy: forward, backward and a layer with PyTorch's semantics.

Defined in chapters:
    chapters/02_bn_transform.ipynb       batch_norm_forward (the transform, Algorithm 1 of the paper)
    chapters/03_bn_backward.ipynb        batch_norm_backward, batch_norm_backward_staged
    chapters/04_train_vs_inference.ipynb BatchNorm (running statistics, train/eval), batch_norm_inference

Conventions (the same as torch.nn.BatchNorm1d/2d/3d):

* x has shape (N, C) or (N, C, *spatial); axis 1 is the channel (feature) axis and the
  statistics of channel c are taken over every other axis, M = N * prod(spatial) values.
* The batch variance used to normalise is the biased one (divisor M); eps goes inside the
  square root: x_hat = (x - mu) / sqrt(var + eps), y = gamma * x_hat + beta.
* The running variance stores the unbiased estimate var * M / (M - 1).

Numerics: float32 inputs are computed in float32 with per-channel sums accumulated in
float64. The statistics use the corrected two-pass algorithm (Chan, Golub & LeVeque 1983):
pass 1 takes a provisional mean `shift`; pass 2 sums d = x - shift and d**2, so that
mu = shift + mean(d) and var = mean(d**2) - mean(d)**2 without cancellation even when
|mean| >> std. Big arrays are processed in cache-sized blocks with preallocated outputs,
so the temporaries stay in the CPU cache (see bench/bench_numpy_bn.py).
"""

from __future__ import annotations

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

    Fields (C = number of channels, x.shape = (N, C, *spatial)):
      x           : the input array itself (a reference, not a copy), shape x.shape;
                    only the staged backward reads it (to rebuild xmu = x - mu).
      x_hat       : normalised input, shape x.shape, in the compute dtype (float32 for
                    float16/float32 input, float64 for float64).
      mu          : (C,) mean used to normalise (batch mean, or running mean in eval).
      var         : (C,) variance used to normalise (biased batch variance, or running var).
      inv_std     : (C,) 1 / sqrt(var + eps).
      gamma, beta : (C,) scale and shift, or None when absent (no affine).
      eps         : the eps used.
      axes        : tuple of the reduced axes, (0, 2, 3, ...) i.e. every axis but 1.
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
# Checks shared by the functions and the layer (messages equal to torch's where torch has one)
# ----------------------------------------------------------------------------------------

def _torch_size(shape) -> str:
    """Format a shape the way torch prints input.size(): torch.Size([1, 3])."""
    return f"torch.Size({list(shape)})"


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
    values_per_channel = shape[0] * int(np.prod(shape[2:], dtype=np.int64))
    if values_per_channel == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, "
            f"got input size {_torch_size(shape)}"
        )


def _check_eps(eps, training: bool) -> None:
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _check_channels(name: str, a, C: int) -> None:
    """torch's check_dims_match_num_input_features."""
    if a is not None and np.size(a) != C:
        raise RuntimeError(f"{name} should contain {C} elements not {np.size(a)}")


def _compute_dtype(dtype) -> np.dtype:
    """float16 is computed in float32; float32 and float64 in themselves."""
    return np.dtype(np.float32) if np.dtype(dtype).itemsize < 4 else np.dtype(dtype)


def _per_channel(a, C: int, dtype) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=dtype).reshape(C)


# ----------------------------------------------------------------------------------------
# Blocked kernels on an (N, C, S) view: S = prod(spatial), S = 1 for (N, C) input
# ----------------------------------------------------------------------------------------

_BLOCK = 1 << 17  # elements per block (512 KiB of float32): a few blocks fit in L2
_ROW = 1024  # longest row summed in float32; longer rows are split (float32 dot products
#              accumulate rounding error with the row length)


def _blocks(shape3):
    """Index tuples that tile an (N, C, S) array into blocks (n, C, s) of about _BLOCK
    elements, with s <= _ROW."""
    N, C, S = shape3
    C = max(C, 1)
    sb = S if (S <= _ROW and C * S <= _BLOCK) else max(1, min(S, _ROW, _BLOCK // C))
    nb = max(1, _BLOCK // (C * max(sb, 1)))
    if sb == S:
        return [np.s_[n0:n0 + nb] for n0 in range(0, N, nb)]
    return [np.s_[n0:n0 + nb, :, s0:s0 + sb] for n0 in range(0, N, nb) for s0 in range(0, S, sb)]


def _scratch(blocks, a3):
    """A buffer as large as the largest block of a3, and a function returning its view for a block."""
    shape = max((a3[b].shape for b in blocks), key=np.prod, default=(0, 0, 0))
    buf = np.empty(shape, dtype=a3.dtype)
    return lambda block: buf[: block.shape[0], :, : block.shape[2]]


def _sum_c(a):
    """(n, C, s) block -> (C,) float64 sums. Rows along s are summed in the array's dtype
    (pairwise summation), the n partial sums in float64."""
    if a.shape[2] >= 8:
        return np.add.reduce(a, axis=2).sum(axis=0, dtype=np.float64)
    return np.add.reduce(a, axis=(0, 2), dtype=np.float64)


def _dot_c(a, b):
    """(n, C, s) blocks -> (C,) float64 sums of a * b (row dot products, then float64)."""
    if a.shape[2] >= 8:
        return np.vecdot(a, b).sum(axis=0, dtype=np.float64)
    return np.einsum("ncs,ncs->c", a, b, dtype=np.float64)


def _as_ncs(x, dtype) -> np.ndarray:
    """(N, C, *spatial) -> (N, C, S) in the compute dtype (a view when x is contiguous)."""
    N, C = x.shape[:2]
    S = int(np.prod(x.shape[2:], dtype=np.int64))
    return np.asarray(x.reshape(N, C, S), dtype=dtype)


def _batch_stats(x3, eps):
    """Corrected two-pass statistics of an (N, C, S) array.

    Returns shift (C,) in x3.dtype, dmean, var, inv_std (C,) float64, with the batch mean
    mu = shift + dmean and the biased variance var.
    """
    N, C, S = x3.shape
    M = N * S
    blocks = _blocks(x3.shape)
    if M == 0:  # empty batch: no statistics (torch returns an empty output, no error)
        zeros = np.zeros(C)
        return zeros.astype(x3.dtype), zeros, zeros, 1.0 / np.sqrt(zeros + eps)
    # pass 1: provisional mean, used as a shift
    total = np.zeros(C)
    for b in blocks:
        total += _sum_c(x3[b])
    shift = (total / M).astype(x3.dtype)
    # pass 2: sums of d = x - shift and of d**2 (values of the order of the std: no cancellation)
    scratch = _scratch(blocks, x3)
    sum_d, sum_dd = np.zeros(C), np.zeros(C)
    for b in blocks:
        xb = x3[b]
        d = np.subtract(xb, shift[:, None], out=scratch(xb))
        sum_d += _sum_c(d)
        sum_dd += _dot_c(d, d)
    dmean = sum_d / M
    var = np.maximum(sum_dd / M - dmean**2, 0.0)
    inv_std = 1.0 / np.sqrt(var + eps)
    return shift, dmean, var, inv_std


def _normalize(x3, shift, offset, inv_std, gamma, beta):
    """x_hat = (x - shift) * inv_std + offset and y = gamma * x_hat + beta, block by block.

    shift, offset, inv_std, gamma, beta: (C,) arrays in x3.dtype (offset, gamma, beta may be None).
    """
    x_hat = np.empty_like(x3)
    y = np.empty_like(x3)
    col = lambda a: None if a is None else a[:, None]  # (C,) -> (C, 1), broadcasts over (n, C, s)
    shift, offset, inv_std, gamma, beta = map(col, (shift, offset, inv_std, gamma, beta))
    for b in _blocks(x3.shape):
        xh, yb = x_hat[b], y[b]
        np.subtract(x3[b], shift, out=xh)
        np.multiply(xh, inv_std, out=xh)
        if offset is not None:
            np.add(xh, offset, out=xh)
        if gamma is not None:
            np.multiply(xh, gamma, out=yb)
        else:
            np.copyto(yb, xh)
        if beta is not None:
            np.add(yb, beta, out=yb)
    return x_hat, y


# ----------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------

def batch_norm_forward(x, gamma, beta, eps=1e-5):
    """Batch-norm transform with batch statistics (training mode, Algorithm 1 of the paper).

    Defined in: chapters/02_bn_transform.ipynb

    For each channel c (axis 1), over the M = N * prod(spatial) values of that channel:
        mu = mean(x),  var = mean((x - mu)**2)  (biased),  inv_std = 1 / sqrt(var + eps)
        x_hat = (x - mu) * inv_std,  y = gamma * x_hat + beta

    Inputs:
    - x: array of shape (N, C) or (N, C, *spatial), float16/float32/float64
    - gamma: scale, C elements (shape (C,)), or None for no scale (gamma = 1)
    - beta: shift, C elements (shape (C,)), or None for no shift (beta = 0)
    - eps: > 0, added to the variance inside the square root

    Returns a tuple of:
    - y: array of the shape and dtype of x (a new array)
    - cache: BNCache for batch_norm_backward / batch_norm_backward_staged

    Raises (messages equal to torch.nn.functional.batch_norm(..., training=True)):
    - TypeError / ValueError: x not floating, or fewer than 2 dims
    - ValueError: one value per channel ("Expected more than 1 value per channel ...")
    - ValueError: eps <= 0 ("batch_norm eps must be positive during training, but got 0.0")
    - RuntimeError: gamma/beta size != C ("weight should contain 5 elements not 3")
    """
    x = _check_input(x)
    _verify_batch_size(x.shape)
    _check_eps(eps, training=True)
    C = x.shape[1]
    _check_channels("weight", gamma, C)
    _check_channels("bias", beta, C)
    wd = _compute_dtype(x.dtype)
    gamma, beta = _per_channel(gamma, C, wd), _per_channel(beta, C, wd)

    x3 = _as_ncs(x, wd)
    shift, dmean, var, inv_std = _batch_stats(x3, eps)
    # x_hat = (x - shift - dmean) * inv_std, with the small correction dmean applied after
    # the (nearly exact) subtraction x - shift
    offset = (-dmean * inv_std).astype(wd)
    x_hat, y = _normalize(x3, shift, offset, inv_std.astype(wd), gamma, beta)

    return _finish(x, x_hat, y, shift + dmean, var, inv_std, gamma, beta, eps, wd, batch_stats=True)


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
    x = _check_input(x)
    _check_eps(eps, training=False)
    C = x.shape[1]
    for name, a in (("running_mean", mean), ("running_var", var), ("weight", gamma), ("bias", beta)):
        _check_channels(name, a, C)
    wd = _compute_dtype(x.dtype)
    gamma, beta = _per_channel(gamma, C, wd), _per_channel(beta, C, wd)
    mu = _per_channel(mean, C, np.float64)
    var = _per_channel(var, C, np.float64)
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat, y = _normalize(_as_ncs(x, wd), mu.astype(wd), None, inv_std.astype(wd), gamma, beta)
    return _finish(x, x_hat, y, mu, var, inv_std, gamma, beta, eps, wd, batch_stats=False)


def _finish(x, x_hat, y, mu, var, inv_std, gamma, beta, eps, wd, batch_stats):
    """(y, cache) in x's shape and dtype, from the (N, C, S) working arrays and per-channel statistics."""
    cache = BNCache(x=x, x_hat=x_hat.reshape(x.shape), mu=mu.astype(wd), var=var.astype(wd),
                    inv_std=inv_std.astype(wd), gamma=gamma, beta=beta, eps=eps,
                    axes=(0,) + tuple(range(2, x.ndim)), batch_stats=batch_stats)
    return y.reshape(x.shape).astype(x.dtype, copy=False), cache


def _check_dy(dy, cache: BNCache) -> np.ndarray:
    dy = np.asarray(dy)
    if dy.shape != cache.x.shape:
        raise ValueError(f"dy must have the shape of x {cache.x.shape}, got {dy.shape}")
    if dy.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"dy must be a floating-point array, got dtype {dy.dtype}")
    return dy


def batch_norm_backward(dy, cache):
    """Backward pass of batch norm, compact formula.

    Defined in: chapters/03_bn_backward.ipynb

    Per channel, with M values, mean() over the M values and the batch statistics:
        dbeta  = sum(dy)
        dgamma = sum(dy * x_hat)
        dx     = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))
    With constant statistics (cache.batch_stats False, inference): dx = gamma * inv_std * dy.

    Inputs:
    - dy: upstream gradient, shape of x
    - cache: BNCache from batch_norm_forward or batch_norm_inference

    Returns a tuple of:
    - dx: shape and dtype of x
    - dgamma: (C,), or None if gamma was None
    - dbeta: (C,), or None if beta was None
    """
    dy = _check_dy(dy, cache)
    x_hat = cache.x_hat
    N, C = x_hat.shape[:2]
    wd = x_hat.dtype
    dy3 = _as_ncs(dy, wd)
    xh3 = _as_ncs(x_hat, wd)
    M = dy3.shape[0] * dy3.shape[2]
    blocks = _blocks(dy3.shape)

    # per-channel sums, float64: sum(dy) and sum(dy * x_hat)
    sum_dy, sum_dy_xhat = np.zeros(C), np.zeros(C)
    for b in blocks:
        sum_dy += _sum_c(dy3[b])
        sum_dy_xhat += _dot_c(dy3[b], xh3[b])

    g = 1.0 if cache.gamma is None else cache.gamma.astype(np.float64)
    scale = g * cache.inv_std.astype(np.float64)          # gamma * inv_std
    dx3 = np.empty_like(dy3)
    if cache.batch_stats and M > 0:
        # dx = scale * dy + k * x_hat + c with k = -scale * mean(dy * x_hat), c = -scale * mean(dy)
        a = scale.astype(wd)[:, None]
        k = (-scale * sum_dy_xhat / M).astype(wd)[:, None]
        c = (-scale * sum_dy / M).astype(wd)[:, None]
        scratch = _scratch(blocks, dy3)
        for b in blocks:
            dxb = dx3[b]
            np.multiply(dy3[b], a, out=dxb)
            np.add(dxb, np.multiply(xh3[b], k, out=scratch(dxb)), out=dxb)
            np.add(dxb, c, out=dxb)
    else:
        a = scale.astype(wd)[:, None]
        for b in blocks:
            np.multiply(dy3[b], a, out=dx3[b])

    dgamma = None if cache.gamma is None else sum_dy_xhat.astype(cache.gamma.dtype)
    dbeta = None if cache.beta is None else sum_dy.astype(cache.beta.dtype)
    dx = dx3.reshape(cache.x.shape).astype(cache.x.dtype, copy=False)
    return dx, dgamma, dbeta


def batch_norm_backward_staged(dy, cache):
    """Backward pass of batch norm, node by node through the graph of Algorithm 1.

    Defined in: chapters/03_bn_backward.ipynb

    Forward graph (per channel, mean() over the M values of the channel):
        mu = mean(x);  xmu = x - mu;  var = mean(xmu**2);  inv_std = (var + eps)**-0.5
        x_hat = xmu * inv_std;  y = gamma * x_hat + beta
    Each line below is the chain rule for one node, visited in reverse order. Same inputs
    and results as batch_norm_backward (slower: it makes many full-size temporaries).

    Inputs:
    - dy: upstream gradient, shape of x
    - cache: BNCache from batch_norm_forward (or batch_norm_inference)

    Returns a tuple of:
    - dx: shape and dtype of x
    - dgamma: (C,), or None if gamma was None
    - dbeta: (C,), or None if beta was None
    """
    dy = _check_dy(dy, cache)
    x_hat, axes = cache.x_hat, cache.axes
    wd = x_hat.dtype
    dy = dy.astype(wd, copy=False)
    x = cache.x.astype(wd, copy=False)
    shape = [1] * x.ndim
    shape[1] = x.shape[1]                          # (1, C, 1, ...): broadcasts over the axes
    M = max(x.size // max(x.shape[1], 1), 1)     # values per channel (1 for an empty batch)
    total = lambda a: a.sum(axis=axes, keepdims=True)
    mu, var, inv_std = (a.reshape(shape) for a in (cache.mu, cache.var, cache.inv_std))
    gamma = 1.0 if cache.gamma is None else cache.gamma.reshape(shape)

    # from y back to x, one node of the forward graph at a time
    # y = gamma * x_hat + beta
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    dx_hat = dy * gamma
    if not cache.batch_stats:                      # inference: mu and inv_std are constants
        # x_hat = (x - mu) * inv_std
        dx = dx_hat * inv_std
    else:
        xmu = x - mu                               # the forward node xmu, recomputed
        # x_hat = xmu * inv_std
        dxmu = dx_hat * inv_std                    # path 1 into xmu
        dinv_std = total(dx_hat * xmu)
        # inv_std = (var + eps) ** -0.5
        dvar = -0.5 * inv_std**3 * dinv_std
        # var = mean(xmu ** 2)
        dxmu = dxmu + 2.0 * xmu * dvar / M         # path 2 into xmu
        # xmu = x - mu
        dx = dxmu                                  # path 1 into x
        dmu = -total(dxmu)
        # mu = mean(x)
        dx = dx + dmu / M                          # path 2 into x

    dgamma = None if cache.gamma is None else dgamma.astype(cache.gamma.dtype)
    dbeta = None if cache.beta is None else dbeta.astype(cache.beta.dtype)
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
        running_var  <- (1 - f) * running_var  + f * var * M / (M - 1)   (unbiased)
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
        x = _check_input(x)
        # the same decisions as torch.nn.modules.batchnorm._BatchNorm.forward
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if pass_buffers else None
        running_var = self.running_var if pass_buffers else None
        # checks in torch's order: batch size, eps, channel counts
        if use_batch_stats:
            _verify_batch_size(x.shape)
        _check_eps(self.eps, training=use_batch_stats)
        C = x.shape[1]
        for name, a in (("running_mean", running_mean), ("running_var", running_var),
                        ("weight", self.weight), ("bias", self.bias)):
            _check_channels(name, a, C)
        # float16 input with float32 parameters is allowed, as in torch ("mixed")
        if x.dtype != self.dtype and not (x.dtype == np.float16 and self.dtype == np.float32):
            raise RuntimeError(
                "mixed dtype (CPU): all inputs must share same datatype. "
                f"(input {x.dtype}, layer {self.dtype}: use x.astype(np.{self.dtype}) "
                f"or BatchNorm(..., dtype=np.{x.dtype}))"
            )

        if not use_batch_stats:
            y, self._cache = batch_norm_inference(
                x, running_mean, running_var, self.weight, self.bias, self.eps)
            return y

        factor = 0.0
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked += 1
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
        y, self._cache = batch_norm_forward(x, self.weight, self.bias, self.eps)
        M = x.size // max(C, 1)
        if self.training and running_mean is not None and M > 0:
            mu = self._cache.mu.astype(np.float64)
            unbiased_var = self._cache.var.astype(np.float64) * (M / (M - 1))
            running_mean[...] = (1 - factor) * running_mean.astype(np.float64) + factor * mu
            running_var[...] = (1 - factor) * running_var.astype(np.float64) + factor * unbiased_var
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
