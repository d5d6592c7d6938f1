"""Batch Normalization as a ``torch.autograd.Function``, and drop-in subclasses of
``torch.nn.BatchNorm1d/2d/3d`` that compute with it.

Defined in: chapters/06_bn_pytorch.ipynb

Public objects
--------------
BatchNormFunction           autograd.Function: the forward and the compact backward, twice differentiable.
BatchNormFunctionWithJvp    the same plus forward-mode AD (jvp), used by batch_norm outside torch.compile.
BatchNormFunctionSavedXHat  the naive variant that saves x_hat: first derivative right,
                            second derivative silently wrong (for the chapter's demonstration).
batch_norm                  same signature, semantics and error messages as F.batch_norm.
BatchNorm1d/2d/3d           subclasses of torch.nn.BatchNorm1d/2d/3d whose forward uses batch_norm.
convert_batchnorm           swap torch.nn.BatchNorm*d <-> bnlib BatchNorm*d in a model.

Shapes: x is (N, C, *S): (N, C) or (N, C, L) for BatchNorm1d, (N, C, H, W) for BatchNorm2d and
(N, C, D, H, W) for BatchNorm3d.  Statistics are per channel over the m = N * prod(S) values of every
dim except dim 1; inside the Function per-channel values have the shape (1, C, 1, ..., 1) that
broadcasts against x.

The statistics are two-pass: first the mean, then the mean of the squared deviations from it, which
stays accurate when |mu| >> sigma, where E[x^2] - mu^2 would cancel (see :func:`_batch_stats`).
float16/bfloat16 inputs are computed in float32 and returned in the input dtype, as torch does.
Autograd keeps x itself and per-channel vectors for the backward pass, nothing else of the input's size.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "BatchNormFunction",
    "BatchNormFunctionWithJvp",
    "BatchNormFunctionSavedXHat",
    "batch_norm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "convert_batchnorm",
]


def _channel_dims(x: Tensor) -> list[int]:
    """The dims a statistic is taken over: every dim except the channel dim 1."""
    return [0, *range(2, x.dim())]


def _channel_shape(x: Tensor) -> list[int]:
    """(1, C, 1, ..., 1): the shape in which a per-channel (C,) vector broadcasts against x."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _in_float32_if_half(t: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (torch computes batch norm of half inputs in float32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class BatchNormFunction(torch.autograd.Function):
    """y = (x - mu) / sqrt(var + eps) * gamma + beta, per channel (dim 1).

    Defined in: chapters/06_bn_pytorch.ipynb

    ``BatchNormFunction.apply(x, weight, bias, running_mean, running_var, training, eps)``
    -> ``(y, mu, var)``.  x: (N, C, *S); weight (gamma), bias (beta): (C,) or None;
    running_mean, running_var: (C,), the statistics used when ``training`` is False (else
    ignored, may be None).  y: x's shape and dtype; mu, var: (C,) biased batch statistics
    (training) or the running ones (eval), non-differentiable.  The running buffers are not
    updated here: :func:`batch_norm` does that.

    Saved for backward: x itself (not a copy), weight, mu and var.  The backward is the compact
    formula ``dx = gamma*inv_std * (dy - sum(dy)/m - x_hat*sum(dy*x_hat)/m)``
    (= ``gamma*inv_std/m * (m*dy - dbeta - x_hat*dgamma)``), ``dgamma = sum(dy*x_hat)``,
    ``dbeta = sum(dy)``, with sums over the m values of a channel.
    x_hat is recomputed from the saved x, never saved: autograd differentiates the backward
    by recording the ops it runs, and a saved x_hat would be a constant to it.  When the
    backward itself is recorded (``create_graph=True``) mu and var are recomputed from x as
    well, so second derivatives see how they depend on x.  ``setup_context`` is separate from
    ``forward`` so that torch.func (grad, vmap, jvp) can run the Function; vmap comes from
    ``generate_vmap_rule``; forward-mode AD is added by :class:`BatchNormFunctionWithJvp`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, training, eps):
        dims, shape = _channel_dims(x), _channel_shape(x)
        x32 = _in_float32_if_half(x)
        if training:
            mu, var = _batch_stats(x32, dims)
        else:
            mu, var = running_mean.view(shape).to(x32.dtype), running_var.view(shape).to(x32.dtype)
        x_hat = (x32 - mu) * torch.rsqrt(var + eps)
        y = x_hat if weight is None else x_hat * weight.view(shape)
        y = y if bias is None else y + bias.view(shape)
        return y.to(x.dtype), mu.view(-1), var.view(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, running_mean, running_var, training, eps = inputs
        _, mu, var = output
        ctx.mark_non_differentiable(mu, var)
        ctx.save_for_backward(x, weight, mu, var)
        ctx.training, ctx.eps = training, eps

    @staticmethod
    def backward(ctx, dy, _dmu, _dvar):
        x, weight, mu, var = ctx.saved_tensors
        dims, shape = _channel_dims(x), _channel_shape(x)
        x32, dy = _in_float32_if_half(x), _in_float32_if_half(dy)
        if ctx.training and torch.is_grad_enabled():  # the backward is being differentiated
            mu, var = _batch_stats(x32, dims)  # so let autograd see mu and var depend on x
        inv_std = torch.rsqrt(var.view(shape) + ctx.eps)
        x_hat = (x32 - mu.view(shape)) * inv_std
        dbeta = dy.sum(dims)
        dgamma = (dy * x_hat).sum(dims)
        gamma = 1.0 if weight is None else weight.view(shape)
        if ctx.training:  # means over the m = N * prod(S) values of each channel
            m = x.numel() // x.shape[1]
            dx = gamma * inv_std * (dy - dbeta.view(shape) / m - x_hat * dgamma.view(shape) / m)
        else:
            dx = gamma * inv_std * dy
        need_x, need_gamma, need_beta = ctx.needs_input_grad[:3]
        return (dx.to(x.dtype) if need_x else None, dgamma if need_gamma else None,
                dbeta if need_beta else None, None, None, None, None)


def _batch_stats(x: Tensor, dims: list[int]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x, shaped (1, C, 1, ...), in two passes over x.

    Pass 1 gives the mean mu0.  Pass 2 looks at the deviations d = x - mu0: their mean corrects the
    rounding of mu0, and var = mean(d^2) - mean(d)^2 cannot cancel because mean(d) is tiny (the
    "corrected two-pass" algorithm; E[x^2] - mu^2 would lose most digits when |mu| >> sigma).
    """
    mu0 = x.mean(dims, keepdim=True)
    d = x - mu0
    d_mean = d.mean(dims, keepdim=True)
    var = d.square().mean(dims, keepdim=True) - d_mean.square()
    return mu0 + d_mean, var


