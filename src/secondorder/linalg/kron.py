"""Kronecker-factor algebra shared by KFAC-type methods (pure tensor functions).

* :func:`gram_`, :func:`gram`, :func:`ema_gram_` -- ``X^T X`` (and its moving average) with
  only the lower triangle computed on the CPU (row panels, then mirrored).
* :func:`damped_inverse` -- ``(M + damping I)^-1`` by Cholesky, with an eigenvalue fallback.
* :func:`damped_eigh` -- the eigendecomposition of ``M + damping I`` (eigenvalues clamped at
  ``damping``, float64 retry): the fallback of :func:`damped_inverse` and the eigh inverse roots.
* :func:`pi_split` -- the trace-norm damping split of Algorithm 12 line 19,
  ``pi = sqrt((tr(Omega)/d_Omega) / (tr(Gamma)/d_Gamma))``.
* :func:`kron_apply` -- ``(A (x) G)^-1``-style preconditioning of a matrix gradient:
  ``vec(H_G X H_A) = (H_A (x) H_G) vec(X)`` for symmetric ``H_A``.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from .finite import finite

logger = logging.getLogger(__name__)


class LinAlgError(RuntimeError):
    """A factor could not be inverted (non-finite entries, or not positive definite after damping)."""


#: below this many columns ``X^T X`` is one GEMM; above, it is computed by triangular row panels
SYMMETRIC_BLOCKS_MIN = 200
#: ... and below this many rows too (few rows: the GEMM is bound by writing ``out``, and panels lose)
SYMMETRIC_ROWS_MIN = 128
#: columns per panel, about; at most this many panels; panel edges on multiples of this
_PANEL_WIDTH, _MAX_PANELS, _PANEL_ALIGN = 125, 8, 16


def _symmetric_blocks(n: int, rows: int, device: torch.device) -> int:
    """How many row panels :func:`gram_` uses for ``n`` columns: 1 (one GEMM) or 2-8 (CPU only).

    Measured on one CPU thread (float32, ``benchmarks``-style best of 3, 128-4000 rows): the panels
    take 0.6-0.7x the time of one GEMM for 500-2000 columns, 0.75-0.85x for 200-400; with fewer
    than 128 rows or 200 columns they gain nothing (30 rows: up to 2x slower). Accelerators keep
    the single GEMM (launch overhead, and untested there).
    """
    if device.type != "cpu" or n < SYMMETRIC_BLOCKS_MIN or rows < SYMMETRIC_ROWS_MIN:
        return 1
    return min(_MAX_PANELS, max(2, n // _PANEL_WIDTH))


def _panel_edges(n: int, blocks: int) -> list[int]:
    """``blocks + 1`` increasing edges from 0 to ``n``, the inner ones on multiples of 16 (SIMD width)."""
    inner = [round(i * n / blocks / _PANEL_ALIGN) * _PANEL_ALIGN for i in range(1, blocks)]
    return [0, *inner, n]


def gram_(out: Tensor, x: Tensor, beta: float = 0.0, alpha: float = 1.0) -> Tensor:
    """In place: ``out <- beta out + alpha X^T X`` for rows ``X`` of shape ``(n, d)``; returns ``out``.

    The second moments of the Kronecker methods: KFAC's ``Omega`` and ``Gamma`` (Algorithm 12
    line 14, with ``beta`` the moving-average decay), the contractions ``G^(i)`` of TNT and
    Shampoo (4.2), K-BFGS's dense ``A`` (Algorithm 9 line 3).

    ``X^T X`` is symmetric, so on the CPU only its lower triangle is computed, by ``b`` row
    panels: panel ``i`` is the GEMM ``out[e_i:e_{i+1}, :e_{i+1}] = X[:, e_i:e_{i+1}]^T
    X[:, :e_{i+1}]``, written straight into ``out`` (about ``(b+1)/(2b)`` of the flops of one
    GEMM); the part above the diagonal blocks is then copied from below. ``out`` is assumed
    symmetric on entry (its upper part is overwritten). With ``beta = 0`` its old contents are
    ignored (NaN included), as in ``torch.addmm``.
    """
    d = x.shape[1]
    if out.shape != (d, d):
        raise ValueError(
            f"out: expected shape ({d}, {d}) for X of shape {tuple(x.shape)}, got {tuple(out.shape)}"
        )
    blocks = _symmetric_blocks(d, x.shape[0], x.device)
    if blocks == 1:
        return out.addmm_(x.t(), x, beta=beta, alpha=alpha)
    edges = _panel_edges(d, blocks)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        out[lo:hi, :hi].addmm_(x[:, lo:hi].t(), x[:, :hi], beta=beta, alpha=alpha)
    for lo, hi in zip(edges[1:-1], edges[2:], strict=True):  # upper = lower^T, column panel by panel
        out[:lo, lo:hi].copy_(out[lo:hi, :lo].t())
    return out


def gram(x: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * X^T X`` for rows ``X`` of shape ``(n, d)`` (by :func:`gram_`)."""
    return gram_(x.new_empty(x.shape[1], x.shape[1]), x, 0.0, scale)


