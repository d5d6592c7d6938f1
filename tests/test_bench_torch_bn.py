"""Smoke test of bench/bench_torch_bn.py on tiny shapes (the real benchmark is manual)."""

import statistics

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


def test_bare_row_runs_the_speed_path_operations(load_bench):
    """The "bare ops" row computes exactly what the speed path's Function returns, without autograd."""
    from bnlib import torch_bn_fast

    mod = load_bench("bench_torch_bn")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, 3, generator=gen).mul_(4).add_(10).requires_grad_()
    w = torch.rand(5, generator=gen).add_(0.5).requires_grad_()
    b = torch.randn(5, generator=gen).requires_grad_()
    dy = torch.randn(7, 5, 3, generator=gen)
    y = torch_bn_fast.FastBatchNormFunction.apply(x, w, b, None, None, 0.1, 1e-5)
    expected = (y, *torch.autograd.grad(y, (x, w, b), dy))
    bare = mod.speed_path_bare(x, w, b, dy)
    assert not any(t.requires_grad for t in bare)  # no graph recorded
    for got, want in zip(bare, expected, strict=True):
        assert torch.equal(got, want.detach()), (got - want).abs().max()
    assert torch.equal(mod.speed_path_bare(x, w, b, dy, backward=False)[0], y.detach())


def test_bare_row_is_in_the_table(load_bench):
    mod = load_bench("bench_torch_bn")
    rows = mod.main(quick=True, shape=(4, 3, 2, 2), small_shape=(6, 5), compiled=False)
    bare = {r["name"]: r for r in rows if r["name"].startswith(mod.BARE)}
    assert set(bare) == {f"{mod.BARE} fwd+bwd", f"{mod.BARE} fwd+bwd (6, 5)", f"{mod.BARE} fwd (6, 5)"}
    assert all(r["saved_bytes"] == 0 and r["median_ms"] > 0 for r in bare.values())
    # every row keeps one CPU-time sample per round, so rows can be compared round by round
    assert all(len(r["cpu_ms_rounds"]) == r["repeats"] and min(r["cpu_ms_rounds"]) > 0 for r in rows)
    for r in rows:  # the row's median is the median of its rounds
        assert abs(statistics.median(r["cpu_ms_rounds"]) - r["cpu_ms_1thread"]) <= 1e-9 * r["cpu_ms_1thread"], r
