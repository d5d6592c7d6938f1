"""bnlib.why: the batched deep MLP equals separate seeds, its normalisations do what they claim, batch norm makes the
hidden weights scale invariant, and the committed results files are reproduced by a small slice of their runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnlib import diagnostics as dg
from bnlib import why
from bnlib.results import load_results


def _x(S=None, N=16, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (N, d) if S is None else (S, N, d)
    return torch.randn(*shape, generator=g), torch.randint(0, 10, (N,), generator=g)


@pytest.mark.parametrize("kw", [dict(norm="none"), dict(norm="bn"), dict(norm="l1"), dict(norm="linf"),
                                dict(norm="bn", residual=True), dict(norm="none", residual=True)])
def test_batched_seeds_equal_separate_models(kw):
    x, y = _x(S=3)
    big = why.DeepMLP((0, 1, 2), 4, 8, in_dim=20, **kw)
    with torch.no_grad():  # non-trivial gammas, so a mix-up between seeds would show
        for p in big.gammas:
            p.uniform_(0.5, 1.5)
    out = big(x)
    losses = why.seed_losses(out, y)
    losses.sum().backward()
    for s in (0, 2):
        one = why.DeepMLP((s,), 4, 8, in_dim=20, **kw)
        with torch.no_grad():
            for a, b in zip(one.parameters(), big.parameters()):
                a.copy_(b[s:s + 1])
        torch.testing.assert_close(one(x[s:s + 1])[0], out[s], rtol=1e-5, atol=1e-5)
        why.seed_losses(one(x[s:s + 1]), y).sum().backward()
        for a, b in zip(one.parameters(), big.parameters()):
            torch.testing.assert_close(a.grad[0], b.grad[s], rtol=1e-4, atol=1e-6)


def test_weights_are_drawn_per_seed_with_the_stated_scale():
    m = why.DeepMLP((0, 1), 3, 400, in_dim=300, init_scale=2.0)
    one = why.DeepMLP((1,), 3, 400, in_dim=300, init_scale=2.0)
    assert torch.equal(m.weights[1][1], one.weights[1][0])
    # He: std = init_scale * sqrt(2 / fan_in)
    assert m.weights[1].std().item() == pytest.approx(2.0 * math.sqrt(2 / 400), rel=0.01)
    assert m.weights[0].std().item() == pytest.approx(2.0 * math.sqrt(2 / 300), rel=0.01)
    res = why.DeepMLP((0,), 4, 400, in_dim=300, residual=True)
    assert res.weights[2].std().item() == pytest.approx(math.sqrt(2 / 400) / 2, rel=0.01)  # 1/sqrt(depth)


@pytest.mark.parametrize("norm", ["bn", "l1", "l2", "linf"])
def test_normalisations_in_training_mode(norm):
    x, _ = _x(S=2, N=32)
    m = why.DeepMLP((0, 1), 3, 6, in_dim=20, norm=norm)
    rec = []
    m(x, record=rec)
    for z in rec:  # gamma = 1, beta = 0: the normalised pre-activations themselves
        z = z.detach().double()
        c = z - z.mean(1, keepdim=True)
        scale = {"bn": c.square().mean(1).sqrt(), "l2": c.square().mean(1).sqrt(), "l1": c.abs().mean(1),
                 "linf": c.abs().amax(1)}[norm]
        tol = 1e-3 if norm == "bn" else 1e-5  # bn: eps = 1e-5 inside the root
        np.testing.assert_allclose(scale.numpy(), 1.0, rtol=tol)
        np.testing.assert_allclose(z.mean(1).numpy(), 0.0, atol=1e-5)


def test_residual_bn_blocks_start_as_identities():
    x, y = _x(S=2)
    m = why.DeepMLP((0, 1), 6, 8, in_dim=20, norm="bn", residual=True)
    rec = []
    why.seed_losses(m(x, record=rec), y).sum().backward()
    assert all(torch.equal(z, torch.zeros_like(z)) for z in rec[1:])  # gamma = 0, beta = 0
    assert m.gammas[3].grad.abs().max() > 0  # ... and they can learn


def test_residual_without_he_scaling_would_grow_the_signal_per_block():
    """The reason for the 1/sqrt(depth) rule: with He's scale, h -> relu(h + h W) multiplies the second moment of a
    non-negative signal by about 2.5 per block (x^2 + 2 x^2, then the ReLU keeps most of it)."""
    x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64).abs()
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * math.sqrt(2 / 256)
    h = torch.relu(x + x @ w)
    ratio = h.square().mean() / x.square().mean()
    assert 2.0 < ratio.item() < 3.0


def test_noise_only_in_training_mode_and_redrawn_each_step():
    x, _ = _x(S=2)
    noise = why.NoisyBN(2, 2, 1.0, seed=0)
    m = why.DeepMLP((0, 1), 2, 8, in_dim=20, norm="bn", noise=noise)
    clean = why.DeepMLP((0, 1), 2, 8, in_dim=20, norm="bn")
    clean.load_state_dict(m.state_dict())
    m.eval(), clean.eval()
    torch.testing.assert_close(m(x), clean(x))
    m.train(), clean.train()
    assert not torch.allclose(m(x), clean(x))
    first = noise.mean_scale.clone()
    noise.new_step()
    assert not torch.equal(first, noise.mean_scale)
    assert ((first >= 1) & (first <= 2)).all()
    # per-activation samples follow the step's distribution
    scale, shift = noise.sample(0, 20000, 4)
    np.testing.assert_allclose(scale.mean((1, 2)).numpy(), noise.mean_scale[0].flatten().numpy(), atol=0.02)
    np.testing.assert_allclose(shift.std((1, 2)).numpy(), noise.spread[0].flatten().numpy(), rtol=0.02, atol=1e-3)


def test_bn_makes_hidden_weights_scale_invariant_and_sgd_grows_their_norm():
    """w . grad_w L = 0 for a weight matrix followed by BN (per unit: its column), hence under plain SGD
    ||w + dw||^2 = ||w||^2 + lr^2 ||g||^2 exactly: the norm can only grow."""
    x, y = _x(S=2, N=32)
    # eps breaks the invariance by a relative eps / var(z): tiny once the weights are large
    m = why.DeepMLP((0, 1), 3, 8, in_dim=20, norm="bn", init_scale=100.0).double()
    why.seed_losses(m(x.double()), y).sum().backward()
    for w in m.hidden_weights():
        col_cos = (w.detach() * w.grad).sum(1) / (w.detach().norm(dim=1) * w.grad.norm(dim=1))  # per unit
        assert col_cos.abs().max() < 1e-8
        lr = 0.7
        new = w.detach() - lr * w.grad
        lhs = dg.seed_norm([new]) ** 2
        rhs = dg.seed_norm([w]) ** 2 + lr ** 2 * dg.seed_norm([w.grad]) ** 2
        np.testing.assert_allclose(lhs.numpy(), rhs.numpy(), rtol=1e-9)
    plain = why.DeepMLP((0, 1), 3, 8, in_dim=20).double()
    why.seed_losses(plain(x.double()), y).sum().backward()
    w = plain.hidden_weights()[1]
    col_cos = (w.detach() * w.grad).sum(1) / (w.detach().norm(dim=1) * w.grad.norm(dim=1))
    assert col_cos.abs().max() > 0.01  # without BN there is no such identity


def test_train_is_deterministic_and_reports_divergence():
    data = why.mnist_subset(500, 100)
    runs = []
    for _ in range(2):
        m = why.DeepMLP((0, 1), 2, 16)
        runs.append(why.train(m, data, 20, 32, 0.1))
    assert torch.equal(runs[0]["losses"], runs[1]["losses"])
    assert runs[0]["diverged"] == [False, False]
    m = why.DeepMLP((0, 1), 4, 16, init_scale=16.0)
    r = why.train(m, data, 30, 32, 50.0)
    assert r["diverged"] == [True, True]


def test_mnist_subset_is_standardised_on_the_training_subset():
    xtr, ytr, xte, yte = why.mnist_subset(2000, 300, seed=1)
    assert xtr.shape == (2000, 784) and xte.shape == (300, 784) and ytr.shape == (2000,)
    assert abs(xtr.mean().item()) < 1e-4 and abs(xtr.std().item() - 1) < 1e-4
    xb = why.mnist_subset(10, 10, binary=True)[0]
    assert set(xb.unique().tolist()) <= {0.0, 1.0}


# ----------------------------------------------------------------------------- the committed results files
def _close(rerun: list, committed: list, what: str):
    """The re-run's mean over seeds agrees with the file's within 3 standard deviations over seeds (and a floor of
    1e-3 when the seeds agree closely)."""
    m_new, m_old = float(np.mean(rerun)), float(np.mean(committed))
    spread = max(3 * float(np.std(committed)), 1e-3)
    assert abs(m_new - m_old) <= spread, f"{what}: re-run {m_new:.4f} vs committed {m_old:.4f} (+- {spread:.4f})"


def test_depth_results_reproduce():
    doc = load_results("why_depth.json")
    assert doc["provenance"]["command"].startswith("python -m bnlib why --part depth")
    cfg = doc["results"]["config"]
    run = doc["results"]["runs"]["res/8"]
    data = why.mnist_subset(cfg["n_train"], cfg["n_test"])
    m = why.DeepMLP(tuple(cfg["seeds"]), 8, cfg["width"], residual=True)
    why.train(m, data, cfg["steps"], cfg["batch_size"], run["lr"], cfg["momentum"])
    _close(why.evaluate(m, data[2], data[3])["accuracy"], run["test_accuracy"], "residual depth 8 accuracy")


def test_lr_results_reproduce():
    doc = load_results("why_lr.json")
    cfg = doc["results"]["config"]
    run = doc["results"]["grid"]["bn/1.0/1.0"]
    data = why.mnist_subset(cfg["n_train"], cfg["n_test"])
    m = why.DeepMLP(tuple(cfg["seeds"]), cfg["depth"], cfg["width"], norm="bn", init_scale=1.0)
    r = why.train(m, data, cfg["steps"], cfg["batch_size"], 1.0)
    _close(why._tail(r["losses"]), run["train_loss"], "bn lr=1 final training loss")
    _close(dg.seed_norm(m.hidden_weights()).tolist(), run["weight_norm_final"], "bn lr=1 weight norm")


def test_reg_results_reproduce():
    doc = load_results("why_reg.json")
    cfg = doc["results"]["config"]
    run = doc["results"]["runs"]["bn/0.0"]
    data = why.mnist_subset(cfg["n_train"], cfg["n_test"])
    m = why.DeepMLP(tuple(cfg["seeds"]), cfg["depth"], cfg["width"], norm="bn")
    why.train(m, data, cfg["steps"], cfg["batch_size"], cfg["lr"], cfg["momentum"])
    _close(why.evaluate(m, data[2], data[3])["accuracy"], run["test_accuracy"], "bn test accuracy")


def test_smooth_results_reproduce():
    """The first two measurements (steps 0 and 250) of the BN and standard Figure 1 networks."""
    doc = load_results("why_smooth.json")
    cfg = dict(doc["results"]["config"])
    cfg.update(steps=cfg["measure_every"] + 1, variants=["standard", "bn"], dln_steps=0)
    cfg = why.SmoothConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    data = why.mnist_subset(cfg.n_train, cfg.n_test, binary=True)
    for name in ("standard", "bn"):
        m = why.DeepMLP(cfg.seeds, 3, 100, act="sigmoid", init_std=cfg.init_std, **why._variant(name))
        rec = why._smooth_run(m, data, cfg, cfg.lr, cfg.steps, False, name)
        old = doc["results"]["mlp"][name]
        assert rec["step"] == old["step"][:2]
        _close(rec["beta"][1], old["beta"][1], f"{name}: effective beta at step 250")
        _close(rec["loss_range"][1], old["loss_range"][1], f"{name}: loss range at step 250")


def test_wd_results_reproduce():
    """The first 200 steps of the weight-decay run from He's scale: the effective rate at step 200."""
    doc = load_results("why_wd.json")
    cfg = doc["results"]["config"]
    wd = max(cfg["wds"])
    old = doc["results"]["runs"][f"{wd}/1.0"]
    k = old["step"].index(200)
    short = why.WDConfig(**{**{key: tuple(v) if isinstance(v, list) else v for key, v in cfg.items()},
                            "steps": 200, "wds": (wd,), "init_scales": (1.0,)})
    new = why.wd_experiment(short)["runs"][f"{wd}/1.0"]
    assert new["step"][-1] == 200
    _close(new["eff_lr"][-1], old["eff_lr"][k], "effective lr at step 200")


