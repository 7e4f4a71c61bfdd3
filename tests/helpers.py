"""Shared test helpers: tiny models, batches and dense float64 oracles (used by every test module)."""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from torch import Tensor, nn

#: hyper-parameters under which each method trains the tiny test problems stably.
#: Every registered method has an entry; the generic tests use it for whatever is implemented.
TEST_HP: dict[str, dict] = {
    "sgd": dict(lr=0.05),
    "adam": dict(lr=3e-3, damping=1e-8),
    "rmsprop": dict(lr=3e-3, damping=1e-8),
    "kfac": dict(lr=0.05, damping=0.3, inverse_freq=2),
    "kfac-ef": dict(lr=0.05, damping=0.3, inverse_freq=2),
    "kbfgs": dict(lr=0.05, damping=0.3),
    "kbfgsl": dict(lr=0.05, damping=0.3, history_size=5),
    "kbfgs20": dict(lr=0.05, damping=0.3),
    "kbfgsl20": dict(lr=0.05, damping=0.3, history_size=5),
    "tnt": dict(lr=1e-3, damping=0.1, inverse_freq=2),
    "tnt-ef": dict(lr=1e-3, damping=0.1, inverse_freq=2),
    "shampoo": dict(lr=3e-3, damping=1e-3, inverse_freq=2),
    "smw-gn": dict(lr=0.3),
    "smw-ng": dict(lr=0.3),
    "smw-ng-bd": dict(lr=0.3),
    "hf": dict(lr=0.5),
    "block-fisher": dict(lr=0.05, damping=0.3),
}


def tiny_mlp(dtype: torch.dtype = torch.float64, seed: int = 0, widths=(6, 5, 4, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def tiny_conv_bn(dtype: torch.dtype = torch.float64, seed: int = 0, classes: int = 3) -> nn.Sequential:
    """conv(stride 2, padding 1) + BN + ReLU, conv without bias + BN, FC head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, classes),
    ).to(dtype)


def classification_data(n: int = 24, d: int = 6, classes: int = 3, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(d, classes, generator=g, dtype=dtype)
    y = (x @ w).argmax(1)
    return x, y


def image_data(n: int = 16, classes: int = 3, dtype=torch.float64, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=g, dtype=dtype)
    y = (x.mean((1, 2, 3)) * 10).long().remainder(classes)
    return x, y


def batches(x: Tensor, y: Tensor, size: int):
    for i in range(0, x.shape[0], size):
        yield x[i : i + size], y[i : i + size]


def roundtrip(obj):
    """torch.save / torch.load through memory (what a checkpoint does)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def per_example_param_grads(
    model: nn.Module, x: Tensor, y: Tensor, per_example_loss: Callable
) -> dict[str, Tensor]:
    """``d l_n / d theta`` for every example via ``torch.func.vmap(grad)``: ``{name: (m, *shape)}``."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return per_example_loss(out, yi.unsqueeze(0)).sum()

    return torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def huge_input_net() -> tuple[nn.Sequential, Tensor, Tensor]:
    """A float32 net whose first-layer inputs are 1e20 and weights 1e-20 (its pre-activations
    stay O(1)): the Gram of those inputs, ``1e40``, overflows float32 while every captured tensor
    and gradient is finite. Returns ``(model, x, y)``; ``x * 1e-20`` is an ordinary batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.mul_(1e-20)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=gen) * 1e20
    return model, x, torch.randint(0, 3, (8,), generator=gen)
