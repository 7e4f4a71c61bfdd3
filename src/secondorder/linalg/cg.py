"""Damped linear conjugate gradient for a matrix-free symmetric operator (Hessian-free, Martens 2010).

Solves ``(A + damping I) x = b`` where ``A`` is symmetric positive semi-definite and known only
through ``matvec(v) = A v`` (for Hessian-free: the subsampled Gauss-Newton product
``B v = s J^T H J v``). The iteration is the textbook one (Nocedal & Wright, Algorithm 5.2):

    r_0 = b - (A + damping I) x_0,  p_0 = r_0
    alpha_i = r_i^T r_i / p_i^T (A + damping I) p_i
    x_{i+1} = x_i + alpha_i p_i,    r_{i+1} = r_i - alpha_i (A + damping I) p_i
    p_{i+1} = r_{i+1} + (r_{i+1}^T r_{i+1} / r_i^T r_i) p_i

It stops after ``max_iters`` products, when the residual satisfies
``|r_i| <= tol |b|`` (relative residual), or when ``p^T (A + damping I) p <= 0`` (the operator
is not positive definite along ``p``; the current iterate is returned). ``x0`` warm-starts the
iteration (Martens uses the previous step's solution, decayed); with ``x0`` one extra product
computes the initial residual.

The returned residual ``r = b - (A + damping I) x`` (the recurrence's, which equals the true
residual up to round-off) lets a caller evaluate the quadratic model at ``x`` without another
product: ``x^T (A + damping I) x = x^T b - x^T r``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CGResult:
    """Outcome of :func:`conjugate_gradient`.

    Attributes:
        x: the final iterate.
        residual: ``b - (A + damping I) x``.
        iterations: CG iterations run (products with ``A``, not counting the one for ``x0``).
        converged: whether ``|r| <= tol |b|`` was reached.
    """

    x: Tensor
    residual: Tensor
    iterations: int
    converged: bool


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    damping: float = 0.0,
    x0: Tensor | None = None,
    max_iters: int = 50,
    tol: float = 1e-6,
) -> CGResult:
    """Solve ``(A + damping I) x = b`` by conjugate gradient with ``A v = matvec(v)``.

    Args:
        matvec: the product with the symmetric positive semi-definite ``A`` (flat vectors).
        b: the right-hand side, a flat tensor.
        damping: ``lambda >= 0`` added to the diagonal.
        x0: initial iterate (warm start); zero when ``None``.
        max_iters: at most this many iterations (``>= 1``).
        tol: stop when ``|r| <= tol |b|``.

    Returns:
        A :class:`CGResult`. For ``b = 0`` the solution is 0 and no product is computed.
    """
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")

    def op(v: Tensor) -> Tensor:
        out = matvec(v)
        return torch.add(out, v, alpha=damping) if damping != 0 else out

    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0.0:
        zero = torch.zeros_like(b)
        return CGResult(zero, zero.clone(), 0, True)
    if x0 is None or not bool(torch.any(x0 != 0)):
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.clone()
        r = b - op(x)
    p = r.clone()
    rs = float(r @ r)
    threshold = (tol * b_norm) ** 2
    iterations = 0
    while iterations < max_iters and rs > threshold:
        ap = op(p)
        p_ap = float(p @ ap)
        if not p_ap > 0:  # not positive definite along p (or NaN): keep the current iterate
            break
        alpha = rs / p_ap
        x.add_(p, alpha=alpha)
        r.add_(ap, alpha=-alpha)
        rs_new = float(r @ r)
        p.mul_(rs_new / rs).add_(r)
        rs = rs_new
        iterations += 1
    return CGResult(x, r, iterations, rs <= threshold)