class BatchNormFunctionWithJvp(BatchNormFunction):
    """:class:`BatchNormFunction` plus forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``,
    ``jacfwd``), which :func:`batch_norm` uses in eager mode.  Separate because Dynamo cannot trace a
    Function with a custom ``jvp``: under ``torch.compile`` :func:`batch_norm` uses the plain one.

    Defined in: chapters/06_bn_pytorch.ipynb
    """

    @staticmethod
    def setup_context(ctx, inputs, output):
        BatchNormFunction.setup_context(ctx, inputs, output)
        x, weight, _, _, _, _, _ = inputs
        ctx.save_for_forward(x, weight, output[1], output[2])

    @staticmethod
    def jvp(ctx, tx, tgamma, tbeta, _trm, _trv, _ttraining, _teps):
        # Forward-mode AD.  The Jacobian of x_hat with respect to x is symmetric, so the tangent
        # of x_hat is the backward's formula applied to tx.
        x, weight, mu, var = ctx.saved_tensors
        dims, shape = _channel_dims(x), _channel_shape(x)
        x32 = _in_float32_if_half(x)
        inv_std = torch.rsqrt(var.view(shape) + ctx.eps)
        x_hat = (x32 - mu.view(shape)) * inv_std
        ty = torch.zeros_like(x_hat)
        if tx is not None:
            tx = _in_float32_if_half(tx)
            if ctx.training:
                tx = tx - tx.mean(dims, keepdim=True) - x_hat * (tx * x_hat).mean(dims, keepdim=True)
            ty = ty + (inv_std * tx if weight is None else weight.view(shape) * inv_std * tx)
        if tgamma is not None:
            ty = ty + tgamma.view(shape) * x_hat
        if tbeta is not None:
            ty = ty + tbeta.view(shape)
        return ty.to(x.dtype), None, None


