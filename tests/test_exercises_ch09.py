"""The chapter-09 checkers accept correct solutions and diagnose each mistake they claim to."""

import pytest
import torch

from bnlib.exercises.ch09 import check_merge_stats, check_sync_dx


def merge_good(counts, means, m2s):
    m = counts.sum()
    mu = (counts[:, None] * means).sum(0) / m
    return mu, m2s.sum(0) + (counts[:, None] * (means - mu) ** 2).sum(0)


def merge_pairwise(counts, means, m2s):
    """Chan's pairwise update, one rank at a time (another correct way)."""
    n, mu, m2 = counts[0], means[0], m2s[0]
    for k in range(1, len(counts)):
        nb, mub, m2b = counts[k], means[k], m2s[k]
        tot = n + nb
        if nb == 0:
            continue
        delta = mub - mu
        mu = mu + delta * nb / tot
        m2 = m2 + m2b + delta ** 2 * n * nb / tot
        n = tot
    return mu, m2


def merge_plain_mean(counts, means, m2s):
    mu = means.mean(0)
    return mu, m2s.sum(0) + (counts[:, None] * (means - mu) ** 2).sum(0)


def merge_no_between(counts, means, m2s):
    return merge_good(counts, means, m2s)[0], m2s.sum(0)


def merge_unweighted_between(counts, means, m2s):
    mu = merge_good(counts, means, m2s)[0]
    return mu, m2s.sum(0) + ((means - mu) ** 2).sum(0)


def merge_via_var(counts, means, m2s):
    var = m2s / counts[:, None]  # 0/0 for an empty rank
    mu = merge_good(counts, means, m2s)[0]
    return mu, (counts[:, None] * var).sum(0) + (counts[:, None] * (means - mu) ** 2).sum(0)


@pytest.mark.parametrize("fn", [merge_good, merge_pairwise])
def test_merge_accepts_correct(fn, capsys):
    assert check_merge_stats(fn) is True
    assert "all 4 cases pass" in capsys.readouterr().out


@pytest.mark.parametrize("fn, expected", [
    (merge_plain_mean, "plain average of the ranks' means"),
    (merge_no_between, "spread *between* the ranks' means is missing"),
    (merge_unweighted_between, "not weighted by the counts"),
    (merge_via_var, "NaN from a rank with no values"),
    (lambda c, m, s: merge_good(c, m, s)[1], "returned a tensor, expected a tuple of 2"),
])
def test_merge_diagnoses(fn, expected, capsys):
    assert check_merge_stats(fn) is False
    out = capsys.readouterr().out
    assert expected in out, out


def dx_good(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, m):
    return gamma * inv_std * (dy - sum_dy / m - x_hat * sum_dy_xhat / m)


def dx_good_factored(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, m):
    return (gamma * inv_std / m) * (m * dy - sum_dy - x_hat * sum_dy_xhat)


def dx_local_sums(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, m):
    return dx_good(dy, x_hat, inv_std, gamma, dy.sum(0), (dy * x_hat).sum(0), m)


def dx_local_count(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, m):
    return dx_good(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, dy.shape[0])


def dx_plain_bn(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, m):
    return dx_good(dy, x_hat, inv_std, gamma, dy.sum(0), (dy * x_hat).sum(0), dy.shape[0])


def dx_no_gamma(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, m):
    return dx_good(dy, x_hat, inv_std, 1.0, sum_dy, sum_dy_xhat, m)


def dx_sign(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, m):
    return gamma * inv_std * (dy - sum_dy / m + x_hat * sum_dy_xhat / m)


def dx_inplace(dy, x_hat, inv_std, gamma, sum_dy, sum_dy_xhat, m):
    dy -= sum_dy / m
    return gamma * inv_std * (dy - x_hat * sum_dy_xhat / m)


@pytest.mark.parametrize("fn", [dx_good, dx_good_factored])
def test_sync_dx_accepts_correct(fn, capsys):
    assert check_sync_dx(fn) is True
    assert "all 4 cases pass" in capsys.readouterr().out


@pytest.mark.parametrize("fn, expected", [
    (dx_local_sums, "this rank's own sums"),
    (dx_local_count, "instead of the global m"),
    (dx_plain_bn, "plain (per-rank) batch norm's gradient"),
    (dx_no_gamma, "gamma is missing"),
    (dx_sign, "wrong sign"),
    (dx_inplace, "modified dy in place"),
    (lambda *a: torch.zeros(3), "dx has shape (3,)"),
])
def test_sync_dx_diagnoses(fn, expected, capsys):
    assert check_sync_dx(fn) is False
    out = capsys.readouterr().out
    assert expected in out, out
