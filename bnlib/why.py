"""Why does batch norm help? The experiments of chapter 10, each for several seeds at once.

* :class:`DeepMLP`: a fully connected network for ``S`` seeds at once (weights ``(S, in, out)``), plain or
  residual, with no normalisation, batch norm (bnlib's :class:`bnlib.torch_bn.BatchNorm1d`, optionally over
  ghost batches, optionally followed by the noise of "noisy BN") or Santurkar et al.'s ℓ1/ℓ2/ℓ∞ variants; ReLU,
  sigmoid, tanh or linear units; dropout.
* :class:`NoisyBN`: the noise of noisy BN, chapter 1's schedule (:class:`bnlib.motivation.BNNoise`) per seed.
* :func:`train`: minibatch SGD of every seed on its own batches, with a callback for measurements.
* :class:`DeepCNN`: the same for plain or residual 3×3 convolutional networks (grouped convolutions, bnlib's
  :class:`bnlib.torch_bn.BatchNorm2d`), for the CNN half of the depth study.
* The experiments behind ``python -m bnlib why --part depth|depth-cnn|lr|wd|reg|smooth`` (:func:`run_part`),
  whose results are committed under ``results/why_*.json``.

Defined in: chapters/10_why_bn.ipynb
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from bnlib import diagnostics as dg
from bnlib.data import binarize, load_mnist
from bnlib.mnist import batch_indices, progress_bar
from bnlib.torch_bn import BatchNorm1d, BatchNorm2d

__all__ = ["DeepMLP", "DeepCNN", "NoisyBN", "DepthConfig", "DepthCNNConfig", "mnist_images", "depth_cnn_experiment",
           "LRConfig", "WDConfig", "RegConfig", "SmoothConfig",
           "mnist_subset", "train", "evaluate", "seed_losses", "init_diagnostics",
           "PARTS", "run_part", "run_and_save", "depth_experiment", "lr_experiment", "wd_experiment",
           "reg_experiment", "smooth_experiment", "summarize", "pm", "markdown_table", "distribution_shift"]

ACTS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "linear": lambda x: x}
NORMS = ("none", "bn", "l1", "l2", "linf")


class NoisyBN:
    """The noise of "noisy BatchNorm" for ``S`` seeds: z → scale·z + shift after each normalisation.

    Chapter 1's schedule (:class:`bnlib.motivation.BNNoise`), drawn independently for every seed: at each step
    (:meth:`new_step`) each layer and seed draws a mean scale 1 + a·U(0, 1), a mean shift a·U(−1, 1) and a spread
    a·U(0, 1); every activation of every example then gets scale ~ N(mean scale, spread²) and shift ~ N(mean
    shift, spread²) (:meth:`sample`). ``a`` is ``amplitude``.

    Defined in: chapters/10_why_bn.ipynb
    """

    def __init__(self, S: int, n_layers: int, amplitude: float = 1.0, seed: int = 0):
        self.S, self.n_layers, self.amplitude = S, n_layers, amplitude
        self.gen = torch.Generator().manual_seed(seed)
        self.new_step()

    def new_step(self) -> None:
        a, g, S, L = self.amplitude, self.gen, self.S, self.n_layers
        self.mean_scale = 1 + a * torch.rand(L, S, 1, 1, generator=g)
        self.mean_shift = a * (2 * torch.rand(L, S, 1, 1, generator=g) - 1)
        self.spread = a * torch.rand(L, S, 1, 1, generator=g)

    def sample(self, k: int, N: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` for layer ``k``, each ``(S, N, n)``."""
        g, S = self.gen, self.S
        scale = self.mean_scale[k] + self.spread[k] * torch.randn(S, N, n, generator=g)
        shift = self.mean_shift[k] + self.spread[k] * torch.randn(S, N, n, generator=g)
        return scale, shift


