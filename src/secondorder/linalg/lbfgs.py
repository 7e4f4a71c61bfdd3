"""Compact ("non-loop") L-BFGS applied to a matrix, maintained incrementally.

Byrd, Nocedal and Schnabel (1994), as used by K-BFGS(L) (2.3 "L-BFGS Implementation", 3.4.3;
docs/notes.md §4). With the ``p' <= p`` stored pairs as rows ``S, Y`` of shape ``(p', d)``
(oldest first), ``R`` upper triangular with ``R_ij = s_i^T y_j`` (``i <= j``),
``D = diag(s_i^T y_i)`` and the initial matrix ``H0 = gamma I``, the L-BFGS matrix

    ``H = gamma I + [S^T, gamma Y^T] [[R^-T (D + gamma Y Y^T) R^-1, -R^-T], [-R^-1, 0]] [S; gamma Y]``

equals ``p'`` BFGS updates (2.6) applied to ``gamma I`` in storage order (3.16). We keep

    ``left  = [Z^T, gamma Y^T]``               ``(d, 2p')``,  ``Z = R^-1 S``,
    ``right = [(D + gamma Y Y^T) Z - gamma Y; -Z]``   ``(2p', d)``,

so that ``H V = gamma V + left (right V)`` (:func:`lbfgs_apply`; :func:`lbfgs_apply_t` gives
``(H V)^T`` from ``V^T``): two GEMMs of cost ``O(p' d n)`` for a ``(d, n)`` matrix ``V``
instead of the ``4 p'`` matrix-vector products per column of the two-loop recursion
(:func:`two_loop`, kept as a test oracle).

Incremental maintenance: ``R^-1`` and ``Y Y^T`` grow by bordering (the new column of ``R^-1``
is ``-rho R^-1 (S y_new)``, its diagonal entry ``rho = 1/s_new^T y_new``); when the memory is
full the first row and column are dropped, which is exact for an upper-triangular ``R``.
``left``/``right`` are rebuilt after each change in ``O(p'^2 d)``.

:class:`CompactLBFGS` holds only tensors and a float, so it round-trips through an optimizer's
``state_dict`` via :meth:`CompactLBFGS.as_state` / :meth:`CompactLBFGS.from_state`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class CompactLBFGS:
    """The L-BFGS memory and its compact factors (all tensors share dtype and device).

    Attributes:
        s, y: ``(p', d)`` pairs, oldest first.
        sty: ``(p',)`` the diagonal ``D`` (``s_i^T y_i``).
        r_inv: ``(p', p')`` upper-triangular ``R^-1``.
        yty: ``(p', p')`` ``Y Y^T`` (``y_i^T y_j``).
        left, right: the factors ``(d, 2p')`` and ``(2p', d)`` for ``gamma``.
        gamma: the initial matrix is ``gamma I``.
    """

    s: Tensor
    y: Tensor
    sty: Tensor
    r_inv: Tensor
    yty: Tensor
    left: Tensor
    right: Tensor
    gamma: float

    @property
    def size(self) -> int:
        """``p'``: pairs stored."""
        return int(self.s.shape[0])

    @property
    def dim(self) -> int:
        return int(self.s.shape[1])

    def as_state(self, prefix: str = "lbfgs_") -> dict[str, Any]:
        """Flat ``{prefix + field: tensor or float}`` for an optimizer's ``module_state``."""
        return {prefix + f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], prefix: str = "lbfgs_") -> CompactLBFGS:
        return cls(**{f.name: state[prefix + f.name] for f in fields(cls)})


def lbfgs_empty(
    dim: int, gamma: float, *, dtype: torch.dtype, device: torch.device | None = None
) -> CompactLBFGS:
    """An empty memory: ``H = gamma I``."""

    def z(*shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    return CompactLBFGS(z(0, dim), z(0, dim), z(0), z(0, 0), z(0, 0), z(dim, 0), z(0, dim), float(gamma))


def lbfgs_factors(mem: CompactLBFGS, gamma: float | None = None) -> CompactLBFGS:
    """Rebuild ``left``/``right`` (for a new ``gamma`` if given); ``O(p'^2 d)``."""
    gamma = mem.gamma if gamma is None else float(gamma)
    z = torch.mm(mem.r_inv, mem.s)  # R^-1 S, (p', d)
    middle = torch.diag(mem.sty).add_(mem.yty, alpha=gamma)  # D + gamma Y Y^T
    top = torch.mm(middle, z).sub_(mem.y, alpha=gamma)
    right = torch.cat([top, -z], dim=0)
    left = torch.cat([z.t(), gamma * mem.y.t()], dim=1)
    return replace(mem, left=left, right=right, gamma=gamma)


def _without_oldest(mem: CompactLBFGS) -> CompactLBFGS:
    # views: the caller copies (lbfgs_append concatenates, lbfgs_drop_oldest clones)
    return replace(
        mem, s=mem.s[1:], y=mem.y[1:], sty=mem.sty[1:], r_inv=mem.r_inv[1:, 1:], yty=mem.yty[1:, 1:]
    )


def lbfgs_drop_oldest(mem: CompactLBFGS) -> CompactLBFGS:
    """Forget the oldest pair (exact: deleting index 0 commutes with inverting ``R``)."""
    kept = _without_oldest(mem)
    return lbfgs_factors(
        replace(
            kept,
            s=kept.s.clone(),
            y=kept.y.clone(),
            sty=kept.sty.clone(),
            r_inv=kept.r_inv.clone(),
            yty=kept.yty.clone(),
        )
    )


def lbfgs_append(mem: CompactLBFGS, s: Tensor, y: Tensor, history_size: int) -> CompactLBFGS:
    """Add the newest pair ``(s, y)`` (``s^T y > 0``), dropping the oldest beyond ``history_size``.

    Bordering (docs/notes.md §4): ``R^-1 <- [[R^-1, -rho R^-1 S y], [0, rho]]``,
    ``Y Y^T <- [[Y Y^T, Y y], [y^T Y, y^T y]]``.
    """
    if history_size < 1:
        raise ValueError(f"history_size must be >= 1, got {history_size}")
    while mem.size >= history_size:
        mem = _without_oldest(mem)
    sy = torch.dot(s, y)
    rho = 1.0 / sy
    k = mem.size
    r_inv = mem.r_inv.new_zeros(k + 1, k + 1)
    r_inv[:k, :k] = mem.r_inv
    r_inv[:k, k] = torch.mv(mem.r_inv, torch.mv(mem.s, y)).mul_(-rho)
    r_inv[k, k] = rho
    yy = torch.mv(mem.y, y)
    yty = mem.yty.new_empty(k + 1, k + 1)
    yty[:k, :k] = mem.yty
    yty[:k, k] = yy
    yty[k, :k] = yy
    yty[k, k] = torch.dot(y, y)
    grown = replace(
        mem,
        s=torch.cat([mem.s, s.reshape(1, -1)]),
        y=torch.cat([mem.y, y.reshape(1, -1)]),
        sty=torch.cat([mem.sty, sy.reshape(1)]),
        r_inv=r_inv,
        yty=yty,
    )
    return lbfgs_factors(grown)


def lbfgs_apply(mem: CompactLBFGS, v: Tensor) -> Tensor:
    """``H v`` for a vector ``(d,)`` or a matrix ``(d, n)`` (columns): ``gamma v + left (right v)``."""
    if mem.size == 0:
        return v * mem.gamma
    if v.dim() == 1:
        return torch.mv(mem.left, torch.mv(mem.right, v)).add_(v, alpha=mem.gamma)
    return torch.addmm(v, mem.left, torch.mm(mem.right, v), beta=mem.gamma)


def lbfgs_apply_t(mem: CompactLBFGS, vt: Tensor) -> Tensor:
    """``(H V)^T`` from ``V^T`` of shape ``(n, d)``: ``gamma V^T + (V^T right^T) left^T``.

    The same product as :func:`lbfgs_apply` in the transposed layout (rows instead of columns).
    """
    if mem.size == 0:
        return vt * mem.gamma
    return torch.addmm(vt, torch.mm(vt, mem.right.t()), mem.left.t(), beta=mem.gamma)


def lbfgs_dense(mem: CompactLBFGS) -> Tensor:
    """The ``(d, d)`` matrix ``H`` (for tests and diagnostics)."""
    eye = torch.eye(mem.dim, dtype=mem.s.dtype, device=mem.s.device)
    return lbfgs_apply(mem, eye)


def two_loop(v: Tensor, s: Sequence[Tensor], y: Sequence[Tensor], gamma: float) -> Tensor:
    """``H v`` by the classical two-loop recursion (Nocedal & Wright Alg. 7.4), pairs oldest first.

    The reference the compact form is tested against; ``4 p`` vector operations per column.
    """
    q = v.clone()
    alphas = []
    for si, yi in zip(reversed(s), reversed(y), strict=True):
        rho = 1.0 / torch.dot(si, yi)
        alpha = rho * torch.dot(si, q)
        q -= alpha * yi
        alphas.append((rho, alpha))
    r = gamma * q
    for (si, yi), (rho, alpha) in zip(zip(s, y, strict=True), reversed(alphas), strict=True):
        beta = rho * torch.dot(yi, r)
        r += (alpha - beta) * si
    return r
