"""bnlib.motivation: least-squares conditioning helpers and the recording sigmoid network of chapter 01.

Expected values come from independent computations: finite differences, closed forms, torch autograd.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnlib.motivation import (
    BNNoise,
    SigmoidMLP,
    best_constant_step,
    condition_number,
    gd_iterations,
    gd_iterations_bound,
    gd_relative_gap,
    gradient_descent,
    least_squares_grad,
    least_squares_hessian,
    least_squares_loss,
    sigmoid_saturation_threshold,
    train_with_recording,
)


def _problem(seed=0, n=50, d=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * [1.0, 5.0, 0.3][:d] + [1.0, -2.0, 0.5][:d]
    y = rng.normal(size=n)
    return X, y


def test_gradient_and_hessian_match_finite_differences():
    X, y = _problem()
    w = np.array([0.3, -0.2, 1.1])
    h = 1e-6
    I = np.eye(3)
    num_grad = np.array([(least_squares_loss(X, y, w + h * e) - least_squares_loss(X, y, w - h * e)) / (2 * h) for e in I])
    np.testing.assert_allclose(least_squares_grad(X, y, w), num_grad, rtol=1e-6, atol=1e-8)
    num_hess = np.stack([(least_squares_grad(X, y, w + h * e) - least_squares_grad(X, y, w - h * e)) / (2 * h) for e in I])
    np.testing.assert_allclose(least_squares_hessian(X), num_hess, rtol=1e-6, atol=1e-8)


def test_condition_number():
    assert condition_number(np.diag([2.0, 0.5, 1.0])) == pytest.approx(4.0)
    R = np.array([[1.0, 0.6], [0.6, 1.0]])
    assert condition_number(R) == pytest.approx(1.6 / 0.4)
    with pytest.raises(ValueError, match="not positive definite"):
        condition_number(np.array([[1.0, 2.0], [2.0, 1.0]]))


def test_best_step_and_iteration_bound():
    X, y = _problem()
    H = least_squares_hessian(X)
    lam = np.linalg.eigvalsh(H)
    lr = best_constant_step(H)
    assert lr == pytest.approx(2 / (lam[0] + lam[-1]))
    path, gaps = gradient_descent(X, y, lr, tol=1e-8)
    k = len(path) - 1
    assert gaps[-1] <= 1e-8 < gaps[-2]
    assert k <= gd_iterations_bound(condition_number(H), 1e-8)
    # the end point is the least-squares solution
    w_star = np.linalg.lstsq(X, y, rcond=None)[0]
    np.testing.assert_allclose(path[-1], w_star, rtol=1e-3, atol=1e-3)
    # the relative loss gap never increases with this step
    assert np.all(np.diff(gaps) <= 1e-15)


def test_gd_diverges_above_two_over_lambda_max():
    X, y = _problem()
    lam_max = np.linalg.eigvalsh(least_squares_hessian(X))[-1]
    with pytest.raises(RuntimeError, match="did not reach"):
        gradient_descent(X, y, 2.05 / lam_max, max_steps=2000)


def test_iteration_bound_closed_form():
    assert gd_iterations_bound(1.0, 1e-6) == 1
    kappa, tol = 100.0, 1e-6
    rho = 99 / 101
    k = gd_iterations_bound(kappa, tol)
    assert rho ** (2 * k) <= tol < rho ** (2 * (k - 1))


@pytest.mark.parametrize("c", [0.01, 0.1, 0.2])
def test_saturation_threshold(c):
    t = sigmoid_saturation_threshold(c)
    s = 1 / (1 + np.exp(-t))
    assert s * (1 - s) == pytest.approx(c)
    # beyond t the derivative is smaller, inside it is larger
    for x, cmp in ((t + 0.1, np.less), (t - 0.1, np.greater)):
        sx = 1 / (1 + np.exp(-x))
        assert cmp(sx * (1 - sx), c)
    with pytest.raises(ValueError):
        sigmoid_saturation_threshold(0.3)


def test_mlp_backward_matches_torch_autograd():
    import torch
    rng = np.random.default_rng(3)
    net = SigmoidMLP([7, 5, 4, 3], init_std=0.8, rng=rng, dtype=np.float64)
    for b in net.b:
        b[:] = rng.normal(size=b.shape)
    x = rng.normal(size=(6, 7))
    labels = np.array([0, 2, 1, 1, 0, 2])
    logits, cache = net.forward(x)
    loss, dlogits = net.loss_and_dlogits(logits, labels)
    dW, db, dx = net.backward(cache, dlogits)

    Wt = [torch.tensor(W, requires_grad=True) for W in net.W]
    bt = [torch.tensor(b, requires_grad=True) for b in net.b]
    u = torch.tensor(x)
    pre = []
    for k, (W, b) in enumerate(zip(Wt, bt)):
        z = u @ W.T + b
        z.retain_grad()
        pre.append(z)
        u = torch.sigmoid(z) if k < len(Wt) - 1 else z
    loss_t = torch.nn.functional.cross_entropy(u, torch.tensor(labels))
    loss_t.backward()
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    for k in range(len(Wt)):
        np.testing.assert_allclose(dW[k], Wt[k].grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(db[k], bt[k].grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dx[k], pre[k].grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cache["x"][k], pre[k].detach().numpy(), rtol=1e-12)


def test_mlp_records_layer_inputs():
    net = SigmoidMLP([4, 3, 2], rng=np.random.default_rng(0))
    x = np.ones((5, 4), dtype=np.float32)
    logits, cache = net.forward(x)
    assert logits.shape == (5, 2)
    assert [u.shape for u in cache["u"]] == [(5, 4), (5, 3)]
    assert [z.shape for z in cache["x"]] == [(5, 3), (5, 2)]
    np.testing.assert_allclose(cache["u"][1], 1 / (1 + np.exp(-cache["x"][0])), rtol=1e-6)


def test_train_with_recording_learns_and_records():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 10)) * 3
    labels = rng.integers(0, 3, size=600)
    X = (centers[labels] + rng.normal(size=(600, 10))).astype(np.float32)
    net = SigmoidMLP([10, 8, 8, 3], init_std=0.5, rng=np.random.default_rng(1))
    rec = train_with_recording(net, X[:500], labels[:500], X[500:], labels[500:], steps=400, batch_size=20,
                               lr=0.5, record_every=100)
    assert rec.steps == [0, 100, 200, 300, 400]
    assert all(len(p) == 3 and p[0] <= p[1] <= p[2] for p in rec.percentiles)
    assert len(rec.grad_rms) == len(rec.saturation) == len(rec.accuracy) == 5
    assert [m.shape for m in rec.input_mean[0]] == [(10,), (8,), (8,)]
    assert rec.accuracy[-1] > 0.9 > rec.accuracy[0] + 0.2
    # the data (layer 0's input) never moves; the hidden layers' inputs do
    np.testing.assert_array_equal(rec.input_mean[0][0], rec.input_mean[-1][0])
    assert np.abs(rec.input_mean[-1][1] - rec.input_mean[0][1]).mean() > 0.01


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gd_iterations_closed_form_equals_running_gd(seed):
    X, y = _problem(seed)
    H = least_squares_hessian(X)
    for lr in (best_constant_step(H), 1.0 / np.linalg.eigvalsh(H)[-1]):
        for tol in (1e-4, 1e-8):
            path, _ = gradient_descent(X, y, lr, tol=tol)
            assert gd_iterations(X, y, lr, tol=tol) == len(path) - 1
    with pytest.raises(RuntimeError, match="not a stable step"):
        gd_iterations(X, y, 2.1 / np.linalg.eigvalsh(H)[-1])


def test_gd_relative_gap_matches_running_gd():
    X, y = _problem(4)
    lr = best_constant_step(least_squares_hessian(X))
    _, gaps = gradient_descent(X, y, lr, tol=1e-10)
    ks = np.arange(len(gaps))
    np.testing.assert_allclose(gd_relative_gap(X, y, lr, ks), gaps, rtol=1e-6, atol=1e-14)
    assert gd_relative_gap(X, y, lr, 0) == pytest.approx(1.0)


@pytest.mark.parametrize("with_noise", [False, True])
def test_bn_mlp_backward_matches_torch_autograd(with_noise):
    """BN before each sigmoid (training-mode batch statistics), optionally with noisy-BN scale and shift."""
    import torch
    rng = np.random.default_rng(5)
    net = SigmoidMLP([7, 5, 4, 3], init_std=0.8, rng=rng, dtype=np.float64, bn=True)
    for g, b in zip(net.gamma, net.beta):
        g[:] = rng.uniform(0.5, 2.0, size=g.shape)
        b[:] = rng.normal(size=b.shape)
    x = rng.normal(size=(6, 7))
    labels = np.array([0, 2, 1, 1, 0, 2])
    noise = BNNoise([5, 4], amplitude=0.8, rng=np.random.default_rng(1), dtype=np.float64).sample(6) if with_noise else None
    logits, cache = net.forward(x, noise=noise)
    loss, dlogits = net.loss_and_dlogits(logits, labels)
    dW, db, dx = net.backward(cache, dlogits)

    Wt = [torch.tensor(W, requires_grad=True) for W in net.W]
    gt = [torch.tensor(g, requires_grad=True) for g in net.gamma]
    bt = [torch.tensor(b, requires_grad=True) for b in net.beta]
    u = torch.tensor(x)
    pre = []
    for k, W in enumerate(Wt):
        if k < 2:
            z = torch.nn.functional.batch_norm(u @ W.T, None, None, gt[k], bt[k], training=True, eps=1e-5)
            if noise is not None:
                z = z * torch.tensor(noise[k][0]) + torch.tensor(noise[k][1])
            z.retain_grad()
            pre.append(z)
            u = torch.sigmoid(z)
        else:
            u = u @ W.T + torch.tensor(net.b[k])
    loss_t = torch.nn.functional.cross_entropy(u, torch.tensor(labels))
    loss_t.backward()
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    for k in range(3):
        np.testing.assert_allclose(dW[k], Wt[k].grad.numpy(), rtol=1e-9, atol=1e-12)
    for k in range(2):
        np.testing.assert_allclose(db[k][0], gt[k].grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(db[k][1], bt[k].grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(dx[k], pre[k].grad.numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(cache["x"][k], pre[k].detach().numpy(), rtol=1e-10, atol=1e-12)


def test_bn_noise_changes_every_step():
    noise = BNNoise([3, 2], amplitude=1.0, rng=np.random.default_rng(0))
    p0 = noise.params
    s = noise.sample(20000)
    assert [a.shape for pair in s for a in pair] == [(20000, 3), (20000, 3), (20000, 2), (20000, 2)]
    for (scale, shift), (mean_scale, mean_shift, spread) in zip(s, p0):
        assert 1.0 <= mean_scale <= 2.0 and -1.0 <= mean_shift <= 1.0 and 0.0 <= spread <= 1.0
        assert scale.mean() == pytest.approx(mean_scale, abs=0.03) and scale.std() == pytest.approx(spread, abs=0.03)
        assert shift.mean() == pytest.approx(mean_shift, abs=0.03)
    noise.new_step()
    assert noise.params != p0


def test_bn_training_keeps_sigmoid_inputs_normalised():
    """With BN (no noise, gamma=1, beta=0 at the start) each unit's sigmoid input has batch mean 0, variance ~1."""
    net = SigmoidMLP([10, 8, 8, 3], init_std=0.5, rng=np.random.default_rng(1), bn=True)
    x = np.random.default_rng(2).normal(size=(50, 10)).astype(np.float32)
    _, cache = net.forward(x)
    for z in cache["x"][:2]:
        np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(z.var(axis=0), 1.0, atol=1e-3)
    assert net.b[0].tolist() == [0.0] * 8
