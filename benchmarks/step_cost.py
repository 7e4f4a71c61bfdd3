"""Per-step cost of every method relative to SGD-m, measured in the same run.

The thesis MNIST autoencoder (784-1000-500-250-30-250-500-1000-784, ReLU, linear code layer,
logits + BCE summed over pixels), batch 1000, random inputs in [0, 1], on the CPU by default.
Each configuration gets a fresh model and optimizer, a warm start where the method has one and
``--warmup`` untimed steps, and so does its own SGD-m runner (same initial model). Then the two
take turns: ``--block`` (20) timed steps of SGD-m, ``--block`` timed steps of the method, until
the method has ``--steps`` (40) timed steps. Blocks are whole T2 = 20 cycles, so the mean
amortises the periodic inverse work exactly, and SGD-m is timed next to each method in time,
so drift in machine speed (a noisy neighbour, clock changes) hits both alike. The ratio is the
method's mean step time over its SGD-m runner's mean; the median ratio (reported too) shows the
cost of an ordinary step. Wall clock, ``time.perf_counter``.

Usage::

    python benchmarks/step_cost.py                      # all methods, CPU
    python benchmarks/step_cost.py --methods kfac,kbfgs --steps 20
    python benchmarks/step_cost.py --device cuda --json out.json
    python benchmarks/step_cost.py --problem transformer   # a 2-layer character transformer
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from torch import nn

import secondorder as so
from secondorder.bench.models import CharTransformer
from secondorder.optim.kronecker import UnmodeledParametersWarning

WIDTHS = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]

#: (label, factory key, hyper-parameters): the configurations the issues set goals for
CONFIGS: list[tuple[str, str, dict]] = [
    ("sgd-m", "sgd", dict(lr=0.003)),
    ("adam", "adam", dict(lr=1e-4)),
    ("rmsprop", "rmsprop", dict(lr=1e-4)),
    ("kfac T1=1 T2=20", "kfac", dict(lr=0.03, damping=1.0, update_freq=1, inverse_freq=20)),
    ("kfac-ef T1=1 T2=20", "kfac-ef", dict(lr=0.03, damping=1.0, update_freq=1, inverse_freq=20)),
    ("kbfgs T=1", "kbfgs", dict(lr=0.03, damping=0.3, update_freq=1)),
    ("kbfgs T=20", "kbfgs", dict(lr=0.3, damping=30.0, update_freq=20)),
    ("kbfgsl T=1", "kbfgsl", dict(lr=0.03, damping=0.3, update_freq=1)),
    ("kbfgs20", "kbfgs20", dict()),
    ("kbfgsl20", "kbfgsl20", dict()),
    ("tnt T1=1 T2=20", "tnt", dict(update_freq=1, inverse_freq=20)),
    ("tnt-ef T1=1 T2=20", "tnt-ef", dict(update_freq=1, inverse_freq=20)),
    ("shampoo", "shampoo", dict()),
]

#: goals from the issues (ratio to SGD-m)
GOALS = {
    "kfac T1=1 T2=20": 3.0,
    "kbfgs T=1": 2.7,
    "kbfgs T=20": 1.7,
    "kbfgsl T=1": 2.9,
    "tnt T1=1 T2=20": 2.8,
    "shampoo": 2.2,
}


def autoencoder() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2 and b != 30:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


#: ``--problem transformer``: the ``charlm`` model of the benchmark (2 layers, width 128, context 64)
#: over a 96-symbol vocabulary, batches of 32 random windows
VOCAB, CONTEXT, WIDTH, LAYERS, LM_BATCH = 96, 64, 128, 2, 32


def batches(problem: str, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The shared minibatches: 5 of 1000 images in [0, 1], or 5 of 32 random token windows."""
    g = torch.Generator().manual_seed(0)
    if problem == "mnist-ae":
        x = torch.rand(5000, 784, generator=g).to(device)
        return [(x[i * 1000 : (i + 1) * 1000],) * 2 for i in range(5)]  # type: ignore[misc]
    tokens = torch.randint(0, VOCAB, (5 * LM_BATCH, CONTEXT + 1), generator=g).to(device)
    return [(w[:, :-1], w[:, 1:]) for w in tokens.split(LM_BATCH)]


