"""Optimizers: one module per method family, a shared base, and the factory."""

from .base import MomentumStyle, NonFiniteError, OptimizerStats, SecondOrderOptimizer
from .baselines import SGD, Adam, AdamVariant, RMSprop
from .kfac import KFAC, KFACEF, PiSplit
from .registry import METHODS, implemented, make_optimizer, optimizer_class

__all__ = [
    "KFAC",
    "KFACEF",
    "METHODS",
    "SGD",
    "Adam",
    "AdamVariant",
    "MomentumStyle",
    "NonFiniteError",
    "OptimizerStats",
    "PiSplit",
    "RMSprop",
    "SecondOrderOptimizer",
    "implemented",
    "make_optimizer",
    "optimizer_class",
]
