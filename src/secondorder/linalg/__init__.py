"""Pure tensor math: no ``nn.Module``, no optimizer state. Each function cites its equation."""

from . import bfgs, lbfgs
from .cg import CGResult, conjugate_gradient
from .kron import (
    LinAlgError,
    damped_eigh,
    damped_inverse,
    damped_inverses,
    ema_gram_,
    gram,
    gram_,
    gram_fits,
    kron_apply,
    pi_split,
)
from .roots import coupled_newton_inverse_root, eigh_inverse_root, inverse_root
from .smw import block_diagonal, kron_gram, kron_jvp, kron_vjp, smw_apply, smw_weights, smw_weights_singular
from .tensor import add_multi_mode_product_, contractions, multi_mode_product, tensor_normal_factors

__all__ = [
    "add_multi_mode_product_",
    "contractions",
    "multi_mode_product",
    "tensor_normal_factors",
    "coupled_newton_inverse_root",
    "eigh_inverse_root",
    "inverse_root",
    "bfgs",
    "lbfgs",
    "CGResult",
    "LinAlgError",
    "block_diagonal",
    "conjugate_gradient",
    "damped_eigh",
    "damped_inverse",
    "damped_inverses",
    "gram_fits",
    "ema_gram_",
    "gram",
    "gram_",
    "kron_apply",
    "kron_gram",
    "kron_jvp",
    "kron_vjp",
    "pi_split",
    "smw_apply",
    "smw_weights",
    "smw_weights_singular",
]
