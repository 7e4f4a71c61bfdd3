"""Per-step cost of SMW-NG, SMW-NG-BD, SMW-GN and HF relative to SGD on the chapter-5 MNIST classifier.

Network 784-500-10 with logistic hidden units and softmax cross-entropy (5.8), minibatch
``N1 = 60``, curvature subsample ``N2 = 30``, random standardised inputs (zero mean, unit
variance, as the thesis scales its data) and random labels. Every method runs in the same
process on the same batches, each from the same initial model: plain SGD (lr 0.1, no
momentum, the chapter-5 baseline), ``smw-ng``, ``smw-ng-bd``, ``smw-gn`` and ``hf``
(``cg_max_iters`` 10) with the thesis LM constants. Each method takes ``--warmup`` untimed
steps, then ``--steps`` timed ones (``time.perf_counter``) in ``--rounds`` interleaved rounds
(every method takes a few steps in turn), so that drift in machine speed hits all methods
alike; the ratio is the median step time over SGD's median. Passes per step come from
``opt.stats``.

This is a measurement, not a test. Usage::

    python benchmarks/ch5_step_cost.py [--steps 60] [--rounds 6] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import secondorder as so

N1, N2 = 60, 30

#: (label, factory key, hyper-parameters)
CONFIGS: list[tuple[str, str, dict]] = [
    ("smw-ng", "smw-ng", dict(lr=0.1, curvature_batch=N2)),
    ("smw-ng-bd", "smw-ng-bd", dict(lr=0.1, curvature_batch=N2)),
    ("smw-gn", "smw-gn", dict(lr=0.1, curvature_batch=N2)),
    ("hf (10 CG)", "hf", dict(lr=0.1, curvature_batch=N2, cg_max_iters=10, cg_tol=0.0)),
]


def classifier(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 500), nn.Sigmoid(), nn.Linear(500, 10))


def data(n_batches: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n_batches * N1, 784, generator=gen)
    x = (x - x.mean(0)) / x.std(0)  # standardised, as in 5.8
    y = torch.randint(0, 10, (n_batches * N1,), generator=gen)
    return [(x[i * N1 : (i + 1) * N1], y[i * N1 : (i + 1) * N1]) for i in range(n_batches)]


class Runner:
    """One method on its own copy of the initial model, stepping through the shared batches."""

    def __init__(self, key: str, hp: dict, batches):
        self.model = classifier()
        self.opt = so.make_optimizer(key, self.model, **hp)
        self.batches = batches
        self.loss_fn = nn.CrossEntropyLoss()
        self.k = 0
        self.times: list[float] = []

    def run(self, steps: int, timed: bool = True) -> None:
        for _ in range(steps):
            x, y = self.batches[self.k % len(self.batches)]
            closure = so.Closure(self.model, x, y, self.loss_fn)
            start = time.perf_counter()
            self.opt.step(closure)
            if timed:
                self.times.append(time.perf_counter() - start)
            self.k += 1

    def summary(self) -> dict:
        s = self.opt.stats
        return {
            "median_s": statistics.median(self.times),
            "forward_per_step": s.forward_passes / s.steps,
            "backward_per_step": s.backward_passes / s.steps,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="timed steps per method")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (drift control)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = data(20)
    runners = {"sgd": Runner("sgd", dict(lr=0.1, momentum=0.0), batches)}
    runners.update({label: Runner(key, hp, batches) for label, key, hp in CONFIGS})
    for r in runners.values():
        r.run(args.warmup, timed=False)
    per_round = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):  # interleaved, so that machine-speed drift hits every method alike
        for r in runners.values():
            r.run(per_round)
    results = {label: r.summary() for label, r in runners.items()}
    base = results["sgd"]["median_s"]
    print(f"784-500-10 sigmoid, softmax CE, N1={N1}, N2={N2}, threads={torch.get_num_threads()}")
    print(f"{'method':<12} {'ms/step':>9} {'x SGD':>7} {'fwd/step':>9} {'bwd/step':>9}")
    for label, r in results.items():
        r["ratio_to_sgd"] = r["median_s"] / base
        print(
            f"{label:<12} {1e3 * r['median_s']:9.3f} {r['ratio_to_sgd']:7.2f} "
            f"{r['forward_per_step']:9.1f} {r['backward_per_step']:9.1f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"methods": results, "threads": torch.get_num_threads()}, fh, indent=2)


if __name__ == "__main__":
    main()
