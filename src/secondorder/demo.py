"""A small real demo: SGD-m and KFAC train a generated autoencoder problem in the one loop."""

from __future__ import annotations

import time

import torch
from torch import nn

from .capture import Closure, losses
from .optim import make_optimizer

#: thesis-style hyper-parameters for the demo problem (chapter-3 conventions)
DEMO_HP = {
    "sgd": dict(lr=0.01),
    "adam": dict(lr=1e-3, damping=1e-4),
    "rmsprop": dict(lr=1e-3, damping=1e-4),
    "kfac": dict(lr=0.1, damping=1.0),
    "kfac-ef": dict(lr=0.1, damping=1.0),
}


def demo_data(seed: int, n: int = 2000, d: int = 64, latent: int = 4) -> torch.Tensor:
    """Binary-valued images in [0, 1]: smooth functions of a few latent factors (autoencoder target)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, latent, generator=g)
    basis = torch.randn(latent, d, generator=g) * 3
    return torch.sigmoid(torch.sin(z @ basis) * 4)


def demo_model(d: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d, 48),
        nn.ReLU(),
        nn.Linear(48, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
        nn.Linear(4, 16),
        nn.ReLU(),
        nn.Linear(16, 48),
        nn.ReLU(),
        nn.Linear(48, d),
    )


def run_demo(epochs: int, seed: int, names: list[str], batch: int = 100) -> int:
    """Train the demo problem with each optimizer and print its losses per epoch.

    One torch thread, as ``secondorder bench`` on the CPU (the times are process time, which
    counts every thread; tiny layers run fastest on one), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(epochs, seed, names, batch)
    finally:
        torch.set_num_threads(threads)


def _run_demo(epochs: int, seed: int, names: list[str], batch: int) -> int:
    x = demo_data(seed)
    loss_fn = losses.SummedBCEWithLogitsLoss()
    print(
        f"demo: 64-48-16-4-16-48-64 autoencoder, {x.shape[0]} generated images, batch {batch}, "
        f"summed BCE (the thesis autoencoder loss)"
    )
    for name in names:
        torch.manual_seed(seed)
        model = demo_model(x.shape[1])
        opt = make_optimizer(name, model, **DEMO_HP.get(name, {}))
        closures = [
            Closure(model, x[i : i + batch], x[i : i + batch], loss_fn) for i in range(0, len(x), batch)
        ]
        opt.warm_start(closures)
        start = time.process_time()
        line = []
        for _ in range(epochs):
            perm = torch.randperm(len(closures))
            for i in perm.tolist():
                opt.step(closures[i])
            with torch.no_grad():
                line.append(float(loss_fn(model(x), x)))
        elapsed = time.process_time() - start
        print(f"{name:8s} loss per epoch: " + " ".join(f"{v:.2f}" for v in line) + f"  ({elapsed:.1f} s CPU)")
    return 0
