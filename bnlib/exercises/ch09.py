"""Checkers for the coding exercises of chapters/09_sync_bn.ipynb: batch norm across processes.

* ``merge(counts, means, m2s) -> (mu, M2)``: merge W ranks' per-channel statistics (Chan et al.'s formula):
  counts (W,), means and m2s (W, C), float64; mu and M2 (C,) of the union of the ranks' values.
* ``sync_dx(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, m) -> dx``: one rank's input gradient from the
  all-reduced sums: dy, x_hat (N_r, C) on this rank; inv_std, gamma, sum_dy, sum_dy_xhat (C,); m the global count.

Defined in: chapters/09_sync_bn.ipynb
"""

from __future__ import annotations

import torch

from bnlib.exercises.harness import Case, Mistake, run

__all__ = ["reference_merge", "check_merge_stats", "reference_sync_dx", "check_sync_dx"]


def reference_merge(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor):
    """(mu, M2) of the union: mu = sum m_r mean_r / m, M2 = sum M2_r + sum m_r (mean_r - mu)^2."""
    w = counts.unsqueeze(1)
    mu = (w * means).sum(0) / counts.sum()
    return mu, m2s.sum(0) + (w * (means - mu).square()).sum(0)


def _merge_cases():
    g = torch.Generator().manual_seed(9)
    cases = []
    for name, sizes, offset in (("2 ranks, 8 values each", (8, 8), 0.0),
                                ("3 ranks, 5, 0 and 12 values (a rank with none)", (5, 0, 12), 1.0),
                                ("4 ranks of 3, 7, 2, 9 values, means near 1e3", (3, 7, 2, 9), 1e3),
                                ("1 rank", (6,), -2.0)):
        parts = [torch.randn(n, 3, generator=g, dtype=torch.float64) * 2 + offset
                 + torch.randn(1, 3, generator=g, dtype=torch.float64) * 3 for n in sizes]  # ranks differ
        counts = torch.tensor(sizes, dtype=torch.float64)
        means = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
        m2s = torch.stack([(p - p.mean(0)).square().sum(0) if len(p) else torch.zeros(3, dtype=torch.float64)
                           for p in parts])
        whole = torch.cat(parts)
        expected = (whole.mean(0), (whole - whole.mean(0)).square().sum(0))  # from the values themselves
        cases.append(Case(name, (counts, means, m2s), expected, (1e-10, 1e-8)))
    return cases


def _merge_mistakes(case):
    counts, means, m2s = case.args
    w = counts.unsqueeze(1)
    mu = (w * means).sum(0) / counts.sum()
    if len(set(counts.tolist())) > 1:  # with equal counts the plain average is right
        yield Mistake("mu is the plain average of the ranks' means: weigh each mean by its rank's count "
                      "(sum m_r mean_r / m); ranks with more values count more", lambda c: (means.mean(0), None))
    yield Mistake("M2 is only the sum of the ranks' M2: the spread *between* the ranks' means is missing, "
                  "+ sum_r m_r (mean_r - mu)^2", lambda c: (None, m2s.sum(0)))
    yield Mistake("the between-ranks term is not weighted by the counts: sum_r m_r (mean_r - mu)^2",
                  lambda c: (None, m2s.sum(0) + (means - mu).square().sum(0)))
    if (counts == 0).any():
        yield Mistake("NaN from a rank with no values: dividing its M2 (or sum) by its count 0 gives 0/0; work with "
                      "M2 and count-weighted sums, which a rank with none adds nothing to",
                      lambda c: (None, torch.full_like(mu, float("nan"))))


def check_merge_stats(fn, verbose: bool = True) -> bool:
    """Run ``fn(counts, means, m2s) -> (mu, M2)`` on 2, 3 (one rank empty), 4 and 1 ranks, float64, against the
    statistics of the concatenated values (1e-10 for mu, 1e-8 for M2); print a diagnosis; True if all agree."""
    return run(fn, _merge_cases(), inputs=("counts", "means", "m2s"), outputs=("mu", "M2"),
               mistakes=_merge_mistakes,
               unknown="mu = (counts[:, None] * means).sum(0) / counts.sum(); then M2 = m2s.sum(0) + the "
                       "count-weighted squared distances of the ranks' means to mu",
               summary="the merged statistics are those of the concatenated values", verbose=verbose)