class Runner:
    """One configuration on its own model, stepping through the shared batches."""

    def __init__(self, key: str, hp: dict, data: list, device: str, problem: str = "mnist-ae"):
        torch.manual_seed(0)
        self.model = (autoencoder() if problem == "mnist-ae" else CharTransformer(VOCAB)).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnmodeledParametersWarning)
            self.opt = so.make_optimizer(key, self.model, **hp)
        loss_fn = (
            so.losses.SummedBCEWithLogitsLoss()
            if problem == "mnist-ae"
            else so.losses.TokenCrossEntropyLoss()
        )
        self.closures = [so.Closure(self.model, x, t, loss_fn) for x, t in data]
        self.opt.warm_start(self.closures[:2])
        self.device = device
        self.k = 0
        self.times: list[float] = []

    def run(self, steps: int, timed: bool = True) -> None:
        for _ in range(steps):
            closure = self.closures[self.k % len(self.closures)]
            if self.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            self.opt.step(closure)
            if self.device == "cuda":
                torch.cuda.synchronize()
            if timed:
                self.times.append(time.perf_counter() - start)
            self.k += 1


def time_config(
    key: str,
    hp: dict,
    data: list,
    steps: int,
    warmup: int,
    device: str,
    block: int = 20,
    problem: str = "mnist-ae",
) -> tuple[Runner, Runner]:
    """(SGD-m runner, method runner), timed in alternating blocks of ``block`` steps."""
    sgd = Runner(CONFIGS[0][1], CONFIGS[0][2], data, device, problem)
    method = Runner(key, hp, data, device, problem)
    sgd.run(warmup, timed=False)
    method.run(warmup, timed=False)
    while len(method.times) < steps:
        sgd.run(block)
        method.run(block)
    return sgd, method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="", help="comma-separated labels or keys (default: all)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (a multiple of T2 = 20)")
    parser.add_argument(
        "--warmup", type=int, default=25, help="untimed steps (past the first T2 steps of frequent inverses)"
    )
    parser.add_argument(
        "--block",
        type=int,
        default=20,
        help="steps per turn of SGD-m and the method (a multiple of T2 = 20 amortises the inverses)",
    )
    parser.add_argument(
        "--problem",
        choices=["mnist-ae", "transformer"],
        default="mnist-ae",
        help="the thesis MNIST autoencoder (default) or a 2-layer character transformer",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    for name in ("steps", "block"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    available = set(so.METHODS)
    wanted = set(args.methods.split(",")) if args.methods else None
    configs = [
        c for c in CONFIGS if c[1] in available and (wanted is None or c[0] in wanted or c[1] in wanted)
    ]
    data = batches(args.problem, args.device)
    results = {}
    sgd_times: list[float] = []
    for label, key, hp in configs:
        if label == "sgd-m":
            continue
        sgd, method = time_config(
            key, hp, data, args.steps, args.warmup, args.device, args.block, args.problem
        )
        sgd_times += sgd.times
        mean, sgd_mean = statistics.fmean(method.times), statistics.fmean(sgd.times)
        median, sgd_median = statistics.median(method.times), statistics.median(sgd.times)
        results[label] = (mean, mean / sgd_mean, median / sgd_median)
    if not sgd_times:  # only SGD-m asked for: time it on its own
        sgd = Runner(CONFIGS[0][1], CONFIGS[0][2], data, args.device, args.problem)
        sgd.run(args.warmup, timed=False)
        sgd.run(args.steps)
        sgd_times = sgd.times
    base = statistics.fmean(sgd_times)
    what = (
        "MNIST autoencoder, batch 1000"
        if args.problem == "mnist-ae"
        else f"character transformer ({LAYERS} layers, width {WIDTH}, context {CONTEXT}), batch {LM_BATCH}"
    )
    print(
        f"{what}, {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; SGD-m step {1000 * base:.1f} ms (mean over all its blocks)"
    )
    print(
        "| method | ms/step (mean) | x SGD-m (mean) | x SGD-m (median) | goal |\n"
        "| --- | ---: | ---: | ---: | ---: |"
    )
    print(f"| sgd-m | {1000 * base:.1f} | 1.00 | 1.00 | |")
    for label, (t, ratio, median_ratio) in results.items():
        goal = GOALS.get(label) if args.problem == "mnist-ae" else None  # the goals are the autoencoder's
        print(
            f"| {label} | {1000 * t:.1f} | {ratio:.2f} | {median_ratio:.2f} | "
            f"{f'<= {goal:.1f}' if goal else ''} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "problem": args.problem,
                    "device": args.device,
                    "threads": torch.get_num_threads(),
                    "sgd_m_seconds": base,
                    "block": args.block,
                    "ratios": {k: v[1] for k, v in results.items()},
                    "median_ratios": {k: v[2] for k, v in results.items()},
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
