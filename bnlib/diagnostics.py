"""Health diagnostics of deep networks, and Santurkar et al.'s measurements of the optimisation landscape.

Per-layer health checks in the style of Karpathy's "Building makemore, part 3" (activation statistics,
saturated or dead units, gradient statistics, update-to-weight ratios), and the measurements of Santurkar,
Tsipras, Ilyas and Madry (2018), "How Does Batch Normalization Help Optimization?":

* internal covariate shift as gradient change (:func:`ics_gradient_change`): a layer's gradient before and after
  the layers below it take their step, ‖G − G′‖ and cos(G, G′);
* the landscape along the gradient (:func:`landscape_along_gradient`): the loss at w − η g for a range of
  steps η (its range), the change of the gradient ‖g − g_η‖ ("gradient predictiveness") and the effective
  β-smoothness max_η ‖g − g_η‖ / ‖η g‖.

Every function works **per seed**: for the batched-seed models of the book (parameters with a leading seed axis
of size S, a loss function returning the S per-seed losses) norms are taken over every axis but the first and
results have a trailing axis of size S. For an ordinary model pass ``batched=False``: the results have S = 1.

Defined in: chapters/10_why_bn.ipynb
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "seed_norm",
    "seed_dot",
    "layer_stats",
    "grad_stats",
    "update_ratio",
    "frozen_bn_stats",
    "ics_gradient_change",
    "landscape_along_gradient",
]

#: |x| beyond which a unit counts as saturated: sigmoid'(x) < 0.1 (as in chapter 1), |tanh(x)| > 0.97 (Karpathy)
SATURATION = {"sigmoid": 2 * math.atanh(math.sqrt(1 - 4 * 0.1)), "tanh": math.atanh(0.97)}


def _flat(t: torch.Tensor, batched: bool) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if batched else t.reshape(1, -1)


def seed_norm(tensors: Sequence[torch.Tensor], batched: bool = True) -> torch.Tensor:
    """The Euclidean norm of a list of tensors taken together, per seed: shape (S,) (float64).

    Defined in: chapters/10_why_bn.ipynb
    """
    return sum(_flat(t.detach(), batched).double().square().sum(1) for t in tensors).sqrt()


def seed_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], batched: bool = True) -> torch.Tensor:
    """The inner product of two lists of tensors (same shapes), per seed: shape (S,) (float64).

    Defined in: chapters/10_why_bn.ipynb
    """
    return sum((_flat(x.detach(), batched).double() * _flat(y.detach(), batched).double()).sum(1)
               for x, y in zip(a, b))


def layer_stats(preacts: Sequence[torch.Tensor], act: str = "relu", batched: bool = True) -> dict:
    """Per-layer statistics of the pre-activations z_k (each ``(S, N, n)``, or ``(N, n)`` with ``batched=False``).

    Returns a dict of float64 tensors of shape (L, S): ``mean`` and ``std`` of all entries of z_k;
    ``saturated``: for sigmoid and tanh the fraction of entries with |z| beyond :data:`SATURATION`, for ReLU the
    fraction of *dead* units (z <= 0 for every example of the batch); zeros for a linear network.

    Defined in: chapters/10_why_bn.ipynb
    """
    out = {"mean": [], "std": [], "saturated": []}
    for z in preacts:
        z = z.detach().double()
        if not batched:
            z = z.unsqueeze(0)
        flat = z.reshape(z.shape[0], -1)
        out["mean"].append(flat.mean(1))
        out["std"].append(flat.std(1, unbiased=False))
        if act in SATURATION:
            out["saturated"].append((flat.abs() > SATURATION[act]).double().mean(1))
        elif act == "relu":
            out["saturated"].append((z <= 0).all(dim=1).double().mean(-1))
        else:
            out["saturated"].append(torch.zeros(z.shape[0], dtype=torch.float64))
    return {k: torch.stack(v) for k, v in out.items()}


def grad_stats(preacts: Sequence[torch.Tensor], batched: bool = True) -> torch.Tensor:
    """Root-mean-square of dLoss/dz_k per layer and seed, shape (L, S), from the ``.grad`` of retained tensors.

    Call ``z.retain_grad()`` on each pre-activation before ``loss.backward()``.

    Defined in: chapters/10_why_bn.ipynb
    """
    rows = []
    for z in preacts:
        if not (z.is_leaf or z.retains_grad) or z.grad is None:
            raise RuntimeError("a pre-activation has no .grad: call retain_grad() on it before backward()")
        g = _flat(z.grad, batched).double()
        rows.append(g.square().mean(1).sqrt())
    return torch.stack(rows)


def update_ratio(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor], batched: bool = True) -> torch.Tensor:
    """‖W_after − W_before‖ / ‖W_before‖ for each tensor, per seed: shape (len(before), S).

    Karpathy's rule of thumb: an update about 1e-3 of the weight (log10 ≈ −3) per step is healthy; much less
    and the layer learns slowly, much more and it is unstable.

    Defined in: chapters/10_why_bn.ipynb
    """
    rows = [seed_norm([a - b], batched) / seed_norm([b], batched) for b, a in zip(before, after)]
    return torch.stack(rows)


@contextlib.contextmanager
def frozen_bn_stats(module: torch.nn.Module):
    """Inside the block, batch-norm layers in training mode normalise with batch statistics but leave their
    running estimates unchanged (momentum 0, and ``num_batches_tracked`` restored), so measurements that run
    extra forward passes do not disturb the model.

    Defined in: chapters/10_why_bn.ipynb
    """
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def _grads(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list]:
    losses = loss_fn()
    grads = torch.autograd.grad(losses.sum(), list(params), allow_unused=True)
    return losses.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def ics_gradient_change(loss_fn: Callable[[], torch.Tensor], layers: Sequence[Sequence[torch.Tensor]], lr: float,
                        batched: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Santurkar et al.'s internal covariate shift of every layer: how much its gradient changes when the layers
    below it take their gradient step.

    ``layers``: the parameters of each layer in forward order (a list of lists); ``loss_fn()``: the per-seed
    losses (shape (S,), or a scalar for ``batched=False``) on a *fixed* batch (with fixed noise, if any).
    For layer i, G_i = ∇_{W_i} L(W_1, …, W_k) and
    G′_i = ∇_{W_i} L(W_1 − lr·G_1, …, W_{i−1} − lr·G_{i−1}, W_i, …, W_k), every gradient taken on the same batch.
    The parameters are restored afterwards.

    Returns ``(l2, cos)``, each of shape (k, S): ‖G_i − G′_i‖ and cos(G_i, G′_i) (float64; layer 0 has nothing
    below it: 0 and 1).

    Defined in: chapters/10_why_bn.ipynb
    """
    flat = [p for layer in layers for p in layer]
    _, g_all = _grads(loss_fn, flat)
    G, pos = [], 0
    for layer in layers:
        G.append(g_all[pos:pos + len(layer)])
        pos += len(layer)
    saved = [p.detach().clone() for p in flat]
    l2, cos = [], []
    try:
        for i, layer in enumerate(layers):
            with torch.no_grad():  # W_j ← W_j − lr G_j for j < i (from the original point)
                for j in range(i):
                    for p, g in zip(layers[j], G[j]):
                        p.sub_(lr * g)
            _, G2 = _grads(loss_fn, list(layer))
            diff = [a - b for a, b in zip(G[i], G2)]
            l2.append(seed_norm(diff, batched))
            denom = seed_norm(G[i], batched) * seed_norm(G2, batched)
            cos.append(seed_dot(G[i], G2, batched) / denom.clamp_min(1e-300))
            with torch.no_grad():
                for p, s in zip(flat, saved):
                    p.copy_(s)
    finally:
        with torch.no_grad():
            for p, s in zip(flat, saved):
                p.copy_(s)
    return torch.stack(l2), torch.stack(cos)


