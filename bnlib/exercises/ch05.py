"""Checkers for the exercises of chapters/05_bn_conv.ipynb (batch normalization for convolutions).

- :func:`check_bn2d_forward`: a reader's NumPy BN2d forward ``fn(x, gamma, beta, eps=1e-5) -> y`` for
  ``x`` of shape (N, C, H, W), written by reshaping to (N*H*W, C).
- :func:`check_fold_bn`: a reader's ``fn(conv, bn) -> torch.nn.Conv2d`` that folds an eval-mode
  BatchNorm2d into the convolution before it.

Each checker runs the reader's function on several cases against an independent reference, prints a
diagnosis for the first case that fails (which case, which output, the largest error, the likely cause)
and returns True or False.

Defined in: chapters/05_bn_conv.ipynb
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnlib.exercises.harness import Case, Diagnosis, Mistake, run

__all__ = ["check_bn2d_forward", "check_fold_bn"]


# ----------------------------------------------------------------------------------------------------
# BN2d forward by reshaping
# ----------------------------------------------------------------------------------------------------

def _normalize(x: np.ndarray, axes: tuple[int, ...], eps: float, ddof: int = 0,
               eps_outside: bool = False) -> np.ndarray:
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True, ddof=ddof)
    if eps_outside:
        return (x - mu) / (np.sqrt(var) + eps)
    return (x - mu) / np.sqrt(var + eps)


def _affine(x_hat: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    return gamma.reshape(1, -1, 1, 1) * x_hat + beta.reshape(1, -1, 1, 1)


def _reference(x, gamma, beta, eps):
    return _affine(_normalize(x, (0, 2, 3), eps), gamma, beta)


def _bn_2d(x2, gamma, beta, eps):
    """Plain (M, C) batch norm, the function the reader reuses."""
    return gamma * _normalize(x2, (0,), eps) + beta


def _wrong_variants(x, gamma, beta, eps) -> dict[str, Callable[[], np.ndarray]]:
    """The mistakes this checker recognises: {diagnosis: output that mistake produces}."""
    N, C, H, W = x.shape

    def no_transpose():
        return _bn_2d(x.reshape(-1, C), gamma, beta, eps).reshape(N, C, H, W)

    def no_transpose_back():
        return _bn_2d(x.transpose(0, 2, 3, 1).reshape(-1, C), gamma, beta, eps).reshape(N, C, H, W)

    return {
        "you reshaped (N, C, H, W) straight to (-1, C) without moving C last first: each row of the "
        "(N*H*W, C) matrix then mixes values of different channels and positions, so every 'channel' "
        "statistic is computed over the wrong numbers. Transpose to (N, H, W, C) first "
        "(x.transpose(0, 2, 3, 1)), then reshape": no_transpose,
        "the statistics are right but you reshaped the (N*H*W, C) result straight back to (N, C, H, W): "
        "reshape to (N, H, W, C) and then transpose(0, 3, 1, 2) to put the channels back at axis 1":
            no_transpose_back,
        "you reduced over axes (0, 1) (batch and channels) instead of (0, 2, 3): those are statistics per "
        "spatial position, shared by all channels": lambda: _affine(_normalize(x, (0, 1), eps), gamma, beta),
        "you computed statistics per position (over axis 0 only, shape (1, C, H, W)): that is BatchNorm1d on "
        "C*H*W separate features, and it breaks the translation equivariance of the convolution; a "
        "channel's statistics must pool N*H*W values": lambda: _affine(_normalize(x, (0,), eps), gamma, beta),
        "you computed statistics per sample and channel (over axes (2, 3)): that is instance normalization, "
        "not batch normalization; include the batch axis 0": lambda: _affine(_normalize(x, (2, 3), eps), gamma, beta),
        "you computed statistics per sample (over axes (1, 2, 3)): that is layer normalization; BN pools "
        "over the batch and the spatial axes, per channel": lambda: _affine(_normalize(x, (1, 2, 3), eps), gamma, beta),
        "you used the unbiased variance (ddof=1, divisor N*H*W - 1): batch norm normalises with the biased "
        "variance (divisor N*H*W)": lambda: _affine(_normalize(x, (0, 2, 3), eps, ddof=1), gamma, beta),
        "eps is outside the square root: use (x - mu) / sqrt(var + eps)":
            lambda: _affine(_normalize(x, (0, 2, 3), eps, eps_outside=True), gamma, beta),
        "gamma and beta are swapped": lambda: _affine(_normalize(x, (0, 2, 3), eps), beta, gamma),
        "you forgot gamma and beta (the output is x_hat)": lambda: _normalize(x, (0, 2, 3), eps),
    }


def _bn2d_cases() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]]:
    rng = np.random.default_rng(5)
    cases = []
    for name, shape, eps in [("(4, 3, 5, 6)", (4, 3, 5, 6), 1e-5),
                             ("(2, 5, 3, 7)", (2, 5, 3, 7), 1e-5),
                             ("(1, 2, 4, 3), batch of one", (1, 2, 4, 3), 1e-5),
                             ("(3, 4, 2, 5), small variance, eps=0.1", (3, 4, 2, 5), 0.1)]:
        N, C, H, W = shape
        # channels with clearly different means and scales, plus a per-position pattern, so that every
        # wrong choice of axes gives a different answer
        offset = rng.uniform(-4, 4, size=(1, C, 1, 1))
        scale = rng.uniform(0.3, 3.0, size=(1, C, 1, 1)) * (0.1 if eps > 1e-3 else 1.0)
        pattern = rng.normal(size=(1, 1, H, W))
        x = offset + scale * (rng.normal(size=shape) + pattern)
        gamma = rng.uniform(0.5, 2.0, size=C)
        beta = rng.normal(size=C)
        cases.append((name, x, gamma, beta, eps))
    return cases


def _bn2d_mistakes(case):
    x, gamma, beta, eps = case.args
    table = [Mistake(cause, lambda case, make=make: make()) for cause, make in _wrong_variants(x, gamma, beta, eps).items()]
    if eps != 1e-5:
        table.append(Mistake(f"you used eps = 1e-5 instead of the eps passed to the function ({eps:g} here): "
                             "use the argument eps", lambda case: _reference(x, gamma, beta, 1e-5)))
    return table


def _bn2d_raise_hint(e, case):
    if "broadcast" in str(e):
        return ("gamma and beta have shape (C,); reshape them to (1, C, 1, 1) for an (N, C, H, W) array, or apply "
                "them while the data is still (N*H*W, C)")
    return None


def check_bn2d_forward(fn: Callable, verbose: bool = True) -> bool:
    """Check ``fn(x, gamma, beta, eps) -> y``, batch norm over (N, H, W) per channel of an (N, C, H, W) array.

    Runs four cases (different shapes, a batch of one, a large eps) against an independent float64
    reference; on the first failure prints which case, the largest error and the likely cause.
    Returns True if every case agrees to 1e-10.
    """
    cases = [Case(name, (x, gamma, beta, eps), _reference(x, gamma, beta, eps), 1e-10)
             for name, x, gamma, beta, eps in _bn2d_cases()]
    return run(fn, cases, inputs=("x", "gamma", "beta", "eps"), outputs=("y",), mistakes=_bn2d_mistakes,
               raise_hints=_bn2d_raise_hint,
               shape_hint=lambda label, y, case: ("reshape the (N*H*W, C) result to (N, H, W, C) and "
                                                  "transpose(0, 3, 1, 2) back"),
               unknown="compare the mean and variance of each output channel y[:, c] with beta[c] and "
                       "gamma[c]**2 * var_c / (var_c + eps), var_c the biased variance of x[:, c]",
               summary="y agrees with the reference (max |error| <= 1e-10)", verbose=verbose)


# ----------------------------------------------------------------------------------------------------
# BN folding
# ----------------------------------------------------------------------------------------------------

def _fold_reference(W, b, rm, rv, gamma, beta, eps):
    s = gamma / np.sqrt(rv + eps)
    return W * s[:, None, None, None], (b - rm) * s + beta


def _fold_variants(W, b, rm, rv, gamma, beta, eps) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    s = gamma / np.sqrt(rv + eps)
    s_noeps = gamma / np.sqrt(rv)
    out = {
        "eps is missing: the scale is gamma / sqrt(running_var + eps)":
            (W * s_noeps[:, None, None, None], (b - rm) * s_noeps + beta),
        "eps is outside the square root: the scale is gamma / sqrt(running_var + eps)":
            (W * (gamma / (np.sqrt(rv) + eps))[:, None, None, None], (b - rm) * gamma / (np.sqrt(rv) + eps) + beta),
        "the running mean is missing from the bias: b' = (b - running_mean) * s + beta":
            (W * s[:, None, None, None], b * s + beta),
        "the conv's own bias is missing from the folded bias: b' = (b - running_mean) * s + beta":
            (W * s[:, None, None, None], (0 * b - rm) * s + beta),
        "the bias is not scaled: b' = (b - running_mean) * s + beta, with s = gamma / sqrt(var + eps)":
            (W * s[:, None, None, None], b - rm + beta),
        "beta is missing from the folded bias": (W * s[:, None, None, None], (b - rm) * s),
        "the weight is not scaled: W' = W * s[:, None, None, None]": (W, (b - rm) * s + beta),
        "you used the standard deviation where its inverse belongs (multiplied by sqrt(var + eps))":
            (W * (gamma * np.sqrt(rv + eps))[:, None, None, None], (b - rm) * gamma * np.sqrt(rv + eps) + beta),
    }
    if W.shape[0] == W.shape[1]:
        out["the scale multiplies the input channels (dim 1 of the weight); BN scales output channel o, "
            "so it multiplies W[o] for output channel o (s[:, None, None, None])"] = (W * s[None, :, None, None], (b - rm) * s + beta)
    return out


def _fold_cases():
    import torch

    cases = []
    g = torch.Generator().manual_seed(7)
    for name, c_in, c_out, k, stride, padding, bias, eps in [
        ("Conv2d(3, 8, 3, padding=1) with bias", 3, 8, 3, 1, 1, True, 1e-5),
        ("Conv2d(4, 4, 3, stride=2) without bias", 4, 4, 3, 2, 0, False, 1e-5),
        ("Conv2d(2, 5, 5, padding=2) with bias, eps=1e-2", 2, 5, 5, 1, 2, True, 1e-2),
    ]:
        conv = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=bias).double()
        bn = torch.nn.BatchNorm2d(c_out, eps=eps).double()
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64) * 0.5)
            if bias:
                conv.bias.copy_(torch.randn(c_out, generator=g, dtype=torch.float64))
            bn.weight.copy_(torch.rand(c_out, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(c_out, generator=g, dtype=torch.float64))
            bn.running_mean.copy_(torch.randn(c_out, generator=g, dtype=torch.float64) * 2)
            bn.running_var.copy_(torch.rand(c_out, generator=g, dtype=torch.float64) * 0.05 + 0.01
                                 if eps > 1e-3 else torch.rand(c_out, generator=g, dtype=torch.float64) * 3 + 0.2)
        conv.eval()
        bn.eval()
        x = torch.randn(2, c_in, 9, 11, generator=g, dtype=torch.float64)
        cases.append((name, conv, bn, x))
    return cases


def _conv(x, W, b, conv):
    import torch

    return torch.nn.functional.conv2d(x, torch.as_tensor(W), torch.as_tensor(b), conv.stride, conv.padding,
                                      conv.dilation, conv.groups)


def _fold_args(conv, bn):
    W = conv.weight.detach().numpy()
    b = conv.bias.detach().numpy() if conv.bias is not None else np.zeros(W.shape[0])
    return (W, b, bn.running_mean.numpy(), bn.running_var.numpy(), bn.weight.detach().numpy(),
            bn.bias.detach().numpy(), bn.eps)


def _fold_mistakes(case):
    conv, bn = case.args
    x = case.data["x"]
    for cause, (Wv, bv) in _fold_variants(*_fold_args(conv, bn)).items():
        yield Mistake(cause, lambda case, Wv=Wv, bv=bv: (Wv, bv, _conv(x, Wv, bv, conv).numpy()))


def _fold_raise_hint(e, case):
    conv, _ = case.args
    if conv.bias is None and "NoneType" in str(e):
        return "this conv has bias=False (conv.bias is None); treat its bias as zeros"
    if "size of tensor" in str(e) or "must match" in str(e):
        return (f"the scale s = gamma / sqrt(running_var + eps) has one entry per output channel "
                f"({conv.out_channels} here); it multiplies W[o] for output channel o, i.e. s[:, None, None, None] "
                f"against a weight of shape {tuple(conv.weight.shape)}")
    return None


def _fold_adapt(folded, case):
    """The folded conv -> (its weight, its bias, folded(x)), with the structural diagnoses of a Conv2d."""
    import torch

    conv, _ = case.args
    if not isinstance(folded, torch.nn.Conv2d):
        raise Diagnosis(f"your function returned {type(folded).__name__}, expected a torch.nn.Conv2d")
    if folded.bias is None:
        raise Diagnosis("the folded conv has no bias; folding always produces one (beta - running_mean * s, plus "
                        "the scaled conv bias), so create the conv with bias=True")
    if folded.weight.dtype != conv.weight.dtype:
        raise Diagnosis(f"the folded conv's weight has dtype {folded.weight.dtype}, expected {conv.weight.dtype} "
                        f"(the original conv's): torch.nn.Conv2d(...) creates float32 parameters unless you pass "
                        f"dtype=conv.weight.dtype (or start from copy.deepcopy(conv))")
    x = case.data["x"]
    try:
        with torch.no_grad():
            y = folded(x)
    except Exception as e:  # noqa: BLE001 - the reader's module may fail in any way
        raise Diagnosis(f"calling the folded conv raised {type(e).__name__}: {e}") from None
    if y.shape != case.expected[2].shape:
        raise Diagnosis(f"the folded conv gives shape {tuple(y.shape)}, expected {tuple(case.expected[2].shape)}: "
                        f"copy stride, padding and dilation from the original conv "
                        f"(stride={conv.stride}, padding={conv.padding})")
    return folded.weight.detach().numpy(), folded.bias.detach().numpy(), y.numpy()


def check_fold_bn(fn: Callable, verbose: bool = True) -> bool:
    """Check ``fn(conv, bn) -> torch.nn.Conv2d`` that folds an eval-mode ``BatchNorm2d`` into ``conv``.

    For three convolutions (with and without bias, stride, padding, a large eps) in float64 the folded
    convolution must have the folded weight and bias, give ``bn(conv(x))`` to 1e-10 and leave ``conv`` and
    ``bn`` unchanged. On the first failure prints which case, the largest error and the likely cause. Returns
    True if all cases pass.
    """
    import torch

    cases = []
    for name, conv, bn, x in _fold_cases():
        W_ref, b_ref = _fold_reference(*_fold_args(conv, bn))
        with torch.no_grad():
            y_ref = bn(conv(x)).numpy()
        cases.append(Case(name, (conv, bn), (W_ref, b_ref, y_ref), 1e-10, data={"x": x}))
    return run(fn, cases, inputs=("conv", "bn"), outputs=("the folded weight", "the folded bias", "folded_conv(x)"),
               adapt=_fold_adapt, mistakes=_fold_mistakes, raise_hints=_fold_raise_hint,
               mutation_hints={"conv": "build a new Conv2d (or copy.deepcopy the conv) and write the folded "
                                       "values into it",
                               "bn": "folding reads bn's parameters and running statistics and changes nothing"},
               unknown="with s = gamma / sqrt(running_var + eps), W' = W * s[:, None, None, None] and "
                       "b' = (b - running_mean) * s + beta",
               summary="the folded conv equals bn(conv(x)) in eval mode (max |error| <= 1e-10)", verbose=verbose)
