"""Process groups on one machine and the chapter's DistributedDataParallel runs of the seed CNN.

Defined in: chapters/09_sync_bn.ipynb

* :func:`launch` starts ``world_size`` processes (``torch.multiprocessing``, spawn), each in a gloo process group
  on 127.0.0.1 with a timeout, runs ``fn(rank, world_size, *args)`` in every one and returns their results in
  rank order.  ``fn`` must be a module-level function (spawn pickles it by name), so a notebook passes functions
  from this module or another importable one.
* :func:`init_from_env` is the same process group for a script started by ``torchrun`` (one or many machines).
* :func:`ddp_parity` (float64, step for step) and :func:`workers_runs` are the chapter's experiments
  (module-level, so they pickle); :func:`workers_experiment` is ``python -m bnlib ddp`` (1, 2, 4 processes,
  per-rank BN vs SyncBatchNorm, written to ``results/ddp.json``); :func:`main` runs :func:`ddp_train` under
  ``torchrun``.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

__all__ = ["free_port", "launch", "init_from_env", "run_tasks", "parity_inputs", "sync_bn_outputs", "torch_reference",
           "DDPConfig", "WorkersConfig",
           "ddp_data", "split_batch", "single_process_train", "ddp_parity", "ddp_train", "workers_runs",
           "workers_experiment", "comm_counts",
           "torch_sync_bn_on_cpu", "main"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it).

    Defined in: chapters/09_sync_bn.ipynb
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, world_size, port, timeout, threads, outdir, args):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(fn, world_size: int, *args, timeout: float = 30.0, threads: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes of one gloo process group.

    Defined in: chapters/09_sync_bn.ipynb

    The group rendezvous on a free TCP port of 127.0.0.1; a collective that waits longer than ``timeout``
    seconds raises instead of hanging.  Each process uses ``threads`` torch threads.  Returns the list of the
    ranks' return values (anything ``torch.save`` can store); an exception in any rank is re-raised here
    (``torch.multiprocessing.ProcessRaisedException``, with the rank's traceback).
    """
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_worker, args=(fn, world_size, free_port(), timeout, threads, outdir, args),
                           nprocs=world_size, start_method="spawn", join=True)
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False) for r in range(world_size)]


