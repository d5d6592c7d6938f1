"""The chapter-05 checkers accept a correct answer and diagnose each mistake they claim to recognise."""

import copy

import numpy as np
import pytest
import torch

from bnlib.exercises.ch05 import check_bn2d_forward, check_fold_bn


# ---------------------------------------------------------------- BN2d forward by reshaping

def _bn_2d(x2, gamma, beta, eps, ddof=0, eps_outside=False):
    mu = x2.mean(axis=0)
    var = x2.var(axis=0, ddof=ddof)
    x_hat = (x2 - mu) / (np.sqrt(var) + eps if eps_outside else np.sqrt(var + eps))
    return gamma * x_hat + beta


def good(x, gamma, beta, eps=1e-5):
    N, C, H, W = x.shape
    y2 = _bn_2d(x.transpose(0, 2, 3, 1).reshape(-1, C), gamma, beta, eps)
    return y2.reshape(N, H, W, C).transpose(0, 3, 1, 2)


def good_torch(x, gamma, beta, eps=1e-5):  # an independent implementation: torch's own kernel
    y = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, torch.from_numpy(gamma),
                                       torch.from_numpy(beta), training=True, eps=eps)
    return y.numpy()


def _axes(axes, **kw):
    def fn(x, gamma, beta, eps=1e-5):
        mu = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True, ddof=kw.get("ddof", 0))
        den = np.sqrt(var) + eps if kw.get("eps_outside") else np.sqrt(var + eps)
        return gamma.reshape(1, -1, 1, 1) * (x - mu) / den + beta.reshape(1, -1, 1, 1)
    return fn


def no_transpose(x, gamma, beta, eps=1e-5):
    N, C, H, W = x.shape
    return _bn_2d(x.reshape(-1, C), gamma, beta, eps).reshape(N, C, H, W)


def no_transpose_back(x, gamma, beta, eps=1e-5):
    N, C, H, W = x.shape
    return _bn_2d(x.transpose(0, 2, 3, 1).reshape(-1, C), gamma, beta, eps).reshape(N, C, H, W)


def swapped_affine(x, gamma, beta, eps=1e-5):
    return good(x, beta, gamma, eps)


def no_affine(x, gamma, beta, eps=1e-5):
    return good(x, np.ones_like(gamma), np.zeros_like(beta), eps)


def in_place(x, gamma, beta, eps=1e-5):
    y = good(x, gamma, beta, eps)
    x -= x.mean()
    return y


def unbroadcast_gamma(x, gamma, beta, eps=1e-5):
    mu = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    return gamma * (x - mu) / np.sqrt(var + eps) + beta


def returns_tuple(x, gamma, beta, eps=1e-5):
    return good(x, gamma, beta, eps), None


def float32(x, gamma, beta, eps=1e-5):
    return good(x, gamma, beta, eps).astype(np.float32)


def eps_hard_coded(x, gamma, beta, eps=1e-5):
    """Ignores the eps argument: right on the eps=1e-5 cases, wrong on the eps=0.1 one."""
    return good(x, gamma, beta, 1e-5)


def test_bn2d_unrecognised_hint_names_the_right_target(capsys):
    """The hint for an unknown mistake gives the variance a correct output has: gamma**2 * var / (var + eps),
    not gamma**2 (which the eps-ignoring output matches on the eps=0.1 case)."""
    def scaled(x, gamma, beta, eps=1e-5):
        return 1.01 * good(x, gamma, beta, eps)

    assert check_bn2d_forward(scaled) is False
    out = capsys.readouterr().out
    assert "not a mistake this checker recognises" in out and "gamma[c]**2 * var_c / (var_c + eps)" in out, out


@pytest.mark.parametrize("fn", [good, good_torch])
def test_bn2d_accepts_correct(fn, capsys):
    assert check_bn2d_forward(fn) is True
    assert "all 4 cases pass" in capsys.readouterr().out


@pytest.mark.parametrize("fn, expected", [
    (no_transpose, "without moving C last"),
    (no_transpose_back, "straight back to (N, C, H, W)"),
    (_axes((0, 1)), "axes (0, 1)"),
    (_axes((0,)), "per position"),
    (_axes((2, 3)), "instance normalization"),
    (_axes((1, 2, 3)), "layer normalization"),
    (_axes((0, 2, 3), ddof=1), "unbiased variance"),
    (_axes((0, 2, 3), eps_outside=True), "eps is outside"),
    (swapped_affine, "swapped"),
    (no_affine, "forgot gamma and beta"),
    (in_place, "your function modified x in place"),
    (unbroadcast_gamma, "reshape them to (1, C, 1, 1)"),
    (returns_tuple, "returned a tuple of 2, expected y only"),
    (float32, "y has dtype float32, expected float64"),
    (eps_hard_coded, "you used eps = 1e-5 instead of the eps passed to the function (0.1 here)"),
])
def test_bn2d_diagnoses(fn, expected, capsys):
    assert check_bn2d_forward(fn) is False
    out = capsys.readouterr().out
    assert expected in out, out