# ------------------------------------------------------------------------------------------------- the CNN
def _cnn_slice(name: str, p: torch.Tensor, s: int, C: int) -> torch.Tensor:
    """Seed ``s``'s part of a batched DeepCNN parameter."""
    if name.startswith(("gammas", "betas")):
        return p[:, s * C:(s + 1) * C]
    if name == "out_bias" or (name.startswith("weights.") and p.dim() == 3):  # the output layer: (S, C, 10)
        return p[s:s + 1]
    return p[s * C:(s + 1) * C]


@pytest.mark.parametrize("kw", [dict(norm="none"), dict(norm="bn"), dict(norm="bn", residual=True),
                                dict(norm="none", residual=True)])
def test_batched_cnn_seeds_equal_separate_models(kw):
    C = 4
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 8, 1, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g)
    big = why.DeepCNN((0, 1, 2), 3, C, **kw)
    with torch.no_grad():  # non-trivial gammas, so a mix-up between seeds would show
        for p in big.gammas:
            p.uniform_(0.5, 1.5)
    out = big(x)
    why.seed_losses(out, y).sum().backward()
    for s in (0, 2):
        one = why.DeepCNN((s,), 3, C, **kw)
        named = dict(big.named_parameters())
        with torch.no_grad():
            for n, a in one.named_parameters():
                a.copy_(_cnn_slice(n, named[n], s, C))
        torch.testing.assert_close(one(x[s:s + 1])[0], out[s], rtol=1e-5, atol=1e-5)
        why.seed_losses(one(x[s:s + 1]), y).sum().backward()
        for n, a in one.named_parameters():
            torch.testing.assert_close(a.grad, _cnn_slice(n, named[n].grad, s, C), rtol=1e-4, atol=1e-6)


