"""``so.make_optimizer(name, model, **hp)``: every method of docs/design.md by its factory key."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

from .base import SecondOrderOptimizer

#: factory key -> (module, class name)
METHODS: dict[str, tuple[str, str]] = {
    "sgd": ("secondorder.optim.baselines", "SGD"),
    "adam": ("secondorder.optim.baselines", "Adam"),
    "rmsprop": ("secondorder.optim.baselines", "RMSprop"),
    "kbfgs": ("secondorder.optim.kbfgs", "KBFGS"),
    "kbfgsl": ("secondorder.optim.kbfgs", "KBFGSL"),
    "kbfgs20": ("secondorder.optim.kbfgs", "KBFGS20"),
    "kbfgsl20": ("secondorder.optim.kbfgs", "KBFGSL20"),
    "kfac": ("secondorder.optim.kfac", "KFAC"),
    "kfac-ef": ("secondorder.optim.kfac", "KFACEF"),
    "tnt": ("secondorder.optim.tnt", "TNT"),
    "tnt-ef": ("secondorder.optim.tnt", "TNTEF"),
    "shampoo": ("secondorder.optim.shampoo", "Shampoo"),
    "smw-gn": ("secondorder.optim.smw", "SMWGN"),
    "smw-ng": ("secondorder.optim.smw", "SMWNG"),
    "smw-ng-bd": ("secondorder.optim.smw", "SMWNGBD"),
    "hf": ("secondorder.optim.hf", "HessianFree"),
    "block-fisher": ("secondorder.optim.block_fisher", "BlockFisher"),
}


def optimizer_class(name: str) -> type[SecondOrderOptimizer]:
    """The class behind a factory key.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in METHODS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(METHODS)}")
    module_name, class_name = METHODS[name]
    return getattr(importlib.import_module(module_name), class_name)


def make_optimizer(name: str, model: nn.Module, **hp: Any) -> SecondOrderOptimizer:
    """Build optimizer ``name`` for ``model`` with hyper-parameters ``hp`` (thesis defaults otherwise).

    Raises:
        ValueError: unknown name, unknown hyper-parameter name, or an invalid value (naming it).
    """
    cls = optimizer_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "model")]
    unknown = sorted(set(hp) - set(accepted))
    if unknown:
        raise ValueError(
            f"{name}: unknown hyper-parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    return cls(model, **hp)


def steps_without_closure() -> list[str]:
    """Factory keys whose ``step()`` also takes no closure (``loss.backward(); opt.step()``)."""
    return [name for name in METHODS if optimizer_class(name).steps_without_closure]


def steps_watched() -> list[str]:
    """Factory keys whose ``step()`` takes no closure when built with ``loss_fn=`` (hooks watch the
    caller's forward and backward)."""
    return [name for name in METHODS if optimizer_class(name).steps_watched]
