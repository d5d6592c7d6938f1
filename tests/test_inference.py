"""bnlib.inference: the population statistics equal torch.optim.swa_utils.update_bn (Algorithm 2) or a
direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnlib.inference import recompute_population_stats
from tests.test_layers import _trained, torch_copy


def test_recompute_batches_equals_torch_update_bn():
    model, X, _ = _trained()
    ref = torch_copy(model)
    model.eval()
    recompute_population_stats(model, X, method="batches", batch_size=20, seed=5)
    perm = np.random.default_rng(5).permutation(len(X))
    loader = [torch.from_numpy(X[perm[k * 20:(k + 1) * 20]]) for k in range(len(X) // 20)]
    ref.eval()
    torch.optim.swa_utils.update_bn(loader, ref)
    tbns = [m for m in ref if isinstance(m, torch.nn.BatchNorm1d)]
    for bn, tbn in zip(model.bns, tbns):
        np.testing.assert_allclose(bn.running_mean, tbn.running_mean.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=0, atol=1e-12)
        assert bn.momentum == tbn.momentum == 0.1
        assert bn.num_batches_tracked == int(tbn.num_batches_tracked) == len(loader)
    assert not model.training  # mode restored


def test_recompute_exact_is_the_inference_networks_statistics():
    model, X, _ = _trained(seed=1)
    recompute_population_stats(model, X, method="exact")
    assert model.training  # _trained leaves it in training mode; restored
    model.eval()
    # layer 0: the statistics of X @ W.T; layer 1: of the hidden layer computed with layer 0 in eval mode
    z0 = X @ model.linears[0].W.T
    np.testing.assert_allclose(model.bns[0].running_mean, z0.mean(0), atol=1e-12)
    np.testing.assert_allclose(model.bns[0].running_var, z0.var(0, ddof=1), atol=1e-12)
    h = np.maximum(model.bns[0].forward(z0), 0)
    z1 = h @ model.linears[1].W.T
    np.testing.assert_allclose(model.bns[1].running_mean, z1.mean(0), atol=1e-12)
    np.testing.assert_allclose(model.bns[1].running_var, z1.var(0, ddof=1), atol=1e-12)
    with pytest.raises(ValueError, match="method"):
        recompute_population_stats(model, X, method="ema")
