"""Benchmark: BatchNorm forward+backward in training mode, float32, CPU, at two sizes.

Defined in: chapters/06_bn_pytorch.ipynb (also shown in chapters/appendix_performance.ipynb)

Sizes, side by side in one run:
  (256, 64, 28, 28)  a convolutional layer's feature maps, 51 MB (``SHAPE``; the same in quick mode)
  (60, 300)          the size the book trains with: the Figure 1 MLP, three seeds batched (``SMALL_SHAPE``)
Rows, for each size:
  native F.batch_norm        torch's kernel
  bnlib.torch_bn             ``bnlib.torch_bn.batch_norm`` in eager mode: training mode runs its speed path,
                             ``bnlib.torch_bn_fast`` (the same math in fewer, partly in-place torch ops)
  bnlib readable Function    the same call with the speed path switched off (``torch_bn_fast.disabled()``):
                             ``BatchNormFunction``, every line one torch op, as the chapters print it
  bnlib.torch_bn compiled    the same function under ``torch.compile(fullgraph=True)`` (inductor fuses
                             the ops into a few loops); compile time is reported, not timed
  empty autograd.Function    a Function that only copies x forward and passes dy back: the cost of the call
                             alone, which a Function with ``setup_context`` pays (``function_floor``)
  empty ..., forward(ctx)    the same written with ``forward(ctx, ...)`` and no ``setup_context``, as the speed
                             path is (``function_floor_ctx``)
  speed path, bare ops       ``FastBatchNormFunction.forward`` then ``.backward`` called as plain functions under
                             ``torch.no_grad()`` (``speed_path_bare``): the speed path's operations without the
                             Function around them (no graph, nothing saved by autograd)
  numpy bnlib.numpy_bn       ``batch_norm_forward`` then ``batch_norm_backward``
fwd+bwd rows time the forward and ``torch.autograd.grad`` of (x, weight, bias); for the small size the
forward alone is timed too.  Candidates are timed interleaved (round-robin, one sample each per round)
so that load from other processes hits them alike; a small batch is timed as a loop of calls (about
5 ms) and reported per call.  The table reports medians of wall-clock time with torch's current thread
count, and of the calling thread's CPU time (``time.thread_time``) under ``torch.set_num_threads(1)``,
far less sensitive to other processes.  ratio = median / native median of the same size and pass.
"saved for backward" is what autograd keeps, measured with ``torch.autograd.graph.saved_tensors_hooks``
(each distinct storage counted once); for NumPy the bytes of the arrays in the returned cache.

Usage: ``python bench/bench_torch_bn.py [--quick]``; ``main(quick=False)`` returns the rows as a list of
dicts with keys name, shape, median_ms, gb_per_s, ratio (wall), cpu_ms_1thread, cpu_ratio_1thread,
cpu_ms_rounds (the CPU-time sample of every round, so that rows of one size and pass can be compared round by
round), saved_bytes, threads, repeats (and compile_s for compiled rows).  The first rows are the big size's
fwd+bwd rows, in the order above; names of the small size's rows end in " (60, 300)".
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = (256, 64, 28, 28)
SMALL_SHAPE = (60, 300)


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


def aten_ops(bn, shape=SMALL_SHAPE) -> tuple[int, int]:
    """(operations in the forward pass, operations in forward + backward) that ``bn`` dispatches to ATen kernels.

    ``bn`` has the signature of ``F.batch_norm``; training mode, float32, weight and bias requiring grad. Counted
    with a ``TorchDispatchMode`` that sees every kernel call, including those autograd makes for the backward pass
    (and the ``detach`` calls that accumulate the leaf gradients).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, generator=gen).requires_grad_()
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    dy = torch.randn(shape, generator=gen)
    with Count():
        y = bn(x, torch.zeros(C), torch.ones(C), w, b, True, 0.1, 1e-5)
        forward = Count.n
        y.backward(dy)
    return forward, Count.n


def input_sized_allocations(bn, shape=SMALL_SHAPE) -> tuple[int, int]:
    """(forward, forward + backward): how many operations of ``bn`` return a new tensor of the input's size.

    In-place operations and views are not counted: they write into memory that exists already.  Training mode,
    float32, running buffers given, weight and bias requiring grad; ``bn`` has the signature of ``F.batch_norm``.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    gen = torch.Generator().manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, generator=gen).requires_grad_()
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    dy = torch.randn(shape, generator=gen)

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            fresh = all(r.alias_info is None for r in func._schema.returns)  # not in place, not a view
            Count.n += fresh and sum(isinstance(t, torch.Tensor) and t.numel() == x.numel() for t in tree_leaves(out))
            return out

    with Count():
        y = bn(x, torch.zeros(C), torch.ones(C), w, b, True, 0.1, 1e-5)
        forward = Count.n
        torch.autograd.grad(y, (x, w, b), dy)
    return forward, Count.n


def _numpy_saved_bytes(cache) -> int:
    import numpy as np

    if isinstance(cache, dict):
        leaves = cache.values()
    elif isinstance(cache, (tuple, list)):
        leaves = cache
    else:
        leaves = vars(cache).values() if hasattr(cache, "__dict__") else [
            getattr(cache, s) for s in getattr(cache, "__slots__", ())]
    seen = {}
    for a in leaves:
        if isinstance(a, np.ndarray):
            base = a if a.base is None else a.base
            seen[id(base)] = getattr(base, "nbytes", a.nbytes)
    return sum(seen.values())


class _CopyFunction(torch.autograd.Function):
    """The floor of every ``autograd.Function`` with ``setup_context`` (as ``BatchNormFunction``): forward copies x,
    backward passes dy on.  What such a Function pays before it does any batch-norm arithmetic."""

    @staticmethod
    def forward(x, weight, bias):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, dy):
        return dy, None, None


class _CopyFunctionCtx(torch.autograd.Function):
    """:class:`_CopyFunction` written with ``forward(ctx, ...)`` and no ``setup_context`` (as
    ``FastBatchNormFunction``): ``Function.apply`` then skips binding the arguments with ``inspect``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        return dy, None, None


