"""Smoke test of bench/bench_torch_bn.py on tiny shapes (the real benchmark is manual)."""

import torch


def test_bench_runs_and_reports_saved_bytes(load_bench):
    mod = load_bench("bench_torch_bn")
    shape, small = (8, 4, 6, 6), (6, 5)
    threads = torch.get_num_threads()
    rows = mod.main(quick=True, shape=shape, small_shape=small, compiled=False)  # compile: test_torch_bn_compile.py
    assert torch.get_num_threads() == threads
    names = [r["name"] for r in rows]
    assert names[:3] == ["native F.batch_norm fwd+bwd", "bnlib.torch_bn fwd+bwd", f"{mod.READABLE} fwd+bwd"]
    assert "bnlib.torch_bn fwd+bwd (6, 5)" in names and "bnlib.torch_bn fwd (6, 5)" in names
    floor = next(r for r in rows if r["name"] == f"{mod.FLOOR} fwd+bwd (6, 5)")
    assert floor["saved_bytes"] == 0 and floor["median_ms"] > 0  # the copy saves nothing for backward
    for r in rows:
        if r["name"].startswith(("native", "bnlib")):
            C = r["shape"][1]
            nbytes = 4 * torch.Size(r["shape"]).numel()
            assert r["median_ms"] > 0 and r["ratio"] > 0
            # x itself (by reference) plus per-channel vectors, nothing else input-sized
            assert nbytes <= r["saved_bytes"] <= nbytes + 8 * 4 * C, r
    assert "| bnlib.torch_bn fwd+bwd |" in mod.to_markdown(rows, shape)