def landscape_along_gradient(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                             etas: Sequence[float], batched: bool = True) -> dict:
    """The loss and its gradient along the gradient direction, as in Santurkar et al.'s Figure 4.

    With g = ∇L(w) at the current parameters, for each step η in ``etas``: the loss L(w − η g) and
    ‖∇L(w) − ∇L(w − η g)‖ (all parameters in ``params`` move; the batch is the one ``loss_fn`` uses).
    Parameters are restored afterwards.

    Returns float64 tensors: ``loss`` (E, S), ``grad_change`` (E, S), ``loss_range`` (S,): max − min of L over
    the steps (and the starting point), ``beta`` (S,): the effective β-smoothness max_η ‖g − g_η‖ / (η ‖g‖),
    ``grad_norm`` (S,).

    Defined in: chapters/10_why_bn.ipynb
    """
    params = list(params)
    loss0, g = _grads(loss_fn, params)
    loss0 = loss0.double().reshape(-1)
    gnorm = seed_norm(g, batched)
    saved = [p.detach().clone() for p in params]
    losses, changes = [], []
    try:
        for eta in etas:
            with torch.no_grad():
                for p, s, gi in zip(params, saved, g):
                    p.copy_(s - eta * gi)
            le, ge = _grads(loss_fn, params)
            losses.append(le.double().reshape(-1))
            changes.append(seed_norm([a - b for a, b in zip(g, ge)], batched))
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    loss, change = torch.stack(losses), torch.stack(changes)
    steps = torch.tensor([float(e) for e in etas], dtype=torch.float64)[:, None]
    all_losses = torch.cat([loss0[None], loss])
    return {"loss": loss, "grad_change": change,
            "loss_range": all_losses.max(0).values - all_losses.min(0).values,
            "beta": (change / (steps * gnorm.clamp_min(1e-300))).max(0).values, "grad_norm": gnorm}