def function_floor(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5):
    """``F.batch_norm``'s signature around :class:`_CopyFunction` (no normalisation at all)."""
    return _CopyFunction.apply(input, weight, bias)


def function_floor_ctx(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                       eps=1e-5):
    """``F.batch_norm``'s signature around :class:`_CopyFunctionCtx` (no normalisation at all)."""
    return _CopyFunctionCtx.apply(input, weight, bias)


class _PlainCtx:
    """What :class:`bnlib.torch_bn_fast.FastBatchNormFunction` uses of autograd's ctx, as a plain object: x, weight
    and bias need gradients, tensors saved for backward are just kept."""

    needs_input_grad = (True, True, True, False, False, False, False)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def speed_path_bare(x, weight, bias, dy, eps=1e-5, backward=True):
    """The speed path's operations without ``autograd.Function``: its ``forward`` then ``backward`` called directly.

    x: (N, C, *S); weight, bias: (C,); dy: x's shape.  Returns (y, dx, dgamma, dbeta), or (y,) when
    ``backward=False``.  No running buffers; no graph is recorded.
    """
    from bnlib.torch_bn_fast import FastBatchNormFunction

    ctx = _PlainCtx()
    with torch.no_grad():  # as inside a Function: forward and (without create_graph) backward run without grad
        y = FastBatchNormFunction.forward(ctx, x, weight, bias, None, None, 0.1, eps)
        if not backward:
            return (y,)
        dx, dgamma, dbeta = FastBatchNormFunction.backward(ctx, dy)[:3]
    return y, dx, dgamma, dbeta


FLOOR = "empty autograd.Function"
FLOOR_CTX = "empty autograd.Function, forward(ctx)"
READABLE = "bnlib readable Function"
BARE = "speed path, bare ops"


def readable_batch_norm(*args, **kwargs):
    """``bnlib.torch_bn.batch_norm`` without its speed path: the readable ``BatchNormFunction`` only."""
    from bnlib import torch_bn, torch_bn_fast

    with torch_bn_fast.disabled():
        return torch_bn.batch_norm(*args, **kwargs)


def _candidates(shape, compiled: bool):
    """{name: (fwd+bwd step, forward only, saved bytes, compile seconds or None)} for one float32 batch."""
    from bnlib import torch_bn

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_()
    C = shape[1]
    w = torch.rand(C, generator=gen).add_(0.5).requires_grad_()
    b = torch.randn(C, generator=gen).requires_grad_()
    dy = torch.randn(shape, generator=gen)

    def torch_pair(bn):
        def forward():
            return bn(x, None, None, w, b, True, 0.1, 1e-5)

        def step():
            torch.autograd.grad(forward(), (x, w, b), dy, allow_unused=True)

        return step, forward

    fns = {"native F.batch_norm": F.batch_norm, "bnlib.torch_bn": torch_bn.batch_norm,
           READABLE: readable_batch_norm}
    compile_s = {}
    if compiled:
        if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
            # torch's scalar code path (ATEN_CPU_CAPABILITY=default, the portability check of `make test`):
            # inductor's vectorised C++ needs vector headers that path lacks, so ask it for scalar loops.
            import torch._inductor.config as inductor_config

            inductor_config.cpp.vec_isa_ok = False
        fns["bnlib.torch_bn compiled"] = torch.compile(torch_bn.batch_norm, fullgraph=True, dynamic=False)
    fns[FLOOR] = function_floor
    fns[FLOOR_CTX] = function_floor_ctx
    cands = {}
    for name, bn in fns.items():
        step, forward = torch_pair(bn)
        t0 = time.perf_counter()
        step()  # warm-up; compiles forward and backward for the compiled row
        compile_s[name] = time.perf_counter() - t0
        cands[name] = (step, forward, saved_bytes_of(forward),
                       compile_s[name] if name.endswith("compiled") else None)

    # the speed path's operations alone: nothing is saved by autograd (saved bytes 0)
    cands[BARE] = (lambda: speed_path_bare(x, w, b, dy), lambda: speed_path_bare(x, w, b, dy, backward=False), 0,
                   None)
    cands[BARE][0]()
    try:  # NumPy row: the public functions of the NumPy chapters' module
        from bnlib.numpy_bn import batch_norm_backward, batch_norm_forward

        xn, gn, bn_, dyn = x.detach().numpy(), w.detach().numpy(), b.detach().numpy(), dy.numpy()

        def np_forward():
            return batch_norm_forward(xn, gn, bn_, 1e-5)

        def np_step():
            batch_norm_backward(dyn, np_forward()[1])

        np_step()
        cands["numpy bnlib.numpy_bn"] = (np_step, np_forward, _numpy_saved_bytes(np_forward()[1]), None)
    except Exception as e:  # noqa: BLE001 - module mid-rewrite or a different API: say so, skip the row
        print(f"(NumPy row skipped: {type(e).__name__}: {e})", file=sys.stderr)
    return x.numel() * x.element_size(), cands


