"""Per-step cost of every implemented method relative to SGD-m, measured in the same run.

The thesis MNIST autoencoder (784-1000-500-250-30-250-500-1000-784, ReLU, linear code layer,
logits + BCE summed over pixels), batch 1000, random inputs in [0, 1], on the CPU by default.
Each configuration gets a fresh model, a warm start where the method has one, ``--warmup``
untimed steps, then ``--steps`` timed steps (wall clock, ``time.perf_counter``); the ratio is the
mean step time divided by SGD-m's mean. ``--steps`` defaults to 40, a multiple of every T2 (20),
so the mean amortises the periodic inverse work exactly; the median (reported too) shows the
cost of an ordinary step. SGD-m is measured first and last, and the mean of
the two is used, so drift in machine speed during the run does not bias the ratios.

Usage::

    python benchmarks/step_cost.py                      # all implemented methods, CPU
    python benchmarks/step_cost.py --methods kfac,kbfgs --steps 20
    python benchmarks/step_cost.py --device cuda --json out.json
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


def time_config(
    key: str, hp: dict, x: torch.Tensor, steps: int, warmup: int, device: str
) -> tuple[float, float]:
    """(mean, median) seconds per timed step."""
    torch.manual_seed(0)
    model = autoencoder().to(device)
    opt = so.make_optimizer(key, model, **hp)
    loss_fn = so.losses.SummedBCEWithLogitsLoss()
    n_batches = x.shape[0] // 1000
    closures = [
        so.Closure(model, x[i * 1000 : (i + 1) * 1000], x[i * 1000 : (i + 1) * 1000], loss_fn)
        for i in range(n_batches)
    ]
    opt.warm_start(closures[:2])
    times = []
    for k in range(warmup + steps):
        c = closures[k % n_batches]
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step(c)
        if device == "cuda":
            torch.cuda.synchronize()
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.fmean(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods", default="", help="comma-separated labels or keys (default: all implemented)"
    )
    parser.add_argument("--steps", type=int, default=40, help="timed steps (a multiple of T2 = 20)")
    parser.add_argument(
        "--warmup", type=int, default=25, help="untimed steps (past the first T2 steps of frequent inverses)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    available = set(so.implemented())
    wanted = set(args.methods.split(",")) if args.methods else None
    configs = [
        c for c in CONFIGS if c[1] in available and (wanted is None or c[0] in wanted or c[1] in wanted)
    ]
    x = torch.rand(5000, 784, generator=torch.Generator().manual_seed(0)).to(args.device)
    sgd = CONFIGS[0]
    first = time_config(sgd[1], sgd[2], x, args.steps, args.warmup, args.device)
    results = {}
    for label, key, hp in configs:
        if label == "sgd-m":
            continue
        results[label] = time_config(key, hp, x, args.steps, args.warmup, args.device)
    last = time_config(sgd[1], sgd[2], x, args.steps, args.warmup, args.device)
    base = 0.5 * (first[0] + last[0])
    base_median = 0.5 * (first[1] + last[1])
    print(
        f"MNIST autoencoder, batch 1000, {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; SGD-m step {1000 * base:.1f} ms "
        f"(first {1000 * first[0]:.1f}, last {1000 * last[0]:.1f})"
    )
    print(
        "| method | ms/step (mean) | x SGD-m (mean) | x SGD-m (median) | goal |\n"
        "| --- | ---: | ---: | ---: | ---: |"
    )
    print(f"| sgd-m | {1000 * base:.1f} | 1.00 | 1.00 | |")
    for label, (t, med) in results.items():
        goal = GOALS.get(label)
        print(
            f"| {label} | {1000 * t:.1f} | {t / base:.2f} | {med / base_median:.2f} | "
            f"{f'<= {goal:.1f}' if goal else ''} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": args.device,
                    "threads": torch.get_num_threads(),
                    "sgd_m_seconds": base,
                    "ratios": {k: v[0] / base for k, v in results.items()},
                    "median_ratios": {k: v[1] / base_median for k, v in results.items()},
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
