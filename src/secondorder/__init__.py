"""secondorder: practical second-order optimizers for deep networks.

Quick start::

    import torch, secondorder as so

    opt = so.make_optimizer("kfac", model, lr=0.03, damping=1.0)
    for x, y in loader:
        loss = opt.step(so.Closure(model, x, y, torch.nn.CrossEntropyLoss()))
"""

from __future__ import annotations

from typing import Any

from . import capture, diagnostics, distributed, linalg, optim
from .capture import Closure, Likelihood, infer_likelihood, losses
from .optim import (
    KFAC,
    KFACEF,
    METHODS,
    SGD,
    Adam,
    NonFiniteError,
    RMSprop,
    SecondOrderOptimizer,
    implemented,
    make_optimizer,
)

__version__ = "0.1.0.dev0"

#: classes of methods that live in modules added method family by method family
_LAZY = {cls: key for key, (_, cls) in METHODS.items()}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return optim.optimizer_class(_LAZY[name])
    raise AttributeError(f"module 'secondorder' has no attribute {name!r}")


__all__ = [
    "KFAC",
    "KFACEF",
    "METHODS",
    "SGD",
    "Adam",
    "Closure",
    "Likelihood",
    "NonFiniteError",
    "RMSprop",
    "SecondOrderOptimizer",
    "capture",
    "diagnostics",
    "distributed",
    "implemented",
    "infer_likelihood",
    "linalg",
    "losses",
    "make_optimizer",
    "optim",
]
