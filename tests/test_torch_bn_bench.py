"""Smoke test of bench/bench_torch_bn.py on a tiny shape (the real benchmark is manual)."""

import importlib.util
from pathlib import Path

import torch


def test_bench_runs_and_reports_saved_bytes():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_torch_bn.py"
    spec = importlib.util.spec_from_file_location("bench_torch_bn", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shape = (8, 4, 6, 6)
    threads = torch.get_num_threads()
    rows = mod.main(quick=True, shape=shape)
    assert torch.get_num_threads() == threads
    names = [r["name"] for r in rows]
    assert names[:3] == ["native F.batch_norm fwd+bwd", "bnlib.torch_bn fwd+bwd",
                         "bnlib.torch_bn, 4 KiB pages fwd+bwd"]
    nbytes = 4 * 8 * 4 * 6 * 6
    for r in rows[:3]:
        assert r["median_ms"] > 0 and r["ratio"] > 0
        # x itself (by reference) plus per-channel vectors, nothing else input-sized
        assert nbytes <= r["saved_bytes"] <= nbytes + 64 * 4 * 8
    assert "| bnlib.torch_bn fwd+bwd |" in mod.to_markdown(rows, shape)