def test_cnn_init_and_diagnostics():
    m = why.DeepCNN((0, 1), 4, 16)
    one = why.DeepCNN((1,), 4, 16)
    assert torch.equal(m.weights[1][16:], one.weights[1])
    assert m.weights[1].std().item() == pytest.approx(math.sqrt(2 / (9 * 16)), rel=0.03)  # He, fan_in 9·C
    x, y = why.mnist_images(64, 10)[:2]
    assert x.shape == (64, 1, 14, 14)
    d = why.init_diagnostics(why.DeepCNN((0, 1), 6, 8, norm="bn", residual=True), x, y)
    assert d["std"].shape == d["grad_rms"].shape == (6, 2)
    # zero-initialised gamma: every residual block's z is exactly 0 and the gradient passes unchanged
    assert torch.all(d["std"][1:] == 0)
    torch.testing.assert_close(d["grad_rms"][1] / d["grad_rms"][-1], torch.ones(2, dtype=torch.float64))
    bn = why.init_diagnostics(why.DeepCNN((0, 1), 6, 8, norm="bn"), x, y)
    torch.testing.assert_close(bn["std"], torch.ones_like(bn["std"]), rtol=1e-3, atol=1e-3)  # BN: unit variance


def test_depth_cnn_results_reproduce():
    """The plain BN CNN of depth 4, the whole budget, against the committed run."""
    doc = load_results("why_depth_cnn.json")
    assert doc["provenance"]["command"].startswith("python -m bnlib why --part depth-cnn")
    cfg = doc["results"]["config"]
    run = doc["results"]["runs"]["plain+bn/4"]
    data = why.mnist_images(cfg["n_train"], cfg["n_test"], pool=cfg["pool"])
    m = why.DeepCNN(tuple(cfg["seeds"]), 4, cfg["channels"], norm="bn")
    why.train(m, data, cfg["steps"], cfg["batch_size"], run["lr"], cfg["momentum"])
    _close(why.evaluate(m, data[2], data[3])["accuracy"], run["test_accuracy"], "plain BN CNN depth 4 accuracy")
