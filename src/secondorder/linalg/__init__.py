"""Pure tensor math: no ``nn.Module``, no optimizer state. Each function cites its equation."""

from .kron import LinAlgError, damped_inverse, ema_gram_, gram, kron_apply, pi_split

__all__ = ["LinAlgError", "damped_inverse", "ema_gram_", "gram", "kron_apply", "pi_split"]
