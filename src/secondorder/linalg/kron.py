"""Kronecker-factor algebra shared by KFAC-type methods (pure tensor functions).

* :func:`ema_gram_` -- ``M <- beta M + (1 - beta) * scale * X^T X`` in one GEMM.
* :func:`damped_inverse` -- ``(M + damping I)^-1`` by Cholesky, with an eigenvalue fallback.
* :func:`pi_split` -- the trace-norm damping split of Algorithm 12 line 19,
  ``pi = sqrt((tr(Omega)/d_Omega) / (tr(Gamma)/d_Gamma))``.
* :func:`kron_apply` -- ``(A (x) G)^-1``-style preconditioning of a matrix gradient:
  ``vec(H_G X H_A) = (H_A (x) H_G) vec(X)`` for symmetric ``H_A``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class LinAlgError(RuntimeError):
    """A factor could not be inverted (non-finite entries, or not positive definite after damping)."""


def gram(x: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * X^T X`` for rows ``X`` of shape ``(n, d)``."""
    return torch.mm(x.t(), x).mul_(scale) if scale != 1.0 else torch.mm(x.t(), x)


def ema_gram_(m: Tensor, x: Tensor, beta: float, scale: float = 1.0) -> Tensor:
    """In place: ``M <- beta M + (1 - beta) scale X^T X``; returns ``M``."""
    return m.addmm_(x.t(), x, beta=beta, alpha=(1.0 - beta) * scale)


def damped_inverse(m: Tensor, damping: float) -> Tensor:
    """``(M + damping I)^-1`` for a symmetric positive semi-definite ``M``.

    Uses a Cholesky factorisation; if that fails (round-off made ``M + damping I``
    indefinite) the symmetrised eigen-decomposition with eigenvalues clamped at 0 is used.

    Raises:
        LinAlgError: when ``M`` has non-finite entries, the eigendecomposition fails, or the
            inverse is not finite.
    """
    if not bool(torch.isfinite(m).all()):
        raise LinAlgError("factor has non-finite entries")
    d = m.shape[0]
    damped = m + damping * torch.eye(d, dtype=m.dtype, device=m.device)
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        inv = torch.cholesky_inverse(chol)
    else:
        sym = 0.5 * (m + m.t())
        try:
            evals, evecs = torch.linalg.eigh(sym)
        except torch.linalg.LinAlgError as err:  # eigh did not converge (extremely ill-conditioned M)
            raise LinAlgError(f"eigendecomposition of a {d}x{d} factor failed: {err}") from err
        inv = (evecs / (evals.clamp_min(0) + damping)) @ evecs.t()
    if not bool(torch.isfinite(inv).all()):
        raise LinAlgError(f"inverse of a {d}x{d} factor with damping {damping:g} is not finite")
    return inv


def pi_split(omega: Tensor, gamma: Tensor) -> float:
    """``pi = sqrt((tr(Omega)/d_Omega) / (tr(Gamma)/d_Gamma))`` (Algorithm 12, line 19).

    Equals ``sqrt(trace(Omega (x) I) / trace(I (x) Gamma))``. Returns 1 when either
    normalised trace is not positive and finite (a factor that is still all zeros).
    """
    ta = float(torch.trace(omega)) / omega.shape[0]
    tg = float(torch.trace(gamma)) / gamma.shape[0]
    if not (ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)


def kron_apply(left: Tensor, x: Tensor, right: Tensor) -> Tensor:
    """``left @ X @ right``: the Kronecker preconditioner ``(right^T (x) left)`` on ``vec(X)``."""
    return torch.linalg.multi_dot([left, x, right])