class DeepMLP(nn.Module):
    """``S`` independent fully connected networks evaluated as one batched computation.

    ``depth`` hidden layers of ``width`` units, then a linear output layer. Hidden layer k computes
    z_k = norm(h_{k−1} W_k) (z_k = h_{k−1} W_k + b_k without normalisation) and

    * plain: h_k = act(z_k);
    * residual (``residual=True``, layers k ≥ 1): h_k = act(h_{k−1} + z_k). With normalisation, γ of every
      residual layer starts at 0 (``zero_gamma``), so every block starts as the identity (Goyal et al. 2017);
      without, the residual weights start 1/√depth times smaller than He's, so that the sum's variance stays
      bounded (with He's scale it would double per block).

    Initialisation: weights ~ N(0, (init_scale · gain)² / fan_in), gain² = 2 for ReLU (He et al.), 1 otherwise;
    or N(0, init_std²) if ``init_std`` is given (the Figure 1 network). Biases 0; no bias before a normalisation
    (β replaces it). One ``torch.Generator`` per seed.

    ``norm``: ``"none"``; ``"bn"``: batch norm over each seed's minibatch (an affine-free
    :class:`bnlib.torch_bn.BatchNorm1d` over the ``(N, S·n)`` view, so running estimates are kept for eval mode,
    then γ, β of shape (S, 1, n)), over ghost batches of ``ghost`` examples if given; ``"l1"``, ``"l2"``,
    ``"linf"``: Santurkar et al.'s ℓp variants, (z − mean) divided by the batch average of |z − mean| (ℓ1), its
    root mean square (ℓ2, batch norm without ε and running estimates) or its maximum (ℓ∞), always with batch
    statistics. ``noise``: a :class:`NoisyBN`, applied after each normalisation in training mode.
    ``dropout``: dropout with this probability on every hidden layer's output, in training mode.

    Input ``(S, N, in)`` (each seed its own batch) or ``(N, in)`` (shared); output ``(S, N, out)``.

    Defined in: chapters/10_why_bn.ipynb
    """

    def __init__(self, seeds, depth: int, width: int = 64, act: str = "relu", norm: str = "none",
                 residual: bool = False, init_scale: float = 1.0, init_std: float | None = None,
                 in_dim: int = 784, out_dim: int = 10, dropout: float = 0.0, ghost: int | None = None,
                 noise: NoisyBN | None = None, zero_gamma: bool = True, eps: float = 1e-5):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"act must be one of {sorted(ACTS)}, got {act!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.seeds, self.S, self.depth, self.width = tuple(int(s) for s in seeds), len(seeds), depth, width
        self.act, self.norm, self.residual = act, norm, residual
        self.dropout, self.ghost, self.noise = dropout, ghost, noise
        self.eps = eps
        sizes = [in_dim] + [width] * depth + [out_dim]
        gain2 = 2.0 if act == "relu" else 1.0
        gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.gammas, self.betas, self.bns = nn.ParameterList(), nn.ParameterList(), nn.ModuleList()
        for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            last = k == len(sizes) - 2
            if init_std is not None:
                std = init_std
            else:
                std = init_scale * math.sqrt((1.0 if last else gain2) / a)
                if residual and norm == "none" and 1 <= k < depth:
                    std /= math.sqrt(depth)
            w = torch.stack([torch.randn(a, b, generator=g) * std for g in gens])
            self.weights.append(nn.Parameter(w))
            if last or norm == "none":
                self.biases.append(nn.Parameter(torch.zeros(self.S, 1, b)))
            if not last and norm != "none":
                g0 = 0.0 if (residual and zero_gamma and k >= 1) else 1.0
                self.gammas.append(nn.Parameter(torch.full((self.S, 1, b), g0)))
                self.betas.append(nn.Parameter(torch.zeros(self.S, 1, b)))
                if norm == "bn":
                    self.bns.append(BatchNorm1d(self.S * b, eps=eps, affine=False))

    # ------------------------------------------------------------------------------------------ pieces
    def layers(self) -> list[list[nn.Parameter]]:
        """The parameters of each layer in forward order (weights, bias or γ and β), for the diagnostics."""
        out = []
        for k, w in enumerate(self.weights):
            last = k == len(self.weights) - 1
            if self.norm == "none" or last:
                out.append([w, self.biases[k if self.norm == "none" else 0]])
            else:
                out.append([w, self.gammas[k], self.betas[k]])
        return out

    def hidden_weights(self) -> list[nn.Parameter]:
        return list(self.weights[:-1])

    def _normalize(self, k: int, z: torch.Tensor) -> torch.Tensor:
        S, N, n = z.shape
        if self.norm == "bn":
            flat = z.transpose(0, 1).reshape(N, S * n)
            if self.ghost and self.training and self.ghost < N:
                flat = torch.cat([self.bns[k](c) for c in flat.split(self.ghost)])
            else:
                flat = self.bns[k](flat)
            z = flat.reshape(N, S, n).transpose(0, 1)
        else:
            c = z - z.mean(1, keepdim=True)
            if self.norm == "l1":
                d = c.abs().mean(1, keepdim=True)
            elif self.norm == "l2":
                d = c.square().mean(1, keepdim=True).sqrt()
            else:
                d = c.abs().amax(1, keepdim=True)
            z = c / d
        z = z * self.gammas[k] + self.betas[k]
        if self.noise is not None and self.training:
            scale, shift = self.noise.sample(k, N, n)
            z = z * scale + shift
        return z

    def forward(self, x: torch.Tensor, record: list | None = None) -> torch.Tensor:
        """Logits ``(S, N, out)``; if ``record`` is a list, the pre-activations z_k are appended to it (with
        ``retain_grad()`` when they require a gradient, for :func:`bnlib.diagnostics.grad_stats`)."""
        if x.dim() == 2:
            x = x.expand(self.S, *x.shape)
        f = ACTS[self.act]
        h = x
        L = len(self.weights)
        for k in range(L - 1):
            if self.norm == "none":
                z = torch.baddbmm(self.biases[k], h, self.weights[k])
            else:
                z = self._normalize(k, torch.bmm(h, self.weights[k]))
            if record is not None:
                if z.requires_grad:
                    z.retain_grad()
                record.append(z)
            h = f(h + z) if (self.residual and k >= 1) else f(z)
            if self.dropout and self.training:
                h = F.dropout(h, self.dropout, training=True)
        return torch.baddbmm(self.biases[-1], h, self.weights[-1])


