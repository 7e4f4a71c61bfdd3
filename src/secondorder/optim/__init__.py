"""Optimizers: one module per method family, a shared base, and the factory."""

from .base import MomentumStyle, NonFiniteError, OptimizerStats, SecondOrderOptimizer
from .baselines import SGD, Adam, AdamVariant, RMSprop
from .block_fisher import BlockFisher
from .hf import HessianFree
from .kbfgs import KBFGS, KBFGS20, KBFGSL, KBFGSL20, VARIANTS, AInverse, AStatistic, PairDamping, SkipRule
from .kfac import KFAC, KFACEF, PiSplit, WeightSharing
from .kronecker import KroneckerFactoredOptimizer, UnmodeledParametersWarning
from .levenberg import CurvatureSample, LMRule, ModelReduction
from .preconditioner import Preconditioner
from .registry import METHODS, make_optimizer, optimizer_class
from .shampoo import Shampoo
from .smw import SMWGN, SMWNG, SMWNGBD, Fisher
from .tnt import TNT, TNTEF

__all__ = [
    "TNT",
    "TNTEF",
    "Shampoo",
    "BlockFisher",
    "KBFGS",
    "KBFGS20",
    "KBFGSL",
    "KBFGSL20",
    "VARIANTS",
    "AInverse",
    "AStatistic",
    "PairDamping",
    "SkipRule",
    "SMWGN",
    "SMWNG",
    "SMWNGBD",
    "CurvatureSample",
    "Fisher",
    "HessianFree",
    "LMRule",
    "ModelReduction",
    "KFAC",
    "KFACEF",
    "KroneckerFactoredOptimizer",
    "UnmodeledParametersWarning",
    "METHODS",
    "SGD",
    "Adam",
    "AdamVariant",
    "MomentumStyle",
    "NonFiniteError",
    "OptimizerStats",
    "Preconditioner",
    "PiSplit",
    "WeightSharing",
    "RMSprop",
    "SecondOrderOptimizer",
    "make_optimizer",
    "optimizer_class",
]