def init_from_env(backend: str | None = None, timeout: float = 300.0) -> tuple[int, int]:
    """Join the process group described by ``torchrun``'s environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Defined in: chapters/09_sync_bn.ipynb

    ``backend``: "nccl" when CUDA is available, else "gloo" (None). Returns (rank, world_size).
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


# ----------------------------------------------------------------------------------------- equality checks
def parity_inputs(sizes, tail=(), channels: int = 3, seed: int = 0, steps: int = 2, dtype=torch.float64) -> dict:
    """The data of an equality check: one global batch per step, split by rows into ``sizes`` (one per rank).

    Defined in: chapters/09_sync_bn.ipynb

    Returns ``{"x": [(sum(sizes), C, *tail) per step], "dy": [same], "weight": (C,), "bias": (C,), "sizes"}``,
    drawn from ``torch.Generator().manual_seed(seed)``; x has per-channel offsets far from 0 (|mean| ~ 5 sigma).
    """
    g = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), channels, *tail)
    offset = (torch.arange(channels, dtype=dtype) * 5 - 3).view(1, channels, *[1] * len(tail))
    xs = [torch.randn(shape, generator=g, dtype=dtype) * 2 + offset for _ in range(steps)]
    dys = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(steps)]
    return {"x": xs, "dy": dys, "weight": torch.rand(channels, generator=g, dtype=dtype) + 0.5,
            "bias": torch.randn(channels, generator=g, dtype=dtype), "sizes": list(sizes)}


def sync_bn_outputs(rank: int, world_size: int, inputs: dict, momentum: float = 0.1, group=None) -> dict:
    """Run :class:`bnlib.sync_bn.SyncBatchNorm` on this rank's rows of every step of ``inputs`` (training mode).

    Defined in: chapters/09_sync_bn.ipynb

    Each step: y = bn(x_r), backward of sum(y * dy_r).  Returns this rank's ``{"y": [...], "dx": [...],
    "dgamma": [...], "dbeta": [...]}`` per step and the buffers after the last step (``running_mean``,
    ``running_var``, ``num_batches_tracked``).  dgamma, dbeta are this rank's local sums.  ``group``: the
    process group to synchronise over (None: the world), of which ``rank`` is then the rank within it.
    """
    from bnlib.sync_bn import SyncBatchNorm

    sizes = inputs["sizes"]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    C = inputs["weight"].shape[0]
    bn = SyncBatchNorm(C, momentum=momentum, process_group=group).to(inputs["weight"].dtype)
    with torch.no_grad():
        bn.weight.copy_(inputs["weight"])
        bn.bias.copy_(inputs["bias"])
    out = {"y": [], "dx": [], "dgamma": [], "dbeta": []}
    for x, dy in zip(inputs["x"], inputs["dy"]):
        x = x[lo:hi].clone().requires_grad_(True)
        bn.zero_grad()
        y = bn(x)
        (y * dy[lo:hi]).sum().backward()
        out["y"].append(y.detach()), out["dx"].append(x.grad)
        out["dgamma"].append(bn.weight.grad.clone()), out["dbeta"].append(bn.bias.grad.clone())
    out.update(running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone(),
               num_batches_tracked=int(bn.num_batches_tracked))
    return out


def torch_reference(inputs: dict, momentum: float = 0.1) -> dict:
    """What one process computes on the concatenated batch, with torch's own ``F.batch_norm`` and autograd.

    Defined in: chapters/09_sync_bn.ipynb

    ``inputs`` from :func:`parity_inputs`; returns the keys of :func:`sync_bn_outputs` for the whole batch
    (dgamma, dbeta: the full sums).
    """
    C = inputs["weight"].shape[0]
    dtype = inputs["weight"].dtype
    rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    out = {"y": [], "dx": [], "dgamma": [], "dbeta": []}
    for x, dy in zip(inputs["x"], inputs["dy"]):
        x = x.clone().requires_grad_(True)
        w, b = inputs["weight"].clone().requires_grad_(True), inputs["bias"].clone().requires_grad_(True)
        y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum)
        (y * dy).sum().backward()
        out["y"].append(y.detach()), out["dx"].append(x.grad)
        out["dgamma"].append(w.grad), out["dbeta"].append(b.grad)
    out.update(running_mean=rm, running_var=rv, num_batches_tracked=len(inputs["x"]))
    return out


# ------------------------------------------------------------------------------------------------ experiments
@dataclass
class DDPConfig:
    """DDP runs of the seed CNN: global batch, steps, data subset, optimiser (the chapter explains the choices).

    Defined in: chapters/09_sync_bn.ipynb
    """

    seeds: tuple = (0, 1, 2)
    steps: int = 30            # 30 steps of 32 images (WorkersConfig: the chapter's runs)
    global_batch: int = 32     # split evenly over the ranks: 16 per rank with 2 processes
    train_size: int = 6_000    # a seeded subset of the 60k training images
    test_size: int = 1_000     # a seeded subset of the 10k test images
    lr: float = 0.05
    momentum: float = 0.9
    data_seed: int = 0

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def ddp_data(cfg: DDPConfig | None = None, root=None):
    """The standardised MNIST subsets ``(x_train, y_train, x_test, y_test)`` of ``cfg``'s sizes.

    Defined in: chapters/09_sync_bn.ipynb

    Read once by the caller and passed to the processes (reading MNIST in every process would cost more than
    the runs).
    """
    from bnlib.mnist import CNNConfig, cnn_data

    cfg = cfg or DDPConfig()
    return cnn_data(CNNConfig(train_size=cfg.train_size, test_size=cfg.test_size, data_seed=cfg.data_seed), root)


def run_tasks(rank: int, world_size: int, tasks) -> list:
    """Run several module-level functions ``fn(rank, world_size, *args)`` one after the other in one group.

    Defined in: chapters/09_sync_bn.ipynb

    ``tasks``: a list of ``(fn, args)``; returns this rank's results in the same order.  One
    :func:`launch` of this costs one start-up of the processes instead of one per task.
    """
    return [fn(rank, world_size, *args) for fn, args in tasks]


def split_batch(idx: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of a global batch of indices: the ``rank``-th of ``world_size`` equal slices.

    Defined in: chapters/09_sync_bn.ipynb
    """
    per = idx.shape[0] // world_size
    return idx[rank * per:(rank + 1) * per]