class DeepCNN(nn.Module):
    """``S`` independent plain or residual convolutional networks evaluated as one batched computation.

    The CNN counterpart of :class:`DeepMLP` for the depth study. Input images ``(N, 1, H, W)`` (shared) or
    ``(S, N, 1, H, W)`` (each seed its own batch). Layer 0 is a 3×3 convolution 1 → ``channels``; layers
    1 … depth−1 are 3×3 convolutions ``channels`` → ``channels`` (padding 1, stride 1: the resolution never
    changes); then global average pooling and a linear output layer. Layer k computes z_k = norm(conv(h_{k−1}))
    (conv + bias without normalisation) and, as in :class:`DeepMLP`, h_k = relu(z_k) (plain) or
    h_k = relu(h_{k−1} + z_k) for k ≥ 1 (``residual=True``), with γ of every residual layer starting at 0 under
    BN and the residual weights 1/√depth times smaller than He's without.

    Initialisation: weights ~ N(0, 2 init_scale² / fan_in), fan_in = 9 × input channels (He et al.); the output
    layer N(0, 1/channels); biases 0. One ``torch.Generator`` per seed, so a seed's network does not depend on
    the others. The S networks run as one grouped convolution (``groups=S``) over ``(N, S·C, H, W)``; ``"bn"``
    is an affine-free :class:`bnlib.torch_bn.BatchNorm2d` over the S·C channels (each seed's channel is
    normalised over its own minibatch and positions), then per-seed γ, β.

    Output ``(S, N, 10)``; ``forward(x, record=list)`` appends each z_k as ``(S, N·H·W, C)`` (a channel is a
    "unit" for :func:`bnlib.diagnostics.layer_stats`; dead = never positive on the batch).

    Defined in: chapters/10_why_bn.ipynb
    """

    act = "relu"
    noise = None

    def __init__(self, seeds, depth: int, channels: int = 8, norm: str = "none", residual: bool = False,
                 init_scale: float = 1.0, out_dim: int = 10, zero_gamma: bool = True, eps: float = 1e-5):
        super().__init__()
        if norm not in ("none", "bn"):
            raise ValueError(f"norm must be 'none' or 'bn', got {norm!r}")
        self.seeds, self.S, self.depth, self.channels = tuple(int(s) for s in seeds), len(seeds), depth, channels
        self.norm, self.residual = norm, residual
        gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        S, C = self.S, channels
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.gammas, self.betas, self.bns = nn.ParameterList(), nn.ParameterList(), nn.ModuleList()
        for k in range(depth):
            cin = 1 if k == 0 else C
            std = init_scale * math.sqrt(2.0 / (9 * cin))
            if residual and norm == "none" and k >= 1:
                std /= math.sqrt(depth)
            w = torch.cat([torch.randn(C, cin, 3, 3, generator=g) * std for g in gens])  # (S·C, cin, 3, 3)
            self.weights.append(nn.Parameter(w))
            if norm == "none":
                self.biases.append(nn.Parameter(torch.zeros(S * C)))
            else:
                g0 = 0.0 if (residual and zero_gamma and k >= 1) else 1.0
                self.gammas.append(nn.Parameter(torch.full((1, S * C, 1, 1), g0)))
                self.betas.append(nn.Parameter(torch.zeros(1, S * C, 1, 1)))
                self.bns.append(BatchNorm2d(S * C, eps=eps, affine=False))
        w = torch.stack([torch.randn(C, out_dim, generator=g) / math.sqrt(C) for g in gens])
        self.weights.append(nn.Parameter(w))
        self.out_bias = nn.Parameter(torch.zeros(S, 1, out_dim))

    def hidden_weights(self) -> list[nn.Parameter]:
        return list(self.weights[:-1])

    def forward(self, x: torch.Tensor, record: list | None = None) -> torch.Tensor:
        S, C = self.S, self.channels
        if x.dim() == 4:  # shared (N, 1, H, W)
            x = x.expand(S, *x.shape)
        N, H, W = x.shape[1], x.shape[-2], x.shape[-1]
        h = x.transpose(0, 1).reshape(N, S, H, W)  # (N, S·1, H, W)
        for k in range(self.depth):
            if self.norm == "none":
                z = F.conv2d(h, self.weights[k], self.biases[k], padding=1, groups=S)
            else:
                z = self.bns[k](F.conv2d(h, self.weights[k], padding=1, groups=S))
                z = z * self.gammas[k] + self.betas[k]
            if record is not None:  # route the graph through an (S, N·H·W, C) view so its .grad is recorded
                v = z.reshape(N, S, C, H, W).permute(1, 0, 3, 4, 2).reshape(S, N * H * W, C)
                if v.requires_grad:
                    v.retain_grad()
                record.append(v)
                z = v.reshape(S, N, H, W, C).permute(1, 0, 4, 2, 3).reshape(N, S * C, H, W)
            h = torch.relu(h + z) if (self.residual and k >= 1) else torch.relu(z)
        pooled = h.mean((2, 3)).reshape(N, S, C).transpose(0, 1)  # (S, N, C)
        return torch.baddbmm(self.out_bias, pooled, self.weights[-1])


def mnist_images(n_train: int, n_test: int, seed: int = 0, pool: int = 2, root=None):
    """``(x_train, y_train, x_test, y_test)`` as images ``(N, 1, 28/pool, 28/pool)``: :func:`mnist_subset`'s
    examples (the same seeded draw, standardised the same way), average-pooled ``pool`` × ``pool``.

    Defined in: chapters/10_why_bn.ipynb
    """
    xtr, ytr, xte, yte = mnist_subset(n_train, n_test, seed, root=root)

    def img(x):
        x = x.reshape(-1, 1, 28, 28)
        return F.avg_pool2d(x, pool) if pool > 1 else x

    return img(xtr), ytr, img(xte), yte


