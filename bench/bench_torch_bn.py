"""Benchmark: BatchNorm forward+backward on a (256, 64, 28, 28) float32 batch, CPU.

Defined in: chapters/06_bn_pytorch.ipynb

Rows: torch's native kernel (``F.batch_norm``), ``bnlib.torch_bn.batch_norm`` (with and
without huge pages, see below) and, when importable, the NumPy version
``bnlib.numpy_bn``.  Candidates are timed interleaved (round-robin, one call each per
round) so that load from other processes hits them alike; the table reports medians of
wall-clock time with torch's current thread count, and of the calling thread's CPU time
(``time.thread_time``) under ``torch.set_num_threads(1)``, which is far less sensitive to
other processes on a shared machine.  "saved for backward" is what autograd keeps,
measured with ``torch.autograd.graph.saved_tensors_hooks`` (each distinct storage counted
once); for NumPy it is the bytes of the arrays in the returned cache.

Page faults: the first touch of each fresh 51 MB output (y, dx) costs about as much as
all the arithmetic.  bnlib asks for transparent huge pages on its own big buffers
(``torch_bn.USE_HUGEPAGES``, as NumPy does for its arrays).  The row "4 KiB pages" turns
that off -- the like-for-like comparison with torch's kernel -- and is timed in a phase of
its own (with native and NumPy), because runs interleaved with huge-page runs get huge
pages back from the kernel; the huge-page row is timed in a second phase against native
again, and each ratio is to the native median of its own phase.  Set the environment
variable ``THP_MEM_ALLOC_ENABLE=1`` (before importing torch) to give torch's allocator
huge pages too.

Usage: ``python bench/bench_torch_bn.py [--quick]``; ``main(quick=False)`` returns the rows
as a list of dicts with keys name, median_ms, gb_per_s, ratio (wall), cpu_ms_1thread,
cpu_ratio_1thread, saved_bytes, threads, repeats.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPE = (256, 64, 28, 28)


def saved_bytes_of(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _torch_step(bn, x, w, b, dy):
    def step():
        y = bn(x, None, None, w, b, True, 0.1, 1e-5)
        torch.autograd.grad(y, (x, w, b), dy)

    def forward_only():
        return bn(x, None, None, w, b, True, 0.1, 1e-5)

    return step, forward_only


def main(quick: bool = False, shape=SHAPE) -> list[dict]:
    """Time forward+backward of each implementation; returns the table rows."""
    from bnlib import torch_bn

    repeats = 5 if quick else 15
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_()
    C = shape[1]
    w = torch.rand(C, generator=gen).add_(0.5).requires_grad_()
    b = torch.randn(C, generator=gen).requires_grad_()
    dy = torch.randn(shape, generator=gen)

    cands = {}
    saved = {}
    for name, fn in (
        ("native F.batch_norm", F.batch_norm),
        ("bnlib.torch_bn", torch_bn.batch_norm),
        ("bnlib.torch_bn, 4 KiB pages", torch_bn.batch_norm),  # USE_HUGEPAGES off
    ):
        step, fwd = _torch_step(fn, x, w, b, dy)
        cands[name] = step
        saved[name] = saved_bytes_of(fwd)

    try:  # optional NumPy row, only if the NumPy chapter's module is present
        import numpy as np
        from bnlib import numpy_bn

        xn = x.detach().numpy()
        gn = w.detach().numpy()
        bn_ = b.detach().numpy()
        dyn = dy.numpy()

        def np_step():
            y, cache = numpy_bn.batch_norm_forward(xn, gn, bn_, 1e-5)
            numpy_bn.batch_norm_backward(dyn, cache)

        np_step()
        _, cache = numpy_bn.batch_norm_forward(xn, gn, bn_, 1e-5)
        leaves = cache.values() if isinstance(cache, dict) else (
            cache if isinstance(cache, (tuple, list)) else [cache]
        )
        saved["numpy bnlib.numpy_bn"] = sum(
            a.nbytes for a in leaves if isinstance(a, np.ndarray)
        )
        del cache
        cands["numpy bnlib.numpy_bn"] = np_step
    except Exception:  # noqa: BLE001 - module absent or different API: skip the row
        pass

    # Two phases, each timed round-robin against its own native baseline: bnlib with
    # 4 KiB pages (and NumPy), then bnlib with huge pages.  Interleaving huge-page runs
    # with 4 KiB-page runs would flatter the latter (the kernel hands back huge pages).
    phases = [
        (False, [n for n in cands if n != "bnlib.torch_bn"]),
        (True, ["native F.batch_norm", "bnlib.torch_bn"]),
    ]
    threads = torch.get_num_threads()
    nbytes = x.numel() * x.element_size()
    old = torch_bn.USE_HUGEPAGES
    results = {}
    try:
        for hugepages, names in phases:
            torch_bn.USE_HUGEPAGES = hugepages
            sub = {n: cands[n] for n in names}
            for fn in sub.values():  # warm-up
                fn()
            wall = _interleaved(sub, repeats, time.perf_counter)
            torch.set_num_threads(1)
            try:  # CPU time of the calling thread, 1 thread: insensitive to other load
                cpu = _interleaved(sub, repeats, time.thread_time)
            finally:
                torch.set_num_threads(threads)
            native = statistics.median(wall["native F.batch_norm"])
            native_cpu = statistics.median(cpu["native F.batch_norm"])
            for name in names:
                if name in results:
                    continue
                med, med_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
                results[name] = {
                    "name": name + " fwd+bwd",
                    "median_ms": med * 1e3,
                    "gb_per_s": nbytes / med / 1e9,
                    "ratio": med / native,
                    "cpu_ms_1thread": med_cpu * 1e3,
                    "cpu_ratio_1thread": med_cpu / native_cpu,
                    "saved_bytes": saved[name],
                    "threads": threads,
                    "repeats": repeats,
                }
    finally:
        torch_bn.USE_HUGEPAGES = old
    return [results[n] for n in cands]


def _interleaved(cands, repeats, clock) -> dict[str, list[float]]:
    """Round-robin timing: every round calls each candidate once."""
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(repeats):
        for name, fn in cands.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def to_markdown(rows: list[dict], shape=SHAPE) -> str:
    """The rows of :func:`main` as a Markdown table."""
    nbytes = 4 * int(torch.Size(shape).numel())
    lines = [
        f"input {tuple(shape)} float32 = {nbytes / 1e6:.1f} MB; wall: {rows[0]['threads']} "
        f"threads, CPU: 1 thread; medians of {rows[0]['repeats']} interleaved runs; "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}",
        "",
        "| implementation | wall median ms | GB/s of input | wall ratio to native "
        "| CPU ms (1 thread) | CPU ratio to native | saved for backward |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['median_ms']:.1f} | {r['gb_per_s']:.2f} | {r['ratio']:.2f} "
            f"| {r['cpu_ms_1thread']:.1f} | {r['cpu_ratio_1thread']:.2f} "
            f"| {r['saved_bytes'] / 1e6:.1f} MB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    print(to_markdown(main(quick=quick)))
