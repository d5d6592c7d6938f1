"""The chapter 7 checker accepts correct implementations and diagnoses each mistake it names."""

from __future__ import annotations

import pytest
import torch

from bnlib.exercises import ch07


def correct_via_batchnorm1d(h, eps):
    """An independent correct solution: torch's BatchNorm1d on the (N, S·n) view."""
    S, N, n = h.shape
    z = torch.nn.functional.batch_norm(h.transpose(0, 1).reshape(N, S * n), None, None, training=True, eps=eps)
    return z.reshape(N, S, n).transpose(0, 1)


def test_reference_matches_torch():
    h = torch.randn(3, 10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ch07.reference_per_seed_batch_norm(h), correct_via_batchnorm1d(h, 1e-5))


def test_accepts_correct(capsys):
    assert ch07.check_per_seed_batch_norm(correct_via_batchnorm1d)
    assert ch07.check_per_seed_batch_norm(ch07.reference_per_seed_batch_norm)
    assert "All cases match" in capsys.readouterr().out


@pytest.mark.parametrize("mistake", list(ch07._MISTAKES))
def test_diagnoses_each_mistake(mistake, capsys):
    wrong, _ = ch07._MISTAKES[mistake]
    assert not ch07.check_per_seed_batch_norm(wrong)
    out = capsys.readouterr().out
    assert f"Likely cause: {mistake}:" in out, out


def test_reports_shape_and_exceptions(capsys):
    assert not ch07.check_per_seed_batch_norm(lambda h, eps: h.mean(1))
    assert "expected a tensor of shape" in capsys.readouterr().out

    def boom(h, eps):
        raise RuntimeError("nope")

    assert not ch07.check_per_seed_batch_norm(boom)
    assert "raised RuntimeError: nope" in capsys.readouterr().out


def test_silent_mode(capsys):
    assert ch07.check_per_seed_batch_norm(correct_via_batchnorm1d, verbose=False)
    assert capsys.readouterr().out == ""
