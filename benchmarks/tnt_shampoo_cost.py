"""Per-step cost of TNT and Shampoo relative to SGD-m on the thesis MNIST autoencoder shape (CPU).

Network 784-1000-500-250-30-250-500-1000-784 (ReLU, linear code layer, logits out), batch 1000,
random inputs in [0, 1] as their own targets, ``so.losses.SummedBCEWithLogitsLoss``. All methods
run in the same process on the same batches: SGD-m (lr 0.003, momentum 0.9), TNT (T1 = 1,
T2 = 20, Table 4.3 MNIST values) and Shampoo (T1 = 1, T2 = 20, "lessInverse", the default root
method: the eigendecomposition on CPU; ``--newton`` adds ``shampoo[newton]``, coupled Newton forced).
Each method is timed over whole T2 periods after one untimed warm-up period, so the amortised
inverse work is included.

Goals (issue 4): ``tnt <= 2.8 x sgd``, ``shampoo <= 2.2 x sgd``. This is a measurement, not a test.

Usage::

    python benchmarks/tnt_shampoo_cost.py [--steps 40] [--threads N] [--rounds 2] [--newton] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from torch import nn

import secondorder as so

logger = logging.getLogger("tnt_shampoo_cost")

WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def autoencoder(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2 and b != 30:  # ReLU everywhere except the linear code layer and the output
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def time_method(name: str, hp: dict, batches: list[torch.Tensor], steps: int, warmup: int) -> dict:
    model = autoencoder()
    opt = so.make_optimizer(name, model, **hp)
    loss_fn = so.losses.SummedBCEWithLogitsLoss()
    closures = [so.Closure(model, x, x, loss_fn) for x in batches]
    for i in range(warmup):
        opt.step(closures[i % len(closures)])
    curvature0 = opt.stats.curvature_seconds
    start = time.perf_counter()
    cpu0 = time.process_time()
    for i in range(steps):
        loss = opt.step(closures[i % len(closures)])
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return {
        "method": name,
        "hp": hp,
        "steps": steps,
        "seconds_per_step": wall / steps,
        "cpu_seconds_per_step": cpu / steps,
        "curvature_seconds_per_step": (opt.stats.curvature_seconds - curvature0) / steps,
        "final_loss": float(loss),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps", type=int, default=40, help="timed steps per method (a multiple of T2 = 20)"
    )
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the fastest is kept)")
    parser.add_argument("--newton", action="store_true", help="also time Shampoo with coupled Newton forced")
    parser.add_argument("--json", type=str, default="", help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("secondorder").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(args.batch, 784, generator=g) for _ in range(4)]
    methods = [
        ("sgd", dict(lr=0.003, momentum=0.9)),
        ("tnt", dict(lr=1e-4, damping=0.1, update_freq=1, inverse_freq=20)),
        ("shampoo", dict(lr=3e-4, damping=3e-4, update_freq=1, inverse_freq=20)),
    ]
    if args.newton:
        methods.append(
            ("shampoo", dict(lr=3e-4, damping=3e-4, update_freq=1, inverse_freq=20, root_method="newton"))
        )
    results = {}
    # interleave rounds so that load changes on a shared machine hit every method alike
    for _ in range(args.rounds):
        for name, hp in methods:
            r = time_method(name, hp, batches, args.steps, warmup=20)
            key = name if "root_method" not in hp else f"{name}[{hp['root_method']}]"
            logger.info("%s: %.1f ms/step", key, r["seconds_per_step"] * 1e3)
            prev = results.get(key)
            if prev is None or r["seconds_per_step"] < prev["seconds_per_step"]:
                results[key] = r
    base = results["sgd"]["seconds_per_step"]
    report = {
        "torch_threads": torch.get_num_threads(),
        "results": results,
        "ratio_to_sgd": {n: r["seconds_per_step"] / base for n, r in results.items()},
        "goals": {"tnt": 2.8, "shampoo": 2.2},
    }
    for n, r in results.items():
        print(
            f"{n:16s} {r['seconds_per_step'] * 1e3:8.1f} ms/step  x{report['ratio_to_sgd'][n]:.2f}  "
            f"(curvature {r['curvature_seconds_per_step'] * 1e3:.1f} ms/step, loss {r['final_loss']:.1f})"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
