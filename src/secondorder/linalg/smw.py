"""Sherman-Morrison-Woodbury solves for subsampled Gauss-Newton / natural gradient (thesis 5.3).

The damped curvature of chapter 5 is

    G = lam I + s J^T H J,        s = 1/N2 (the thesis's batch-mean convention),

with ``J`` the ``R x n`` matrix of per-example Jacobian rows (``R = N2`` gradients ``grad f_i``
for the natural gradient, where ``H = I``; ``R = N2 m_L`` output-Jacobian rows for Gauss-Newton,
where ``H = blockdiag(H_i)``). Woodbury turns the ``n x n`` solve into an ``R x R`` one:

* (5.6), ``H`` invertible: ``G^-1 = (1/lam)(I - s J^T D^-1 J)``, ``D = lam H^-1 + s J J^T``
  (symmetric positive definite: Cholesky);
* (5.7), ``H`` singular (softmax): ``G^-1 = (1/lam)(I - s J^T H D^-1 J)``,
  ``D = lam I + s J J^T H`` (not symmetric: LU).

Both are written here as *weights* ``u`` with ``G^-1 g = (g - J^T u) / lam``, so that a caller
who never forms ``J`` (only ``J J^T``, ``J g`` and a way to apply ``J^T``) can finish the solve:
:func:`smw_weights` (5.6) and :func:`smw_weights_singular` (5.7). :func:`smw_apply` does the
whole solve for an explicit ``J``.

The Gram matrix ``J J^T`` of a fully-connected layer never needs the per-example gradients
(5.3.3, 5.4.6-5.4.7, Algorithm 22). A row ``r = (i, j)`` of the layer's block of ``J`` is
``vec(g_ij a_i^T)``: ``a_i`` the layer input of example ``i`` with the homogeneous 1 appended
(the bias column), ``g_ij`` the vector backpropagated to the layer's pre-activation (``j``
indexes the ``K`` backpropagated vectors per example: ``K = 1``, ``g_i = dl_i/dh_i`` for the
natural gradient; ``K = m_L``, ``g_ij = d yhat_ij / dh_i`` for Gauss-Newton). Since
``vec(g a^T)^T vec(g' a'^T) = (g^T g')(a^T a')``:

    J_l J_l^T = (A_l A_l^T (x) 1_{K x K}) o (G_l G_l^T)            (Algorithm 22 line 16)

which for ``K = 1`` is ``(G_l G_l^T) o (V_l V_l^T + 1)`` of 5.3.3. Layers applied at several
locations (a ``Linear`` layer on a sequence, a convolution on im2col patches) have rows
``vec(sum_t g_ijt a_it^T)`` and the identity becomes a sum over location pairs
(:func:`kron_gram`). :func:`kron_jvp` (``J_l v``) and :func:`kron_vjp` (``J_l^T u``) are the
matching products.

Shapes: ``g`` is ``(N, K, T, d_o)``, ``a`` is ``(N, T, D)`` (``T`` locations, ``D`` = inputs
+ 1 with a bias); a weight-shaped vector is the ``(d_o, D)`` matrix ``[W | b]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .finite import finite
from .kron import LinAlgError


def kron_gram(g: Tensor, a: Tensor) -> Tensor:
    """``J_l J_l^T`` of one layer from its factors (5.3.3, Algorithm 22), shape ``(N K, N K)``.

    Entry ``((i, j), (i', j'))`` is ``sum_{t, t'} (g_ijt^T g_i'j't') (a_it^T a_i't')``; for one
    location that is ``(g_ij^T g_i'j') (v_i^T v_i' + 1)``.

    Args:
        g: backpropagated pre-activation vectors, ``(N, K, T, d_o)``.
        a: layer inputs with the homogeneous coordinate, ``(N, T, D)``.
    """
    n, k, t, d_o = g.shape
    if t == 1:
        gg = g.reshape(n * k, d_o)
        vv = a[:, 0] @ a[:, 0].t()  # V_ii' = v_i^T v_i' + 1
        return ((gg @ gg.t()).view(n, k, n, k) * vv[:, None, :, None]).reshape(n * k, n * k)
    gg = g.reshape(n * k * t, d_o)
    aa = a.reshape(n * t, a.shape[-1])
    ggt = (gg @ gg.t()).view(n, k, t, n, k, t)
    vv = (aa @ aa.t()).view(n, t, n, t)
    return torch.einsum("iatjbs,itjs->iajb", ggt, vv).reshape(n * k, n * k)


def kron_jvp(g: Tensor, a: Tensor, mat: Tensor) -> Tensor:
    """``J_l v`` for ``v = vec(mat)``, ``mat = [V_W | v_b]`` of shape ``(d_o, D)``; returns ``(N, K)``.

    Entry ``(i, j)`` is ``sum_t g_ijt^T mat a_it`` (5.4.4, Algorithm 19 in factored form).
    """
    am = torch.matmul(a, mat.t())  # (N, T, d_o): mat a_it
    return torch.einsum("nktd,ntd->nk", g, am)


def kron_vjp(g: Tensor, a: Tensor, u: Tensor) -> Tensor:
    """``J_l^T u`` as a ``(d_o, D)`` matrix ``sum_{i,j,t} u_ij g_ijt a_it^T`` (5.4.5, Algorithm 21).

    Args:
        u: weights of the rows, ``(N, K)``.
    """
    n, _, t, d_o = g.shape
    gu = torch.einsum("nktd,nk->ntd", g, u).reshape(n * t, d_o)
    return gu.t() @ a.reshape(n * t, a.shape[-1])


def smw_weights(
    gram: Tensor, jg: Tensor, damping: float, scale: float, hess_inv: Tensor | None = None
) -> Tensor:
    """(5.6): ``u = s D^-1 J g`` with ``D = lam H^-1 + s J J^T``, so ``G^-1 g = (g - J^T u) / lam``.

    Args:
        gram: ``J J^T``, ``(R, R)`` with ``R = N K``.
        jg: ``J g``, ``(R,)``.
        damping: ``lam > 0``.
        scale: ``s`` (``1/N2``).
        hess_inv: the blocks of ``H^-1 = blockdiag((H_i)^-1)``, ``(N, K, K)``, each symmetric
            positive definite; ``None`` means ``H = I`` (the natural gradient).

    Raises:
        LinAlgError: when ``D`` or the result is not finite.
    """
    d = scale * gram
    if hess_inv is None:
        d.diagonal().add_(damping)
    else:
        n, k, _ = hess_inv.shape
        d.view(n, k, n, k).diagonal(dim1=0, dim2=2).add_(damping * hess_inv.permute(1, 2, 0))
    d = 0.5 * (d + d.t())
    _check_finite("D", d)
    chol, info = torch.linalg.cholesky_ex(d)
    if int(info) == 0:
        x = torch.cholesky_solve(jg.unsqueeze(1), chol).squeeze(1)
    else:  # round-off made D numerically indefinite: LU still solves the (nonsingular) system
        x = torch.linalg.solve(d, jg)
    u = scale * x
    _check_finite("SMW solution", u)
    return u


def smw_weights_singular(gram: Tensor, jg: Tensor, damping: float, scale: float, hess: Tensor) -> Tensor:
    """(5.7): ``u = s H D^-1 J g`` with ``D = lam I + s J J^T H`` (LU), so ``G^-1 g = (g - J^T u) / lam``.

    Valid for any positive semi-definite ``H`` (the softmax Hessian ``diag(p) - p p^T`` is
    singular); ``D`` is not symmetric. The products with ``H = blockdiag(H_i)`` are done
    block by block (``O(R N K^2)`` instead of ``O(R^3)``).

    Args:
        gram: ``J J^T``, ``(R, R)`` with ``R = N K``.
        jg: ``J g``, ``(R,)``.
        damping: ``lam > 0``.
        scale: ``s``.
        hess: the blocks ``H_i``, ``(N, K, K)``.
    """
    n, k, _ = hess.shape
    r = gram.shape[0]
    gram_h = torch.matmul(gram.view(r, n, 1, k), hess).view(r, r)  # (J J^T) H
    d = scale * gram_h
    d.diagonal().add_(damping)
    _check_finite("D", d)
    x = torch.linalg.solve(d, jg)
    u = scale * torch.bmm(hess, x.view(n, k, 1)).view(r)  # s H D^-1 J g
    _check_finite("SMW solution", u)
    return u


def smw_apply(
    jac: Tensor, g: Tensor, damping: float, scale: float, hess: Tensor | None = None, singular: bool = False
) -> Tensor:
    """``(lam I + s J^T H J)^-1 g`` for an explicit ``J`` (``(N K, n)``) by (5.6) or (5.7).

    Args:
        jac: ``J``.
        g: ``(n,)``.
        hess: the blocks ``H_i`` (``(N, K, K)``); ``None`` means ``H = I``.
        singular: use (5.7) (required when ``H`` is singular); otherwise (5.6) with ``H^-1``.
    """
    gram = jac @ jac.t()
    jg = jac @ g
    if hess is None:
        u = smw_weights(gram, jg, damping, scale)
    elif singular:
        u = smw_weights_singular(gram, jg, damping, scale, hess)
    else:
        u = smw_weights(gram, jg, damping, scale, torch.linalg.inv(hess))
    return (g - jac.t() @ u) / damping


def block_diagonal(blocks: Tensor) -> Tensor:
    """``blockdiag(H_1, ..., H_N)`` of ``(N, K, K)`` blocks as an ``(N K, N K)`` matrix."""
    n, k, _ = blocks.shape
    out = blocks.new_zeros(n, k, n, k)
    idx = torch.arange(n, device=blocks.device)
    out[idx, :, idx, :] = blocks
    return out.reshape(n * k, n * k)


def _check_finite(what: str, x: Tensor) -> None:
    if not finite(x):
        raise LinAlgError(f"{what} has non-finite entries")
