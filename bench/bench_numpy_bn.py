"""Benchmark: bnlib.numpy_bn forward+backward against torch's native CPU batch norm.

Defined in chapter: chapters/03_bn_backward.ipynb (the table is shown in the book, and in
chapters/appendix_performance.ipynb)

Two float32 batches, side by side in one run:
  (256, 64, 28, 28)  a convolutional layer's feature maps, 51 MB (quick mode: (64, 64, 28, 28))
  (60, 300)          the size the book trains with: the Figure 1 MLP, three seeds batched
Rows, for each batch:
  np.copyto                  a plain memory copy of the array (bandwidth reference)
  torch fwd / fwd+bwd        torch.nn.functional.batch_norm(training=True), backward via
                             torch.autograd.grad (no gradient accumulation), on all CPUs
                             (or --threads) and fwd+bwd also on 1 thread
  bnlib fwd / fwd+bwd        batch_norm_forward, then batch_norm_backward
  naive NumPy fwd+bwd        the textbook NumPy code with full-size temporaries
The timed calls are interleaved round-robin, so machine noise hits all rows alike, and the
median of the repeats is reported; a small batch is timed as a loop of calls (about 10 ms)
and reported per call. GB/s = bytes of x / median time. ratio = median / median of torch
fwd+bwd on the same batch (on all threads, and on one thread like NumPy).

Usage: python bench/bench_numpy_bn.py [--quick] [--threads T]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bnlib.numpy_bn import batch_norm_backward, batch_norm_forward  # noqa: E402

FULL_SHAPES = [(256, 64, 28, 28), (60, 300)]
QUICK_SHAPES = [(64, 64, 28, 28), (60, 300)]


def naive_forward_backward(x, gamma, beta, dy, eps=1e-5):
    """Textbook NumPy batch norm: every step makes a full-size temporary."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    g, b = gamma.reshape(shape), beta.reshape(shape)
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    x_hat = (x - mu) / np.sqrt(var + eps)
    y = g * x_hat + b
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    dx = g / np.sqrt(var + eps) * (dy - dy.mean(axis=axes, keepdims=True)
                                   - x_hat * (dy * x_hat).mean(axis=axes, keepdims=True))
    return y, dx, dgamma, dbeta


def _cases(shape, threads, rng):
    """(name, torch threads, function) for one float32 batch of the given shape."""
    C = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    gamma = rng.standard_normal(C, dtype=np.float32)
    beta = rng.standard_normal(C, dtype=np.float32)
    copy_out = np.empty_like(x)

    xt = torch.from_numpy(x).requires_grad_(True)
    dyt = torch.from_numpy(dy)
    gt = torch.from_numpy(gamma).requires_grad_(True)
    bt = torch.from_numpy(beta).requires_grad_(True)

    def torch_fwd():
        with torch.no_grad():
            torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True)

    def torch_fwd_bwd():
        y = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True)
        torch.autograd.grad(y, (xt, gt, bt), dyt)

    def bnlib_fwd():
        batch_norm_forward(x, gamma, beta)

    def bnlib_fwd_bwd():
        _, cache = batch_norm_forward(x, gamma, beta)
        batch_norm_backward(dy, cache)

    cases = [
        ("np.copyto (memory copy)", 1, lambda: np.copyto(copy_out, x)),
        ("torch forward", threads, torch_fwd),
        ("torch forward+backward", threads, torch_fwd_bwd),
        ("bnlib forward", 1, bnlib_fwd),
        ("bnlib forward+backward", 1, bnlib_fwd_bwd),
        ("naive NumPy forward+backward", 1, lambda: naive_forward_backward(x, gamma, beta, dy)),
    ]
    if threads > 1:  # torch on one thread too, like the NumPy rows
        cases.insert(3, ("torch forward+backward, 1 thread", 1, torch_fwd_bwd))
    return x.nbytes, cases


def _time(name, nthreads, fn, number):
    """Seconds per call of fn, over a loop of `number` calls."""
    if name.startswith("torch"):
        torch.set_num_threads(nthreads)  # outside the timed region
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def main(quick=False, threads=None):
    """Run the benchmark; returns the table as a list of dicts and prints it as Markdown.

    Each row: shape, name, threads, median_ms, gb_s, ratio_to_torch (to torch forward+backward
    on the same shape and on `threads` threads), ratio_to_torch_1thread (to torch
    forward+backward on one thread, like the NumPy rows).
    quick=True: a smaller convolutional batch (64, 64, 28, 28) and fewer repeats (seconds).
    threads: torch threads (default: all CPUs); the NumPy rows are single-threaded, and
    torch forward+backward is also timed on 1 thread when threads > 1.
    """
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    repeats = 7 if quick else 21
    rng = np.random.default_rng(0)

    rows = []
    for shape in shapes:
        nbytes, cases = _cases(shape, threads, rng)
        # warm-up (page faults, allocator, thread pool), and the loop length: about 10 ms a sample
        number = {name: min(1000, max(1, round(0.01 / max(min(_time(name, n, fn, 1) for _ in range(3)), 1e-6))))
                  for name, n, fn in cases}
        times = {name: [] for name, _, _ in cases}
        for _ in range(repeats):
            for name, nthreads, fn in cases:
                times[name].append(_time(name, nthreads, fn, number[name]))
        torch.set_num_threads(threads)

        torch_ms = 1e3 * float(np.median(times["torch forward+backward"]))
        one_thread = "torch forward+backward" + (", 1 thread" if threads > 1 else "")
        torch1_ms = 1e3 * float(np.median(times[one_thread]))
        for name, nthreads, _ in cases:
            ms = 1e3 * float(np.median(times[name]))
            rows.append({
                "shape": shape,
                "name": name,
                "threads": nthreads,
                "median_ms": round(ms, 4),
                "gb_s": round(nbytes / (ms * 1e-3) / 1e9, 2),
                "ratio_to_torch": round(ms / torch_ms, 2),
                "ratio_to_torch_1thread": round(ms / torch1_ms, 2),
            })

    print(f"x: float32, shapes {', '.join(map(str, shapes))}; {repeats} repeats (median); "
          f"torch {torch.__version__} with {threads} thread(s), NumPy {np.__version__} single-threaded")
    print()
    print("| x shape | operation | threads | median ms | GB/s of x | ratio to torch fwd+bwd "
          "| ratio to torch fwd+bwd, 1 thread |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['name']} | {r['threads']} | {r['median_ms']:.3g} | {r['gb_s']:.2f} "
              f"| {r['ratio_to_torch']:.2f} | {r['ratio_to_torch_1thread']:.2f} |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    args = parser.parse_args()
    main(quick=args.quick, threads=args.threads)
