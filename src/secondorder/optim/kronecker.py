"""The base of the Kronecker-factored methods (KFAC, K-BFGS): which layers get a block.

A Kronecker-factored optimizer preconditions the parameters of each layer that a
:class:`~secondorder.capture.blocks.LayerBlock` models (built in: ``nn.Linear``, ``nn.Conv2d``;
more through :func:`~secondorder.capture.blocks.register_layer`) and applies a fallback to every
other trainable tensor (the thesis's rule: the momentum gradient, 3.4.3, 3.7.2). This base finds
the blocks, holds the capture over their modules and the list of the other tensors; each method
module holds only its algorithm box.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..capture import Capture, layer_blocks
from .base import SecondOrderOptimizer

logger = logging.getLogger(__name__)


class KroneckerFactoredOptimizer(SecondOrderOptimizer):
    """A :class:`SecondOrderOptimizer` with one layer block per modeled layer.

    Attributes:
        blocks: module name -> its layer block.
        layers: module name -> the module (the keys of ``module_state``).
        capture: the hooks over ``layers``.
        other_params: names of the trainable tensors no block models (they take the fallback).
    """

    def __init__(self, model: nn.Module, defaults: dict[str, Any], *, seed: int | None = None):
        super().__init__(model, defaults, seed=seed)
        self.blocks = layer_blocks(self.module)
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

    @property
    def modeled_modules(self) -> list[str]:
        """Names of the layers with Kronecker factors."""
        return list(self.layers)
