"""Kronecker-factor algebra shared by KFAC-type methods (pure tensor functions).

* :func:`gram_`, :func:`gram`, :func:`ema_gram_` -- ``X^T X`` (and its moving average) with
  only the lower triangular blocks computed on the CPU.
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

from .finite import finite


class LinAlgError(RuntimeError):
    """A factor could not be inverted (non-finite entries, or not positive definite after damping)."""


#: below this many columns ``X^T X`` is one GEMM; above, it is computed by triangular blocks
SYMMETRIC_BLOCKS_MIN = 200


def _symmetric_blocks(n: int, device: torch.device) -> int:
    """How many column blocks :func:`gram_` uses: 1 (one GEMM), 2 or 4 (CPU only).

    Measured on one CPU thread (float32, 1000 rows): 4 blocks take 0.6-0.75x the time of one
    GEMM for 500-1000 columns, 2 blocks 0.8x for 250-400; smaller matrices gain nothing.
    Accelerators keep the single GEMM (launch overhead, and untested there).
    """
    if device.type != "cpu" or n < SYMMETRIC_BLOCKS_MIN:
        return 1
    return 2 if n < 2 * SYMMETRIC_BLOCKS_MIN else 4


def gram_(out: Tensor, x: Tensor, beta: float = 0.0, alpha: float = 1.0) -> Tensor:
    """In place: ``out <- beta out + alpha X^T X`` for rows ``X`` of shape ``(n, d)``; returns ``out``.

    The second moments of the Kronecker methods: KFAC's ``Omega`` and ``Gamma`` (Algorithm 12
    line 14, with ``beta`` the moving-average decay), the contractions ``G^(i)`` of TNT and
    Shampoo (4.2), K-BFGS's dense ``A`` (Algorithm 9 line 3).

    ``X^T X`` is symmetric, so on the CPU only the blocks on and below the diagonal of a
    ``b x b`` block partition are computed (``b(b+1)/2`` of ``b^2`` GEMMs, written straight
    into ``out``) and the blocks above the diagonal are copied from those below: about
    ``(b+1)/(2b)`` of the flops of one GEMM. ``out`` is assumed symmetric on entry (its upper
    blocks are overwritten). With ``beta = 0`` its old contents are ignored (NaN included), as
    in ``torch.addmm``.
    """
    d = x.shape[1]
    if out.shape != (d, d):
        raise ValueError(
            f"out: expected shape ({d}, {d}) for X of shape {tuple(x.shape)}, got {tuple(out.shape)}"
        )
    blocks = _symmetric_blocks(d, x.device)
    if blocks == 1:
        return out.addmm_(x.t(), x, beta=beta, alpha=alpha)
    edges = [i * d // blocks for i in range(blocks + 1)]
    for i in range(blocks):
        xi = x[:, edges[i] : edges[i + 1]].t()
        for j in range(i + 1):
            block = out[edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
            block.addmm_(xi, x[:, edges[j] : edges[j + 1]], beta=beta, alpha=alpha)
    for i in range(1, blocks):  # upper = lower^T
        out[: edges[i], edges[i] : edges[i + 1]].copy_(out[edges[i] : edges[i + 1], : edges[i]].t())
    return out


def gram(x: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * X^T X`` for rows ``X`` of shape ``(n, d)`` (by :func:`gram_`)."""
    return gram_(x.new_empty(x.shape[1], x.shape[1]), x, 0.0, scale)


def ema_gram_(m: Tensor, x: Tensor, beta: float, scale: float = 1.0) -> Tensor:
    """In place: ``M <- beta M + (1 - beta) scale X^T X``; returns ``M``."""
    return gram_(m, x, beta, (1.0 - beta) * scale)


def damped_inverse(m: Tensor, damping: float) -> Tensor:
    """``(M + damping I)^-1`` for a symmetric positive semi-definite ``M``.

    Uses a Cholesky factorisation; if that fails (round-off made ``M + damping I``
    indefinite) the symmetrised eigen-decomposition with eigenvalues clamped at 0 is used.

    Raises:
        LinAlgError: when ``M`` has non-finite entries, the eigendecomposition fails, or the
            inverse is not finite.
    """
    if not finite(m):
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
    if not finite(inv):
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
