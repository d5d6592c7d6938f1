"""The chapter 10 checkers accept correct implementations and diagnose each mistake they name.

Every wrong implementation below is written by hand, the way a reader would write it (never taken from the
checkers' own tables), and the tests assert the verdict and the diagnosis printed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnlib.exercises import ch10


# ------------------------------------------------------------------------------------------ gradient change
def gc_correct(G, G_prime):
    a, b = G.flatten(), G_prime.flatten()
    return torch.dist(a, b), torch.dot(a, b) / (a.norm() * b.norm())


def gc_correct_numpy_style(G, G_prime):
    d = (G - G_prime).reshape(-1)
    l2 = torch.sqrt((d * d).sum())
    cos = torch.nn.functional.cosine_similarity(G.reshape(1, -1), G_prime.reshape(1, -1), eps=0.0)[0]
    return l2, cos


def gc_norm_difference(G, G_prime):
    return (G.norm() - G_prime.norm()).abs(), (G * G_prime).sum() / (G.norm() * G_prime.norm())


def gc_squared(G, G_prime):
    return ((G - G_prime) ** 2).sum(), (G * G_prime).sum() / (G.norm() * G_prime.norm())


def gc_relative(G, G_prime):
    return (G - G_prime).norm() / G.norm(), (G * G_prime).sum() / (G.norm() * G_prime.norm())


def gc_dot(G, G_prime):
    return (G - G_prime).norm(), (G * G_prime).sum()


def gc_dot_over_G2(G, G_prime):
    return (G - G_prime).norm(), (G * G_prime).sum() / (G * G).sum()


def gc_mean(G, G_prime):
    return (G - G_prime).norm(), (G * G_prime).mean() / (G.norm() * G_prime.norm())


def gc_float(G, G_prime):
    return float((G - G_prime).norm()), float((G * G_prime).sum() / (G.norm() * G_prime.norm()))


def gc_in_place(G, G_prime):
    G -= G_prime
    return G.norm(), torch.tensor(1.0, dtype=torch.float64)


@pytest.mark.parametrize("fn", [gc_correct, gc_correct_numpy_style])
def test_gradient_change_accepts_correct(fn, capsys):
    assert ch10.check_gradient_change(fn) is True
    assert "all 4 cases pass" in capsys.readouterr().out


@pytest.mark.parametrize("fn, words", [
    (gc_norm_difference, "difference of the norms"),
    (gc_squared, "squared distance"),
    (gc_relative, "relative change"),
    (gc_dot, "without dividing"),
    (gc_dot_over_G2, "divided by ‖G‖²"),
    (gc_mean, "a mean over entries"),
    (gc_float, "l2 is float, expected a tensor"),
    (gc_in_place, "modified G in place"),
])
def test_gradient_change_diagnoses(fn, words, capsys):
    assert ch10.check_gradient_change(fn) is False
    assert words in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- effective beta
def beta_correct(g, grads, etas):
    return max(torch.linalg.norm(g - ge) / (eta * torch.linalg.norm(g)) for ge, eta in zip(grads, etas))


def beta_correct_vectorised(g, grads, etas):
    return ((grads - g).norm(dim=1) / etas).amax() / g.norm()


def beta_eta_only(g, grads, etas):
    return ((grads - g).norm(dim=1) / etas).max()


def beta_no_step(g, grads, etas):
    return (grads - g).norm(dim=1).max()


def beta_mean(g, grads, etas):
    return ((grads - g).norm(dim=1) / (etas * g.norm())).mean()


def beta_min(g, grads, etas):
    return ((grads - g).norm(dim=1) / (etas * g.norm())).min()


def beta_norm_change(g, grads, etas):
    return ((grads.norm(dim=1) - g.norm()).abs() / (etas * g.norm())).max()


def beta_first_two_steps(g, grads, etas):
    return torch.maximum((grads[0] - g).norm() / etas[0], (grads[1] - g).norm() / etas[1]) / g.norm()


def beta_last_step_only(g, grads, etas):
    return (grads[-1] - g).norm() / (etas[-1] * g.norm())


@pytest.mark.parametrize("fn", [beta_correct, beta_correct_vectorised])
def test_effective_beta_accepts_correct(fn, capsys):
    assert ch10.check_effective_beta(fn) is True
    assert "all 4 cases pass" in capsys.readouterr().out


@pytest.mark.parametrize("fn, words", [
    (beta_eta_only, "divided by η only"),
    (beta_no_step, "largest gradient change"),
    (beta_mean, "the mean over the steps"),
    (beta_min, "the minimum over the steps"),
    (beta_norm_change, "a change of norms"),
    (beta_last_step_only, "only the last (largest) step"),
    (beta_first_two_steps, "not a mistake this checker recognises"),
])
def test_effective_beta_diagnoses(fn, words, capsys):
    assert ch10.check_effective_beta(fn) is False
    assert words in capsys.readouterr().out


def test_references_against_numpy():
    rng = np.random.default_rng(3)
    G, Gp = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    l2, cos = ch10.reference_gradient_change(torch.tensor(G), torch.tensor(Gp))
    assert l2.item() == pytest.approx(np.linalg.norm(G - Gp), rel=1e-12)
    assert cos.item() == pytest.approx((G * Gp).sum() / np.linalg.norm(G) / np.linalg.norm(Gp), rel=1e-12)
    g, grads, etas = rng.standard_normal(5), rng.standard_normal((3, 5)), np.array([0.1, 0.2, 0.4])
    beta = ch10.reference_effective_beta(torch.tensor(g), torch.tensor(grads), torch.tensor(etas))
    expected = max(np.linalg.norm(g - grads[e]) / (etas[e] * np.linalg.norm(g)) for e in range(3))
    assert beta.item() == pytest.approx(expected, rel=1e-12)
