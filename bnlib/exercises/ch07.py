"""Checker for the coding exercise of chapters/07_mnist.ipynb: batch norm for S seeds at once.

The reader writes ``per_seed_batch_norm(h, eps)``: ``h`` holds the pre-activations of ``S`` independent
networks, shape ``(S, N, n)`` (seed, example, unit); the result normalises every (seed, unit) column over the
``N`` examples of that seed's minibatch, exactly as ``S`` separate ``BatchNorm1d(n)`` layers in training mode
would (no affine part: γ = 1, β = 0).

:func:`trained_bn_mlp` builds, in seconds, a stand-in for the chapter's trained BN MLP (Part A's 50,000-step
run) for the exercises that use it.

Defined in: chapters/07_mnist.ipynb
"""

from __future__ import annotations

import torch

from bnlib.exercises.harness import Case, Mistake, run

__all__ = ["reference_per_seed_batch_norm", "check_per_seed_batch_norm", "trained_bn_mlp"]


def reference_per_seed_batch_norm(h: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``(S, N, n)`` → ``(S, N, n)``: per seed and unit, (h − mean over N) / sqrt(biased var over N + eps)."""
    mu = h.mean(dim=1, keepdim=True)
    var = h.var(dim=1, unbiased=False, keepdim=True)
    return (h - mu) / torch.sqrt(var + eps)


def _standardize(h: torch.Tensor, dims, eps: float, unbiased: bool = False, eps_outside: bool = False):
    mu = h.mean(dim=dims, keepdim=True)
    var = h.var(dim=dims, unbiased=unbiased, keepdim=True)
    return (h - mu) / (var.sqrt() + eps) if eps_outside else (h - mu) / torch.sqrt(var + eps)


def _wrong_view(h: torch.Tensor, eps: float) -> torch.Tensor:
    """(S, N, n) reshaped straight to (N, S·n) without moving the seed axis: columns mix seeds and examples."""
    S, N, n = h.shape
    flat = h.reshape(N, S * n)
    return _standardize(flat, 0, eps).reshape(S, N, n)


#: name -> (function of (h, eps), likely cause shown to the reader)
_MISTAKES = {
    "pooled over seeds": (lambda h, eps: _standardize(h, (0, 1), eps),
                          "statistics over seeds and examples together (dims (0, 1)): the seeds are no longer "
                          "independent; reduce over dim 1 only"),
    "over units": (lambda h, eps: _standardize(h, 2, eps),
                   "statistics over the units (dim 2): that is layer normalisation, not batch normalisation"),
    "over seeds": (lambda h, eps: _standardize(h, 0, eps),
                   "statistics over the seed axis (dim 0): reduce over the examples (dim 1)"),
    "wrong view": (_wrong_view,
                   "h.reshape(N, S*n) without first moving the seed axis (h.transpose(0, 1)): each column then "
                   "mixes examples of different seeds"),
    "unbiased variance": (lambda h, eps: _standardize(h, 1, eps, unbiased=True),
                          "unbiased variance (divides by N-1); batch norm normalises with the biased one (1/N)"),
    "eps outside the root": (lambda h, eps: _standardize(h, 1, eps, eps_outside=True),
                             "eps added to the standard deviation; it belongs inside: sqrt(var + eps)"),
    "no eps": (lambda h, eps: _standardize(h, 1, 0.0),
               "eps left out: a constant column divides by zero"),
}


def _cases() -> list[tuple[str, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(7)
    big = torch.randn(3, 60, 100, generator=g, dtype=torch.float64) * 2 + 1
    small = torch.randn(4, 2, 5, generator=g, dtype=torch.float64)  # batch of 2: 1/N vs 1/(N-1) matters
    seeds_differ = torch.randn(2, 8, 3, generator=g, dtype=torch.float64)
    seeds_differ[1] = seeds_differ[1] * 10 + 5  # a second seed on another scale: pooling shows
    tiny = torch.randn(2, 16, 4, generator=g, dtype=torch.float64) * 1e-3  # var ~ 1e-6, comparable to eps
    tiny[0, :, 1] = 0.25  # a constant column: only eps keeps it finite
    return [("S=3, N=60, n=100", big, 1e-5), ("S=4, N=2, n=5, eps=0.1", small, 0.1),
            ("seeds on different scales, eps=1e-3", seeds_differ, 1e-3),
            ("tiny variance, a constant unit", tiny, 1e-5)]


def _mistakes(case):
    h, eps = case.args
    table = [Mistake(f"{name}: {why}", lambda case, wrong=wrong: wrong(h, eps)) for name, (wrong, why) in _MISTAKES.items()]
    if eps != 1e-5:
        table.append(Mistake(f"eps ignored: you used eps = 1e-5 instead of the eps passed to the function "
                             f"({eps:g} here)", lambda case: reference_per_seed_batch_norm(h, 1e-5)))
    return table


def check_per_seed_batch_norm(fn, verbose: bool = True) -> bool:
    """Run ``fn(h, eps)`` on several ``(S, N, n)`` float64 cases (eps 1e-5, 1e-3 and 0.1) against the reference;
    print a diagnosis of the first failure; True if every case agrees to 1e-10."""
    cases = [Case(name, (h, eps), reference_per_seed_batch_norm(h, eps), 1e-10) for name, h, eps in _cases()]
    return run(fn, cases, inputs=("h", "eps"), outputs=("the result",), mistakes=_mistakes,
               unknown="compare your mean and variance with h.mean(1) and h.var(1, unbiased=False)",
               summary="each (seed, unit) column is normalised over its own minibatch", verbose=verbose)


def trained_bn_mlp(steps: int = 1000, seed: int = 0):
    """The chapter's BN MLP (Figure 1, with BN) for one seed, trained for ``steps`` steps instead of 50,000.

    A stand-in for ``fig1["models"]["bn"].seed_model(0)`` when Part A has not been run: the same network,
    configuration and batches (:func:`bnlib.mnist.run_figure1` with ``Figure1Config(steps=steps)``), trained in
    seconds. Returns an ``nn.Sequential`` with :class:`bnlib.torch_bn.BatchNorm1d` layers, in training mode.
    """
    from bnlib import mnist

    cfg = mnist.Figure1Config(steps=steps, eval_every=steps)
    run_ = mnist.run_figure1(True, seeds=(seed,), config=cfg, progress=False)
    net = run_["model"].seed_model(0)
    return net.train()
