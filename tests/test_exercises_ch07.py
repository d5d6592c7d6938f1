"""The chapter 7 checker accepts correct implementations and diagnoses each mistake it names.

Every wrong implementation below is written by hand, the way a reader would write it (never taken from the
checker's own table of mistakes), and the test asserts the verdict and the diagnosis the checker prints.
"""

from __future__ import annotations

import pytest
import torch

from bnlib.exercises import ch07


def correct_via_batchnorm1d(h, eps):
    """An independent correct solution: torch's BatchNorm1d on the (N, S·n) view."""
    S, N, n = h.shape
    z = torch.nn.functional.batch_norm(h.transpose(0, 1).reshape(N, S * n), None, None, training=True, eps=eps)
    return z.reshape(N, S, n).transpose(0, 1)


def correct_loop(h, eps):
    """Another correct one: a loop over seeds, each a (N, n) batch norm written out."""
    out = torch.empty_like(h)
    for s in range(h.shape[0]):
        mu = h[s].sum(0) / h.shape[1]
        var = ((h[s] - mu) ** 2).sum(0) / h.shape[1]
        out[s] = (h[s] - mu) / (var + eps) ** 0.5
    return out


def pooled_over_seeds(h, eps):
    mu = h.mean(dim=(0, 1), keepdim=True)
    var = ((h - mu) ** 2).mean(dim=(0, 1), keepdim=True)
    return (h - mu) / torch.sqrt(var + eps)


def over_units(h, eps):
    return torch.nn.functional.layer_norm(h, (h.shape[-1],), eps=eps)


def over_seeds(h, eps):
    mu, var = h.mean(0, keepdim=True), h.var(0, unbiased=False, keepdim=True)
    return (h - mu) / torch.sqrt(var + eps)


def wrong_view(h, eps):
    S, N, n = h.shape
    z = torch.nn.functional.batch_norm(h.reshape(N, S * n), None, None, training=True, eps=eps)
    return z.reshape(S, N, n)


def unbiased(h, eps):
    return (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, keepdim=True) + eps)


def eps_outside(h, eps):
    return (h - h.mean(1, keepdim=True)) / (h.std(1, unbiased=False, keepdim=True) + eps)


def no_eps(h, eps):
    return (h - h.mean(1, keepdim=True)) / h.std(1, unbiased=False, keepdim=True)


def eps_hard_coded(h, eps=1e-5):
    """Ignores its eps argument (the old checker always passed 1e-5, so this passed)."""
    return correct_via_batchnorm1d(h, 1e-5)


def float32_result(h, eps):
    """The right formula in single precision (the old checker converted the result back and accepted it)."""
    return correct_via_batchnorm1d(h.float(), eps)


def in_place(h, eps):
    """Right values, but h is centred in place (the old checker passed a clone and never looked)."""
    h -= h.mean(1, keepdim=True)
    return h / torch.sqrt(h.pow(2).mean(1, keepdim=True) + eps)


def reduced(h, eps):
    return h.mean(1)


def raises(h, eps):
    raise RuntimeError("nope")


def test_reference_matches_torch():
    h = torch.randn(3, 10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ch07.reference_per_seed_batch_norm(h), correct_via_batchnorm1d(h, 1e-5))


@pytest.mark.parametrize("fn", [correct_via_batchnorm1d, correct_loop])
def test_accepts_correct(fn, capsys):
    assert ch07.check_per_seed_batch_norm(fn) is True
    assert "all 4 cases pass" in capsys.readouterr().out


@pytest.mark.parametrize("fn, expected", [
    (pooled_over_seeds, "likely cause: pooled over seeds"),
    (over_units, "likely cause: over units"),
    (over_seeds, "likely cause: over seeds"),
    (wrong_view, "likely cause: wrong view"),
    (unbiased, "likely cause: unbiased variance"),
    (eps_outside, "likely cause: eps outside the root"),
    (no_eps, "likely cause: no eps"),
    (eps_hard_coded, "likely cause: eps ignored: you used eps = 1e-5 instead of the eps passed to the function (0.1 here)"),
    (float32_result, "the result has dtype torch.float32, expected torch.float64"),
    (in_place, "your function modified h in place"),
    (reduced, "the result has shape (3, 100), expected (3, 60, 100)"),
    (raises, "your function raised RuntimeError: nope"),
])
def test_diagnoses(fn, expected, capsys):
    assert ch07.check_per_seed_batch_norm(fn) is False
    out = capsys.readouterr().out
    assert expected in out, out


def test_silent_mode(capsys):
    assert ch07.check_per_seed_batch_norm(correct_via_batchnorm1d, verbose=False)
    assert capsys.readouterr().out == ""


def test_trained_bn_mlp_stand_in():
    """The short-run stand-in is the chapter's BN MLP, in training mode, and the answers of the two exercises
    that use it hold for it: batches of two land between chance and eval mode; scaling the first layer by 0.1
    leaves training-mode predictions alone and ruins eval mode."""
    from bnlib import mnist
    from bnlib.torch_bn import BatchNorm1d

    net = ch07.trained_bn_mlp()
    assert isinstance(net, torch.nn.Sequential) and net.training
    assert sum(isinstance(m, BatchNorm1d) for m in net) == 3
    images, labels = mnist.load_mnist(train=False)
    x = mnist.binarize(images)
    acc_eval = mnist.evaluate(net, x, labels)[1]
    acc_two = mnist.evaluate(net, x, labels, batch_size=2, train_mode=True)[1]
    assert acc_eval > 0.8 and 0.1 < acc_two < acc_eval - 0.05, (acc_eval, acc_two)
    before_train = mnist.evaluate(net, x, labels, 1000, train_mode=True)[1]
    with torch.no_grad():
        net[0].weight.mul_(0.1)
    after_train = mnist.evaluate(net, x, labels, 1000, train_mode=True)[1]
    after_eval = mnist.evaluate(net, x, labels)[1]
    assert abs(after_train - before_train) < 0.005 and after_eval < acc_eval - 0.3, (after_train, after_eval)
