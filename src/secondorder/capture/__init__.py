"""Capture layer: the closure, likelihoods, losses and layer hooks. Nothing method-specific."""

from . import blocks, losses, statistics
from .blocks import LayerBlock, register_layer, unregister_layer
from .closure import Closure, ForwardResult, PlainClosure, preserved_norm_buffers
from .hooks import (
    Capture,
    HookNeverFiredError,
    LayerRecord,
    grad_matrix,
    input_rows,
    is_supported,
    layer_blocks,
    num_locations,
    output_rows,
    patches,
    split_matrix,
    supported_modules,
    unmodeled_modules,
    unwrap,
)
from .likelihood import BatchReduction, Family, Likelihood, infer_likelihood

__all__ = [
    "BatchReduction",
    "blocks",
    "Capture",
    "Closure",
    "Family",
    "ForwardResult",
    "HookNeverFiredError",
    "LayerRecord",
    "LayerBlock",
    "PlainClosure",
    "Likelihood",
    "grad_matrix",
    "infer_likelihood",
    "input_rows",
    "is_supported",
    "layer_blocks",
    "losses",
    "num_locations",
    "output_rows",
    "patches",
    "preserved_norm_buffers",
    "register_layer",
    "split_matrix",
    "statistics",
    "supported_modules",
    "unmodeled_modules",
    "unregister_layer",
    "unwrap",
]
