"""Tensor algebra of chapter 4 (section 4.2.1): vectorization, matricization, mode products, contractions.

Conventions (thesis 4.2.1):

* ``vec(A)`` is the **row-major** vectorization (``A.reshape(-1)``): the slices along the first
  dimension, each vectorized recursively, stacked.
* ``mat_i(A)`` has the row-major vectorized slices ``A^i_j`` as its rows:
  ``A.movedim(i, 0).reshape(d_i, -1)``.
* The mode-``i`` product ``B = A x_i U`` with ``U`` of shape ``(d'_i, d_i)``:
  ``B[.., j', ..] = sum_j A[.., j, ..] U[j', j]``; for matrices ``A x_1 U = U A`` and
  ``A x_2 U = A U^T``.
* The contraction ``A^(i) = mat_i(A) mat_i(A)^T`` (``d_i x d_i``).

Proposition 1 / (4.9): ``(U_1 (x) ... (x) U_k) vec(G) = vec(G x_1 U_1 x_2 ... x_k U_k)``.

(4.10), the tensor-normal identification with equal normalised traces: from the (expected)
contractions ``E[G^(i)]`` of a ``d_1 x ... x d_k`` tensor, with ``D = prod_j d_j`` and
``c_0 = (tr(E[G^(i)]) / D)^(1/k)`` (the trace is the same for every mode),
``U~_i = E[G^(i)] / (c_0^(k-1) prod_{j != i} d_j)``; then ``tr(U~_i)/d_i = c_0`` for every ``i``.

A factor may also be *diagonal* (a 1-D tensor holding the diagonal): :func:`diag_contraction`
gives ``diag(A^(i))`` in ``O(D)`` memory, and every function here accepts such factors. The
optimizers use them for modes too large for a dense ``d_i x d_i`` factor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .kron import gram


def vec(a: Tensor) -> Tensor:
    """Row-major vectorization ``vec(A)`` (4.2.1)."""
    return a.reshape(-1)


def matricize(a: Tensor, mode: int) -> Tensor:
    """``mat_i(A)``: ``(d_i, D / d_i)``, rows are the row-major vectorized slices along ``mode`` (4.2.1)."""
    return a.movedim(mode, 0).reshape(a.shape[mode], -1)


def mode_product(a: Tensor, u: Tensor, mode: int) -> Tensor:
    """``A x_i U`` for ``U`` of shape ``(d'_i, d_i)``, or a diagonal ``U`` given as a vector ``(d_i,)``."""
    if u.dim() == 1:
        shape = [1] * a.dim()
        shape[mode] = -1
        return a * u.reshape(shape)
    return torch.tensordot(a, u, dims=([mode], [1])).movedim(-1, mode)


def multi_mode_product(a: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``A x_1 U_1 x_2 U_2 ... x_k U_k`` (one factor per mode; 1-D factors are diagonal).

    Computed as in the reference code: ``k`` contractions over the leading axis, each of which
    moves the new axis to the end, so the axes come back in their original order.
    """
    if len(factors) != a.dim():
        raise ValueError(
            f"factors: expected {a.dim()} factors for a tensor of shape {tuple(a.shape)}, got {len(factors)}"
        )
    if a.dim() == 1:
        u = factors[0]
        return a * u if u.dim() == 1 else u @ a
    if a.dim() == 2 and factors[0].dim() == 2 and factors[1].dim() == 2:
        return torch.linalg.multi_dot([factors[0], a, factors[1].t()])  # U_1 A U_2^T
    out = a
    for u in factors:
        if u.dim() == 1:
            shape = [-1] + [1] * (out.dim() - 1)
            out = (out * u.reshape(shape)).movedim(0, -1)
        else:
            out = torch.tensordot(out, u, dims=([0], [1]))  # sum_j A[j, ...] U[j', j], new axis last
    return out


def add_multi_mode_product_(out: Tensor, a: Tensor, factors: Sequence[Tensor], alpha: float = 1.0) -> Tensor:
    """In place: ``out <- out + alpha (A x_1 U_1 ... x_k U_k)``; returns ``out``.

    The preconditioned update without forming ``p``: Algorithm 15 lines 18-20 and Algorithm 16
    lines 14-16, ``W <- W - alpha p`` with ``p = m x_1 K_1 ... x_k K_k`` (the weight decay is
    applied to ``W`` separately). For dense matrices ``out += alpha (U_1 A) U_2^T`` is one GEMM
    accumulating into ``out``, for vectors ``out += alpha U_1 a`` one GEMV; other tensors go
    through :func:`multi_mode_product`. ``out`` has the product's shape (``d'_i`` where ``U_i``
    is ``(d'_i, d_i)``).
    """
    if len(factors) != a.dim():
        raise ValueError(
            f"factors: expected {a.dim()} factors for a tensor of shape {tuple(a.shape)}, got {len(factors)}"
        )
    expected = tuple(u.shape[0] if u.dim() == 2 else d for u, d in zip(factors, a.shape, strict=True))
    if tuple(out.shape) != expected:
        raise ValueError(f"out: expected shape {expected}, got {tuple(out.shape)}")
    if all(u.dim() == 2 for u in factors):
        if a.dim() == 2:
            return out.addmm_(factors[0] @ a, factors[1].t(), alpha=alpha)
        if a.dim() == 1:
            return out.addmv_(factors[0], a, alpha=alpha)
    return out.add_(multi_mode_product(a, factors), alpha=alpha)


def contraction(a: Tensor, mode: int) -> Tensor:
    """``A^(i) = mat_i(A) mat_i(A)^T``, shape ``(d_i, d_i)`` (4.2)."""
    if a.dim() == 1:
        return torch.outer(a, a)
    if a.dim() == 2:
        return gram(a.t()) if mode == 0 else gram(a)  # symmetric: lower triangle only (kron.gram_)
    return gram(matricize(a, mode).t())


def diag_contraction(a: Tensor, mode: int) -> Tensor:
    """``diag(A^(i))``: the sum of squares over all but mode ``i``, shape ``(d_i,)``."""
    dims = [d for d in range(a.dim()) if d != mode]
    sq = a * a
    return sq.sum(dim=dims) if dims else sq


def contractions(a: Tensor, diagonal: Sequence[bool] | None = None) -> list[Tensor]:
    """``[A^(1), ..., A^(k)]``; modes flagged in ``diagonal`` get :func:`diag_contraction` instead."""
    flags = list(diagonal) if diagonal is not None else [False] * a.dim()
    if len(flags) != a.dim():
        raise ValueError(f"diagonal: expected {a.dim()} flags, got {len(flags)}")
    return [diag_contraction(a, i) if d else contraction(a, i) for i, d in enumerate(flags)]


def factor_trace(factor: Tensor) -> Tensor:
    """``tr(U)`` of a dense factor, or the sum of a diagonal factor given as a vector."""
    return factor.sum() if factor.dim() == 1 else torch.diagonal(factor).sum()


def tensor_normal_factors(stats: Sequence[Tensor], shape: Sequence[int]) -> list[Tensor]:
    """The identification (4.10): ``U~_i = E[G^(i)] / (c_0^(k-1) prod_{j != i} d_j)``.

    Args:
        stats: ``E[G^(i)]`` for ``i = 1..k`` (dense ``(d_i, d_i)`` or diagonal ``(d_i,)``).
        shape: ``(d_1, ..., d_k)``.

    Returns:
        ``[U~_1, ..., U~_k]`` with ``tr(U~_i)/d_i = c_0`` for every ``i``. When the statistics are
        all zero (a parameter whose gradient is identically zero) the factors are zero, the limit
        of (4.10); for ``k = 1`` (4.10) is the identity, ``U~_1 = E[G^(1)]``.

    ``c_0`` uses the mean of the ``k`` traces, which are equal in exact arithmetic.
    """
    k = len(shape)
    if len(stats) != k:
        raise ValueError(f"stats: expected {k} contractions for shape {tuple(shape)}, got {len(stats)}")
    if k == 1:
        return [stats[0].clone()]
    total = math.prod(shape)
    trace = float(torch.stack([factor_trace(s) for s in stats]).mean())
    if not trace > 0:
        return [torch.zeros_like(s) for s in stats]
    c0 = (trace / total) ** (1.0 / k)
    return [s / (c0 ** (k - 1) * (total // d)) for s, d in zip(stats, shape, strict=True)]


def kron_dense(factors: Sequence[Tensor]) -> Tensor:
    """``U_1 (x) ... (x) U_k`` as a dense matrix (diagonal factors expanded); for tests and small blocks."""
    out = torch.ones(1, 1, dtype=factors[0].dtype, device=factors[0].device)
    for u in factors:
        out = torch.kron(out, torch.diag(u) if u.dim() == 1 else u)
    return out
