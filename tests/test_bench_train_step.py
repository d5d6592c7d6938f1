"""bench/bench_train_step.py times the networks it names: each step runs the batch norm its row says."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from bnlib import torch_bn_fast


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_row_runs_its_own_batch_norm(monkeypatch):
    mod = _bench()
    calls = {"native": 0, "speed path": 0}
    native, fast = F.batch_norm, torch_bn_fast.FastBatchNormFunction.apply

    def counted_native(*args, **kwargs):
        calls["native"] += 1
        return native(*args, **kwargs)

    def counted_fast(*args):
        calls["speed path"] += 1
        return fast(*args)

    monkeypatch.setattr(F, "batch_norm", counted_native)
    monkeypatch.setattr(torch_bn_fast.FastBatchNormFunction, "apply", counted_fast)
    expected = {mod.NO_BN: (0, 0), mod.TORCH: (3, 0), mod.BNLIB: (0, 3), mod.READABLE: (0, 0)}
    for name, step in mod._steps().items():
        calls.update(native=0, **{"speed path": 0})
        step()
        assert (calls["native"], calls["speed path"]) == expected[name], name


def test_steps_train_and_table_reports_every_network():
    mod = _bench()
    threads = torch.get_num_threads()
    rows = mod.main(quick=True)
    assert torch.get_num_threads() == threads
    assert [r["name"] for r in rows] == [mod.NO_BN, mod.TORCH, mod.BNLIB, mod.READABLE]
    by_name = {r["name"]: r for r in rows}
    assert by_name[mod.TORCH]["ratio_to_torch"] == 1.0 and by_name[mod.NO_BN]["bn_share_ms"] == 0.0
    assert all(r["ms_per_step"] > 0 for r in rows)
    table = mod.to_markdown(rows)
    assert all(f"| {r['name']} |" in table for r in rows)
