"""Capture layer: the closure, likelihoods, losses and layer hooks. Nothing method-specific."""

from . import losses, statistics
from .closure import Closure, ForwardResult, preserved_norm_buffers
from .hooks import (
    Capture,
    HookNeverFiredError,
    LayerRecord,
    grad_matrix,
    input_rows,
    is_supported,
    num_locations,
    output_rows,
    patches,
    split_matrix,
    supported_modules,
    unwrap,
)
from .likelihood import BatchReduction, Family, Likelihood, infer_likelihood

__all__ = [
    "BatchReduction",
    "Capture",
    "Closure",
    "Family",
    "ForwardResult",
    "HookNeverFiredError",
    "LayerRecord",
    "Likelihood",
    "grad_matrix",
    "infer_likelihood",
    "input_rows",
    "is_supported",
    "losses",
    "num_locations",
    "output_rows",
    "patches",
    "preserved_norm_buffers",
    "split_matrix",
    "statistics",
    "supported_modules",
    "unwrap",
]
