"""The ``secondorder`` command line. The CLI alone talks to the terminal.

Subcommands:

* ``secondorder bench ...`` -- the thesis benchmark suite (see ``secondorder bench --help``);
* ``secondorder demo`` -- a one-minute sanity run: SGD-m and KFAC on a generated problem;
* ``secondorder methods`` -- the factory keys and whether this version implements them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence


def _bench_module():
    try:
        return importlib.import_module("secondorder.bench.cli")
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("secondorder.bench"):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secondorder", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the optimizers model")
    sub = parser.add_subparsers(dest="command")
    bench = _bench_module()
    if bench is not None:
        bench.add_parser(sub)
    demo = sub.add_parser("demo", help="train a generated problem with sgd and kfac and print the losses")
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--optimizers", default="sgd,kfac", help="comma-separated factory keys")
    sub.add_parser("methods", help="list the optimizers and their status")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command is None:
        bench = _bench_module()
        if bench is not None:
            return bench.main(parser.parse_args(["bench"]))
        from .demo import run_demo

        return run_demo(10, 0, ["sgd", "kfac"])
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.epochs, args.seed, args.optimizers.split(","))
    if args.command == "methods":
        from .optim import METHODS, implemented

        done = set(implemented())
        for name in METHODS:
            print(f"{name:14s} {'implemented' if name in done else 'not implemented yet'}")
        return 0
    return _bench_module().main(args)  # type: ignore[union-attr]


if __name__ == "__main__":
    sys.exit(main())
