"""MNIST experiments with and without batch normalization: data as whole tensors, training loops, Figure 1.

Data
    :func:`bnlib.data.load_mnist`, :func:`bnlib.data.binarize` and :func:`bnlib.data.standardize` (imported
    here, so ``mnist.load_mnist`` works): the whole split as two tensors, turned into float inputs in one
    vectorised step; :func:`batch_indices` yields minibatch indices (a fresh seeded permutation each epoch) so a
    minibatch is one gather ``X[idx]`` instead of 60 PIL conversions.
Figure 1 (part A)
    :func:`run_figure1` trains the paper's 784-100-100-100-10 sigmoid MLP for several seeds at once
    (:class:`bnlib.models.BatchedMLP`), evaluating on the 10k test set; :func:`figure1` runs it with and
    without BN and returns the JSON-ready results.
CNN (part B)
    :func:`train_cnn` trains :class:`bnlib.models.SeedCNN`, :func:`evaluate` measures loss and accuracy
    (optionally in training mode, to show what forgetting ``model.eval()`` costs).

Defined in: chapters/07_mnist.ipynb
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch.nn import functional as F
from tqdm import tqdm

from bnlib.data import binarize, load_mnist, standardize
from bnlib.models import BatchedMLP, SeedCNN

__all__ = [
    "batch_indices",
    "Figure1Config",
    "PAPER_FIGURE1",
    "figure1_step",
    "run_figure1",
    "figure1",
    "accuracy_at",
    "steps_to_accuracy",
    "rms_to_paper",
    "figure1_grid",
    "evaluate",
    "train_cnn",
    "CNNConfig",
    "cnn_data",
    "cnn_experiments",
    "weight_norms",
    "LeNetConfig",
    "lenet_experiment",
    "progress_bar",
]

#: Figure 1(a) of Ioffe & Szegedy (2015), digitised from the arXiv PDF's vector paths (error ≈ ±0.002):
#: training step -> test accuracy. The baseline curve ends at ~44k steps, BN at ~49k.
PAPER_FIGURE1 = {
    "baseline": {5000: 0.784, 7500: 0.904, 10000: 0.926, 15000: 0.953, 20000: 0.963, 30000: 0.968,
                 40000: 0.972, 44000: 0.972},
    "bn": {4000: 0.953, 5000: 0.956, 7500: 0.965, 10000: 0.966, 15000: 0.972, 20000: 0.974, 30000: 0.978,
           40000: 0.980, 44000: 0.980, 49000: 0.982},
}


def progress_bar(iterable, total: int | None = None, desc: str = "", progress: bool = True,
                 mininterval: float = 30.0):
    """Plain-text tqdm on stdout (no widgets, nothing on stderr); a no-op wrapper when ``progress`` is False.

    Defined in: chapters/07_mnist.ipynb
    """
    return tqdm(iterable, total=total, desc=desc, file=sys.stdout, disable=not progress,
                mininterval=mininterval, ascii=True, dynamic_ncols=False, ncols=80)


# --------------------------------------------------------------------------------------------------- data
def batch_indices(n: int, batch_size: int, seeds: list[int] | tuple[int, ...] | int,
                  steps: int | None = None) -> Iterator[torch.Tensor]:
    """Minibatch indices for one or several seeds: yields ``(S, batch_size)`` int64 (``(batch_size,)`` for an int seed).

    Each seed has its own ``torch.Generator`` and walks through its own permutation of ``range(n)``,
    drawing a fresh one every epoch (the incomplete last batch of an epoch is dropped). Stops after
    ``steps`` batches (never, if None).

    Defined in: chapters/07_mnist.ipynb
    """
    single = isinstance(seeds, int)
    gens = [torch.Generator().manual_seed(int(s)) for s in ([seeds] if single else seeds)]
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n})")
    done = 0
    while steps is None or done < steps:
        perms = torch.stack([torch.randperm(n, generator=g) for g in gens])  # (S, n)
        perms = perms[:, : per_epoch * batch_size].reshape(len(gens), per_epoch, batch_size)
        for k in range(per_epoch):
            if steps is not None and done >= steps:
                return
            done += 1
            yield perms[0, k] if single else perms[:, k]


# ----------------------------------------------------------------------------------------------- figure 1
@dataclass
class Figure1Config:
    """Every choice of the Figure 1 reproduction, the paper's and ours (see the chapter's table).

    Defined in: chapters/07_mnist.ipynb
    """

    steps: int = 50_000            # paper
    batch_size: int = 60           # paper
    sizes: tuple = (784, 100, 100, 100, 10)  # paper
    lr: float = 0.1                # ours, chosen by figure1_grid: plain SGD, the same rate for both networks
    init_std: float = 0.1          # ours, chosen by figure1_grid: weights ~ N(0, init_std²), biases 0
    threshold: float = 0.5         # ours: pixel/255 > threshold -> 1
    eval_every: int = 1000         # ours
    eps: float = 1e-5              # torch's default
    momentum: float = 0.1          # running-statistics momentum (torch's default)
    unit: int = 0                  # the last-hidden-layer unit whose sigmoid input is tracked
    percentiles: tuple = (15, 50, 85)  # paper
    threads: int = 1               # torch intra-op threads

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _mlp_data(cfg: Figure1Config, root=None):
    xtr, ytr = load_mnist(True, root)
    xte, yte = load_mnist(False, root)
    return binarize(xtr, cfg.threshold), ytr, binarize(xte, cfg.threshold), yte


@torch.no_grad()
def _evaluate_mlp(model: BatchedMLP, x: torch.Tensor, y: torch.Tensor, cfg: Figure1Config):
    was_training = model.training
    model.eval()
    logits, pre = model(x, return_preacts=True)
    model.train(was_training)
    acc = (logits.argmax(-1) == y).float().mean(1)  # (S,)
    q = torch.tensor([p / 100 for p in cfg.percentiles])
    perc = torch.quantile(pre[-1][:, :, cfg.unit], q, dim=1).T  # (S, 3)
    return acc.tolist(), perc.tolist()


def figure1_step(model: BatchedMLP, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
                 lr: torch.Tensor) -> None:
    """One training step of :func:`run_figure1`: forward, each network's mean loss weighted by its rate, backward,
    SGD step (``opt`` has rate 1).  xb: (S, B, 784) inputs, yb: (S, B) labels, lr: (S,) rates.

    Defined in: chapters/07_mnist.ipynb (timed in chapters/appendix_performance.ipynb)
    """
    S, B = yb.shape
    logits = model(xb)  # (S, B, 10)
    loss_per_net = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1),
                                   reduction="none").reshape(S, B).mean(1)  # (S,)
    loss = (lr * loss_per_net).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def run_figure1(bn: bool, seeds=(0, 1, 2), config: Figure1Config | None = None, data=None,
                progress: bool = True, bn_layer: type | None = None, root=None,
                init_stds: list[float] | None = None, lrs: list[float] | None = None) -> dict:
    """Train the Figure 1 MLP (with or without BN) for every seed at once; evaluate every ``eval_every`` steps.

    Network ``s`` trains with plain SGD at rate ``lrs[s]`` from weights ~ N(0, ``init_stds[s]``²) (default: the
    config's ``lr`` and ``init_std`` for all): its mean loss is weighted by its rate and SGD steps with rate 1,
    which is the same update because the networks share no parameter. Returns ``{"steps": [0, e, 2e, ...], "test_accuracy": [[acc per step] per seed],
    "percentiles": [[[p15, p50, p85] per step] per seed], "seconds": wall time}``. Test accuracy uses the
    running statistics (eval mode); the percentiles are over the 10k test images of the sigmoid input of
    last-hidden-layer unit ``config.unit``. ``data``: ``(x_train, y_train, x_test, y_test)`` binarised, to
    skip loading.

    Defined in: chapters/07_mnist.ipynb
    """
    cfg = config or Figure1Config()
    seeds = [int(s) for s in seeds]
    torch.set_num_threads(cfg.threads)
    xtr, ytr, xte, yte = data if data is not None else _mlp_data(cfg, root)
    S = len(seeds)
    model = BatchedMLP(seeds, bn=bn, sizes=cfg.sizes, init_std=init_stds or cfg.init_std, bn_layer=bn_layer)
    for norm in model.norms:
        norm.eps, norm.momentum = cfg.eps, cfg.momentum
    lr = torch.tensor(lrs if lrs is not None else [cfg.lr] * S, dtype=torch.float32)  # (S,)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    B = cfg.batch_size
    steps_logged, accs, percs = [0], [], []
    a, p = _evaluate_mlp(model, xte, yte, cfg)
    accs.append(a), percs.append(p)
    t0 = time.perf_counter()
    batches = batch_indices(xtr.shape[0], B, seeds, cfg.steps)
    bar = progress_bar(batches, total=cfg.steps, desc="BN      " if bn else "baseline", progress=progress)
    for step, idx in enumerate(bar, start=1):
        figure1_step(model, opt, xtr[idx], ytr[idx], lr)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            a, p = _evaluate_mlp(model, xte, yte, cfg)
            steps_logged.append(step), accs.append(a), percs.append(p)
            if progress:
                bar.set_postfix_str(f"test acc {sum(a) / len(a):.4f}", refresh=False)
    seconds = time.perf_counter() - t0
    return {
        "steps": steps_logged,
        "test_accuracy": [[round(acc[s], 6) for acc in accs] for s in range(S)],
        "percentiles": [[[round(v, 5) for v in pc[s]] for pc in percs] for s in range(S)],
        "seconds": seconds,
        "model": model,
    }


def figure1(seeds=(0, 1, 2), config: Figure1Config | None = None, progress: bool = True,
            bn_layer: type | None = None, root=None, keep_models: bool = False) -> dict:
    """Figure 1 of the paper: :func:`run_figure1` without (``"baseline"``) and with (``"bn"``) BN.

    Returns the JSON-ready dict ``{"bn": {...}, "baseline": {...}, "config": {...}, "seeds": [...]}``;
    with ``keep_models`` also ``"models": {"bn": BatchedMLP, "baseline": BatchedMLP}`` (not JSON).

    Defined in: chapters/07_mnist.ipynb
    """
    cfg = config or Figure1Config()
    data = _mlp_data(cfg, root)
    out = {"config": cfg.as_dict(), "seeds": [int(s) for s in seeds]}
    models = {}
    for key, bn in (("baseline", False), ("bn", True)):
        res = run_figure1(bn, seeds, cfg, data, progress, bn_layer)
        models[key] = res.pop("model")
        out[key] = res
    if keep_models:
        out["models"] = models
    return out


def accuracy_at(run: dict, step: int) -> tuple[float, float]:
    """(mean, standard deviation) over seeds of the test accuracy logged at ``step`` in one run of :func:`figure1`.

    Defined in: chapters/07_mnist.ipynb
    """
    acc = torch.tensor(run["test_accuracy"])[:, run["steps"].index(step)]
    return float(acc.mean()), float(acc.std(unbiased=False))


def steps_to_accuracy(run: dict, level: float) -> int | None:
    """First logged step at which the seed-mean test accuracy reaches ``level`` (None if it never does).

    Defined in: chapters/07_mnist.ipynb
    """
    mean = torch.tensor(run["test_accuracy"]).mean(0)
    hits = (mean >= level).nonzero()
    return int(run["steps"][hits[0, 0]]) if len(hits) else None


def rms_to_paper(runs: dict) -> float:
    """Root-mean-square distance between our seed-mean test accuracy and the paper's Figure 1(a) curves.

    ``runs``: ``{"baseline": run, "bn": run}`` as returned by :func:`figure1` (or one cell of
    :func:`figure1_grid`). The distance is taken over every digitised point of :data:`PAPER_FIGURE1` whose step
    was logged, both networks together (one number, so a setting cannot fit one curve by missing the other).

    Defined in: chapters/07_mnist.ipynb
    """
    diffs = []
    for key in ("baseline", "bn"):
        steps = runs[key]["steps"]
        mean = torch.tensor(runs[key]["test_accuracy"], dtype=torch.float64).mean(0)
        diffs += [float(mean[steps.index(step)]) - acc for step, acc in PAPER_FIGURE1[key].items() if step in steps]
    if not diffs:
        raise ValueError("no step of the paper's curves was logged; log every 500 steps up to at least 5000")
    return math.sqrt(sum(d * d for d in diffs) / len(diffs))


def figure1_grid(init_stds=(0.01, 0.1, 1.0), lrs=(0.1, 0.5, 1.0), seeds=(0, 1, 2),
                 config: Figure1Config | None = None, progress: bool = True, root=None) -> dict:
    """Figure 1 over the choices the paper leaves open: every (init scale, learning rate) cell, every seed, at once.

    All ``len(init_stds) · len(lrs) · len(seeds)`` networks train as one :class:`BatchedMLP` (network
    ``(σ, lr, seed)`` starts from seed ``seed``'s weights scaled to σ and steps at rate ``lr``), once without
    and once with BN, for ``config.steps`` steps (default 20,000, logged every 500). Returns the JSON-ready
    ``{"config", "init_stds", "lrs", "seeds", "steps", "seconds", "cells": [...], "best": i}``; each cell holds
    ``init_std``, ``lr``, per network ``{"test_accuracy" (seeds × checkpoints), "steps_to_95" (seed-mean
    curve; None if never), "final" (mean, sd over seeds)}`` and ``rms_to_paper`` (:func:`rms_to_paper`);
    ``best`` is the cell with the smallest RMS distance (both None for runs shorter than the paper's first point).

    Defined in: chapters/07_mnist.ipynb
    """
    cfg = config or Figure1Config(steps=20_000, eval_every=500)
    seeds = [int(s) for s in seeds]
    cells = [(float(std), float(lr)) for std in init_stds for lr in lrs]
    nets = [(std, lr, seed) for std, lr in cells for seed in seeds]
    data = _mlp_data(cfg, root)
    runs = {}
    for key, bn in (("baseline", False), ("bn", True)):
        runs[key] = run_figure1(bn, [n[2] for n in nets], cfg, data, progress,
                                init_stds=[n[0] for n in nets], lrs=[n[1] for n in nets])
        runs[key].pop("model")
    S = len(seeds)
    out = {"config": cfg.as_dict(), "init_stds": [float(v) for v in init_stds], "lrs": [float(v) for v in lrs],
           "seeds": seeds, "steps": runs["baseline"]["steps"],
           "seconds": {key: round(runs[key]["seconds"], 1) for key in runs}, "cells": []}
    for c, (std, lr) in enumerate(cells):
        sub = {key: {"steps": runs[key]["steps"], "test_accuracy": runs[key]["test_accuracy"][c * S: (c + 1) * S]}
               for key in runs}
        scored = any(step in out["steps"] for curve in PAPER_FIGURE1.values() for step in curve)
        cell = {"init_std": std, "lr": lr, "rms_to_paper": rms_to_paper(sub) if scored else None}
        for key in runs:
            cell[key] = {"test_accuracy": sub[key]["test_accuracy"],
                         "steps_to_95": steps_to_accuracy(sub[key], 0.95),
                         "final": list(accuracy_at(sub[key], sub[key]["steps"][-1]))}
        out["cells"].append(cell)
    out["best"] = min(range(len(cells)), key=lambda c: out["cells"][c]["rms_to_paper"]) if scored else None
    return out


# ---------------------------------------------------------------------------------------------------- CNN
@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             train_mode: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)`` in batches of ``batch_size``.

    ``train_mode=True`` evaluates as if ``model.eval()`` had been forgotten for the batch-norm layers only: they
    normalise with each test batch's own statistics (and update their running ones), while every other layer
    (dropout) stays in eval mode, so the measurement shows what BN's mode alone costs. Every module's mode is
    restored afterwards, and so are the BN buffers: the measurement has no side effect.

    Defined in: chapters/07_mnist.ipynb
    """
    modes = {m: m.training for m in model.modules()}
    saved = {k: v.clone() for k, v in model.state_dict().items()} if train_mode else None
    model.eval()
    if train_mode:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
    loss, correct = 0.0, 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i: i + batch_size])
        loss += F.cross_entropy(logits, y[i: i + batch_size], reduction="sum").item()
        correct += (logits.argmax(1) == y[i: i + batch_size]).sum().item()
    if saved is not None:
        model.load_state_dict(saved)
    for m, training in modes.items():
        m.training = training
    return loss / x.shape[0], correct / x.shape[0]


def train_cnn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, x_test=None, y_test=None, *,
              epochs: float = 1, steps: int | None = None, batch_size: int = 64, lr: float = 0.05,
              momentum: float = 0.9, seed: int = 0, eval_every: int | None = None, progress: bool = True,
              desc: str = "") -> dict:
    """Train ``model`` with SGD (+momentum) on ``(x, y)``; return its history.

    Runs ``steps`` minibatch steps if given, else ``epochs`` epochs; batches come from :func:`batch_indices`
    with ``seed`` (which also seeds dropout). Evaluates on ``(x_test, y_test)`` every ``eval_every`` steps
    (default: once per epoch) and at the end. History: ``{"step", "train_loss" (mean over the steps since the
    last evaluation), "test_loss", "test_accuracy"}`` lists, plus ``"diverged"`` (a non-finite loss stopped
    training) and ``"seconds"``.

    Defined in: chapters/07_mnist.ipynb
    """
    n = x.shape[0]
    per_epoch = n // batch_size
    total = steps if steps is not None else max(1, round(epochs * per_epoch))
    eval_every = eval_every or per_epoch
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    hist = {"step": [], "train_loss": [], "test_loss": [], "test_accuracy": [], "diverged": False}
    running, count = 0.0, 0
    model.train()
    t0 = time.perf_counter()
    bar = progress_bar(batch_indices(n, batch_size, seed, total), total=total, desc=desc, progress=progress)
    for step, idx in enumerate(bar, start=1):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        count += 1
        if not math.isfinite(loss.item()):
            hist["diverged"] = True
        if step % eval_every == 0 or step == total or hist["diverged"]:
            hist["step"].append(step)
            hist["train_loss"].append(running / count)
            running, count = 0.0, 0
            if x_test is not None:
                tl, ta = evaluate(model, x_test, y_test)
                hist["test_loss"].append(tl)
                hist["test_accuracy"].append(ta)
            if hist["diverged"]:
                break
    hist["seconds"] = time.perf_counter() - t0
    return hist