# ---------------------------------------------------------------- folding BN into a conv

def fold_good(conv, bn):
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                             padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
    folded = folded.to(conv.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * s[:, None, None, None])
        folded.bias.copy_((b - bn.running_mean) * s + bn.bias)
    return folded


def _fold_with(scale_fn, bias_fn, weight_fn=None):
    def fn(conv, bn):
        folded = copy.deepcopy(conv)
        if folded.bias is None:
            folded.bias = torch.nn.Parameter(torch.zeros_like(bn.running_mean))
        b = folded.bias.detach().clone()
        s = scale_fn(bn)
        with torch.no_grad():
            folded.weight.copy_(weight_fn(conv.weight, s) if weight_fn else conv.weight * s[:, None, None, None])
            folded.bias.copy_(bias_fn(b, bn, s))
        return folded
    return fn


def _s(bn):
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


def fold_in_place(conv, bn):
    folded = fold_good(copy.deepcopy(conv), bn)
    with torch.no_grad():
        conv.weight.copy_(folded.weight)
    return folded


def fold_no_bias(conv, bn):
    folded = fold_good(conv, bn)
    return torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, bias=False).to(torch.float64)


def fold_no_padding(conv, bn):
    good_one = fold_good(conv, bn)
    folded = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size).to(torch.float64)
    folded.load_state_dict(good_one.state_dict())
    return folded


def fold_float32(conv, bn):
    """nn.Conv2d built without dtype=: float32 parameters, values right to about 1e-7 only."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                             padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * s[:, None, None, None])
        folded.bias.copy_((b - bn.running_mean) * s + bn.bias)
    return folded


def fold_naive_none_bias(conv, bn):
    folded = fold_good(conv, bn)
    with torch.no_grad():
        folded.bias.copy_((conv.bias - bn.running_mean) * _s(bn) + bn.bias)  # TypeError when conv.bias is None
    return folded


@pytest.mark.parametrize("fn", [fold_good])
def test_fold_accepts_correct(fn, capsys):
    assert check_fold_bn(fn) is True
    assert "all 3 cases" in capsys.readouterr().out


@pytest.mark.parametrize("fn, expected", [
    (_fold_with(lambda bn: bn.weight / torch.sqrt(bn.running_var), lambda b, bn, s: (b - bn.running_mean) * s + bn.bias),
     "eps is missing"),
    (_fold_with(lambda bn: bn.weight / (torch.sqrt(bn.running_var) + bn.eps),
                lambda b, bn, s: (b - bn.running_mean) * s + bn.bias), "eps is outside"),
    (_fold_with(_s, lambda b, bn, s: b * s + bn.bias), "running mean is missing"),
    (_fold_with(_s, lambda b, bn, s: -bn.running_mean * s + bn.bias), "conv's own bias is missing"),
    (_fold_with(_s, lambda b, bn, s: b - bn.running_mean + bn.bias), "bias is not scaled"),
    (_fold_with(_s, lambda b, bn, s: (b - bn.running_mean) * s), "beta is missing"),
    (_fold_with(_s, lambda b, bn, s: (b - bn.running_mean) * s + bn.bias, lambda W, s: W), "weight is not scaled"),
    (_fold_with(lambda bn: bn.weight * torch.sqrt(bn.running_var + bn.eps),
                lambda b, bn, s: (b - bn.running_mean) * s + bn.bias), "inverse belongs"),
    (_fold_with(_s, lambda b, bn, s: (b - bn.running_mean) * s + bn.bias, lambda W, s: W * s[None, :, None, None]),
     "output channel o"),
    (fold_in_place, "your function modified conv in place (conv.weight)"),
    (fold_float32, "the folded conv's weight has dtype torch.float32, expected torch.float64"),
    (fold_no_bias, "has no bias"),
    (fold_no_padding, "copy stride, padding"),
    (fold_naive_none_bias, "conv.bias is None"),
])
def test_fold_diagnoses(fn, expected, capsys):
    assert check_fold_bn(fn) is False
    out = capsys.readouterr().out
    assert expected in out, out
