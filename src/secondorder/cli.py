"""The ``secondorder`` command line. The CLI alone talks to the terminal.

Subcommands:

* ``secondorder bench ...`` -- the thesis benchmark suite (see ``secondorder bench --help``);
* ``secondorder demo`` -- a one-minute sanity run: SGD-m and KFAC on a generated problem;
* ``secondorder methods`` -- each factory key with its class and a line on the method;
* ``secondorder --version``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from . import __version__


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")
    bench = _bench_module()
    if bench is not None:
        bench.add_parser(sub)
    demo = sub.add_parser("demo", help="train a generated problem with sgd and kfac and print the losses")
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--optimizers", default="sgd,kfac", help="comma-separated factory keys")
    sub.add_parser("methods", help="list the optimizers: factory key, class, what the method is")
    return parser


def _demo_problem(epochs: int, names: list[str], known: list[str]) -> str | None:
    """What is wrong with ``demo``'s arguments, or ``None``."""
    if epochs < 1:
        return f"--epochs must be >= 1, got {epochs}"
    unknown = [x for x in names if x not in known]
    if unknown:
        return f"--optimizers: unknown {', '.join(repr(x) for x in unknown)}; known: {', '.join(known)}"
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        return f"--optimizers: {', '.join(twice)} named twice"
    return None


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
        from .optim import METHODS

        names = [x.strip() for x in args.optimizers.split(",")]
        problem = _demo_problem(args.epochs, names, list(METHODS))
        if problem:
            print(f"secondorder demo: {problem}", file=sys.stderr)
            return 2
        return run_demo(args.epochs, args.seed, names)
    if args.command == "methods":
        from .optim import METHODS, optimizer_class

        for name in METHODS:
            cls = optimizer_class(name)
            line = (cls.__doc__ or "").strip().splitlines()[0].replace("``", "")
            print(f"{name:13s} so.{cls.__name__:12s} {line}")
        return 0
    return _bench_module().main(args)  # type: ignore[union-attr]


if __name__ == "__main__":
    sys.exit(main())
