"""Synthetic data shared by the examples: a teacher network labels Gaussian inputs (offline)."""

from __future__ import annotations

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
