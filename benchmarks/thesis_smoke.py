"""Full-size runs of the thesis rows at the thesis's values: does anything turn non-finite?

The test ``tests/bench/test_thesis_smoke.py`` runs every method on every thesis problem at a
reduced batch (and a 1/8-wide VGG16) so that it fits in CI; this script runs the full sizes:
the thesis networks at the thesis batch sizes (ResNet32 and VGG16-BN at 128, the autoencoders
at 1000, the classifiers at 60/100), on generated data of the right shape
(``secondorder.bench.smoke.stand_in``).

Usage::

    python benchmarks/thesis_smoke.py                      # K-BFGS keys on the 4 CNN problems, 60 steps
    python benchmarks/thesis_smoke.py --problems cifar10-resnet32 --rows kbfgs,kfac --steps 60
    python benchmarks/thesis_smoke.py --all --steps 30     # every row of every suite, every problem

Prints one line per run (status, steps, the first and last minibatch loss, K-BFGS's uninformative
and non-finite counters, seconds) and exits 1 if any run was not finite.
"""

from __future__ import annotations

import argparse
import sys

import torch

from secondorder.bench import presets as PR
from secondorder.bench import smoke

KBFGS_KEYS = ("kbfgs", "kbfgsl", "kbfgs20", "kbfgsl20")


def _counters(result) -> tuple[int, int]:  # noqa: ANN001
    diag = result.diagnostics.get("kbfgs", {})
    return sum(int(d.get("h_g_uninformative", 0)) for d in diag.values()), smoke.nonfinite_updates(result)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default=",".join(PR.CNNS), help="comma-separated problems")
    ap.add_argument("--rows", default=",".join(KBFGS_KEYS), help="comma-separated row names (see --all)")
    ap.add_argument("--all", action="store_true", help="every row of every suite on every thesis problem")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=None, help="default: the thesis batch of each problem")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.batch is not None and args.batch < 1:
        ap.error("--batch must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = smoke.PROBLEMS if args.all else tuple(p for p in args.problems.split(",") if p)
    wanted = None if args.all else {r for r in args.rows.split(",") if r}
    for problem in problems:
        try:
            smoke.rows(problem)
        except ValueError as err:
            ap.error(f"--problems: {err}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps per run",
        flush=True,
    )
    bad = 0
    for problem in problems:
        rows = [r for r in smoke.rows(problem) if wanted is None or r.name in wanted or r.label in wanted]
        if wanted is not None:
            missing = wanted - {r.name for r in rows} - {r.label for r in rows}
            if missing:
                print(f"{problem}: no row named {', '.join(sorted(missing))}", flush=True)
        for row in rows:
            result = smoke.run(problem, row, steps=args.steps, batch=args.batch)
            losses = result.losses or [float("nan")]
            uninformative, nonfinite = _counters(result)
            ok = smoke.finite_result(result)
            bad += not ok
            print(
                f"{problem:18s} {row.name:26s} {'ok ' if ok else 'BAD'} {result.status:8s} "
                f"steps {result.steps:3d}  loss {losses[0]:10.4g} -> {losses[-1]:10.4g}  "
                f"uninformative {uninformative:4d}  nonfinite {nonfinite}  {result.seconds:6.1f} s"
                + (f"  ({result.error})" if result.error else ""),
                flush=True,
            )
    print(f"{bad} run(s) not finite", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
