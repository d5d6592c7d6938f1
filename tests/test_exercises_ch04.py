"""The checkers of chapter 04 accept correct solutions and diagnose each mistake they claim to recognise."""

from __future__ import annotations

import numpy as np
import pytest

from bnlib.exercises.ch04 import check_fold_bn_into_linear, check_update_running_stats


# ------------------------------------------------------------------------------ update_running_stats
def update_correct(rm, rv, bm, bv, n, momentum, nbt, training):
    if not training:
        return rm, rv, nbt
    nbt = nbt + 1
    f = 1.0 / nbt if momentum is None else momentum
    return (1 - f) * rm + f * bm, (1 - f) * rv + f * bv * n / (n - 1), nbt


def update_in_place(rm, rv, bm, bv, n, momentum, nbt, training):
    """Correct, torch-style: updates the arrays in place and returns them."""
    if training:
        nbt += 1
        f = 1.0 / nbt if momentum is None else momentum
        rm *= 1 - f
        rm += f * bm
        rv *= 1 - f
        rv += f * bv * n / (n - 1)
    return rm, rv, nbt


def update_biased(rm, rv, bm, bv, n, momentum, nbt, training):
    if not training:
        return rm, rv, nbt
    nbt = nbt + 1
    f = 1.0 / nbt if momentum is None else momentum
    return (1 - f) * rm + f * bm, (1 - f) * rv + f * bv, nbt


def update_swapped(rm, rv, bm, bv, n, momentum, nbt, training):
    if not training:
        return rm, rv, nbt
    nbt = nbt + 1
    f = 1.0 / nbt if momentum is None else momentum
    return f * rm + (1 - f) * bm, f * rv + (1 - f) * bv * n / (n - 1), nbt


def update_none_crashes(rm, rv, bm, bv, n, momentum, nbt, training):
    if not training:
        return rm, rv, nbt
    return (1 - momentum) * rm + momentum * bm, (1 - momentum) * rv + momentum * bv * n / (n - 1), nbt + 1


def update_none_before(rm, rv, bm, bv, n, momentum, nbt, training):
    if not training:
        return rm, rv, nbt
    f = 1.0 / nbt if momentum is None else momentum
    return (1 - f) * rm + f * bm, (1 - f) * rv + f * bv * n / (n - 1), nbt + 1


def update_none_before_float(rm, rv, bm, bv, n, momentum, nbt, training):
    """momentum=None with the count before this batch, but a float count (no ZeroDivisionError at 0)."""
    if not training:
        return rm, rv, nbt
    f = (1.0 / max(nbt, 1e-300) if nbt else np.inf) if momentum is None else momentum
    with np.errstate(invalid="ignore"):
        return (1 - f) * rm + f * bm, (1 - f) * rv + f * bv * n / (n - 1), nbt + 1


def update_in_eval(rm, rv, bm, bv, n, momentum, nbt, training):
    nbt = nbt + 1
    f = 1.0 / nbt if momentum is None else momentum
    return (1 - f) * rm + f * bm, (1 - f) * rv + f * bv * n / (n - 1), nbt


def update_counts_in_eval(rm, rv, bm, bv, n, momentum, nbt, training):
    """Leaves the statistics alone in eval mode, but counts the batch anyway."""
    if not training:
        return rm, rv, nbt + 1
    nbt = nbt + 1
    f = 1.0 / nbt if momentum is None else momentum
    return (1 - f) * rm + f * bm, (1 - f) * rv + f * bv * n / (n - 1), nbt


def update_no_count(rm, rv, bm, bv, n, momentum, nbt, training):
    if not training:
        return rm, rv, nbt
    f = 1.0 / (nbt + 1) if momentum is None else momentum
    return (1 - f) * rm + f * bm, (1 - f) * rv + f * bv * n / (n - 1), nbt