@dataclass
class CNNConfig:
    """The seed-CNN experiments' budget and settings (the chapter explains the choices).

    Defined in: chapters/07_mnist.ipynb
    """

    train_size: int = 5_000        # a fixed random subset of the 60k training images
    test_size: int = 2_000         # a fixed random subset of the 10k test images
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05               # SGD with momentum 0.9, the same rate with and without BN
    momentum: float = 0.9
    sweep_lrs: tuple = (0.03, 0.1, 0.3, 1.0)
    sweep_steps: int = 60
    eval_batch_sizes: tuple = (1000, 64, 8)  # forgetting model.eval() for BN: test batches of these sizes
    seeds: tuple = (0, 1, 2)       # each seed: the initial weights, the batch order, the dropout masks
    data_seed: int = 0             # the choice of the training and test subsets (the same for every seed)
    threads: int = 1

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def cnn_data(cfg: CNNConfig, root=None):
    """Standardised subsets ``(x_train, y_train, x_test, y_test)`` of the sizes in ``cfg`` (chosen by ``data_seed``).

    Defined in: chapters/07_mnist.ipynb
    """
    xtr, ytr = load_mnist(True, root)
    xte, yte = load_mnist(False, root)
    g = torch.Generator().manual_seed(cfg.data_seed)
    itr = torch.randperm(xtr.shape[0], generator=g)[: cfg.train_size]
    ite = torch.randperm(xte.shape[0], generator=g)[: cfg.test_size]
    return standardize(xtr[itr]), ytr[itr], standardize(xte[ite]), yte[ite]


