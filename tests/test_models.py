"""bnlib.models: S seeds batched = S independent models (trained and in eval mode); the seed CNN's layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnlib.mnist import batch_indices
from bnlib.models import BatchedMLP, SeedCNN, default_bn_layers, mlp

BN_LAYERS = [nn.BatchNorm1d] + ([default_bn_layers()[0]] if default_bn_layers()[0] is not nn.BatchNorm1d else [])


@pytest.mark.parametrize("bn_layer", BN_LAYERS, ids=lambda c: c.__module__)
@pytest.mark.parametrize("bn", [False, True])
def test_batched_mlp_equals_independent_models(bn, bn_layer):
    """S seeds trained as one batched model == S separate nn.Sequential MLPs trained on the same batches."""
    seeds, B, sizes = [3, 4, 5], 8, (20, 7, 6, 5, 4)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(40, sizes[0], generator=gen) > 0.5).float()
    y = torch.randint(0, sizes[-1], (40,), generator=gen)
    big = BatchedMLP(seeds, bn=bn, sizes=sizes, init_std=0.3, bn_layer=bn_layer)
    small = [mlp(bn, sizes, 0.3, torch.Generator().manual_seed(s), bn_layer=nn.BatchNorm1d) for s in seeds]
    opt_big = torch.optim.SGD(big.parameters(), lr=0.5)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in small]
    for idx in batch_indices(40, B, seeds, steps=6):
        out = big(x[idx])
        loss = F.cross_entropy(out.reshape(-1, sizes[-1]), y[idx].reshape(-1), reduction="sum") / B
        opt_big.zero_grad(), loss.backward(), opt_big.step()
        for s, (m, o) in enumerate(zip(small, opts)):
            out_s = m(x[idx[s]])
            torch.testing.assert_close(out[s], out_s, atol=1e-5, rtol=1e-5)
            o.zero_grad(), F.cross_entropy(out_s, y[idx[s]]).backward(), o.step()
    big.eval()
    with torch.no_grad():
        shared = big(x)  # (N, in) input: the same examples for every seed, running statistics
        for s, m in enumerate(small):
            m.eval()
            torch.testing.assert_close(shared[s], m(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(big.seed_model(s)(x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bn,position", [(False, "pre"), (True, "pre"), (True, "post")])
def test_seed_cnn_shapes_and_layout(bn, position):
    net = SeedCNN(bn=bn, bn_position=position)
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    names = [type(m).__name__ for m in net.modules()]
    assert names.count("BatchNorm2d") == (2 if bn else 0) and names.count("BatchNorm1d") == (1 if bn else 0)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all((c.bias is None) == (bn and position == "pre") for c in convs)
    with pytest.raises(ValueError):
        SeedCNN(bn=True, bn_position="middle")
