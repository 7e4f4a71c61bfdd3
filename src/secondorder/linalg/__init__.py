"""Pure tensor math: no ``nn.Module``, no optimizer state. Each function cites its equation."""

from . import bfgs, lbfgs
from .cg import CGResult, conjugate_gradient
from .kron import LinAlgError, damped_inverse, ema_gram_, gram, kron_apply, pi_split
from .smw import block_diagonal, kron_gram, kron_jvp, kron_vjp, smw_apply, smw_weights, smw_weights_singular

__all__ = [
    "bfgs",
    "lbfgs",
    "CGResult",
    "LinAlgError",
    "block_diagonal",
    "conjugate_gradient",
    "damped_inverse",
    "ema_gram_",
    "gram",
    "kron_apply",
    "kron_gram",
    "kron_jvp",
    "kron_vjp",
    "pi_split",
    "smw_apply",
    "smw_weights",
    "smw_weights_singular",
]
