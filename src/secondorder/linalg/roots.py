"""Inverse p-th roots and damped inverses of symmetric PSD factors (TNT and Shampoo, chapter 4).

* :func:`coupled_newton_inverse_root` -- ``(G + eps I)^(-1/p)`` by the coupled Newton iteration
  of Anil et al. as used for Shampoo (Algorithm 16 line 12; docs/notes.md §6):
  ``z = (1 + p) / (2 |G_d|_F)``, ``M_0 = z G_d``, ``H_0 = z^(1/p) I``, then
  ``M'_i = (1 + 1/p) I - M_i / p``, ``M_{i+1} = M'_i^p M_i``, ``H_{i+1} = H_i M'_i``
  (invariant ``M = H^p G_d``, so ``H -> G_d^(-1/p)``), with error ``e = max|M - I|``; it stops
  after 100 iterations, when ``e <= 1e-6``, or when the error stops decreasing
  (``e_new >= 1.2 e_old``), in which case the previous ``H`` is returned.
* :func:`eigh_inverse_root` -- the same root from a symmetric eigendecomposition (eigenvalues
  clamped at 0 before damping): the fallback when Newton fails, and the test oracle.
* :func:`inverse_root` -- a factor's damped inverse root: dense (``p = 1`` by Cholesky through
  :func:`secondorder.linalg.kron.damped_inverse`, ``p > 1`` by coupled Newton with the
  eigendecomposition fallback) or diagonal (a vector, elementwise).

Failure path: every function raises :class:`~secondorder.linalg.kron.LinAlgError` when the
factor has non-finite entries or no finite root exists; the optimizers catch it, log a warning
and keep the previous preconditioner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .finite import finite
from .kron import LinAlgError, damped_eigh, damped_inverse, gram

logger = logging.getLogger(__name__)

#: defaults of docs/notes.md §6 (thesis 4.7.2: "max iteration number of 100 and error tolerance of 1e-6")
MAX_ITERS = 100
TOLERANCE = 1e-6
#: the error may grow by this factor in one iteration before the loop stops
STALL_FACTOR = 1.2
#: a Newton result whose final error ``max|H^p G_d - I|`` exceeds this is replaced by the eigh root
FALLBACK_ERROR = 1e-2


@dataclass
class NewtonResult:
    """The root, the number of iterations run and the error ``max|H^p G_d - I|`` of the returned root."""

    root: Tensor
    iterations: int
    error: float


def _matrix_power(x: Tensor, p: int) -> Tensor:
    """``X^p`` for an integer ``p >= 1`` by repeated squaring."""
    result: Tensor | None = None
    base = x
    while True:
        if p & 1:
            result = base if result is None else result @ base
        p >>= 1
        if not p:
            break
        base = base @ base
    assert result is not None
    return result


def coupled_newton(
    g: Tensor, p: int, damping: float = 0.0, *, max_iters: int = MAX_ITERS, tol: float = TOLERANCE
) -> NewtonResult:
    """``(G + damping I)^(-1/p)`` by the coupled Newton iteration (docs/notes.md §6).

    Args:
        g: symmetric PSD ``(n, n)``.
        p: the root, an integer ``>= 1``.
        damping: ``eps`` added before the root (0 when ``g`` is already damped).
        max_iters: at most this many iterations (100).
        tol: stop when ``max|M - I| <= tol`` (1e-6).

    Returns:
        A :class:`NewtonResult`; no fallback is applied here (see :func:`coupled_newton_inverse_root`).
    """
    if p < 1:
        raise ValueError(f"p must be an integer >= 1, got {p!r}")
    n = g.shape[0]
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    gd = g + damping * eye if damping else g
    norm = float(torch.linalg.matrix_norm(gd))  # Frobenius
    if not norm > 0:
        raise LinAlgError("coupled Newton: the damped factor is zero")
    z = (1.0 + p) / (2.0 * norm)
    m = z * gd
    h = (z ** (1.0 / p)) * eye
    err = float((m - eye).abs().max())
    iters = 0
    while iters < max_iters and err > tol:
        m_step = (1.0 + 1.0 / p) * eye - m / p  # M'_i
        m_new = _matrix_power(m_step, p) @ m
        err_new = float((m_new - eye).abs().max())
        if not err_new < STALL_FACTOR * err:  # also catches NaN
            break
        h = h @ m_step
        m, err = m_new, err_new
        iters += 1
    return NewtonResult(h, iters, err)


def eigh_inverse_root(g: Tensor, p: float, damping: float = 0.0) -> Tensor:
    """``(G + damping I)^(-1/p)`` from the eigendecomposition of ``(G + G^T)/2`` (eigenvalues clamped at 0).

    :func:`~secondorder.linalg.kron.damped_eigh` decomposes the damped matrix (float32 LAPACK
    fails less often on it; float64 retry) and clamps its eigenvalues at ``damping``.

    Raises:
        LinAlgError: non-finite input, a failed eigendecomposition, or a non-positive damped
            eigenvalue.
    """
    evals, evecs = damped_eigh(g, damping)
    if not bool((evals > 0).all()):
        raise LinAlgError("factor is singular and undamped; no inverse root")
    # Q diag(lam^(-1/p)) Q^T = X^T X with X = (Q diag(lam^(-1/(2p))))^T: a symmetric product
    return gram((evecs * evals.pow(-0.5 / p)).t())


def coupled_newton_inverse_root(g: Tensor, p: int, damping: float = 0.0) -> Tensor:
    """``(G + damping I)^(-1/p)``: coupled Newton, with the eigendecomposition as the fallback.

    The fallback runs when the Newton root is not finite or its error ``max|H^p G_d - I|`` is
    above :data:`FALLBACK_ERROR` (the iteration stalled far from the root, e.g. a factor that is
    numerically singular in float32).

    Raises:
        LinAlgError: non-finite input, or no finite root.
    """
    if not finite(g):
        raise LinAlgError("factor has non-finite entries")
    if g.shape[0] == 1:
        value = float(g.reshape(()) + damping)
        if not value > 0:
            raise LinAlgError("1x1 factor is not positive after damping")
        return g.new_full((1, 1), value ** (-1.0 / p))
    result = coupled_newton(g, p, damping)
    root = result.root
    if result.error > FALLBACK_ERROR or not finite(root):
        logger.debug(
            "coupled Newton stalled (n=%d, p=%d, error %.3g after %d iterations); using eigh",
            g.shape[0],
            p,
            result.error,
            result.iterations,
        )
        root = eigh_inverse_root(g, p, damping)
    if not finite(root):
        raise LinAlgError(f"inverse {p}-th root of a {g.shape[0]}x{g.shape[0]} factor is not finite")
    return root


def inverse_root(factor: Tensor, p: int, damping: float, *, method: str = "newton") -> Tensor:
    """``(U + damping I)^(-1/p)`` of a dense ``(d, d)`` factor or a diagonal factor given as ``(d,)``.

    ``p = 1`` is the damped inverse (Cholesky, eigendecomposition fallback); ``p > 1`` uses
    :func:`coupled_newton_inverse_root` (``method="newton"``) or :func:`eigh_inverse_root`
    (``method="eigh"``). Diagonal factors are handled elementwise.

    Raises:
        LinAlgError: when the factor is not finite or the result is not finite (the caller keeps
            its previous preconditioner).
    """
    if not finite(factor):
        raise LinAlgError("factor has non-finite entries")
    if factor.dim() == 1:
        out = (factor.clamp_min(0) + damping).pow(-1.0 / p)
    elif p == 1:
        out = damped_inverse(factor, damping)
    elif method == "eigh":
        out = eigh_inverse_root(factor, p, damping)
    elif method == "newton":
        out = coupled_newton_inverse_root(factor, p, damping)
    else:
        raise ValueError(f"method must be 'newton' or 'eigh', got {method!r}")
    if not finite(out):
        raise LinAlgError(f"damped inverse {p}-th root of a {tuple(factor.shape)} factor is not finite")
    return out
