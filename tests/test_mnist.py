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
    res = json.loads(out.read_text())
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
