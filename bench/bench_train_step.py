"""Benchmark: one training step of the Figure 1 MLP with each batch norm, CPU, 1 thread.

Defined in: chapters/appendix_performance.ipynb (the network and the step are those of chapters/07_mnist.ipynb)

The layer benchmark (``bench/bench_torch_bn.py``) times batch norm alone.  This one times what the book
actually runs: :func:`bnlib.mnist.figure1_step` on the three-seed ``BatchedMLP`` (784-100-100-100-10, sigmoid,
a batch of 60 per seed, so every BN layer sees a (60, 300) batch), forward, backward and SGD update, with
  no BN                        the baseline network (no normalisation layer at all)
  torch.nn.BatchNorm1d         torch's layer
  bnlib BatchNorm1d            ``bnlib.torch_bn.BatchNorm1d``: its speed path in training
  bnlib, readable Function     the same layer with the speed path switched off (``torch_bn_fast.disabled()``)
Inputs are one fixed batch of random binary images and random labels, and every timed round restarts the
networks from their initial weights, so that every round computes on the same values.
Candidates are timed interleaved (round-robin) with the calling thread's CPU time (``time.thread_time``) under
``torch.set_num_threads(1)`` (the MNIST chapter's setting); medians are reported.  "BN share" is the median over
rounds of a step's time minus the no-BN step's time in the same round: the three BN layers with everything around
them that the layer benchmark leaves out (the modules' Python ``forward``, the running-statistics updates, the
reshapes of ``BatchedMLP._norm``, the updates of gamma and beta), less the hidden layers' biases, which the
baseline network has and the BN network drops.

Usage: ``python bench/bench_train_step.py [--quick]``; ``main(quick=False)`` returns the rows as a list of dicts
with keys name, ms_per_step, ratio_to_torch, bn_share_ms, minus_torch_ms (the median over rounds of the step's
time minus the step with torch's BN), steps, repeats.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEEDS = (0, 1, 2)
BATCH = 60
NO_BN, TORCH, BNLIB, READABLE = ("no BN", "torch.nn.BatchNorm1d", "bnlib BatchNorm1d",
                                 "bnlib, readable Function")


def _steps() -> dict:
    """{name: (a function that runs one training step, a function that restores the network's initial state,
    the network)} for the four networks, on one fixed random batch."""
    from bnlib import torch_bn, torch_bn_fast
    from bnlib.mnist import figure1_step
    from bnlib.models import BatchedMLP

    gen = torch.Generator().manual_seed(0)
    S = len(SEEDS)
    xb = (torch.rand(S, BATCH, 784, generator=gen) > 0.5).float()
    yb = torch.randint(0, 10, (S, BATCH), generator=gen)
    lr = torch.full((S,), 0.1)

    def make(bn: bool, layer, readable: bool = False):
        model = BatchedMLP(SEEDS, bn=bn, bn_layer=layer)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        initial = {k: v.clone() for k, v in model.state_dict().items()}

        def reset():  # every timed round starts from the same weights (training changes what the kernels see)
            model.load_state_dict(initial)

        def step():
            if readable:
                with torch_bn_fast.disabled():
                    figure1_step(model, opt, xb, yb, lr)
            else:
                figure1_step(model, opt, xb, yb, lr)

        return step, reset, model

    return {NO_BN: make(False, None), TORCH: make(True, torch.nn.BatchNorm1d),
            BNLIB: make(True, torch_bn.BatchNorm1d), READABLE: make(True, torch_bn.BatchNorm1d, readable=True)}


def main(quick: bool = False, number: int | None = None, repeats: int | None = None) -> list[dict]:
    """Median CPU time per training step of each network (1 thread); returns the rows.

    ``repeats`` rounds of ``number`` steps per network (default 7 x 40 in quick mode, 15 x 200 otherwise).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = _steps()
        number = number or (40 if quick else 200)
        repeats = repeats or (7 if quick else 15)
        for step, _, _ in steps.values():  # warm-up
            for _ in range(10):
                step()
        times = {name: [] for name in steps}
        for _ in range(repeats):
            for name, (step, reset, _) in steps.items():
                reset()
                t0 = time.thread_time()
                for _ in range(number):
                    step()
                times[name].append((time.thread_time() - t0) / number)
    finally:
        torch.set_num_threads(threads)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}

    def paired(name, other):  # median over rounds of name's time minus other's: load hits both terms alike
        return statistics.median(a - b for a, b in zip(times[name], times[other])) * 1e3

    return [{"name": name, "ms_per_step": ms, "ratio_to_torch": ms / med[TORCH], "bn_share_ms": paired(name, NO_BN),
             "minus_torch_ms": paired(name, TORCH), "steps": number, "repeats": repeats} for name, ms in med.items()]


def to_markdown(rows: list[dict]) -> str:
    """The rows of :func:`main` as a Markdown table."""
    lines = [f"Figure 1 MLP, three seeds batched ({BATCH} images each), one SGD step; CPU time, 1 thread; medians "
             f"of {rows[0]['repeats']} interleaved samples of {rows[0]['steps']} steps",
             "",
             "| network | ms per step | ratio to the step with torch's BN | BN share, ms | minus torch's BN step, ms |",
             "|---|---|---|---|---|"]
    for r in rows:
        share = "" if r["name"] == NO_BN else f"{r['bn_share_ms']:.2f}"
        lines.append(f"| {r['name']} | {r['ms_per_step']:.2f} | {r['ratio_to_torch']:.2f} | {share} "
                     f"| {r['minus_torch_ms']:+.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(to_markdown(main(quick="--quick" in sys.argv[1:])))