def update_inverted(rm, rv, bm, bv, n, momentum, nbt, training):
    if not training:
        return rm, rv, nbt
    nbt = nbt + 1
    f = 1.0 / nbt if momentum is None else momentum
    return (1 - f) * rm + f * bm, (1 - f) * rv + f * bv * (n - 1) / n, nbt


def update_biased_and_swapped(rm, rv, bm, bv, n, momentum, nbt, training):
    if not training:
        return rm, rv, nbt
    nbt = nbt + 1
    f = 1.0 / nbt if momentum is None else momentum
    return f * rm + (1 - f) * bm, f * rv + (1 - f) * bv, nbt


def update_stub(*args):
    raise NotImplementedError


@pytest.mark.parametrize("fn", [update_correct, update_in_place])
def test_update_accepts_correct(fn, capsys):
    assert check_update_running_stats(fn) is True
    assert "all 7 cases pass" in capsys.readouterr().out


@pytest.mark.parametrize("fn, expected", [
    (update_biased, "biased batch variance"),
    (update_swapped, "momentum convention is swapped"),
    (update_none_crashes, "momentum=None is not handled"),
    (update_none_before, "AFTER counting this batch"),
    (update_none_before_float, "AFTER counting this batch"),
    (update_in_eval, "training=False"),
    (update_no_count, "counts every training batch"),
    (update_counts_in_eval, "in eval mode nothing is counted"),
    (update_inverted, "upside down"),
    (update_stub, "NotImplementedError"),
])
def test_update_diagnoses(fn, expected, capsys):
    assert check_update_running_stats(fn) is False
    out = capsys.readouterr().out
    assert expected in out, out


def test_update_diagnoses_two_mistakes(capsys):
    assert check_update_running_stats(update_biased_and_swapped) is False
    out = capsys.readouterr().out
    assert "biased batch variance" in out and "momentum convention is swapped" in out, out


