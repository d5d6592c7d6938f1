"""bnlib.diagnostics: every measurement against an independent computation (NumPy, closed forms, torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnlib import diagnostics as dg
from bnlib.motivation import sigmoid_saturation_threshold
from bnlib.torch_bn import BatchNorm1d


def test_seed_norm_and_dot_are_per_seed():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 7, generator=g)]
    b = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 7, generator=g)]
    A = np.concatenate([t.numpy().reshape(3, -1) for t in a], 1).astype(np.float64)
    B = np.concatenate([t.numpy().reshape(3, -1) for t in b], 1).astype(np.float64)
    np.testing.assert_allclose(dg.seed_norm(a).numpy(), np.linalg.norm(A, axis=1), rtol=1e-12)
    np.testing.assert_allclose(dg.seed_dot(a, b).numpy(), (A * B).sum(1), rtol=1e-12)
    whole = dg.seed_norm(a, batched=False)
    assert whole.shape == (1,)
    np.testing.assert_allclose(whole.numpy(), [np.linalg.norm(A)], rtol=1e-12)


def test_saturation_thresholds_match_their_definitions():
    assert dg.SATURATION["sigmoid"] == pytest.approx(sigmoid_saturation_threshold(0.1), rel=1e-12)
    assert math.tanh(dg.SATURATION["tanh"]) == pytest.approx(0.97, rel=1e-12)


def test_layer_stats_counts_dead_relu_units_and_saturated_sigmoids():
    z = torch.tensor([[[-1.0, 2.0, -3.0], [-2.0, -1.0, 0.0]],          # seed 0: units 0 and 2 dead
                      [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]])        # seed 1: none dead
    st = dg.layer_stats([z], "relu")
    np.testing.assert_allclose(st["saturated"].numpy(), [[2 / 3, 0.0]])
    np.testing.assert_allclose(st["mean"].numpy(), [[z[0].mean().item(), 0.0]], atol=1e-12)
    np.testing.assert_allclose(st["std"].numpy(), [[np.std(z[0].numpy()), 1.0]], rtol=1e-6)
    thr = sigmoid_saturation_threshold(0.1)
    zs = torch.tensor([[thr + 0.01, -thr - 0.01, thr - 0.01, 0.0]])
    st = dg.layer_stats([zs], "sigmoid", batched=False)
    assert st["saturated"].shape == (1, 1)
    assert st["saturated"].item() == 0.5
    assert dg.layer_stats([zs], "linear", batched=False)["saturated"].item() == 0.0


def test_grad_stats_is_the_rms_of_the_retained_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.bmm(x, w)
    z.retain_grad()
    (0.5 * z.square()).sum().backward()  # dL/dz = z
    expected = z.detach().reshape(2, -1).square().mean(1).sqrt()
    np.testing.assert_allclose(dg.grad_stats([z]).numpy(), expected.numpy()[None], rtol=1e-12)
    with pytest.raises(RuntimeError, match="retain_grad"):
        dg.grad_stats([torch.bmm(x, w)])


def test_update_ratio():
    before = [torch.tensor([[3.0, 4.0], [1.0, 0.0]])]
    after = [torch.tensor([[3.0, 4.5], [1.0, 2.0]])]
    np.testing.assert_allclose(dg.update_ratio(before, after).numpy(), [[0.5 / 5.0, 2.0]], rtol=1e-12)


def test_frozen_bn_stats_normalises_with_the_batch_but_keeps_the_running_estimates():
    bn = BatchNorm1d(4, momentum=0.3)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2)) * 3 + 1
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    with dg.frozen_bn_stats(bn):
        y = bn(x)
    expected = torch.nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, expected)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])
    assert bn.momentum == 0.3
    bn(x)  # outside the block the estimates move again
    assert not torch.equal(bn.running_mean, before[0])


def _two_layer_linear(seed=3):
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    W2 = torch.randn(2, 4, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)   # five examples as columns
    y = torch.randn(2, 5, generator=g, dtype=torch.float64)
    return W1, W2, x, y


def test_ics_gradient_change_matches_the_closed_form_of_a_linear_network():
    W1, W2, x, y = _two_layer_linear()
    lr = 0.05
    # closed form: L = 1/2 ||W2 W1 x - y||^2, r = W2 W1 x - y, G1 = W2^T r x^T, G2 = r (W1 x)^T
    r = W2 @ W1 @ x - y
    G1, G2 = W2.T @ r @ x.T, r @ (W1 @ x).T
    W1n = W1 - lr * G1
    G2p = (W2 @ W1n @ x - y) @ (W1n @ x).T
    l2_expected = torch.linalg.norm(G2 - G2p).item()
    cos_expected = (G2 * G2p).sum().item() / (torch.linalg.norm(G2) * torch.linalg.norm(G2p)).item()

    p1, p2 = W1.clone().requires_grad_(), W2.clone().requires_grad_()
    l2, cos = dg.ics_gradient_change(lambda: 0.5 * (p2 @ p1 @ x - y).square().sum(), [[p1], [p2]], lr,
                                     batched=False)
    assert l2.shape == cos.shape == (2, 1)
    assert l2[0, 0].item() == 0.0 and cos[0, 0].item() == pytest.approx(1.0, abs=1e-12)
    assert l2[1, 0].item() == pytest.approx(l2_expected, rel=1e-10)
    assert cos[1, 0].item() == pytest.approx(cos_expected, rel=1e-10)
    assert l2_expected > 1e-3  # the check is not vacuous
    assert torch.equal(p1.detach(), W1) and torch.equal(p2.detach(), W2)  # parameters restored


def test_ics_gradient_change_is_per_seed():
    Ws = [_two_layer_linear(seed) for seed in (4, 5)]
    p1 = torch.stack([w[0] for w in Ws]).requires_grad_()
    p2 = torch.stack([w[1] for w in Ws]).requires_grad_()
    x = torch.stack([w[2] for w in Ws])
    y = torch.stack([w[3] for w in Ws])
    l2, cos = dg.ics_gradient_change(lambda: 0.5 * (p2 @ p1 @ x - y).square().sum((1, 2)), [[p1], [p2]], 0.05)
    for s, (W1, W2, xs, ys) in enumerate(Ws):
        q1, q2 = W1.clone().requires_grad_(), W2.clone().requires_grad_()
        l2s, coss = dg.ics_gradient_change(lambda: 0.5 * (q2 @ q1 @ xs - ys).square().sum(), [[q1], [q2]], 0.05,
                                           batched=False)
        assert l2[1, s].item() == pytest.approx(l2s[1, 0].item(), rel=1e-10)
        assert cos[1, s].item() == pytest.approx(coss[1, 0].item(), rel=1e-10)


def test_landscape_along_gradient_on_quadratics():
    """L_s(w) = 1/2 w^T H_s w for two seeds: L(w - eta g) and ||g - g_eta|| = eta ||H g|| in closed form, so the
    effective beta-smoothness is ||H g|| / ||g|| <= lambda_max(H)."""
    rng = np.random.default_rng(6)
    Hs = []
    for scale in (1.0, 10.0):
        A = rng.standard_normal((4, 4))
        Hs.append(scale * (A @ A.T + np.eye(4)))
    H = torch.tensor(np.stack(Hs))
    w0 = torch.tensor(rng.standard_normal((2, 4)))
    w = w0.clone().requires_grad_()
    etas = [0.001, 0.01, 0.02]
    out = dg.landscape_along_gradient(lambda: 0.5 * torch.einsum("si,sij,sj->s", w, H, w), [w], etas)
    for s in range(2):
        Hn, wn = Hs[s], w0[s].numpy()
        g = Hn @ wn
        losses = [0.5 * (wn - e * g) @ Hn @ (wn - e * g) for e in etas]
        np.testing.assert_allclose(out["loss"][:, s].numpy(), losses, rtol=1e-10)
        np.testing.assert_allclose(out["grad_change"][:, s].numpy(), [e * np.linalg.norm(Hn @ g) for e in etas],
                                   rtol=1e-10)
        beta = np.linalg.norm(Hn @ g) / np.linalg.norm(g)
        assert out["beta"][s].item() == pytest.approx(beta, rel=1e-10)
        assert beta <= np.linalg.eigvalsh(Hn)[-1] * (1 + 1e-12)
        all_losses = [0.5 * wn @ Hn @ wn] + losses
        assert out["loss_range"][s].item() == pytest.approx(max(all_losses) - min(all_losses), rel=1e-10)
    assert torch.equal(w.detach(), w0)  # restored