# --------------------------------------------------------------------------------------------- training
def mnist_subset(n_train: int, n_test: int, seed: int = 0, binary: bool = False, root=None):
    """``(x_train, y_train, x_test, y_test)``: the first ``n_test`` test images and ``n_train`` training images
    drawn without replacement by a seeded permutation; inputs ``(N, 784)`` float32, standardised with the
    training subset's pixel mean and std (or binarised at 0.5 as in Figure 1, ``binary=True``).

    Defined in: chapters/10_why_bn.ipynb
    """
    xtr, ytr = load_mnist(True, root)
    xte, yte = load_mnist(False, root)
    idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[:n_train]
    xtr, ytr, xte, yte = xtr[idx], ytr[idx], xte[:n_test], yte[:n_test]
    if binary:
        return binarize(xtr), ytr, binarize(xte), yte
    xtr, xte = xtr.reshape(len(xtr), -1).float() / 255, xte.reshape(len(xte), -1).float() / 255
    mu, sd = xtr.mean(), xtr.std()
    return (xtr - mu) / sd, ytr, (xte - mu) / sd, yte


def seed_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each seed: logits ``(S, N, C)``, labels ``(S, N)`` or ``(N,)`` → ``(S,)``.

    Defined in: chapters/10_why_bn.ipynb
    """
    S, N, C = logits.shape
    y = y.expand(S, N) if y.dim() == 1 else y
    return F.cross_entropy(logits.reshape(S * N, C), y.reshape(-1), reduction="none").reshape(S, N).mean(1)


@torch.no_grad()
def evaluate(model: DeepMLP, x: torch.Tensor, y: torch.Tensor, train_mode: bool = False) -> dict:
    """Per-seed loss and accuracy on shared data ``x`` ``(N, in)``, in eval mode (running estimates) unless
    ``train_mode``; lists of S floats.

    Defined in: chapters/10_why_bn.ipynb
    """
    was = model.training
    model.train(train_mode)
    with dg.frozen_bn_stats(model):
        logits = model(x)
    model.train(was)
    loss = seed_losses(logits, y)
    acc = (logits.argmax(-1) == y).double().mean(1)
    return {"loss": loss.tolist(), "accuracy": acc.tolist()}


def train(model: DeepMLP, data, steps: int, batch_size: int = 64, lr: float = 0.1, momentum: float = 0.0,
          weight_decay: float = 0.0, hidden_lr: float | None = None, on_step=None, data_seed: int = 0,
          progress: bool = False, desc: str = "") -> dict:
    """Minibatch SGD of every seed of ``model`` on its own batches (seed s: permutation seed data_seed + s).

    ``data``: ``(x_train, y_train, ...)``. The loss is the sum of the per-seed mean cross-entropies, so each seed
    gets exactly its own gradient. ``weight_decay`` applies to the weights only; ``hidden_lr`` (default ``lr``)
    is the rate of the hidden weights. ``on_step(step, model, x, y)`` runs before each update (and once after
    the last, with ``x = y = None``). Returns the per-step training losses ``(steps, S)`` as ``losses`` and
    ``diverged``: per seed, whether a loss was not finite.

    Defined in: chapters/10_why_bn.ipynb
    """
    xtr, ytr = data[0], data[1]
    hidden = set(map(id, model.hidden_weights()))
    groups = [
        {"params": model.hidden_weights(), "weight_decay": weight_decay, "lr": lr if hidden_lr is None else hidden_lr},
        {"params": [model.weights[-1]], "weight_decay": weight_decay},
        {"params": [p for p in model.parameters() if id(p) not in hidden and p is not model.weights[-1]],
         "weight_decay": 0.0},
    ]
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    seeds = [data_seed + s for s in range(model.S)]
    losses = torch.empty(steps, model.S)
    model.train()
    it = batch_indices(len(xtr), batch_size, seeds, steps)
    for step, idx in enumerate(progress_bar(it, total=steps, desc=desc, progress=progress)):
        x, y = xtr[idx], ytr[idx]
        if model.noise is not None:
            model.noise.new_step()
        if on_step is not None:
            on_step(step, model, x, y)
        per_seed = seed_losses(model(x), y)
        losses[step] = per_seed.detach()
        opt.zero_grad(set_to_none=True)
        per_seed.sum().backward()
        opt.step()
    if on_step is not None:
        on_step(steps, model, None, None)
    return {"losses": losses, "diverged": (~torch.isfinite(losses)).any(0).tolist()}


def init_diagnostics(model: DeepMLP, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One forward and backward pass in training mode: per-layer statistics of the pre-activations and of their
    gradients, float64 tensors of shape (L, S) (:func:`bnlib.diagnostics.layer_stats`, ``grad_rms``).

    Defined in: chapters/10_why_bn.ipynb
    """
    rec: list = []
    with dg.frozen_bn_stats(model):
        was = model.training
        model.train()
        if model.noise is not None:
            model.noise.new_step()
        seed_losses(model(x, record=rec), y).sum().backward()
        model.train(was)
    out = dg.layer_stats(rec, model.act)
    out["grad_rms"] = dg.grad_stats(rec)
    model.zero_grad(set_to_none=True)
    return out


def _ms(values) -> list[float]:
    """[mean, std over seeds] of a list of numbers (population std; NaN-aware: non-finite values give NaN)."""
    t = torch.as_tensor(values, dtype=torch.float64)
    return [float(t.mean()), float(t.std(unbiased=False))]


def _tail(losses: torch.Tensor, n: int = 50) -> list[float]:
    return losses[-n:].double().mean(0).tolist()


