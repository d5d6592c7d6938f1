"""Checker for the coding exercise of chapters/07_mnist.ipynb: batch norm for S seeds at once.

The reader writes ``per_seed_batch_norm(h, eps)``: ``h`` holds the pre-activations of ``S`` independent
networks, shape ``(S, N, n)`` (seed, example, unit); the result normalises every (seed, unit) column over the
``N`` examples of that seed's minibatch, exactly as ``S`` separate ``BatchNorm1d(n)`` layers in training mode
would (no affine part: γ = 1, β = 0).

Defined in: chapters/07_mnist.ipynb
"""

from __future__ import annotations

import torch

__all__ = ["reference_per_seed_batch_norm", "check_per_seed_batch_norm"]


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
    return [("S=3, N=60, n=100", big, 1e-5), ("S=4, N=2, n=5", small, 1e-5),
            ("seeds on different scales", seeds_differ, 1e-5), ("tiny variance, a constant unit", tiny, 1e-5)]


def check_per_seed_batch_norm(fn, verbose: bool = True) -> bool:
    """Run ``fn(h, eps)`` on several ``(S, N, n)`` cases against the reference; print a diagnosis; True if all pass."""
    say = print if verbose else (lambda *a, **k: None)
    ok = True
    for name, h, eps in _cases():
        want = reference_per_seed_batch_norm(h, eps)
        try:
            got = fn(h.clone(), eps)
        except Exception as e:  # the reader's code may raise anything
            say(f"case '{name}': your function raised {type(e).__name__}: {e}")
            ok = False
            continue
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            say(f"case '{name}': expected a tensor of shape {tuple(want.shape)}, got {shape}")
            ok = False
            continue
        got = got.to(want.dtype)
        err = (got - want).abs().max().item() if torch.isfinite(got).all() else float("inf")
        if err <= 1e-6:
            continue
        ok = False
        s, i, j = divmod_index(((got - want).abs().nan_to_num(float("inf"))).argmax().item(), want.shape)
        cause = "no known mistake matches; compare your mean and variance with h.mean(1) and h.var(1, unbiased=False)"
        for mistake, (wrong, why) in _MISTAKES.items():
            with torch.no_grad():
                alt = wrong(h, eps)
            if torch.isfinite(got).all() == torch.isfinite(alt).all() and torch.allclose(
                    got.nan_to_num(), alt.nan_to_num(), atol=1e-6, rtol=1e-6):
                cause = f"{mistake}: {why}"
                break
        say(f"case '{name}': largest error {err:.3g} at seed {s}, example {i}, unit {j}. Likely cause: {cause}")
    if ok:
        say("All cases match the reference: each (seed, unit) column is normalised over its own minibatch.")
    return ok


def divmod_index(flat: int, shape) -> tuple[int, ...]:
    """Unravel a flat index into ``shape`` (``torch.unravel_index`` as plain ints)."""
    out = []
    for size in reversed(shape):
        flat, r = divmod(flat, size)
        out.append(r)
    return tuple(reversed(out))
