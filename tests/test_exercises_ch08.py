"""The chapter 8 checkers accept correct implementations and diagnose each mistake they name.

Every wrong implementation is written by hand, the way a reader would write it (not taken from the checker's
table of mistakes), and the test asserts the verdict and the diagnosis printed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnlib.exercises import ch08


# ---------------------------------------------------------------------------------------------- group norm
def gn_correct(x, num_groups, gamma, beta, eps=1e-5):
    N, C = x.shape[:2]
    v = x.reshape(N, num_groups, -1)
    mu = v.mean(axis=2, keepdims=True)
    var = ((v - mu) ** 2).mean(axis=2, keepdims=True)
    x_hat = ((v - mu) / np.sqrt(var + eps)).reshape(x.shape)
    shape = (1, C) + (1,) * (x.ndim - 2)
    return gamma.reshape(shape) * x_hat + beta.reshape(shape)


def gn_correct_loop(x, num_groups, gamma, beta, eps=1e-5):
    """Another correct one: loops over examples and groups."""
    N, C = x.shape[:2]
    k = C // num_groups
    y = np.empty_like(x)
    for n in range(N):
        for g in range(num_groups):
            block = x[n, g * k:(g + 1) * k]
            x_hat = (block - block.mean()) / np.sqrt(block.var() + eps)
            for j in range(k):
                c = g * k + j
                y[n, c] = gamma[c] * x_hat[j] + beta[c]
    return y


def _aff(x_hat, gamma, beta):
    shape = (1, -1) + (1,) * (x_hat.ndim - 2)
    return gamma.reshape(shape) * x_hat + beta.reshape(shape)


def gn_instance(x, num_groups, gamma, beta, eps=1e-5):
    axes = tuple(range(2, x.ndim))
    return _aff((x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + eps), gamma, beta)


def gn_layer(x, num_groups, gamma, beta, eps=1e-5):
    axes = tuple(range(1, x.ndim))
    return _aff((x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + eps), gamma, beta)


def gn_interleaved(x, num_groups, gamma, beta, eps=1e-5):
    N, C = x.shape[:2]
    v = x.reshape(N, C // num_groups, num_groups, -1)
    mu, var = v.mean(axis=(1, 3), keepdims=True), v.var(axis=(1, 3), keepdims=True)
    return _aff(((v - mu) / np.sqrt(var + eps)).reshape(x.shape), gamma, beta)


def gn_over_batch(x, num_groups, gamma, beta, eps=1e-5):
    v = x.reshape(x.shape[0], num_groups, -1)
    mu, var = v.mean(axis=(0, 2), keepdims=True), v.var(axis=(0, 2), keepdims=True)
    return _aff(((v - mu) / np.sqrt(var + eps)).reshape(x.shape), gamma, beta)


def gn_unbiased(x, num_groups, gamma, beta, eps=1e-5):
    v = x.reshape(x.shape[0], num_groups, -1)
    x_hat = (v - v.mean(2, keepdims=True)) / np.sqrt(v.var(2, ddof=1, keepdims=True) + eps)
    return _aff(x_hat.reshape(x.shape), gamma, beta)


def gn_eps_outside(x, num_groups, gamma, beta, eps=1e-5):
    v = x.reshape(x.shape[0], num_groups, -1)
    x_hat = (v - v.mean(2, keepdims=True)) / (v.std(2, keepdims=True) + eps)
    return _aff(x_hat.reshape(x.shape), gamma, beta)


def gn_no_affine(x, num_groups, gamma, beta, eps=1e-5):
    v = x.reshape(x.shape[0], num_groups, -1)
    return ((v - v.mean(2, keepdims=True)) / np.sqrt(v.var(2, keepdims=True) + eps)).reshape(x.shape)


def gn_eps_fixed(x, num_groups, gamma, beta, eps=1e-5):
    return gn_correct(x, num_groups, gamma, beta, 1e-5)


def gn_float32(x, num_groups, gamma, beta, eps=1e-5):
    return gn_correct(x.astype(np.float32), num_groups, gamma.astype(np.float32), beta.astype(np.float32), eps)


def gn_in_place(x, num_groups, gamma, beta, eps=1e-5):
    v = x.reshape(x.shape[0], num_groups, -1)
    v -= v.mean(2, keepdims=True)
    return gn_correct(x, num_groups, gamma, beta, eps)


def test_group_norm_reference_is_torch():
    x = np.random.default_rng(0).normal(size=(3, 6, 2, 2))
    g, b = np.ones(6), np.zeros(6)
    np.testing.assert_allclose(ch08.reference_group_norm(x, 3, g, b), gn_correct(x, 3, g, b), atol=1e-12)


@pytest.mark.parametrize("fn", [gn_correct, gn_correct_loop])
def test_group_norm_accepts_correct(fn, capsys):
    assert ch08.check_group_norm(fn) is True
    assert "all 5 cases pass" in capsys.readouterr().out


@pytest.mark.parametrize("fn, expected", [
    (gn_instance, "likely cause: statistics per (example, channel)"),
    (gn_layer, "likely cause: statistics over all channels of an example: that is layer norm"),
    (gn_interleaved, "likely cause: channels grouped by c % G"),
    (gn_over_batch, "likely cause: the group statistics are pooled over the batch"),
    (gn_unbiased, "likely cause: unbiased variance"),
    (gn_eps_outside, "likely cause: eps added to the standard deviation"),
    (gn_no_affine, "likely cause: gamma and beta left out"),
    (gn_eps_fixed, "likely cause: eps ignored: you used eps = 1e-5 instead of the eps passed (0.1 here)"),
    (gn_float32, "y has dtype float32, expected float64"),
    (gn_in_place, "your function modified x in place"),
])
def test_group_norm_diagnoses(fn, expected, capsys):
    assert ch08.check_group_norm(fn) is False
    out = capsys.readouterr().out
    assert expected in out, out


# --------------------------------------------------------------------------------------------------- AdaBN
def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_correct(model, x, batch_size):
    model.eval()
    for bn in _bns(model):
        bn.reset_running_stats()
        bn.momentum, bn._saved = None, bn.momentum
        bn.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    for bn in _bns(model):
        bn.momentum = bn._saved
        del bn._saved
    model.eval()


@torch.no_grad()
def adapt_correct_by_hand(model, x, batch_size):
    """Another correct one: hooks record each BN layer's input (batch statistics in use, as during training);
    the running statistics are then overwritten with the averages computed by hand."""
    model.eval()
    inputs = {bn: [] for bn in _bns(model)}
    hooks = [bn.register_forward_pre_hook(lambda m, a: inputs[m].append(a[0])) for bn in _bns(model)]
    state = {bn: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in _bns(model)}
    for bn in _bns(model):
        bn.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    for h in hooks:
        h.remove()
    for bn in _bns(model):
        dims = [0] + list(range(2, inputs[bn][0].dim()))
        bn.running_mean.copy_(torch.stack([h.mean(dims) for h in inputs[bn]]).mean(0))
        bn.running_var.copy_(torch.stack([h.var(dims, unbiased=True) for h in inputs[bn]]).mean(0))
        bn.num_batches_tracked.copy_(state[bn][2] * 0 + len(inputs[bn]))
    model.eval()


@torch.no_grad()
def adapt_eval_mode(model, x, batch_size):
    model.eval()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])


@torch.no_grad()
def adapt_ema(model, x, batch_size):
    model.eval()
    for bn in _bns(model):
        bn.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    model.eval()


@torch.no_grad()
def adapt_reset_ema(model, x, batch_size):
    model.eval()
    for bn in _bns(model):
        bn.reset_running_stats()
        bn.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    model.eval()


@torch.no_grad()
def adapt_one_batch(model, x, batch_size):
    model.eval()
    for bn in _bns(model):
        bn.reset_running_stats()
        bn.momentum, m = None, bn.momentum
        bn.train()
        bn._m = m
    model(x)
    for bn in _bns(model):
        bn.momentum = bn._m
        del bn._m
    model.eval()


@torch.no_grad()
def adapt_whole_train(model, x, batch_size):
    momenta = [bn.momentum for bn in _bns(model)]
    for bn in _bns(model):
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    for bn, m in zip(_bns(model), momenta):
        bn.momentum = m
    model.eval()


def adapt_with_sgd(model, x, batch_size):
    """Trains (a gradient step on the output norm) instead of only re-estimating."""
    adapt_correct(model, x, batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).pow(2).mean().backward()
    opt.step()


@torch.no_grad()
def adapt_left_training(model, x, batch_size):
    adapt_correct(model, x, batch_size)
    for bn in _bns(model):
        bn.train()


@torch.no_grad()
def adapt_momentum_not_restored(model, x, batch_size):
    model.eval()
    for bn in _bns(model):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    model.eval()


@pytest.mark.parametrize("fn", [adapt_correct, adapt_correct_by_hand])
def test_adapt_bn_accepts_correct(fn, capsys):
    assert ch08.check_adapt_bn(fn) is True
    assert "all 3 cases pass" in capsys.readouterr().out


@pytest.mark.parametrize("fn, expected", [
    (adapt_eval_mode, "likely cause: the statistics did not change"),
    (adapt_ema, "likely cause: a moving average with the layer's momentum (0.1) that starts from the source"),
    (adapt_reset_ema, "likely cause: the statistics were reset, but averaged with the layer's momentum"),
    (adapt_one_batch, "likely cause: one batch of all the data"),
    (adapt_whole_train, "likely cause: model.train() also turned dropout on"),
    (adapt_with_sgd, "the weights changed"),
    (adapt_left_training, "the model is left in training mode"),
    (adapt_momentum_not_restored, "momentum was not restored"),
])
def test_adapt_bn_diagnoses(fn, expected, capsys):
    assert ch08.check_adapt_bn(fn) is False
    out = capsys.readouterr().out
    assert expected in out, out


def test_stubs_say_fill_in(capsys):
    def group_norm(x, num_groups, gamma, beta, eps=1e-5):
        raise NotImplementedError

    def adapt_bn(model, x, batch_size):
        raise NotImplementedError

    assert not ch08.check_group_norm(group_norm) and not ch08.check_adapt_bn(adapt_bn)
    out = capsys.readouterr().out
    assert "group_norm raises NotImplementedError" in out and "adapt_bn raises NotImplementedError" in out


def test_silent_mode(capsys):
    assert ch08.check_group_norm(gn_correct, verbose=False)
    assert ch08.check_adapt_bn(adapt_correct, verbose=False)
    assert capsys.readouterr().out == ""
