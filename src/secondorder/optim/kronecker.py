"""The base of the Kronecker-factored methods (KFAC, K-BFGS): which layers get a block.

A Kronecker-factored optimizer preconditions the parameters of each layer that a
:class:`~secondorder.capture.blocks.LayerBlock` models (built in: ``nn.Linear``, ``nn.Conv2d``;
more through :func:`~secondorder.capture.blocks.register_layer`) and applies a fallback to every
other trainable tensor (the thesis's rule: the momentum gradient, 3.4.3, 3.7.2). This base finds
the blocks, applies the user's choice of layers (``layers=`` / ``exclude=``), holds the capture
over their modules and the list of the other tensors, and reports the split
(:meth:`KroneckerFactoredOptimizer.coverage`, :class:`UnmodeledParametersWarning`); each method
module holds only its algorithm box.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import sys
import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..capture import Capture, LayerBlock, layer_blocks, unmodeled_modules
from .base import SecondOrderOptimizer

logger = logging.getLogger(__name__)

#: a module name or ``fnmatch`` pattern of names (``"encoder.*"``), or an ``nn.Module`` type
LayerSpec = str | type[nn.Module]

#: what :meth:`KroneckerFactoredOptimizer.coverage` reports for a tensor without a block
FALLBACK = "fallback: momentum gradient"


class UnmodeledParametersWarning(UserWarning):
    """Some trainable tensors have no layer block and follow the fallback (the momentum gradient)."""


def _specs(arg: str, value: LayerSpec | Iterable[LayerSpec] | None) -> tuple[LayerSpec, ...] | None:
    if value is None:
        return None
    specs = (value,) if isinstance(value, str | type) else tuple(value)
    for s in specs:
        if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise ValueError(f"{arg}: expected module names, name patterns or nn.Module types, got {s!r}")
    return specs


def _matches(name: str, module: nn.Module, spec: LayerSpec) -> bool:
    if isinstance(spec, str):
        return fnmatch.fnmatchcase(name, spec)
    return isinstance(module, spec)


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package (where the user built the optimizer)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


class KroneckerFactoredOptimizer(SecondOrderOptimizer):
    """A :class:`SecondOrderOptimizer` with one layer block per modeled layer.

    Args (beyond the method's hyper-parameters):
        layers: model only these layers: module names, ``fnmatch`` patterns of names
            (``"blocks.*.mlp.*"``) or ``nn.Module`` types. Default: every layer a block models.
        exclude: leave these layers (same forms) to the fallback.

    Attributes:
        blocks: module name -> its layer block.
        layers: module name -> the module (the keys of ``module_state``).
        capture: the hooks over ``layers``.
        other_params: names of the trainable tensors no block models (they take the fallback).

    Raises:
        ValueError: ``layers`` / ``exclude`` hold something else, or a name, pattern or type that
            matches no layer a block models; ``model`` has no layer left to model.
    """

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        seed: int | None = None,
        layers: LayerSpec | Iterable[LayerSpec] | None = None,
        exclude: LayerSpec | Iterable[LayerSpec] | None = None,
    ):
        super().__init__(model, defaults, seed=seed)
        self.blocks = self._choose_blocks(
            layer_blocks(self.module), _specs("layers", layers), _specs("exclude", exclude)
        )
        self.layers = {name: b.module for name, b in self.blocks.items()}
        self.capture = Capture(self.blocks)
        modeled = {id(p) for b in self.blocks.values() for p in b.parameters()}
        self.other_params = [n for n, p in self.named_params() if id(p) not in modeled]
        logger.info(
            "%s models %d layers (%s); %d other parameter tensors follow the momentum gradient",
            self.method,
            len(self.layers),
            ", ".join(self.layers),
            len(self.other_params),
        )
        if self.other_params:
            self._warn_unmodeled()

    def _choose_blocks(
        self,
        found: dict[str, LayerBlock],
        include: tuple[LayerSpec, ...] | None,
        exclude: tuple[LayerSpec, ...] | None,
    ) -> dict[str, LayerBlock]:
        def module_name(name: str, block: LayerBlock) -> str:  # "conv[2]" (a group) -> "conv"
            return name[: len(name) - len(block.part)] if block.part else name

        for arg, specs in (("layers", include), ("exclude", exclude)):
            for spec in specs or ():
                if not any(_matches(module_name(n, b), b.module, spec) for n, b in found.items()):
                    raise ValueError(
                        f"{arg}: {spec!r} matches no layer that {self.method} can model "
                        f"(layers with a block: {', '.join(found) or 'none'})"
                    )
        chosen = {
            n: b
            for n, b in found.items()
            if (include is None or any(_matches(module_name(n, b), b.module, s) for s in include))
            and not any(_matches(module_name(n, b), b.module, s) for s in exclude or ())
        }
        if not chosen:
            why = unmodeled_modules(self.module)
            detail = "; ".join(f"'{n}': {r}" for n, r in why.items())
            raise ValueError(
                f"model: {self.method} has no layer to model"
                + (" (every modelable layer is excluded)" if found else "")
                + (f"; modules without a block: {detail}" if detail else "")
                + ". Register a block for your layer type (so.register_layer) or use a method that "
                "preconditions any tensor (tnt, shampoo, adam)"
            )
        return chosen

    def _warn_unmodeled(self) -> None:
        by_name = dict(self.named_params())
        total = sum(p.numel() for p in by_name.values())
        left = sum(by_name[n].numel() for n in self.other_params)
        shown = ", ".join(self.other_params[:6]) + (", ..." if len(self.other_params) > 6 else "")
        warnings.warn(
            f"{self.method}: {len(self.other_params)} of {len(by_name)} trainable tensors "
            f"({left / total:.1%} of the parameters) get no Kronecker factors (no layer block, or "
            f"excluded) and follow the momentum gradient ({shown}); opt.coverage() lists every "
            "tensor, so.register_layer adds a block",
            UnmodeledParametersWarning,
            stacklevel=_caller_level(),
        )

    @property
    def modeled_modules(self) -> list[str]:
        """Names of the layers with Kronecker factors."""
        return list(self.layers)

    def coverage(self) -> dict[str, str]:
        """Per trainable tensor (by name), what preconditions it: ``"<Block>('<module>')"`` or
        :data:`FALLBACK`."""
        names = {id(p): n for n, p in self.named_params()}
        out = {n: FALLBACK for n in names.values()}
        parts: dict[str, list[str]] = {}
        for mname, b in self.blocks.items():
            for p in b.parameters():
                if id(p) in names:
                    parts.setdefault(names[id(p)], []).append(mname)
                    block_names = ", ".join(f"'{n}'" for n in parts[names[id(p)]])
                    out[names[id(p)]] = f"{type(b).__name__}({block_names})"
        return out
