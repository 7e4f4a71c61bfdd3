"""Quality run on CURVES (synthetic): the thesis's best hyper-parameters, several seeds, one time budget.

Runs the chapter-3/4 rows of Tables 3.5 / 4.3 (K-BFGS, K-BFGS-dagger, K-BFGS(L), K-BFGS-20,
K-BFGS(L)-20, KFAC, Adam, SGD-m, TNT, Shampoo) on ``curves-synth-v1`` at full size (20,000 / 10,000)
with the same process-time budget per method and ``--seeds`` seeds, then the Table 3.8 ablation
(K-BFGS with improvement #1 and/or #2 switched off). The check of issue 5: the mean final training
losses of ``kfac``, ``kbfgs``, ``kbfgsl`` and ``tnt`` lie below SGD-m's.

Everything goes through one SQLite store (``OUT/bench.sqlite``), so an interrupted run resumes and
the ablation reuses the ``kbfgs`` and ``kbfgs20`` runs; reports land in ``OUT/ch3`` and
``OUT/ablation`` (summary.md, summary.json, plots).

Usage::

    python benchmarks/quality_curves.py                                  # 60 s per run, 3 seeds
    python benchmarks/quality_curves.py --time-budget 500 --seeds 5      # the thesis protocol
    python benchmarks/quality_curves.py --methods sgd,kfac --time-budget 20 --seeds 1 --no-ablation
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

from secondorder.bench import data as D
from secondorder.bench import presets as PR
from secondorder.bench import reports
from secondorder.bench.cli import Progress
from secondorder.bench.grid import BenchConfig, Benchmark, Outcome
from secondorder.bench.store import Store

MUST_BEAT_SGD = ("kfac", "kbfgs", "kbfgsl", "tnt")


def _mean_final(outcome: Outcome, label: str) -> tuple[float, float, int]:
    vals = [
        r.result["final_train_loss"]
        for r in outcome.finals
        if r.spec.label == label and r.status == "done" and math.isfinite(r.result["final_train_loss"])
    ]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def run_suite(suite: str, labels: tuple[str, ...] | None, args: argparse.Namespace, store: Store) -> Outcome:
    config = BenchConfig(
        problem="curves",
        suite=suite,
        labels=labels,
        seconds=args.time_budget,
        seeds=args.seeds,
        base_seed=args.seed,
        data=D.DataOptions(cache_dir=args.cache_dir),
        device=args.device,
    )
    bench = Benchmark(config, store, Progress(sys.stderr))
    if bench.skipped:
        skipped = ", ".join(f"{k} ({v})" for k, v in bench.skipped.items())
        print(f"{suite}: skipped {skipped}", file=sys.stderr)
    outcome = bench.run()
    reports.write_all(outcome, args.out / suite)
    return outcome


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--time-budget", type=float, default=60.0, help="process seconds per run (default 60)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--methods", help="comma-separated ch3 rows (default: every default row)")
    p.add_argument("--no-ablation", action="store_true", help="skip the Table 3.8 ablation")
    p.add_argument("--out", type=Path, default=Path("bench-out/quality-curves"))
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, as secondorder bench)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    labels = tuple(args.methods.split(",")) if args.methods else None
    with Store(args.out / "bench.sqlite") as store:
        ch3 = run_suite("ch3", labels, args, store)
        ablation = None if args.no_ablation else run_suite("ablation", None, args, store)

    budget = f"{args.time_budget:g} s of process time per run"
    print(f"\nCURVES ({ch3.dataset.label}), {args.seeds} seed(s), {budget}")
    print("\n| optimizer | final train loss (ours) | runs | thesis Table 3.3 (real CURVES, 500 s) |")
    print("|---|---|---|---|")
    means = {}
    for row in ch3.rows:
        mean, std, n = _mean_final(ch3, row.label)
        means[row.label] = mean
        thesis = PR.THESIS_TABLE_3_3.get(row.label, {}).get("curves")
        print(f"| {row.label} | {mean:.3f} ± {std:.3f} | {n} | {'—' if thesis is None else thesis} |")
    sgd = means.get("sgd", math.nan)
    print()
    status = 0
    for label in (*MUST_BEAT_SGD, "kfac-pi1"):
        if label not in means:
            if label in MUST_BEAT_SGD:
                print(f"{label}: not run (not selected)")
            continue
        ok = means[label] < sgd
        status |= 0 if ok or label not in MUST_BEAT_SGD else 1
        verdict = "ok" if ok else "NOT BELOW SGD-m"
        print(f"{label}: {means[label]:.3f} {'<' if ok else '>='} SGD-m {sgd:.3f}  {verdict}")
    if ablation is not None:
        print()
        print(reports.ablation_table(ablation))
    print(f"reports: {args.out / 'ch3'}" + ("" if ablation is None else f", {args.out / 'ablation'}"))
    return status


if __name__ == "__main__":
    sys.exit(main())