def _new_cnn(seed: int, bn: bool, position: str = "pre", bn_layer=None, bn2d_layer=None) -> SeedCNN:
    torch.manual_seed(seed)  # the same initial conv/fc weights for every variant of one seed
    return SeedCNN(bn=bn, bn_position=position, bn_layer=bn_layer, bn2d_layer=bn2d_layer)


def weight_norms(model: torch.nn.Module) -> list[float]:
    """Frobenius norm of the weight of every conv and linear layer of ``model``, in order.

    Defined in: chapters/07_mnist.ipynb
    """
    return [float(m.weight.detach().norm()) for m in model.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def cnn_experiments(cfg: CNNConfig | None = None, parts=("curves", "sweep", "placement", "eval"),
                    data=None, progress: bool = True, bn_layer=None, bn2d_layer=None, root=None) -> dict:
    """The seed-CNN experiments of the chapter, for every seed in ``cfg.seeds``; a JSON-ready dict per part.

    ``curves``: one history of :func:`train_cnn` per seed (per-epoch train loss, test loss, test accuracy)
    without BN (``"baseline"``) and with BN before the ReLU (``"bn"``); ``placement``: the same with BN after
    the ReLU (``"bn_post"``). ``sweep``: for each rate in ``sweep_lrs``, each network and each seed, the test
    loss/accuracy after ``sweep_steps`` steps, ``"diverged"`` (the loss became NaN/inf) and the weight norms
    (:func:`weight_norms`) before and after. ``eval``: per seed, the test accuracy of the trained networks in
    eval mode and with only the BN layers in training mode (``evaluate(..., train_mode=True)``) for test
    batches of each size in ``eval_batch_sizes``; needs ``curves`` (it reuses the trained networks). The
    models of the last seed are returned under ``"models"`` (not JSON).

    Defined in: chapters/07_mnist.ipynb
    """
    cfg = cfg or CNNConfig()
    torch.set_num_threads(cfg.threads)
    x, y, xt, yt = data if data is not None else cnn_data(cfg, root)
    out: dict = {"config": cfg.as_dict()}
    variants = []
    if "curves" in parts or "eval" in parts:
        variants += [("baseline", False, "pre"), ("bn", True, "pre")]
    if "placement" in parts:
        variants += [("bn_post", True, "post")]
    for name, _, _ in variants:
        out[name] = []
    if "sweep" in parts:
        out["sweep"] = {"lr": list(cfg.sweep_lrs), "baseline": [[] for _ in cfg.sweep_lrs],
                        "bn": [[] for _ in cfg.sweep_lrs]}
    if "eval" in parts:
        out["eval"] = {"batch_sizes": list(cfg.eval_batch_sizes), "baseline": [], "bn": []}
    models = {}
    for seed in cfg.seeds:
        kw = dict(batch_size=cfg.batch_size, momentum=cfg.momentum, seed=seed, progress=progress)
        for name, bn, position in variants:
            models[name] = _new_cnn(seed, bn, position, bn_layer, bn2d_layer)
            out[name].append(train_cnn(models[name], x, y, xt, yt, epochs=cfg.epochs, lr=cfg.lr,
                                       desc=f"{name:8s} seed {seed}", **kw))
        if "sweep" in parts:
            for i, lr in enumerate(cfg.sweep_lrs):
                for name, bn in (("baseline", False), ("bn", True)):
                    model = _new_cnn(seed, bn, "pre", bn_layer, bn2d_layer)
                    before = weight_norms(model)
                    h = train_cnn(model, x, y, xt, yt, steps=cfg.sweep_steps, lr=lr,
                                  desc=f"{name} lr={lr:g} seed {seed}", **kw)
                    out["sweep"][name][i].append({"test_loss": h["test_loss"][-1],
                                                  "test_accuracy": h["test_accuracy"][-1],
                                                  "diverged": h["diverged"], "weight_norms_init": before,
                                                  "weight_norms": weight_norms(model)})
        if "eval" in parts:
            for name in ("baseline", "bn"):
                out["eval"][name].append({
                    "eval": evaluate(models[name], xt, yt)[1],
                    "train_mode": [evaluate(models[name], xt, yt, bs, train_mode=True)[1]
                                   for bs in cfg.eval_batch_sizes]})
    out["models"] = models
    return out


@dataclass
class LeNetConfig:
    """The seeds' LeNet experiment (:class:`bnlib.models.LeNet` with and without BN on full MNIST).

    Defined in: chapters/07_mnist.ipynb
    """

    epochs: int = 10               # the W&B report's
    batch_size: int = 64
    lr: float = 0.01               # plain SGD (no momentum), cross-entropy, as the report
    seeds: tuple = (0, 1, 2)
    eval_every: int = 0            # steps between evaluations on the 10k test images; 0: once per epoch
    train_size: int = 60_000       # the first train_size images of a fixed permutation (full MNIST: 60,000)
    threads: int = 1

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def lenet_experiment(cfg: LeNetConfig | None = None, progress: bool = True, bn2d_layer=None, root=None) -> dict:
    """Train the LeNet with and without BN for every seed; return ``{"config", "baseline": [history per seed],
    "bn": [...]}`` (histories of :func:`train_cnn`: step, train loss, test loss, test accuracy per evaluation).

    Both networks of one seed start from the same conv/fc weights and see the same batches.

    Defined in: chapters/07_mnist.ipynb
    """
    from bnlib.models import LeNet

    cfg = cfg or LeNetConfig()
    torch.set_num_threads(cfg.threads)
    xtr, ytr = load_mnist(True, root)
    xte, yte = load_mnist(False, root)
    if cfg.train_size < xtr.shape[0]:
        keep = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(0))[: cfg.train_size]
        xtr, ytr = xtr[keep], ytr[keep]
    x, xt = standardize(xtr), standardize(xte)
    out: dict = {"config": cfg.as_dict(), "baseline": [], "bn": []}
    for seed in cfg.seeds:
        for name, bn in (("baseline", False), ("bn", True)):
            torch.manual_seed(seed)
            model = LeNet(bn=bn, bn2d_layer=bn2d_layer)
            out[name].append(train_cnn(model, x, ytr, xt, yte, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                       lr=cfg.lr, momentum=0.0, seed=seed, eval_every=cfg.eval_every or None,
                                       progress=progress, desc=f"LeNet {name} seed {seed}"))
    return out