# ------------------------------------------------------------------------------------------ experiments
@dataclass
class DepthConfig:
    """Part 1: depth with and without BN, plain and residual. Every choice, in one place.

    Defined in: chapters/10_why_bn.ipynb
    """

    seeds: tuple = (0, 1, 2)
    depths: tuple = (4, 8, 16, 32, 64, 128)
    archs: tuple = ("plain", "plain+bn", "res", "res+bn")
    width: int = 64
    n_train: int = 10_000
    n_test: int = 2_000
    steps: int = 300               # fixed budget: steps × batch_size = 19,200 examples (1.9 epochs)
    batch_size: int = 64
    momentum: float = 0.9
    lrs: tuple = (0.01, 0.03, 0.1)   # rule: per architecture, the best of these at tune_depth (mean final loss)
    tune_depth: int = 8
    threads: int = 1


def _arch(name: str) -> dict:
    return {"residual": name.startswith("res"), "norm": "bn" if name.endswith("+bn") else "none"}


def _depth_study(cfg, data, make, progress: bool) -> dict:
    """The depth study for any model family: ``make(depth, arch)`` builds the S-seed model of an architecture."""
    xb, yb = data[0][:256], data[1][:256]
    out = {"config": _jsonable(asdict(cfg)), "tuning": {}, "runs": {}}
    for arch in cfg.archs:
        best = None
        for lr in cfg.lrs:
            m = make(cfg.tune_depth, arch)
            r = train(m, data, cfg.steps, cfg.batch_size, lr, cfg.momentum, progress=progress,
                      desc=f"tune {arch} lr={lr}")
            loss = _ms(_tail(r["losses"]))[0]
            out["tuning"].setdefault(arch, {})[str(lr)] = loss
            if math.isfinite(loss) and (best is None or loss < best[1]):
                best = (lr, loss)
        lr = best[0] if best else min(cfg.lrs)
        for depth in cfg.depths:
            m = make(depth, arch)
            diag = init_diagnostics(m, xb, yb)
            t0 = time.perf_counter()
            r = train(m, data, cfg.steps, cfg.batch_size, lr, cfg.momentum, progress=progress,
                      desc=f"{arch} depth {depth}")
            ev = evaluate(m, data[2], data[3])
            out["runs"][f"{arch}/{depth}"] = {
                "arch": arch, "depth": depth, "lr": lr, "seconds": time.perf_counter() - t0,
                "train_loss": _tail(r["losses"]), "test_accuracy": ev["accuracy"], "diverged": r["diverged"],
                "init_act_std": diag["std"].mean(1).tolist(), "init_grad_rms": diag["grad_rms"].mean(1).tolist(),
                "init_dead": diag["saturated"].mean(1).tolist(),
            }
    return out


def depth_experiment(cfg: DepthConfig | None = None, progress: bool = False) -> dict:
    """Final training loss and test accuracy against depth, per architecture, with per-layer statistics at
    initialisation (activation std, gradient rms) and the learning rate each architecture was given.

    Defined in: chapters/10_why_bn.ipynb
    """
    cfg = cfg or DepthConfig()
    data = mnist_subset(cfg.n_train, cfg.n_test)
    return _depth_study(cfg, data, lambda d, arch: DeepMLP(cfg.seeds, d, cfg.width, **_arch(arch)), progress)


@dataclass
class DepthCNNConfig:
    """Part 1b: the depth study with plain and residual CNNs (:class:`DeepCNN`), the same rules as
    :class:`DepthConfig`: fixed budget of examples, learning rate the best of ``lrs`` at ``tune_depth``.

    Defined in: chapters/10_why_bn.ipynb
    """

    seeds: tuple = (0, 1, 2)
    depths: tuple = (4, 8, 16, 32, 64, 128)
    archs: tuple = ("plain", "plain+bn", "res", "res+bn")
    channels: int = 8
    pool: int = 2                  # 28×28 average-pooled to 14×14, to fit the budget
    n_train: int = 10_000
    n_test: int = 2_000
    steps: int = 200               # fixed budget: steps × batch_size = 6,400 examples (0.64 epoch)
    batch_size: int = 32
    momentum: float = 0.9
    lrs: tuple = (0.01, 0.03, 0.1)   # rule: per architecture, the best of these at tune_depth (mean final loss)
    tune_depth: int = 8
    threads: int = 1


def depth_cnn_experiment(cfg: DepthCNNConfig | None = None, progress: bool = False) -> dict:
    """:func:`depth_experiment` for :class:`DeepCNN` on average-pooled MNIST images (channels are the units of
    the per-layer statistics).

    Defined in: chapters/10_why_bn.ipynb
    """
    cfg = cfg or DepthCNNConfig()
    data = mnist_images(cfg.n_train, cfg.n_test, pool=cfg.pool)
    return _depth_study(cfg, data, lambda d, arch: DeepCNN(cfg.seeds, d, cfg.channels, **_arch(arch)), progress)


@dataclass
class LRConfig:
    """Part 2: learning rate × init scale, with and without BN; weight norms.

    Defined in: chapters/10_why_bn.ipynb
    """

    seeds: tuple = (0, 1, 2)
    depth: int = 8
    width: int = 64
    n_train: int = 10_000
    n_test: int = 2_000
    steps: int = 300
    batch_size: int = 64
    lrs: tuple = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    init_scales: tuple = (0.25, 1.0, 4.0)
    threads: int = 1