def test_update_reference_matches_torch():
    """The checker's reference is torch's rule: compare with torch.nn.BatchNorm1d over a few batches."""
    import torch
    from bnlib.exercises.ch04 import _update_reference

    rng = np.random.default_rng(0)
    for momentum in (0.1, None):
        bn = torch.nn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
        rm, rv, nbt = np.zeros(3), np.ones(3), 0
        for n in (4, 9, 2):
            x = rng.normal(1, 2, (n, 3))
            bn(torch.from_numpy(x))
            rm, rv, nbt = _update_reference(rm, rv, x.mean(0), x.var(0), n, momentum, nbt, True)
        np.testing.assert_allclose(rm, bn.running_mean.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(rv, bn.running_var.numpy(), rtol=0, atol=1e-12)
        assert nbt == int(bn.num_batches_tracked)


# ------------------------------------------------------------------------------ fold_bn_into_linear
def _params(bn):
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps


def fold_correct(W, b, bn):
    gamma, beta, mean, var, eps = _params(bn)
    s = gamma / np.sqrt(var + eps)
    b = np.zeros(W.shape[0]) if b is None else b
    return s[:, None] * W, (b - mean) * s + beta


def fold_forgot_bias(W, b, bn):
    gamma, beta, mean, var, eps = _params(bn)
    s = gamma / np.sqrt(var + eps)
    return s[:, None] * W, beta - mean * s


def fold_batch_stats(W, b, bn):
    """Reads the statistics of the last training batch from the layer's cache."""
    gamma, beta, _, _, eps = _params(bn)
    mean, var = bn._cache.mu, bn._cache.var
    s = gamma / np.sqrt(var + eps)
    b = np.zeros(W.shape[0]) if b is None else b
    return s[:, None] * W, (b - mean) * s + beta


def fold_eps_outside(W, b, bn):
    gamma, beta, mean, var, eps = _params(bn)
    s = gamma / (np.sqrt(var) + eps)
    b = np.zeros(W.shape[0]) if b is None else b
    return s[:, None] * W, (b - mean) * s + beta


def fold_wrong_axis(W, b, bn):
    gamma, beta, mean, var, eps = _params(bn)
    s = gamma / np.sqrt(var + eps)
    b = np.zeros(W.shape[0]) if b is None else b
    return W * s, (b - mean) * s + beta  # s broadcasts along the columns


def fold_bias_none_crash(W, b, bn):
    gamma, beta, mean, var, eps = _params(bn)
    s = gamma / np.sqrt(var + eps)
    return s[:, None] * W, (b - mean) * s + beta


def fold_in_place(W, b, bn):
    gamma, beta, mean, var, eps = _params(bn)
    s = gamma / np.sqrt(var + eps)
    W *= s[:, None]
    b = np.zeros(W.shape[0]) if b is None else b
    return W, (b - mean) * s + beta


def fold_calls_eval(W, b, bn):
    """Puts bn in eval mode to read its inference transform: the statement forbids changing the layer."""
    bn.eval()
    gamma, beta, mean, var, eps = _params(bn)
    s = gamma / np.sqrt(var + eps)
    b = np.zeros(W.shape[0]) if b is None else b
    return s[:, None] * W, (b - mean) * s + beta


def fold_float32(W, b, bn):
    """The right fold, stored in single precision."""
    gamma, beta, mean, var, eps = _params(bn)
    s = gamma / np.sqrt(var + eps)
    b = np.zeros(W.shape[0]) if b is None else b
    return (s[:, None] * W).astype(np.float32), ((b - mean) * s + beta).astype(np.float32)


def fold_stub(W, b, bn):
    raise NotImplementedError


def test_fold_accepts_correct(capsys):
    assert check_fold_bn_into_linear(fold_correct) is True
    assert "all 3 cases" in capsys.readouterr().out


def test_fold_matches_torch_fusion():
    """The reference equals torch.nn.utils.fusion.fuse_linear_bn_eval on the checker's cases."""
    import torch
    from torch.nn.utils.fusion import fuse_linear_bn_eval

    from bnlib.exercises.ch04 import _fold_cases

    for _, W, b, bn, _, _ in _fold_cases():
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=torch.float64)
        tbn = torch.nn.BatchNorm1d(W.shape[0], eps=bn.eps, dtype=torch.float64).eval()
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
            if b is not None:
                lin.bias.copy_(torch.from_numpy(b))
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(tbn, name).copy_(torch.from_numpy(getattr(bn, name)))
        fused = fuse_linear_bn_eval(lin.eval(), tbn)
        W_f, b_f = fold_correct(W, b, bn)
        np.testing.assert_allclose(W_f, fused.weight.detach().numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(b_f, fused.bias.detach().numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn, expected", [
    (fold_forgot_bias, "own bias is missing"),
    (fold_batch_stats, "statistics of the last training batch"),
    (fold_eps_outside, "eps is outside the square root"),
    (fold_wrong_axis, "W' = s[:, None] * W"),
    (fold_bias_none_crash, "treat it as zeros"),
    (fold_in_place, "your function modified W in place"),
    (fold_calls_eval, "your function modified bn in place (bn.training: True -> False)"),
    (fold_float32, "W_fold has dtype float32, expected float64"),
    (fold_stub, "NotImplementedError"),
])
def test_fold_diagnoses(fn, expected, capsys):
    assert check_fold_bn_into_linear(fn) is False
    out = capsys.readouterr().out
    assert expected in out, out


def test_fold_wrong_axis_square_case(capsys):
    """On the square Linear(4, 4) the wrong axis does not raise; the checker still names it."""
    from bnlib.exercises import ch04

    cases = ch04._fold_cases()
    square = [c for c in cases if c[1].shape[0] == c[1].shape[1]]
    assert square, "the checker must include a square Linear so that the wrong axis runs silently"
    original = ch04._fold_cases
    try:
        ch04._fold_cases = lambda: square
        assert check_fold_bn_into_linear(fold_wrong_axis) is False
    finally:
        ch04._fold_cases = original
    out = capsys.readouterr().out
    assert "multiplies row o" in out and "W' = s[:, None] * W" in out and "max |error|" in out, out
