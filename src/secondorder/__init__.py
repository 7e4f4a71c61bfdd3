"""secondorder: practical second-order optimizers for deep networks.

Quick start::

    import torch, secondorder as so

    opt = so.make_optimizer("kfac", model, lr=0.03, damping=1.0)
    for x, y in loader:
        loss = opt.step(so.Closure(model, x, y, torch.nn.CrossEntropyLoss()))
"""

from __future__ import annotations

from . import capture, diagnostics, distributed, linalg, optim
from .capture import Closure, Likelihood, infer_likelihood, losses
from .optim import (
    KBFGS,
    KBFGS20,
    KBFGSL,
    KBFGSL20,
    KFAC,
    KFACEF,
    METHODS,
    SGD,
    SMWGN,
    SMWNG,
    SMWNGBD,
    TNT,
    TNTEF,
    Adam,
    BlockFisher,
    HessianFree,
    NonFiniteError,
    RMSprop,
    SecondOrderOptimizer,
    Shampoo,
    implemented,
    make_optimizer,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "KBFGS",
    "KBFGS20",
    "KBFGSL",
    "KBFGSL20",
    "KFAC",
    "KFACEF",
    "METHODS",
    "SGD",
    "SMWGN",
    "SMWNG",
    "SMWNGBD",
    "TNT",
    "TNTEF",
    "Adam",
    "BlockFisher",
    "HessianFree",
    "Shampoo",
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
