"""bnlib.layers: the NumPy MLP equals torch (forward, every gradient, running statistics); the loss and
the activations equal torch's or a direct computation."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from bnlib.layers import MLP, BatchNorm, accuracy, predict, sigmoid, softmax_cross_entropy, train_mlp


def torch_copy(model: MLP) -> torch.nn.Sequential:
    """The same network as torch modules, in float64, with the same parameters and buffers."""
    mods = []
    for layer in model.layers:
        if isinstance(layer, BatchNorm):
            bn = torch.nn.BatchNorm1d(layer.num_features, eps=layer.eps, momentum=layer.momentum,
                                      dtype=torch.float64)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, name).copy_(torch.from_numpy(getattr(layer, name).astype(np.float64)))
            bn.num_batches_tracked.fill_(layer.num_batches_tracked)
            mods.append(bn)
        elif hasattr(layer, "W"):
            lin = torch.nn.Linear(layer.W.shape[1], layer.W.shape[0], bias=layer.b is not None,
                                  dtype=torch.float64)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(layer.W.astype(np.float64)))
                if layer.b is not None:
                    lin.bias.copy_(torch.from_numpy(layer.b.astype(np.float64)))
            mods.append(lin)
        else:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def test_forward_backward_equal_torch_autograd():
    rng = np.random.default_rng(0)
    model = MLP(sizes=(7, 6, 5, 4), seed=1, dtype=np.float64)
    ref = torch_copy(model)
    x = rng.normal(size=(9, 7))
    y = rng.integers(0, 4, 9)
    for training in (True, False):
        model.train(training)
        ref.train(training)
        loss, dlogits = softmax_cross_entropy(model.forward(x), y)
        model.backward(dlogits)
        for p in ref.parameters():
            p.grad = None
        t_logits = ref(torch.from_numpy(x))
        t_loss = torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(y))
        t_loss.backward()
        assert abs(loss - t_loss.item()) < 1e-12
        ours = [g for _, g in model.params()]
        theirs = [p.grad.numpy() for p in ref.parameters()]
        assert len(ours) == len(theirs)
        for g, tg in zip(ours, theirs):
            np.testing.assert_allclose(g, tg, rtol=1e-10, atol=1e-12)
    # the running statistics followed torch's in the training-mode call
    for bn, tbn in zip(model.bns, [m for m in ref if isinstance(m, torch.nn.BatchNorm1d)]):
        np.testing.assert_allclose(bn.running_mean, tbn.running_mean.numpy(), atol=1e-12)
        np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), atol=1e-12)


def test_forward_upto_returns_bn_input():
    rng = np.random.default_rng(1)
    model = MLP(sizes=(5, 4, 3, 2), seed=2, dtype=np.float64).eval()
    x = rng.normal(size=(6, 5))
    z0 = model.forward(x, upto=0)
    np.testing.assert_allclose(z0, x @ model.linears[0].W.T, atol=1e-14)
    z1 = model.forward(x, upto=1)
    h = np.maximum(model.bns[0].forward(z0), 0)
    np.testing.assert_allclose(z1, h @ model.linears[1].W.T, atol=1e-14)
    with pytest.raises(IndexError):
        model.forward(x, upto=2)


def _trained(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(600, 8)) + rng.normal(size=8)
    y = (X[:, 0] + X[:, 1] > X[:, 2]).astype(np.int64) + (X[:, 3] > 0)
    model = MLP(sizes=(8, 6, 5, 3), seed=seed, dtype=dtype)
    train_mlp(model, X.astype(dtype), y, steps=40, batch_size=20, lr=0.1, seed=seed)
    return model, X.astype(dtype), y


def test_training_reduces_the_loss():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(600, 8))
    y = (X[:, 0] > 0).astype(np.int64)
    model = MLP(sizes=(8, 16, 2), seed=0, dtype=np.float64)
    losses = train_mlp(model, X, y, steps=150, batch_size=30, lr=0.2)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert accuracy(model.eval(), X, y) > 0.9


def test_predict_in_chunks_and_modes():
    model, X, y = _trained(seed=2)
    model.eval()
    np.testing.assert_allclose(predict(model, X, 64), predict(model, X, None), atol=1e-12)
    m2 = copy.deepcopy(model).train()
    before = m2.bns[0].running_mean.copy()
    logits_train = predict(m2, X[:40], 20)
    assert not np.allclose(logits_train, predict(model, X[:40], 20))
    assert not np.allclose(before, m2.bns[0].running_mean)  # training mode updates the running stats


def test_softmax_cross_entropy_equals_torch():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(5, 3)) * 10
    y = rng.integers(0, 3, 5)
    loss, d = softmax_cross_entropy(logits, y)
    t = torch.from_numpy(logits).requires_grad_()
    tl = torch.nn.functional.cross_entropy(t, torch.from_numpy(y))
    tl.backward()
    assert abs(loss - tl.item()) < 1e-12
    np.testing.assert_allclose(d, t.grad.numpy(), atol=1e-14)


def test_sigmoid_stable_and_correct():
    x = np.linspace(-30, 30, 121)
    np.testing.assert_allclose(sigmoid(x), 1 / (1 + np.exp(-x)), rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_array_equal(s, [0.0, 0.5, 1.0])
    assert sigmoid(np.ones(3, dtype=np.float32)).dtype == np.float32