def _new_model(seed: int, bn: str, dtype=torch.float32):
    """The seed CNN without dropout (dropout masks would differ between one and two processes)."""
    from bnlib.models import SeedCNN
    from bnlib.sync_bn import convert_sync_batchnorm

    torch.manual_seed(seed)
    model = SeedCNN(bn=True, dropout=False).to(dtype)
    return convert_sync_batchnorm(model) if bn == "sync" else model


def single_process_train(seed: int, cfg: DDPConfig, data, dtype=torch.float32, steps: int | None = None,
                         record: bool = False, test: bool = True, eval_at=()) -> dict:
    """One process, the whole global batch: the reference a DDP run with SyncBatchNorm must equal.

    Defined in: chapters/09_sync_bn.ipynb

    Returns ``{"test_accuracy": float}`` (eval mode, running statistics; None without ``test``), with
    ``record``, ``"params"``: the flattened parameters after every step, and with ``eval_at`` (step numbers),
    ``"curve"``: the test accuracy after each of those steps.
    """
    from bnlib.mnist import batch_indices, evaluate

    x, y, xt, yt = data
    model = _new_model(seed, "local", dtype)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    params, curve = [], []
    for step, idx in enumerate(batch_indices(x.shape[0], cfg.global_batch, seed, steps or cfg.steps), 1):
        loss = F.cross_entropy(model(x[idx].to(dtype)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if record:
            params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        if step in eval_at:
            curve.append(evaluate(model, xt.to(dtype), yt)[1])
            model.train()
    out = {"test_accuracy": evaluate(model, xt.to(dtype), yt)[1] if test else None}
    if eval_at:
        out["curve"] = curve
    if record:
        out["params"] = params
    return out


def _ddp_run(rank, world_size, seed, bn, cfg, data, dtype=torch.float32, steps=None, record=False, test=True,
             eval_at=()):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bnlib.mnist import batch_indices, evaluate

    x, y, xt, yt = data
    model = DDP(_new_model(seed, bn, dtype))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    if cfg.global_batch % world_size:
        raise ValueError(f"global batch {cfg.global_batch} does not split evenly over {world_size} ranks")
    params, curve = [], []
    for step, idx in enumerate(batch_indices(x.shape[0], cfg.global_batch, seed, steps or cfg.steps), 1):
        mine = split_batch(idx, rank, world_size)
        loss = F.cross_entropy(model(x[mine].to(dtype)), y[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if record:
            params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        if step in eval_at and rank == 0:  # rank 0's buffers: the ones DDP broadcasts
            curve.append(evaluate(model.module, xt.to(dtype), yt)[1])
            model.module.train()
    out = {"test_accuracy": evaluate(model.module, xt.to(dtype), yt)[1] if rank == 0 and test else None}
    if eval_at:
        out["curve"] = curve if rank == 0 else None
    if record:
        out["params"] = params
    return out


def ddp_parity(rank: int, world_size: int, data, seed: int = 0, steps: int = 3,
               global_batch: int = 16) -> dict | None:
    """DDP + SyncBatchNorm against one process on the whole batch, in float64, step for step.

    Defined in: chapters/09_sync_bn.ipynb

    Every rank trains the float64 seed CNN (no dropout) for ``steps`` SGD steps on its slice of the same global
    batches; rank 0 then trains the same network in one process on the whole batches.  Rank 0 returns
    ``{"max_abs_diff": [after step 1, 2, ...], "max_abs_param": float}``, the others None.
    """
    cfg = DDPConfig(steps=steps, global_batch=global_batch)
    ddp = _ddp_run(rank, world_size, seed, "sync", cfg, data, torch.float64, record=True, test=False)
    if rank != 0:
        return None
    ref = single_process_train(seed, cfg, data, torch.float64, record=True, test=False)
    diffs = [float((a - b).abs().max()) for a, b in zip(ddp["params"], ref["params"])]
    return {"max_abs_diff": diffs, "max_abs_param": float(ref["params"][-1].abs().max())}


def ddp_train(rank: int, world_size: int, cfg: DDPConfig, data) -> dict:
    """The chapter's comparison, for every seed: DDP with per-rank BN, DDP with SyncBatchNorm, one process.

    Defined in: chapters/09_sync_bn.ipynb

    Same initial weights and the same global batches for the three (``batch_indices`` with the seed); each rank
    of a DDP run takes its slice (:func:`split_batch`).  The one-process runs are shared out over the ranks
    (no communication).  Returns, on every rank, ``{"local": [acc per seed], "sync": [...], "single": [...],
    "seconds": {...}}`` with test accuracies in eval mode (None where this rank did not evaluate); the caller
    takes rank 0's DDP entries and each rank's single entries.
    """
    out = {"local": [], "sync": [], "single": [], "seconds": {"local": 0.0, "sync": 0.0, "single": 0.0}}
    for i, seed in enumerate(cfg.seeds):
        for bn in ("local", "sync"):
            t0 = time.perf_counter()
            out[bn].append(_ddp_run(rank, world_size, seed, bn, cfg, data)["test_accuracy"])
            out["seconds"][bn] += time.perf_counter() - t0
    for i, seed in enumerate(cfg.seeds):
        t0 = time.perf_counter()
        mine = i % world_size == rank
        out["single"].append(single_process_train(seed, cfg, data)["test_accuracy"] if mine else None)
        out["seconds"]["single"] += time.perf_counter() - t0
    return out


@dataclass
class WorkersConfig(DDPConfig):
    """``python -m bnlib ddp``: the seed CNN trained by 1, 2 and 4 processes at one global batch size.

    Defined in: chapters/09_sync_bn.ipynb

    The global batch of 32 is split evenly over the ranks (8 images per rank with 4); every run of a seed starts
    from the same weights and sees the same global batches.  Test accuracy (1,000 images, eval mode) after every
    ``eval_every`` steps.
    """

    steps: int = 200
    workers: tuple = (1, 2, 4)
    eval_every: int = 25

    def checkpoints(self) -> list[int]:
        return list(range(self.eval_every, self.steps + 1, self.eval_every))


def workers_runs(rank: int, world_size: int, cfg: WorkersConfig, data, kinds=("local", "sync")) -> dict:
    """In one process group: every seed of ``cfg`` trained by DDP with per-rank BN and with SyncBatchNorm.

    Defined in: chapters/09_sync_bn.ipynb

    Returns ``{kind: [test accuracy after each of cfg.checkpoints(), per seed], "seconds": {kind: s}}``
    (accuracies on rank 0, None on the others).
    """
    out = {k: [] for k in kinds}
    out["seconds"] = {k: 0.0 for k in kinds}
    for seed in cfg.seeds:
        for bn in kinds:
            t0 = time.perf_counter()
            run = _ddp_run(rank, world_size, seed, bn, cfg, data, eval_at=cfg.checkpoints(), test=False)
            out[bn].append(run["curve"])
            out["seconds"][bn] += time.perf_counter() - t0
    return out


def workers_experiment(cfg: WorkersConfig | None = None, data=None, progress: bool = False) -> dict:
    """Train the seed CNN with 1, 2, 4, ... workers (``cfg.workers``) at a fixed global batch; one row per
    (workers, BN kind).

    Defined in: chapters/09_sync_bn.ipynb

    One worker is one process without a process group ("single", the reference: its batch norm sees the whole
    global batch).  Each larger world size is one :func:`launch` of :func:`workers_runs` (gloo on 127.0.0.1,
    one thread per process), with per-rank BN ("local") and with SyncBatchNorm ("sync").  Returns
    ``{"config", "steps": checkpoints, "rows": [{"workers", "bn", "test_accuracy": [[per checkpoint] per
    seed], "seconds"}]}``.
    """
    cfg = cfg or WorkersConfig()
    data = data if data is not None else ddp_data(cfg)
    rows = []
    for W in cfg.workers:
        t0 = time.perf_counter()
        if W == 1:
            curves = [single_process_train(s, cfg, data, test=False, eval_at=cfg.checkpoints())["curve"]
                      for s in cfg.seeds]
            rows.append({"workers": 1, "bn": "single", "test_accuracy": curves,
                         "seconds": time.perf_counter() - t0})
        else:
            res = launch(workers_runs, W, cfg, data, timeout=600)[0]
            rows += [{"workers": W, "bn": k, "test_accuracy": res[k], "seconds": res["seconds"][k]}
                     for k in ("local", "sync")]
        if progress:
            for r in rows[-1 if W == 1 else -2:]:
                final = [c[-1] for c in r["test_accuracy"]]
                print(f"{W} worker(s), {r['bn']:6s}: final test accuracy "
                      f"{sum(final) / len(final):.4f} ({', '.join(f'{a:.4f}' for a in final)}), "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
    return {"config": cfg.as_dict(), "steps": cfg.checkpoints(), "rows": rows}


def torch_sync_bn_on_cpu(rank: int, world_size: int) -> str:
    """What ``torch.nn.SyncBatchNorm`` does with CPU tensors in a process group: its error message.

    Defined in: chapters/09_sync_bn.ipynb
    """
    try:
        torch.nn.SyncBatchNorm(3)(torch.randn(4, 3))
    except ValueError as e:
        return f"ValueError: {e}"
    return "no error"


def comm_counts(rank: int, world_size: int, batch_per_rank: int = 8) -> dict:
    """Count the collectives of one training step of the seed CNN with SyncBatchNorm under DDP.

    Defined in: chapters/09_sync_bn.ipynb

    Returns ``{"syncbn": [logged calls of bnlib.sync_bn during the step], "ddp": [numbers in each of DDP's
    gradient all-reduces], "params": number of parameters}`` (rank 0; DDP's buckets are logged by a comm hook).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    from bnlib.sync_bn import record_collectives

    model = DDP(_new_model(0, "sync"))
    ddp_sizes = []

    def hook(state, bucket):
        ddp_sizes.append(bucket.buffer().numel())
        fut = dist.all_reduce(bucket.buffer().div_(world_size), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    model.register_comm_hook(None, hook)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch_per_rank, 1, 28, 28, generator=g), torch.randint(0, 10, (batch_per_rank,), generator=g)
    F.cross_entropy(model(x), y).backward()  # first step: includes the one-off channel check
    with record_collectives() as log:
        model.zero_grad()
        ddp_sizes.clear()
        F.cross_entropy(model(x), y).backward()
    return {"syncbn": log, "ddp": list(ddp_sizes), "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node=2 -m bnlib.ddp [--steps N]``: :func:`ddp_train` in the group torchrun made.

    Defined in: chapters/09_sync_bn.ipynb
    """
    import argparse

    p = argparse.ArgumentParser(prog="torchrun ... -m bnlib.ddp")
    p.add_argument("--steps", type=int, default=DDPConfig.steps)
    p.add_argument("--seeds", type=int, nargs="+", default=list(DDPConfig.seeds))
    args = p.parse_args(argv)
    rank, world = init_from_env()
    torch.set_num_threads(1)
    cfg = DDPConfig(seeds=tuple(args.seeds), steps=args.steps)
    res = ddp_train(rank, world, cfg, ddp_data(cfg))
    if rank == 0:
        print({k: v for k, v in res.items() if k != "seconds"})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
