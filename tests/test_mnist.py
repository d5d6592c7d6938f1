"""bnlib.mnist: minibatch indices, the Figure 1 run (schema, determinism, CLI), the CNN training loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from bnlib import mnist
from bnlib.models import SeedCNN

ROOT = Path(__file__).resolve().parents[1]


def test_batch_indices_epochs_and_seeds():
    it = list(mnist.batch_indices(10, 3, [0, 1], steps=7))
    assert len(it) == 7 and all(b.shape == (2, 3) for b in it)
    epoch = torch.cat([b[0] for b in it[:3]])  # 3 full batches per epoch, the 10th sample dropped
    assert len(set(epoch.tolist())) == 9
    assert not torch.equal(it[0][0], it[0][1])  # seeds have their own orders
    again = list(mnist.batch_indices(10, 3, [0, 1], steps=7))
    assert all(torch.equal(a, b) for a, b in zip(it, again))
    single = list(mnist.batch_indices(10, 3, 0, steps=2))
    assert torch.equal(single[0], it[0][0])  # seed 0's order does not depend on the other seeds


def test_figure1_schema_and_determinism():
    cfg = mnist.Figure1Config(steps=40, eval_every=20)
    images, labels = mnist.load_mnist(False)
    x, y = mnist.binarize(images[:2000]), labels[:2000]
    data = (x, y, x[:500], y[:500])
    runs = [mnist.run_figure1(True, (0, 1), cfg, data, progress=False) for _ in range(2)]
    res = runs[0]
    assert res["steps"] == [0, 20, 40]
    assert len(res["test_accuracy"]) == 2 and all(len(a) == 3 for a in res["test_accuracy"])
    assert all(len(p) == 3 and all(len(q) == 3 and q[0] <= q[1] <= q[2] for q in p) for p in res["percentiles"])
    assert runs[0]["test_accuracy"] == runs[1]["test_accuracy"]
    assert runs[0]["percentiles"] == runs[1]["percentiles"]


def test_cli_figure1(tmp_path):
    out = tmp_path / "fig1.json"
    proc = subprocess.run([sys.executable, "-m", "bnlib", "figure1", "--steps", "30", "--eval-every", "15",
                           "--seeds", "0", "1", "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    doc = json.loads(out.read_text())
    assert doc["provenance"]["command"].startswith("python -m bnlib figure1 --steps 30")
    assert set(doc["provenance"]) >= {"commit", "cpu", "date", "torch", "seconds", "threads"}
    res = doc["results"]
    for key in ("bn", "baseline"):
        assert res[key]["steps"] == [0, 15, 30]
        assert len(res[key]["test_accuracy"]) == 2 and len(res[key]["test_accuracy"][0]) == 3
        assert len(res[key]["percentiles"][1][2]) == 3


def test_evaluate_train_mode_has_no_side_effect():
    torch.manual_seed(0)
    net = SeedCNN(bn=True)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    mnist.evaluate(net, x, y, batch_size=16, train_mode=True)
    assert not net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_train_cnn_learns_and_is_deterministic():
    images, labels = mnist.load_mnist(False)
    x, y = mnist.standardize(images[:1024]), labels[:1024]
    hists = []
    for _ in range(2):
        torch.manual_seed(0)
        net = SeedCNN(bn=True)
        hists.append(mnist.train_cnn(net, x, y, x[:256], y[:256], steps=12, batch_size=32, lr=0.05,
                                     eval_every=6, progress=False))
    assert hists[0]["step"] == [6, 12]
    assert hists[0]["test_accuracy"] == hists[1]["test_accuracy"]
    assert hists[0]["test_accuracy"][-1] > 0.3


def test_evaluate_train_mode_switches_only_batch_norm():
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    plain = SeedCNN(bn=False)  # dropout only: BN-only training mode must change nothing
    assert mnist.evaluate(plain, x, y, 16, train_mode=True) == mnist.evaluate(plain, x, y, 16)
    net = SeedCNN(bn=True)
    with torch.no_grad():  # running statistics that differ from any batch's
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.fill_(0.5)
                m.running_var.fill_(4.0)
    assert mnist.evaluate(net, x, y, 16, train_mode=True) != mnist.evaluate(net, x, y, 16)
    net.train()
    net.features[1].eval()  # a frozen BN inside a training model keeps its own mode
    mnist.evaluate(net, x, y, 16, train_mode=True)
    assert net.training and not net.features[1].training and net.classifier[2].training


def test_run_figure1_per_network_rates_and_scales_equal_separate_runs():
    cfg = mnist.Figure1Config(steps=30, eval_every=15)
    images, labels = mnist.load_mnist(False)
    x, y = mnist.binarize(images[:2000]), labels[:2000]
    data = (x, y, x[:500], y[:500])
    for bn in (False, True):
        together = mnist.run_figure1(bn, (0, 1), cfg, data, progress=False, init_stds=[0.01, 0.1], lrs=[0.1, 1.0])
        for s, (seed, std, lr) in enumerate([(0, 0.01, 0.1), (1, 0.1, 1.0)]):
            alone_cfg = mnist.Figure1Config(steps=30, eval_every=15, init_std=std, lr=lr)
            alone = mnist.run_figure1(bn, (seed,), alone_cfg, data, progress=False)
            w_together = together["model"].weights[0].detach()[s]
            w_alone = alone["model"].weights[0].detach()[0]
            # float32 rounding only: the batched products sum in another order
            assert torch.allclose(w_together, w_alone, rtol=0, atol=1e-5)
            assert max(abs(a - b) for a, b in zip(together["test_accuracy"][s], alone["test_accuracy"][0])) <= 0.004


def test_rms_to_paper_is_the_distance_to_the_digitised_points():
    def run(offset):
        out = {}
        for key, curve in mnist.PAPER_FIGURE1.items():
            steps = sorted(curve)
            out[key] = {"steps": steps, "test_accuracy": [[curve[t] + offset for t in steps]] * 2}
        return out

    assert mnist.rms_to_paper(run(0.0)) == 0.0
    assert abs(mnist.rms_to_paper(run(0.01)) - 0.01) < 1e-12
    partial = run(0.0)
    partial["bn"]["test_accuracy"] = [[a + 0.03 for a in partial["bn"]["test_accuracy"][0]]] * 2
    n_base, n_bn = len(mnist.PAPER_FIGURE1["baseline"]), len(mnist.PAPER_FIGURE1["bn"])
    assert abs(mnist.rms_to_paper(partial) - 0.03 * (n_bn / (n_base + n_bn)) ** 0.5) < 1e-12


def test_figure1_grid_schema():
    cfg = mnist.Figure1Config(steps=10, eval_every=5)
    res = mnist.figure1_grid((0.01, 0.1), (0.5,), (0, 1), cfg, progress=False)
    assert [(c["init_std"], c["lr"]) for c in res["cells"]] == [(0.01, 0.5), (0.1, 0.5)]
    assert res["steps"] == [0, 5, 10] and res["best"] is None
    for c in res["cells"]:
        assert c["rms_to_paper"] is None
        for key in ("baseline", "bn"):
            assert len(c[key]["test_accuracy"]) == 2 and len(c[key]["test_accuracy"][0]) == 3
            assert len(c[key]["final"]) == 2


def test_cnn_experiments_every_seed_and_part():
    cfg = mnist.CNNConfig(train_size=128, test_size=64, epochs=1, batch_size=32, sweep_lrs=(0.1,), sweep_steps=2,
                          eval_batch_sizes=(64, 8), seeds=(0, 1))
    res = mnist.cnn_experiments(cfg, progress=False)
    for key in ("baseline", "bn", "bn_post"):
        assert len(res[key]) == 2 and all(len(h["test_accuracy"]) == 1 for h in res[key])
    assert res["baseline"][0]["test_accuracy"] != res["baseline"][1]["test_accuracy"] or \
        res["baseline"][0]["train_loss"] != res["baseline"][1]["train_loss"]  # the seeds differ
    for key in ("baseline", "bn"):
        (runs,) = res["sweep"][key]
        assert len(runs) == 2 and all(len(r["weight_norms"]) == 4 == len(r["weight_norms_init"]) for r in runs)
    for r in res["eval"]["baseline"]:
        assert r["train_mode"] == [r["eval"]] * 2  # no BN layer: nothing to switch


def test_lenet_experiment_same_start_for_both_networks():
    cfg = mnist.LeNetConfig(epochs=1, train_size=256, seeds=(3,))
    res = mnist.lenet_experiment(cfg, progress=False)
    assert [len(res[k]) for k in ("baseline", "bn")] == [1, 1]
    assert res["baseline"][0]["step"] == [256 // 64]