@dataclass
class WDConfig:
    """Part 2b: BN networks with and without weight decay from several init scales; effective rate lr / ‖W‖².

    Defined in: chapters/10_why_bn.ipynb
    """

    seeds: tuple = (0, 1, 2)
    depth: int = 8
    width: int = 64
    n_train: int = 10_000
    n_test: int = 2_000
    batch_size: int = 64
    lr: float = 0.1                  # plain SGD
    init_scales: tuple = (0.25, 1.0, 4.0)
    wds: tuple = (0.0, 0.05)         # 2·lr·wd = 0.01: the initial scale is forgotten over ~100 steps
    steps: int = 1_500
    record_every: int = 50
    threads: int = 1


def _stable(losses: torch.Tensor, diverged: list) -> bool:
    """Stable: every seed's losses finite, and its mean loss over the last 50 steps below ln 10 (chance)."""
    return (not any(diverged)) and all(v < math.log(10) for v in _tail(losses))


def lr_experiment(cfg: LRConfig | None = None, progress: bool = False) -> dict:
    """The lr × init-scale grid (plain SGD) with and without BN, hidden-weight norms before and after.

    Defined in: chapters/10_why_bn.ipynb
    """
    cfg = cfg or LRConfig()
    data = mnist_subset(cfg.n_train, cfg.n_test)
    out = {"config": _jsonable(asdict(cfg)), "grid": {}}
    for norm in ("none", "bn"):
        for c in cfg.init_scales:
            for lr in cfg.lrs:
                m = DeepMLP(cfg.seeds, cfg.depth, cfg.width, norm=norm, init_scale=c)
                w0 = dg.seed_norm(m.hidden_weights()).tolist()
                r = train(m, data, cfg.steps, cfg.batch_size, lr, progress=progress, desc=f"{norm} c={c} lr={lr}")
                w1 = dg.seed_norm(m.hidden_weights()).tolist()
                ev = evaluate(m, data[2], data[3])
                out["grid"][f"{norm}/{c}/{lr}"] = {
                    "norm": norm, "init_scale": c, "lr": lr, "train_loss": _tail(r["losses"]),
                    "test_accuracy": ev["accuracy"], "diverged": r["diverged"],
                    "stable": _stable(r["losses"], r["diverged"]),
                    "weight_norm_init": w0, "weight_norm_final": w1}
    return out


def wd_experiment(cfg: WDConfig | None = None, progress: bool = False) -> dict:
    """BN networks trained by plain SGD with and without weight decay from each init scale, recording every
    ``record_every`` steps the squared norm of each hidden weight matrix and the effective rate lr / ‖W_k‖².

    Defined in: chapters/10_why_bn.ipynb
    """
    cfg = cfg or WDConfig()
    data = mnist_subset(cfg.n_train, cfg.n_test)
    out = {"config": _jsonable(asdict(cfg)), "runs": {}}
    for wd in cfg.wds:
        for c in cfg.init_scales:
            m = DeepMLP(cfg.seeds, cfg.depth, cfg.width, norm="bn", init_scale=c)
            rec = {"step": [], "sq_norm": [], "eff_lr": []}

            def on_step(step, model, x, y, rec=rec):
                if step % cfg.record_every == 0 or x is None:
                    sq = torch.stack([dg.seed_norm([w]) ** 2 for w in model.hidden_weights()])  # (L, S)
                    rec["step"].append(step)
                    rec["sq_norm"].append(sq.mean(0).tolist())
                    rec["eff_lr"].append((cfg.lr / sq).mean(0).tolist())

            r = train(m, data, cfg.steps, cfg.batch_size, cfg.lr, weight_decay=wd, on_step=on_step,
                      progress=progress, desc=f"bn wd={wd} c={c}")
            ev = evaluate(m, data[2], data[3])
            out["runs"][f"{wd}/{c}"] = {"wd": wd, "init_scale": c, **rec, "train_loss": _tail(r["losses"]),
                                        "test_accuracy": ev["accuracy"]}
    return out


@dataclass
class RegConfig:
    """Part 3: train/test gap on a small training set; ghost batch sizes; dropout before BN.

    Defined in: chapters/10_why_bn.ipynb
    """

    seeds: tuple = (0, 1, 2)
    depth: int = 3
    width: int = 256
    n_train: int = 1_000
    n_test: int = 5_000
    steps: int = 1_500              # 48 epochs of 1,000 examples at batch 32
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    dropout: float = 0.5
    ghost_batch: int = 128          # the ghost runs: this batch, statistics over ghost sub-batches
    ghosts: tuple = (4, 16, 128)
    threads: int = 1


