"""secondorder: practical second-order optimizers for deep networks.

Quick start::

    import torch, secondorder as so

    opt = so.make_optimizer("kfac", model, lr=0.03, damping=1.0)
    for x, y in loader:
        loss = opt.step(so.Closure(model, x, y, torch.nn.CrossEntropyLoss()))
"""

from __future__ import annotations

import importlib
from typing import Any

from . import capture, distributed, linalg, optim
from .capture import (
    Closure,
    LayerBlock,
    Likelihood,
    infer_likelihood,
    losses,
    register_layer,
    unregister_layer,
)
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
    Preconditioner,
    RMSprop,
    SecondOrderOptimizer,
    Shampoo,
    UnmodeledParametersWarning,
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
    "UnmodeledParametersWarning",
    "Closure",
    "LayerBlock",
    "Likelihood",
    "NonFiniteError",
    "Preconditioner",
    "RMSprop",
    "SecondOrderOptimizer",
    "capture",
    "diagnostics",
    "distributed",
    "infer_likelihood",
    "linalg",
    "losses",
    "make_optimizer",
    "register_layer",
    "unregister_layer",
    "optim",
]


def __getattr__(name: str) -> Any:
    """``so.diagnostics`` is imported on first use (PEP 562), so that ``python -m
    secondorder.diagnostics`` does not find the module already imported by the package (runpy's
    RuntimeWarning) and ``import secondorder`` stays light."""
    if name == "diagnostics":
        return importlib.import_module(".diagnostics", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