def _interleaved(fns: dict, repeats: int, number: int, clock) -> dict[str, list[float]]:
    """Round-robin timing: every round times ``number`` calls of each candidate; per-call times."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            for _ in range(number):
                fn()
            times[name].append((clock() - t0) / number)
    return times


def _measure(shape, quick: bool, compiled: bool, passes: tuple[str, ...], suffix: str = "") -> list[dict]:
    nbytes, cands = _candidates(shape, compiled)
    big = nbytes > 1 << 20
    repeats = (5 if quick else 15) if big else 21  # small rounds are cheap: as many in quick mode
    # calls per sample: about 5 ms for a small batch (timer resolution, noise)
    t0 = time.perf_counter()
    cands["native F.batch_norm"][0]()
    number = 1 if big else max(1, int(5e-3 / max(time.perf_counter() - t0, 1e-6)))
    threads = torch.get_num_threads()
    rows = []
    for p in passes:
        fns = {name: c[0] if p == "fwd+bwd" else c[1] for name, c in cands.items()}
        wall = _interleaved(fns, repeats, number, time.perf_counter)
        torch.set_num_threads(1)
        try:  # CPU time of the calling thread, 1 thread: insensitive to other load
            cpu = _interleaved(fns, repeats, number, time.thread_time)
        finally:
            torch.set_num_threads(threads)
        native, native_cpu = statistics.median(wall["native F.batch_norm"]), statistics.median(
            cpu["native F.batch_norm"])
        for name, (_, _, saved, compile_s) in cands.items():
            med, med_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
            row = {
                "name": f"{name} {p}{suffix}",
                "shape": tuple(shape),
                "median_ms": med * 1e3,
                "gb_per_s": nbytes / med / 1e9,
                "ratio": med / native,
                "cpu_ms_1thread": med_cpu * 1e3,
                "cpu_ratio_1thread": med_cpu / native_cpu,
                "cpu_ms_rounds": [t * 1e3 for t in cpu[name]],  # one sample per round, same rounds for every row
                "saved_bytes": saved,
                "threads": threads,
                "repeats": repeats,
            }
            if compile_s is not None:
                row["compile_s"] = compile_s
            rows.append(row)
    return rows


def main(quick: bool = False, shape=SHAPE, small_shape=SMALL_SHAPE, compiled: bool = True) -> list[dict]:
    """Time forward+backward of each implementation at both sizes; returns the table rows."""
    rows = _measure(shape, quick, compiled, ("fwd+bwd",))
    rows += _measure(small_shape, quick, compiled, ("fwd+bwd", "fwd"), suffix=f" {tuple(small_shape)}")
    return rows


def to_markdown(rows: list[dict], shape=None) -> str:
    """The rows of :func:`main` as a Markdown table (``shape`` is accepted for compatibility)."""
    lines = [
        f"float32, training mode; wall: {rows[0]['threads']} threads, CPU: 1 thread; medians of "
        f"{rows[0]['repeats']} (big) interleaved samples; ratios to native of the same size and pass",
        "",
        "| implementation | shape | wall median ms | GB/s of input | wall ratio to native "
        "| CPU ms (1 thread) | CPU ratio to native | saved for backward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        saved = r["saved_bytes"]
        saved_txt = f"{saved / 1e6:.1f} MB" if saved >= 1e5 else f"{saved / 1e3:.1f} kB"
        ms = f"{r['median_ms']:.1f}" if r["median_ms"] >= 1 else f"{r['median_ms']:.3f}"
        cpu = f"{r['cpu_ms_1thread']:.1f}" if r["cpu_ms_1thread"] >= 1 else f"{r['cpu_ms_1thread']:.3f}"
        lines.append(
            f"| {r['name']} | {r['shape']} | {ms} | {r['gb_per_s']:.2f} | {r['ratio']:.2f} "
            f"| {cpu} | {r['cpu_ratio_1thread']:.2f} | {saved_txt} |"
        )
    compiled = [r for r in rows if "compile_s" in r]
    if compiled:
        lines += ["", "torch.compile, first call (compiles forward and backward): " + ", ".join(
            f"{r['shape']}: {r['compile_s']:.1f} s" for r in compiled if "fwd+bwd" in r["name"])]
    return "\n".join(lines)


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    print(to_markdown(main(quick=quick)))