def ema_gram_(m: Tensor, x: Tensor, beta: float, scale: float = 1.0) -> Tensor:
    """In place: ``M <- beta M + (1 - beta) scale X^T X``; returns ``M``."""
    return gram_(m, x, beta, (1.0 - beta) * scale)


def _eigh(sym: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``torch.linalg.eigh``, or ``(None, None)`` when it fails or returns non-finite values."""
    try:
        evals, evecs = torch.linalg.eigh(sym)
    except torch.linalg.LinAlgError:
        return None, None
    if not (finite(evals) and finite(evecs)):
        return None, None
    return evals, evecs


def damped_eigh(m: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of ``(M + M^T)/2 + damping I``, the eigenvalues clamped at ``damping``.

    For ``damping >= 0`` the clamped eigenvalues are those of ``(M + M^T)/2`` clamped at 0 plus
    ``damping`` (round-off can make a PSD factor's smallest eigenvalues slightly negative). The
    damped matrix is decomposed rather than ``M``: a factor of low numerical rank (a moving
    average of a few rank-one contractions, say) has a large cluster of eigenvalues at 0, on which
    float32 LAPACK divide and conquer (``ssyevd``) can fail to converge; the shifted spectrum did
    not on the factors where ``M`` failed (the MNIST autoencoder's). If float32 still fails, the
    decomposition is retried in float64 (about twice the time) and returned in ``M``'s dtype.

    Raises:
        LinAlgError: non-finite ``M``, or the eigendecomposition failed in float64 too.
    """
    if not finite(m):
        raise LinAlgError("factor has non-finite entries")
    sym = 0.5 * (m + m.t())
    if damping > 0:
        sym.diagonal().add_(damping)
    evals, evecs = _eigh(sym)
    if evals is None and sym.dtype != torch.float64:
        logger.debug("float32 eigh of a %dx%d factor failed; retrying in float64", m.shape[0], m.shape[0])
        evals, evecs = _eigh(sym.double())
        if evals is not None and evecs is not None:
            evals, evecs = evals.to(m.dtype), evecs.to(m.dtype)
    if evals is None or evecs is None:
        raise LinAlgError(f"eigendecomposition of a {m.shape[0]}x{m.shape[0]} factor failed")
    evals = evals.clamp_min(damping) if damping > 0 else evals.clamp_min(0) + damping
    return evals, evecs


def damped_inverse(m: Tensor, damping: float) -> Tensor:
    """``(M + damping I)^-1`` for a symmetric positive semi-definite ``M``.

    Uses a Cholesky factorisation; if that fails (round-off made ``M + damping I``
    indefinite) the eigendecomposition of :func:`damped_eigh` (eigenvalues clamped at ``damping``)
    is used.

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
        evals, evecs = damped_eigh(m, damping)
        inv = (evecs / evals) @ evecs.t()
    if not finite(inv):
        raise LinAlgError(f"inverse of a {d}x{d} factor with damping {damping:g} is not finite")
    return inv


def gram_fits(rows: Tensor, scale: float = 1.0) -> bool:
    """Whether ``scale * rows^T rows`` (and a moving average of it with a finite factor of the same
    size) surely stays finite: ``n max|rows|^2 scale`` below a quarter of the dtype's largest
    value. One reduction over the rows, much cheaper than the product; a ``False`` only means
    "check the product" (the bound is loose)."""
    if rows.numel() == 0:
        return True
    low, high = torch.aminmax(rows)  # 15x faster than vector_norm(rows, inf) on CPU
    peak = max(-float(low), float(high))
    bound = rows.shape[0] * peak * peak * abs(scale)
    return math.isfinite(bound) and bound < torch.finfo(rows.dtype).max / 4


def damped_inverses(m: Tensor, damping: float) -> Tensor:
    """``(M_c + damping I)^-1`` for a batch ``(C, k, k)`` of small symmetric PSD blocks.

    Batched Cholesky; blocks where it fails are inverted through their eigendecomposition with the
    eigenvalues clamped at ``damping`` (as :func:`damped_inverse`).

    Raises:
        LinAlgError: non-finite blocks, or a non-finite inverse.
    """
    if not finite(m):
        raise LinAlgError("blocks have non-finite entries")
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    damped = m + damping * eye
    chol, info = torch.linalg.cholesky_ex(damped)
    if bool((info == 0).all()):
        inv = torch.cholesky_inverse(chol)
    else:
        evals, evecs = torch.linalg.eigh(0.5 * (damped + damped.transpose(-1, -2)))
        evals = evals.clamp_min(damping)
        inv = (evecs / evals.unsqueeze(-2)) @ evecs.transpose(-1, -2)
    if not finite(inv):
        raise LinAlgError(f"inverse of {m.shape[0]} blocks of {m.shape[-1]}x{m.shape[-1]} is not finite")
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