def reg_experiment(cfg: RegConfig | None = None, progress: bool = False) -> dict:
    """Train and test accuracy (and their gap) with and without BN and dropout; BN with ghost batches; the
    variance shift of dropout before BN (running variance / the variance BN sees in eval mode).

    Defined in: chapters/10_why_bn.ipynb
    """
    cfg = cfg or RegConfig()
    data = mnist_subset(cfg.n_train, cfg.n_test)
    out = {"config": _jsonable(asdict(cfg)), "runs": {}, "ghost": {}}

    def finish(m, r):
        tr, te = evaluate(m, data[0], data[1]), evaluate(m, data[2], data[3])
        return {"train_accuracy": tr["accuracy"], "test_accuracy": te["accuracy"], "train_loss": tr["loss"],
                "gap": [a - b for a, b in zip(tr["accuracy"], te["accuracy"])], "diverged": r["diverged"]}

    for norm in ("none", "bn"):
        for p in (0.0, cfg.dropout):
            m = DeepMLP(cfg.seeds, cfg.depth, cfg.width, norm=norm, dropout=p)
            r = train(m, data, cfg.steps, cfg.batch_size, cfg.lr, cfg.momentum, progress=progress,
                      desc=f"{norm} dropout {p}")
            res = finish(m, r)
            if norm == "bn" and p > 0:
                res["variance_shift"] = _variance_shift(m, data[0])
                fixed = _eval_with_eval_mode_stats(m, data)
                res["test_accuracy_recomputed_stats"] = fixed
            out["runs"][f"{norm}/{p}"] = res
    for g in cfg.ghosts:
        m = DeepMLP(cfg.seeds, cfg.depth, cfg.width, norm="bn", ghost=g)
        r = train(m, data, cfg.steps, cfg.ghost_batch, cfg.lr, cfg.momentum, progress=progress, desc=f"ghost {g}")
        out["ghost"][str(g)] = finish(m, r)
    return out


@torch.no_grad()
def _eval_mode_bn_inputs(model: DeepMLP, x: torch.Tensor) -> list[torch.Tensor]:
    """The inputs of each BN layer in eval mode (dropout off, running estimates), each (N, S·n)."""
    was = model.training
    model.eval()
    seen = []
    hooks = [bn.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach())) for bn in model.bns]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return seen


def _variance_shift(model: DeepMLP, x: torch.Tensor) -> list[float]:
    """Per BN layer after the first (those fed by dropout), the mean over units of running_var / Var_eval, where
    Var_eval is the variance of the BN input in eval mode over ``x``. Li et al.'s variance shift: > 1 when the
    statistics learnt with dropout overestimate what the layer sees at test time."""
    ins = _eval_mode_bn_inputs(model, x)
    return [float((bn.running_var / z.var(0)).mean()) for bn, z in zip(list(model.bns)[1:], ins[1:])]


def _eval_with_eval_mode_stats(model: DeepMLP, data) -> list[float]:
    """Test accuracy after replacing every running estimate by the statistics of its input in eval mode
    (dropout off), layer by layer, over the training set: the remedy for the variance shift."""
    import copy

    m = copy.deepcopy(model)
    for k, bn in enumerate(m.bns):
        z = _eval_mode_bn_inputs(m, data[0])[k]
        bn.running_mean.copy_(z.mean(0))
        bn.running_var.copy_(z.var(0))
    return evaluate(m, data[2], data[3])["accuracy"]


@dataclass
class SmoothConfig:
    """Part 4: Santurkar et al.'s measurements on the Figure 1 MLP and a deep linear network.

    Defined in: chapters/10_why_bn.ipynb
    """

    seeds: tuple = (0, 1, 2)
    n_train: int = 60_000
    n_test: int = 2_000
    steps: int = 2_000
    batch_size: int = 60
    lr: float = 0.5                    # Figure 1 network: plain SGD, init N(0, 0.1²) as in chapter 1
    init_std: float = 0.1
    variants: tuple = ("standard", "bn", "noisy bn", "l1", "linf")
    noise_amplitude: float = 1.0       # chapter 1's schedule
    measure_every: int = 250
    etas: tuple = (0.25, 0.5, 1.0, 2.0, 4.0)   # steps along the gradient, in units of lr
    dln_depth: int = 16
    dln_width: int = 100
    dln_lr: float = 0.005
    dln_steps: int = 1_500
    threads: int = 1


def _variant(name: str) -> dict:
    return {"standard": {"norm": "none"}, "bn": {"norm": "bn"}, "noisy bn": {"norm": "bn"}}.get(name, {"norm": name})


