"""What the examples share: synthetic data (a teacher network labels Gaussian inputs, offline),
the small model, their common command-line options and the final full-data loss."""

from __future__ import annotations

import argparse

import torch


def teacher_data(n: int, d: int = 20, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs in ``R^d`` and the labels of a random two-layer teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w1, w2 = torch.randn(d, 32, generator=g), torch.randn(32, classes, generator=g)
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


def batches(x: torch.Tensor, y: torch.Tensor, size: int):
    for i in range(0, len(x) - size + 1, size):
        yield x[i : i + size], y[i : i + size]


def mlp(d: int = 20, classes: int = 5, width: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(d, width), torch.nn.ReLU(), torch.nn.LayerNorm(width), torch.nn.Linear(width, classes)
    )


def parser(doc: str, methods: list[str] | None = None, default: str | None = None) -> argparse.ArgumentParser:
    """The options every example takes (``--epochs``, ``--examples``, ``--batch``), and
    ``--method`` when ``methods`` are given."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    if methods is not None:
        p.add_argument("--method", default=default, choices=methods)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--examples", type=int, default=4096)
    p.add_argument("--batch", type=int, default=128)
    return p


def final_loss(model: torch.nn.Module, loss_fn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The loss on all the data after training (no gradient)."""
    with torch.no_grad():
        return float(loss_fn(model(x), y))
