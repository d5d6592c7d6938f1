"""Checkers for the coding exercises of chapters/10_why_bn.ipynb: Santurkar et al.'s two measurements.

* ``gradient_change(G, G_prime)``: a layer's gradient before (G) and after (G′) the layers below it are updated,
  as the pair (‖G − G′‖, cos(G, G′)), each a 0-dim tensor (internal covariate shift as gradient change);
* ``effective_beta(g, grads, etas)``: the effective β-smoothness along the gradient,
  max over the steps η_e of ‖g − grads[e]‖ / (η_e ‖g‖), where grads[e] is the gradient at w − η_e g.

Defined in: chapters/10_why_bn.ipynb
"""

from __future__ import annotations

import torch

from bnlib.exercises.harness import Case, Mistake, run

__all__ = ["reference_gradient_change", "check_gradient_change", "reference_effective_beta",
           "check_effective_beta"]


def reference_gradient_change(G: torch.Tensor, G_prime: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖G − G′‖₂ over all entries, cos(G, G′) = ⟨G, G′⟩ / (‖G‖ ‖G′‖)), two 0-dim tensors."""
    l2 = torch.linalg.vector_norm(G - G_prime)
    cos = (G * G_prime).sum() / (torch.linalg.vector_norm(G) * torch.linalg.vector_norm(G_prime))
    return l2, cos


def _gc_cases() -> list[Case]:
    g = torch.Generator().manual_seed(10)
    G = torch.randn(5, 4, generator=g, dtype=torch.float64)
    near = G + 0.1 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    big = 30 * torch.randn(3, 7, generator=g, dtype=torch.float64)
    big2 = 0.5 * big + 10 * torch.randn(3, 7, generator=g, dtype=torch.float64)  # another norm and direction
    v = torch.randn(6, generator=g, dtype=torch.float64)
    cases = [("a 5x4 gradient and a nearby one", G, near), ("gradients of different norms", big, big2),
             ("the same gradient", v, v.clone()), ("opposite gradients", v, -2 * v)]
    return [Case(name, (a, b), reference_gradient_change(a, b), (1e-10, 1e-10)) for name, a, b in cases]


def _gc_mistakes(case):
    G, Gp = case.args
    nG, nGp = torch.linalg.vector_norm(G), torch.linalg.vector_norm(Gp)
    l2, cos = case.expected
    dot = (G * Gp).sum()
    return [
        Mistake("the difference of the norms, |‖G‖ − ‖G′‖|, instead of the norm of the difference ‖G − G′‖ "
                "(two gradients of equal norm can point in opposite directions)", lambda c: ((nG - nGp).abs(), None)),
        Mistake("the squared distance ‖G − G′‖²: take the square root", lambda c: (l2 ** 2, None)),
        Mistake("a relative change ‖G − G′‖ / ‖G‖: the exercise asks for the plain distance",
                lambda c: (l2 / nG, None)),
        Mistake("the inner product ⟨G, G′⟩ without dividing by ‖G‖ ‖G′‖: that is not a cosine",
                lambda c: (None, dot)),
        Mistake("the inner product divided by ‖G‖² instead of ‖G‖ ‖G′‖", lambda c: (None, dot / nG ** 2)),
        Mistake("a mean over entries (G * G′).mean() in the cosine instead of the sum",
                lambda c: (None, (G * Gp).mean() / (nG * nGp))),
    ]


def check_gradient_change(fn, verbose: bool = True) -> bool:
    """Run ``fn(G, G_prime)`` on four float64 cases against (‖G − G′‖, cos(G, G′)); print a diagnosis of the first
    failure; True if every case agrees to 1e-10."""
    return run(fn, _gc_cases(), inputs=("G", "G_prime"), outputs=("l2", "cos"), mistakes=_gc_mistakes,
               unknown="compare with torch.linalg.vector_norm(G - G_prime) and the cosine of the two flattened "
                       "gradients",
               summary="the distance and the cosine of two gradients", verbose=verbose)


def reference_effective_beta(g: torch.Tensor, grads: torch.Tensor, etas: torch.Tensor) -> torch.Tensor:
    """g ``(d,)``, grads ``(E, d)`` (the gradient at w − η_e g), etas ``(E,)`` → max_e ‖g − grads[e]‖ / (η_e ‖g‖)."""
    change = torch.linalg.vector_norm(g[None] - grads, dim=1)
    return (change / (etas * torch.linalg.vector_norm(g))).max()


def _quadratic_case(name: str, seed: int, scale: float, etas, d: int = 6, cubic: float = 0.0,
                    saturate: bool = False) -> Case:
    """Gradients H w + cubic * w² (of 1/2 w^T H w + cubic * sum(w³) / 3), or tanh(H w) with ``saturate`` (the
    ratio then falls with the step, so the largest is the first), along the gradient."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=gen, dtype=torch.float64)
    H = scale * (A @ A.T + torch.eye(d, dtype=torch.float64))
    w = torch.randn(d, generator=gen, dtype=torch.float64)

    def grad(v):
        return torch.tanh(H @ v) if saturate else H @ v + cubic * v ** 2

    g = grad(w)
    etas = torch.tensor(etas, dtype=torch.float64)
    grads = torch.stack([grad(w - e * g) for e in etas])
    return Case(name, (g, grads, etas), reference_effective_beta(g, grads, etas), 1e-10)


def _beta_cases() -> list[Case]:
    return [_quadratic_case("a quadratic, three steps", 11, 1.0, [0.01, 0.02, 0.05]),
            _quadratic_case("a cubic term: the ratio changes with the step", 12, 0.5, [0.001, 0.01, 0.1, 0.3],
                            cubic=3.0),
            _quadratic_case("a saturating gradient: the first step is the steepest", 14, 1.0, [0.01, 0.5, 2.0],
                            saturate=True),
            _quadratic_case("a steep quadratic, one step", 13, 50.0, [1e-4])]


def _beta_mistakes(case):
    g, grads, etas = case.args
    change = torch.linalg.vector_norm(g[None] - grads, dim=1)
    ng = torch.linalg.vector_norm(g)
    return [
        Mistake("divided by η only: the distance moved is ‖η g‖ = η ‖g‖", lambda c: (change / etas).max()),
        Mistake("not divided by the step η ‖g‖: that is the largest gradient change, not a smoothness",
                lambda c: change.max()),
        Mistake("the mean over the steps: β is the worst case, the maximum", lambda c: (change / (etas * ng)).mean()),
        Mistake("only the last (largest) step: β is the maximum over every step, and the steepest may be the first",
                lambda c: change[-1] / (etas[-1] * ng)),
        Mistake("the minimum over the steps: β is the worst case, the maximum", lambda c: (change / (etas * ng)).min()),
        Mistake("‖grads[e]‖ − ‖g‖ (a change of norms) instead of ‖g − grads[e]‖",
                lambda c: ((torch.linalg.vector_norm(grads, dim=1) - ng).abs() / (etas * ng)).max()),
    ]


def check_effective_beta(fn, verbose: bool = True) -> bool:
    """Run ``fn(g, grads, etas)`` on four float64 cases against the effective β-smoothness; print a diagnosis of the
    first failure; True if every case agrees to 1e-10 (relative)."""
    return run(fn, _beta_cases(), inputs=("g", "grads", "etas"), outputs=("beta",), mistakes=_beta_mistakes,
               unknown="for each step compute ‖g − grads[e]‖, divide by the distance moved η_e ‖g‖, keep the largest",
               summary="the effective β-smoothness along the gradient", rel=True, verbose=verbose)