def reference_sync_dx(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, m):
    """gamma * inv_std * (dy - sum_dy / m - x_hat * sum_dy_xhat / m) on this rank's (N_r, C) rows."""
    return gamma * inv_std * (dy - sum_dy / m - x_hat * sum_dy_xhat / m)


def _dx_cases():
    g = torch.Generator().manual_seed(10)
    cases = []
    for name, sizes, rank in (("rank 1 of batches 5 and 3", (5, 3), 1), ("rank 0 of batches 4, 4 and 4", (4, 4, 4), 0),
                              ("rank 2 of batches 6, 1 and 9", (6, 1, 9), 2), ("a rank with no examples", (0, 7), 0)):
        n = sum(sizes)
        x = torch.randn(n, 2, generator=g, dtype=torch.float64) * 3 + 1
        dy = torch.randn(n, 2, generator=g, dtype=torch.float64)
        gamma = torch.rand(2, generator=g, dtype=torch.float64) + 0.5
        inv_std = 1 / (x.var(0, correction=0) + 1e-5).sqrt()
        x_hat = (x - x.mean(0)) * inv_std
        # the reference: autograd through batch norm of the whole batch, then this rank's rows
        xg = x.clone().requires_grad_(True)
        y = (xg - xg.mean(0)) / (xg.var(0, correction=0) + 1e-5).sqrt() * gamma
        (y * dy).sum().backward()
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        args = (dy[lo:hi], x_hat[lo:hi], inv_std, gamma, dy.sum(0), (dy * x_hat).sum(0), n)
        cases.append(Case(name, args, xg.grad[lo:hi], 1e-10))
    return cases


def _dx_mistakes(case):
    dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, m = case.args
    n = dy.shape[0]
    yield Mistake("you used this rank's own sums (dy.sum(0), (dy * x_hat).sum(0)): the mean terms are over the "
                  "whole batch, use the all-reduced sum_dy and sum_dy_xhat",
                  lambda c: reference_sync_dx(dy, x_hat, inv_std, gamma, dy.sum(0), (dy * x_hat).sum(0), m))
    if n != m:
        yield Mistake("you divided by this rank's count (dy.shape[0]) instead of the global m: every rank's "
                      "share is averaged over all m values",
                      lambda c: reference_sync_dx(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, n))
        yield Mistake("this rank's sums and this rank's count: that is plain (per-rank) batch norm's gradient",
                      lambda c: reference_sync_dx(dy, x_hat, inv_std, gamma, dy.sum(0), (dy * x_hat).sum(0), n)
                      if n else None)
    yield Mistake("gamma is missing: dx is gamma * inv_std * (...)",
                  lambda c: reference_sync_dx(dy, x_hat, inv_std, 1.0, sum_dy, sum_dy_xhat, m))
    yield Mistake("the projection term has the wrong sign: - x_hat * sum_dy_xhat / m",
                  lambda c: gamma * inv_std * (dy - sum_dy / m + x_hat * sum_dy_xhat / m))


def check_sync_dx(fn, verbose: bool = True) -> bool:
    """Run ``fn(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, m) -> dx`` on the rows of one rank of 2 or 3
    (one with 0 rows), float64, against autograd through batch norm of the whole batch (1e-10); print a
    diagnosis; True if all agree."""
    return run(fn, _dx_cases(), inputs=("dy", "x_hat", "inv_std", "gamma", "sum_dy", "sum_dy_xhat", "m"),
               outputs=("dx",), mistakes=_dx_mistakes,
               unknown="chapter 3's compact formula with the global sums: "
                       "gamma * inv_std * (dy - sum_dy / m - x_hat * sum_dy_xhat / m)",
               summary="each rank's dx is its rows of the whole batch's gradient", verbose=verbose)