def _smooth_run(model: DeepMLP, data, cfg: SmoothConfig, lr: float, steps: int, progress: bool, desc: str) -> dict:
    probe_x = data[2][:1000]
    rec = {"step": [], "ics_l2": [], "ics_rel": [], "ics_cos": [], "loss_range": [], "grad_change": [], "beta": [],
           "layer_mean": [], "layer_std": [], "test_accuracy": []}

    def on_step(step, m, x, y):
        if x is None or step % cfg.measure_every:
            return
        rec["step"].append(step)
        with dg.frozen_bn_stats(m):
            def loss_fn():
                return seed_losses(m(x), y)
            if m.noise is not None:  # the same noise for every evaluation of this step's loss
                g = m.noise.gen.get_state()

                def loss_fn():  # noqa: F811
                    m.noise.gen.set_state(g)
                    return seed_losses(m(x), y)
            l2, cos = dg.ics_gradient_change(loss_fn, m.layers(), lr)
            land = dg.landscape_along_gradient(loss_fn, list(m.parameters()), [e * lr for e in cfg.etas])
            _, gl = dg._grads(loss_fn, [p for layer in m.layers() for p in layer])
        pos, rel = 0, []
        for i, layer in enumerate(m.layers()):
            rel.append((l2[i] / dg.seed_norm(gl[pos:pos + len(layer)]).clamp_min(1e-300)).tolist())
            pos += len(layer)
        rec["ics_l2"].append(l2.tolist())
        rec["ics_rel"].append(rel)
        rec["ics_cos"].append(cos.tolist())
        rec["loss_range"].append(land["loss_range"].tolist())
        rec["grad_change"].append(land["grad_change"].tolist())
        rec["beta"].append(land["beta"].tolist())
        # distribution of the layer inputs on fixed probe images (training mode: what the layers see)
        with dg.frozen_bn_stats(m), torch.no_grad():
            r: list = []
            m(probe_x, record=r)
            st = dg.layer_stats(r, m.act)
        rec["layer_mean"].append(st["mean"].tolist())
        rec["layer_std"].append(st["std"].tolist())
        rec["test_accuracy"].append(evaluate(m, data[2], data[3])["accuracy"])

    r = train(model, data, steps, cfg.batch_size, lr, on_step=on_step, progress=progress, desc=desc)
    ev = evaluate(model, data[2], data[3])
    rec.update({"train_loss": _tail(r["losses"]), "final_test_accuracy": ev["accuracy"], "diverged": r["diverged"],
                "loss_curve": r["losses"][:: max(1, steps // 60)].double().mean(1).tolist()})
    return rec


def smooth_experiment(cfg: SmoothConfig | None = None, progress: bool = False) -> dict:
    """Standard, BN, noisy-BN and ℓp-normalised Figure 1 MLPs, and a deep linear network with and without BN:
    accuracy, and every ``measure_every`` steps the gradient-change ICS per layer, the loss range, gradient change
    and effective β-smoothness along the gradient, and the moments of each layer's input on probe images.

    Defined in: chapters/10_why_bn.ipynb
    """
    cfg = cfg or SmoothConfig()
    data = mnist_subset(cfg.n_train, cfg.n_test, binary=True)
    out = {"config": _jsonable(asdict(cfg)), "mlp": {}, "dln": {}}
    for name in cfg.variants:
        noise = NoisyBN(len(cfg.seeds), 3, cfg.noise_amplitude, seed=7) if name == "noisy bn" else None
        m = DeepMLP(cfg.seeds, 3, 100, act="sigmoid", init_std=cfg.init_std, noise=noise, **_variant(name))
        out["mlp"][name] = _smooth_run(m, data, cfg, cfg.lr, cfg.steps, progress, name)
    for name in ("standard", "bn"):
        m = DeepMLP(cfg.seeds, cfg.dln_depth, cfg.dln_width, act="linear", **_variant(name))
        out["dln"][name] = _smooth_run(m, data, cfg, cfg.dln_lr, cfg.dln_steps, progress, f"linear {name}")
    return out


# ----------------------------------------------------------------------------------------------- the CLI
PARTS = {"depth": (DepthConfig, depth_experiment), "depth-cnn": (DepthCNNConfig, depth_cnn_experiment),
         "lr": (LRConfig, lr_experiment), "wd": (WDConfig, wd_experiment),
         "reg": (RegConfig, reg_experiment), "smooth": (SmoothConfig, smooth_experiment)}


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def run_part(part: str, progress: bool = False, **overrides) -> dict:
    """Run one part (``depth``, ``lr``, ``reg`` or ``smooth``) with its default configuration (``overrides``
    replace fields), single-threaded unless ``threads`` says otherwise; returns the JSON-ready results.

    Defined in: chapters/10_why_bn.ipynb
    """
    from bnlib.utils import set_threads

    cfg_cls, fn = PARTS[part]
    cfg = cfg_cls(**overrides)
    set_threads(cfg.threads)
    torch.manual_seed(0)
    return fn(cfg, progress=progress)


# ------------------------------------------------------------------------------------------- summaries
def summarize(values) -> tuple[float, float]:
    """(mean, population std) over seeds of a list of numbers.

    Defined in: chapters/10_why_bn.ipynb
    """
    m, s = _ms(values)
    return m, s


def pm(values, digits: int = 3) -> str:
    """``"mean ± std"`` over seeds, for tables (``"diverged"`` if a value is not finite).

    Defined in: chapters/10_why_bn.ipynb
    """
    m, s = _ms(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if math.isfinite(m) else "diverged"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A MyST/Markdown pipe table.

    Defined in: chapters/10_why_bn.ipynb
    """
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def distribution_shift(run: dict) -> list[float]:
    """Per seed, the mean over measurements and layers of |Δ mean| + |Δ std| of the layer inputs on the probe images
    between consecutive measurements (from a :func:`smooth_experiment` run): the moment-based internal covariate
    shift that chapter 1 watched.

    Defined in: chapters/10_why_bn.ipynb
    """
    mean = torch.tensor(run["layer_mean"], dtype=torch.float64)  # (T, L, S)
    std = torch.tensor(run["layer_std"], dtype=torch.float64)
    d = (mean[1:] - mean[:-1]).abs() + (std[1:] - std[:-1]).abs()
    return d.mean((0, 1)).tolist()



def run_and_save(part: str, out: str | None = None, progress: bool = False, **overrides) -> str:
    """``python -m bnlib why --part PART``: run one part and write ``results/why_PART.json`` with its provenance
    (:func:`bnlib.results.save_results`); returns the path.

    Defined in: chapters/10_why_bn.ipynb
    """
    from bnlib.results import RESULTS_DIR, save_results

    t0 = time.perf_counter()
    res = run_part(part, progress=progress, **overrides)
    cfg = PARTS[part][0](**overrides)
    path = out or str(RESULTS_DIR / f"why_{part.replace('-', '_')}.json")
    extra = "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items())
    save_results(path, res, command=f"python -m bnlib why --part {part}{extra}",
                 seconds=time.perf_counter() - t0, threads=cfg.threads)
    return path
