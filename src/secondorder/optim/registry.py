"""``so.make_optimizer(name, model, **hp)``: every method of docs/design.md by its factory key."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

from .base import SecondOrderOptimizer

#: factory key -> (module, class name). A key whose module or class does not exist yet is
#: "not implemented": make_optimizer raises NotImplementedError for it.
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
        NotImplementedError: a known method that this version does not implement yet.
    """
    if name not in METHODS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(METHODS)}")
    module_name, class_name = METHODS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise NotImplementedError(
            f"optimizer {name!r} is not implemented yet (see the README's method table)"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise NotImplementedError(
            f"optimizer {name!r} is not implemented yet (see the README's method table)"
        )
    return cls


def implemented() -> list[str]:
    """Factory keys that this version implements."""
    out = []
    for name in METHODS:
        try:
            optimizer_class(name)
        except NotImplementedError:
            continue
        out.append(name)
    return out


def make_optimizer(name: str, model: nn.Module, **hp: Any) -> SecondOrderOptimizer:
    """Build optimizer ``name`` for ``model`` with hyper-parameters ``hp`` (thesis defaults otherwise).

    Raises:
        ValueError: unknown name, unknown hyper-parameter name, or an invalid value (naming it).
        NotImplementedError: a method this version does not implement yet.
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
    return [name for name in implemented() if optimizer_class(name).steps_without_closure]


def steps_watched() -> list[str]:
    """Factory keys whose ``step()`` takes no closure when built with ``loss_fn=`` (hooks watch the
    caller's forward and backward)."""
    return [name for name in implemented() if optimizer_class(name).steps_watched]
