"""Per-step time of K-BFGS and K-BFGS(L) relative to SGD-m on the thesis MNIST autoencoder.

Network 784-1000-500-250-30-250-500-1000-784 (ReLU, linear code layer, logits with
``so.losses.SummedBCEWithLogitsLoss``), batch 1000, random inputs in [0, 1], CPU, float32.
Goals (issue 3): ``kbfgs`` T=1 <= 2.7x, ``kbfgs`` T=20 <= 1.7x, ``kbfgsl`` T=1 <= 2.9x SGD-m.

All configurations live in one process and are measured in interleaved rounds: a round runs
``--steps`` steps (a multiple of 20, so T=20 pays its curvature step once per 20 steps) of
every configuration, one step of each in turn (``--block``: the steps of one configuration
back to back), and the reported ratio is the median over rounds of the configuration's step
time divided by SGD-m's in the same round, for wall-clock time and for process CPU time (the
thesis's clock; it does not count time the process waits for a CPU). Interleaving keeps the
drifts of a shared machine out of the ratios. ``--threads`` sets ``torch.set_num_threads``
(default 1: on a machine shared with other jobs, every multi-threaded kernel can stall on a
descheduled thread, which penalises methods with many small kernels; ``--threads 0`` keeps
torch's default). Before timing, every
optimizer is warm-started on two batches and takes ``--warmup`` untimed steps; ``kbfgsl``
first fills its L-BFGS memory (``history_size`` = 100 pairs) so that the timed steps are the
steady state.

Usage::

    python benchmarks/kbfgs_cost.py                 # 5 rounds of 20 steps, 1 thread
    python benchmarks/kbfgs_cost.py --rounds 3 --threads 0 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import secondorder as so

WIDTHS = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
BATCH = 1000

#: (label, factory key, hyper-parameters, goal ratio): Table 3.5 (MNIST) values; T=20 is K-BFGS†
CONFIGS: list[tuple[str, str, dict, float | None]] = [
    ("sgd-m", "sgd", dict(lr=0.003), None),
    ("kbfgs T=1", "kbfgs", dict(lr=0.03, damping=0.3, update_freq=1), 2.7),
    ("kbfgs T=20", "kbfgs", dict(lr=0.3, damping=30.0, update_freq=20), 1.7),
    ("kbfgsl T=1", "kbfgsl", dict(lr=0.03, damping=0.3, update_freq=1, history_size=100), 2.9),
]


def autoencoder() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2 and b != 30:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Runner:
    """One configuration: its model, optimizer and a cycle over the batches."""

    def __init__(self, key: str, hp: dict, x: torch.Tensor):
        torch.manual_seed(0)
        self.model = autoencoder()
        self.opt = so.make_optimizer(key, self.model, **hp)
        loss_fn = so.losses.SummedBCEWithLogitsLoss()
        batches = [x[i : i + BATCH] for i in range(0, x.shape[0], BATCH)]
        self.closures = [so.Closure(self.model, b, b, loss_fn) for b in batches]
        self.opt.warm_start(self.closures[:2])
        self.k = 0

    def steps(self, n: int) -> tuple[float, float]:
        """Run ``n`` steps; returns the (wall-clock, process CPU) seconds they took."""
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            self.opt.step(self.closures[self.k % len(self.closures)])
            self.k += 1
        return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round (a multiple of 20)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--no-fill", action="store_true", help="do not fill the L-BFGS memory before timing")
    parser.add_argument("--block", action="store_true", help="time consecutive steps per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batches * BATCH, WIDTHS[0], generator=gen)
    runners = {}
    for label, key, hp, _ in CONFIGS:
        runner = Runner(key, hp, x)
        fill = 0 if args.no_fill else hp.get("history_size", 0)
        runner.steps(args.warmup + fill)
        runners[label] = runner
    clocks = ("wall", "cpu")
    per_round = {c: {label: [] for label in runners} for c in clocks}
    for _ in range(args.rounds):
        totals = {label: [0.0, 0.0] for label in runners}
        for _ in range(1 if args.block else args.steps):
            for label, runner in runners.items():
                for i, dt in enumerate(runner.steps(args.steps if args.block else 1)):
                    totals[label][i] += dt
        for label, (wall, cpu) in totals.items():
            per_round["wall"][label].append(wall / args.steps)
            per_round["cpu"][label].append(cpu / args.steps)

    mode = "blocks" if args.block else "interleaved steps"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, "
        f"{args.rounds} rounds x {args.steps} {mode}"
    )
    results: dict[str, dict] = {}
    for label, _, _, goal in CONFIGS:
        results[label] = {"goal": goal}
        line = f"{label:12s}"
        for c in clocks:
            ratios = [t / s for t, s in zip(per_round[c][label], per_round[c]["sgd-m"], strict=True)]
            ratio = statistics.median(ratios)
            ms = 1e3 * statistics.median(per_round[c][label])
            results[label][c] = dict(ms_per_step=ms, ratio=ratio, ratios=ratios)
            line += f"  {c} {ms:7.1f} ms {ratio:5.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        if goal is not None:
            met = results[label]["cpu"]["ratio"] <= goal
            line += f"  goal <= {goal:.1f}x: {'met' if met else 'MISSED'} (CPU time)"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