class BatchNormFunctionSavedXHat(torch.autograd.Function):
    """Deliberately naive BN Function that saves x_hat and inv_std from forward.

    Defined in: chapters/06_bn_pytorch.ipynb

    ``BatchNormFunctionSavedXHat.apply(x, weight, bias, eps)`` -> ``(y, x_hat, inv_std)``,
    training-mode batch statistics only, no running buffers.  x: (N, C, *S), weight and bias: (C,).

    Its backward uses the same compact formula as :class:`BatchNormFunction`, but from the saved
    x_hat.  First derivatives are right (``gradcheck`` passes); second derivatives are silently
    wrong (``gradgradcheck`` fails) because x_hat and inv_std are constants to the graph recorded
    while backward runs.  For teaching only.
    """

    @staticmethod
    def forward(x, weight, bias, eps):
        dims, shape = _channel_dims(x), _channel_shape(x)
        mu, var = _batch_stats(x, dims)
        inv_std = torch.rsqrt(var + eps)
        x_hat = (x - mu) * inv_std
        return x_hat * weight.view(shape) + bias.view(shape), x_hat, inv_std

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, x_hat, inv_std = output
        ctx.mark_non_differentiable(x_hat, inv_std)
        ctx.save_for_backward(inputs[1], x_hat, inv_std)

    @staticmethod
    def backward(ctx, dy, _dx_hat, _dinv_std):
        weight, x_hat, inv_std = ctx.saved_tensors
        dims, shape = _channel_dims(x_hat), _channel_shape(x_hat)
        m = x_hat.numel() // x_hat.shape[1]
        dbeta = dy.sum(dims)
        dgamma = (dy * x_hat).sum(dims)
        dx = weight.view(shape) * inv_std * (dy - dbeta.view(shape) / m - x_hat * dgamma.view(shape) / m)
        return dx, dgamma, dbeta, None


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

    input: (N, C, *S).  running_mean, running_var: (C,) or None.  weight, bias: (C,) or None.
    Returns y with input's shape, dtype and memory format.

    training=True: normalise with the biased batch statistics and, if the running buffers are
    given, update them in place (without autograd), with m = N * prod(S) values per channel:
    ``running_mean = (1-momentum)*running_mean + momentum*mu``,
    ``running_var = (1-momentum)*running_var + momentum*var*m/(m-1)`` (unbiased).
    training=False: normalise with the running buffers.  Errors and messages are torch's.
    """
    _check_inputs(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.numel() == 0:  # no statistics to take: torch returns a copy and leaves the buffers alone
        y = input.clone()
        y = y if weight is None else y * weight[0]
        return y if bias is None else y + bias[0]
    if torch_bn_fast.use_fast_path(input, training):  # eager training: the same math in fewer operations
        return torch_bn_fast.FastBatchNormFunction.apply(input, weight, bias, running_mean, running_var,
                                                         momentum, eps)
    # Dynamo cannot trace a custom jvp: under torch.compile, the Function without forward-mode AD
    fn = BatchNormFunction if torch.compiler.is_compiling() else BatchNormFunctionWithJvp
    y, mu, var = fn.apply(input, weight, bias, running_mean, running_var, training, eps)
    if training and running_mean is not None:
        m = input.numel() // input.shape[1]
        with torch.no_grad():
            try:
                running_mean.copy_((1 - momentum) * running_mean + momentum * mu)
                running_var.copy_((1 - momentum) * running_var + momentum * m / (m - 1) * var)
            except RuntimeError as e:  # vmap over the input but not over the buffers
                raise RuntimeError(_VMAP_UNBATCHED_BUFFERS) from e
    return y


class _BnlibForward:
    """``torch.nn.modules.batchnorm._BatchNorm.forward`` with bnlib's :func:`batch_norm`."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        # batch statistics in training mode, and in eval mode when there are no running buffers
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats  # to update or to normalise with
        return batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )


class BatchNorm1d(_BnlibForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` over (N, C) or (N, C, L) input, computed by bnlib.

    Defined in: chapters/06_bn_pytorch.ipynb

    A subclass of torch's class that overrides ``forward`` only: same constructor
    ``BatchNorm1d(num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True)``,
    parameters (weight, bias: (C,)), buffers (running_mean, running_var: (C,),
    num_batches_tracked), state_dict, repr and input checks; ``isinstance(m, torch.nn.BatchNorm1d)``.
    """


class BatchNorm2d(_BnlibForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` over (N, C, H, W) input, computed by bnlib.

    Defined in: chapters/06_bn_pytorch.ipynb

    A subclass of torch's class that overrides ``forward`` only (see :class:`BatchNorm1d`).
    channels_last input gives channels_last output.
    """


class BatchNorm3d(_BnlibForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` over (N, C, D, H, W) input, computed by bnlib.

    Defined in: chapters/06_bn_pytorch.ipynb

    A subclass of torch's class that overrides ``forward`` only (see :class:`BatchNorm1d`).
    """


_TO_BNLIB = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH = {v: k for k, v in _TO_BNLIB.items()}


def convert_batchnorm(module: torch.nn.Module, to: str = "bnlib") -> torch.nn.Module:
    """Replace every BatchNorm{1,2,3}d in ``module`` by the other implementation.

    Defined in: chapters/06_bn_pytorch.ipynb

    ``to="bnlib"``: ``torch.nn.BatchNorm1d/2d/3d`` -> ``bnlib.torch_bn.BatchNorm1d/2d/3d``.
    ``to="torch"``: the reverse.  Classes are matched exactly (bnlib's classes are subclasses of
    torch's, but are not "torch's" here; SyncBatchNorm, LazyBatchNorm and user subclasses are left
    alone).  Works recursively and in place on submodules; returns the converted module (a new
    object only when ``module`` itself is a BatchNorm).  Each new layer shares the old layer's
    Parameter and buffer tensors (values, device, dtype and optimiser references are kept) and
    copies eps, momentum, affine, track_running_stats and the training flag.
    """
    if to not in ("bnlib", "torch"):
        raise ValueError(f"convert_batchnorm: to must be 'bnlib' or 'torch', got {to!r}")
    cls = (_TO_BNLIB if to == "bnlib" else _TO_TORCH).get(type(module))
    if cls is not None:
        return _swap(module, cls)
    for name, child in module.named_children():
        new_child = convert_batchnorm(child, to)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _swap(bn: torch.nn.Module, cls: type) -> torch.nn.Module:
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
              device="meta", bias=bn.bias is not None if bn.affine else True)
    # share the very same Parameter / buffer objects: optimisers keep working
    new._parameters.update(bn._parameters)
    new._buffers.update(bn._buffers)
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


# ------------------------------------------------------------------------------ input checks
def _check_inputs(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """torch's checks of F.batch_norm and native_batch_norm, in torch's order and with its messages."""
    if momentum is None:
        raise TypeError("batch_norm(): argument 'momentum' (position 7) must be float, not NoneType")
    if training:
        size = input.size()
        values_per_channel = size[0]
        for n in size[2:]:
            values_per_channel *= n
        if values_per_channel == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.numel() == 0:
        return
    named = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
    if input.dim() < 2:
        for name, t in named:
            if t is not None:
                raise RuntimeError(f"{name} should contain 0 elements not {t.numel()}")
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
    C = input.shape[1]
    for name, t in named:
        if t is not None and t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
        if t is None and not training and name in ("running_mean", "running_var"):
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    for name, t in named[:2]:
        if t is not None and t.requires_grad:
            raise RuntimeError(f"The function 'native_batch_norm' is not differentiable with respect to "
                               f"argument '{name}'. This input cannot have requires_grad True.")
    if not training and torch.autograd.forward_ad._current_level >= 0 and _any_dual(running_mean, running_var) \
            and _any_dual(input, weight, bias):
        raise RuntimeError("batch_norm is not differentiable wrt running_mean and running_var, "
                           "they cannot have forward grad defined")
    if not input.is_floating_point():
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{_scalar_name(input.dtype)}'")
    params = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    if params and params[0].dtype != input.dtype:  # torch's "mixed dtype" branch
        if any(t.dtype != torch.float32 for t in params):
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        if input.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
    for t in params:
        if params[0].dtype == input.dtype and t.dtype != input.dtype:
            raise RuntimeError(f"expected scalar type {_scalar_name(input.dtype)} but found {_scalar_name(t.dtype)}")


_VMAP_UNBATCHED_BUFFERS = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated in "
    "place, were not batched.\nIf you are using a module and do not need eval mode, please set "
    "`track_running_stats` to be False.If you are using a prebuilt module and do not need eval mode, please see "
    "the functorch website for resources on how to patch your module to work with vmap"
)


def _any_dual(*tensors) -> bool:
    """True if any tensor carries a forward-mode AD tangent (torch.autograd.forward_ad)."""
    return any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _scalar_name(dtype: torch.dtype) -> str:
    """torch's C++ ScalarType name: torch.float32 -> 'Float', torch.int64 -> 'Long'."""
    return torch.empty(0, dtype=dtype).type()[len("torch."):-len("Tensor")]


# the speed path of batch_norm, in its own module (it builds on BatchNormFunction above)
from bnlib import torch_bn_fast  # noqa: E402
