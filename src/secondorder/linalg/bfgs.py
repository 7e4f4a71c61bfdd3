"""Damped BFGS updates of an inverse-Hessian approximation ``H`` (thesis chapters 2 and 3).

Pure tensor functions, float32 or float64, on vectors of length ``d`` and ``d x d`` matrices:

* :func:`bfgs_update` -- the BFGS inverse update (2.6)/(3.11),
  ``H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T`` with ``rho = 1/s^T y``;
  :func:`broyden_update` -- the Broyden family (2.11) of Theorem 1 (``phi = 1`` BFGS, ``0`` DFP).
* :func:`powell_damping` -- Powell's damping on ``H`` (2.3.1), ``s~ = theta s + (1 - theta) H y``.
* :func:`double_damping` -- DD, Algorithm 3 (chapter 2): Powell on ``H``, then Powell with ``B = I``.
* :func:`dp_dlm` -- ``D_P D_LM``, Algorithm 8 (chapter 3): Powell on ``H``, then ``y~ = y + mu2 s~``.
* :func:`dpi_dlm` -- ``D_P(I) D_LM``, Algorithm 11: as Algorithm 8 with ``H`` replaced by ``I/mu2``.
* :func:`dd_skip` -- the skip test of Algorithm 5 line 17: update only if ``s~^T y~ >= mu1 y~^T H y~``.
* :func:`code_skip_reason` -- the skip rules of the chapter-2 code (docs/notes.md §1, §11.2).
* :func:`hessian_action_pair`, :func:`gram_action` -- "Hessian-action" BFGS pairs for ``A``
  (2.4 and the minibatched form (3.14)-(3.15)).
* :func:`normalize_pair` -- ``(c s, c y)`` with ``c`` a power of two that balances the pair, so
  that the dot products above neither overflow nor underflow.

The damping functions take ``hy = H y`` instead of ``H`` so that they serve a dense ``H`` and an
L-BFGS operator alike; they are branch-free (``torch.where``), so they need no host sync.
All of DD, ``D_P D_LM``, ``D_P(I) D_LM`` and BFGS are invariant to ``(s, y) -> (c s, c y)``
for ``c != 0``; the chapter-2 norm gate is invariant to the pair's scale but not to the
gradient's. The formulas themselves are not safe at every scale: BFGS squares ``rho = 1/s^T y``,
which overflows float32 once ``s^T y < 5e-20``, and the dot products underflow for pairs below
about ``1e-19``. Callers therefore pass pairs through :func:`normalize_pair` first; because its
factor is a power of two, the normalised computation gives bit-for-bit the same ``H+`` wherever
the unnormalised one neither overflows nor underflows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

#: the norm-gate constant of the chapter-2 code: skip if ``s^T y <= 1e-4 s^T s |g|``
CODE_NORM_GATE = 1e-4


def _dot(u: Tensor, v: Tensor) -> Tensor:
    return torch.dot(u.reshape(-1), v.reshape(-1))


# ----------------------------------------------------------------------------- BFGS
def bfgs_update_(h: Tensor, s: Tensor, y: Tensor, hy: Tensor | None = None) -> Tensor:
    """In place: the BFGS inverse update (2.6)/(3.11); returns ``h``.

    ``H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T``, ``rho = 1 / s^T y``, computed in the
    expanded rank-2 form (docs/notes.md §1) with one GEMM of inner size 2:

        ``H+ = H + (rho^2 y^T H y + rho) s s^T - rho (s (Hy)^T + (Hy) s^T)``.

    The caller guarantees ``s^T y > 0`` (see the damping functions and skip rules).

    Args:
        h: symmetric ``(d, d)`` matrix, overwritten.
        s, y: ``(d,)`` vectors.
        hy: ``H y`` if already known.
    """
    if hy is None:
        hy = torch.mv(h, y)
    rho = 1.0 / _dot(s, y)
    c = rho * rho * _dot(y, hy) + rho
    left = torch.stack([s, hy], dim=1)  # (d, 2)
    right = torch.stack([c * s - rho * hy, -rho * s], dim=0)  # (2, d)
    return h.addmm_(left, right)


def bfgs_update(h: Tensor, s: Tensor, y: Tensor, hy: Tensor | None = None) -> Tensor:
    """The BFGS inverse update (2.6)/(3.11) as a new matrix (see :func:`bfgs_update_`).

    ``h`` is left unchanged, so a caller can check the result before replacing ``h`` with it.
    """
    return bfgs_update_(h.clone(), s, y, hy)


def pair_scale(s: Tensor, y: Tensor) -> Tensor:
    """A power of two ``c`` (0-d tensor) with ``max|c s| max|c y|`` in ``[1/4, 2)``.

    ``c = 2^-e`` with ``e = floor((e_s + e_y) / 2)``, where ``max|s| = f_s 2^e_s`` and
    ``max|y| = f_y 2^e_y`` with ``f`` in ``[1/2, 1)`` (``frexp``); ``e`` is clamped so that ``c``
    itself is finite. Multiplying by a power of two is exact unless it overflows or underflows,
    so :func:`normalize_pair` changes no digit of a pair. A zero vector has exponent 0.
    Branch-free (no host synchronisation).
    """
    _, e_s = torch.frexp(s.abs().amax())
    _, e_y = torch.frexp(y.abs().amax())
    limit = math.frexp(torch.finfo(s.dtype).max)[1] - 2
    e = torch.div(e_s + e_y, 2, rounding_mode="floor").clamp_(-limit, limit)
    return torch.ldexp(torch.ones((), dtype=s.dtype, device=s.device), -e)


def normalize_pair(s: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(c s, c y)`` with ``c`` = :func:`pair_scale`: the same pair for every damping and BFGS.

    A pair of any scale between about ``1e-30`` and ``1e30`` (float32) comes out with
    ``max|s| max|y|`` near 1, so ``s^T y``, ``y^T H y`` and ``rho^2`` stay in range (as long as ``H``
    itself is moderate); the damped BFGS update of the normalised pair equals the update of the
    pair at scale 1.
    """
    c = pair_scale(s, y)
    return s * c, y * c


def broyden_update(h: Tensor, s: Tensor, y: Tensor, phi: float) -> Tensor:
    """The Broyden family (2.11): ``H+ = H - sigma Hy (Hy)^T + rho s s^T + phi (y^T H y) v v^T``.

    ``rho = 1/s^T y``, ``sigma = 1/y^T H y``, ``v = rho s - sigma H y``; ``phi = 1`` is BFGS
    (2.6), ``phi = 0`` is DFP. Used to check Theorem 1.
    """
    hy = torch.mv(h, y)
    rho = 1.0 / _dot(s, y)
    yhy = _dot(y, hy)
    sigma = 1.0 / yhy
    v = rho * s - sigma * hy
    return h - sigma * torch.outer(hy, hy) + rho * torch.outer(s, s) + phi * yhy * torch.outer(v, v)


# --------------------------------------------------------------------------- damping
def powell_damping(s: Tensor, y: Tensor, hy: Tensor, mu1: float) -> tuple[Tensor, Tensor]:
    """Powell's damping on ``H`` (2.3.1; Algorithm 3 lines 2-3, Algorithm 8 lines 2-7).

    ``theta = (1 - mu1) y^T H y / (y^T H y - s^T y)`` if ``s^T y < mu1 y^T H y``, else 1;
    ``s~ = theta s + (1 - theta) H y``. Guarantees ``s~^T y >= mu1 y^T H y`` (equality when damped).

    Returns:
        ``(s~, theta)`` with ``theta`` a 0-d tensor.
    """
    sy = _dot(s, y)
    yhy = _dot(y, hy)
    damp = sy < mu1 * yhy
    theta = torch.where(damp, (1.0 - mu1) * yhy / torch.where(damp, yhy - sy, torch.ones_like(yhy)), 1.0)
    return theta * s + (1.0 - theta) * hy, theta


def double_damping(s: Tensor, y: Tensor, hy: Tensor, mu1: float, mu2: float) -> tuple[Tensor, Tensor]:
    """DD, Algorithm 3 (chapter 2): Powell on ``H``, then Powell with ``B = I``.

    Step 2: ``theta2 = (1 - mu2) s~^T s~ / (s~^T s~ - s~^T y)`` if ``s~^T y < mu2 s~^T s~``, else 1;
    ``y~ = theta2 y + (1 - theta2) s~``. Gives ``s~^T y~ >= mu2 s~^T s~`` for ``0 < mu2 <= 1``
    (for ``mu2 > 1`` step 2 extrapolates; docs/notes.md §11.3).

    Args:
        s, y: the pair; ``hy = H y`` with ``H`` the current approximation.
        mu1: Powell parameter (0.2 in the thesis); mu2: ``lambda_G`` in ``(0, 1]``.

    Returns:
        ``(s~, y~)``.
    """
    s_t, _ = powell_damping(s, y, hy, mu1)
    sts = _dot(s_t, s_t)
    sty = _dot(s_t, y)
    damp = sty < mu2 * sts
    theta2 = torch.where(damp, (1.0 - mu2) * sts / torch.where(damp, sts - sty, torch.ones_like(sts)), 1.0)
    return s_t, theta2 * y + (1.0 - theta2) * s_t


def dp_dlm(s: Tensor, y: Tensor, hy: Tensor, mu1: float, mu2: float) -> tuple[Tensor, Tensor]:
    """``D_P D_LM``, Algorithm 8 (chapter 3): Powell on ``H``, then ``y~ = y + mu2 s~``.

    Since ``s~^T y >= mu1 y^T H y >= 0``, ``s~^T y~ >= mu2 |s~|^2`` for any ``mu2 > 0``
    (Levenberg-Marquardt damping on ``H^-1`` with parameter ``mu2 = lambda_G``).

    Returns:
        ``(s~, y~)``.
    """
    s_t, _ = powell_damping(s, y, hy, mu1)
    return s_t, y + mu2 * s_t


def dpi_dlm(s: Tensor, y: Tensor, mu1: float, mu2: float) -> tuple[Tensor, Tensor]:
    """``D_P(I) D_LM``, Algorithm 11: :func:`dp_dlm` with ``H`` replaced by ``mu2^-1 I``.

    Lemma 4: ``s~^T s~ / s~^T y~ <= 1/mu2`` and ``y~^T y~ / s~^T y~ <= 1/mu3`` with
    ``mu3 = mu1 / (mu2 (1 + 2 mu1))``.
    """
    return dp_dlm(s, y, y / mu2, mu1, mu2)


# ------------------------------------------------------------------------ skip rules
def curvature_ratio(s: Tensor, y: Tensor, hy: Tensor) -> Tensor:
    """``y^T H y / s^T y`` (Fig. 2.1 plots how often it is ``<= 2/mu1``); a 0-d tensor."""
    return _dot(y, hy) / _dot(s, y)


def dd_skip(s: Tensor, y: Tensor, hy: Tensor, mu1: float, rtol: float | None = None) -> bool:
    """Algorithm 5 line 17: ``True`` (skip) unless ``s~^T y~ >= mu1 y~^T H y~``.

    When Powell's step damps and DD's second step does not, ``s~^T y~ = mu1 y~^T H y~`` holds
    exactly, so the comparison allows a relative rounding error ``rtol`` (default 64 machine
    epsilons of the dtype); otherwise that common case would be decided by rounding.

    Args:
        s, y: the damped pair ``(s~, y~)``; ``hy = H y~`` with the current ``H``.
    """
    if rtol is None:
        rtol = 64 * torch.finfo(s.dtype).eps
    return not bool(_dot(s, y) >= mu1 * _dot(y, hy) * (1 - rtol))


def positive_curvature(s: Tensor, y: Tensor) -> bool:
    """``s^T y > 0`` and finite: the minimal condition for a BFGS update to stay positive definite."""
    sy = _dot(s, y)
    return bool(torch.isfinite(sy) & (sy > 0))


def code_skip_reason(s: Tensor, y: Tensor, grad_norm: float | Tensor) -> str | None:
    """The pre-update skip rules of the chapter-2 code (docs/notes.md §1, §11.2; not in the thesis).

    Skip when ``s^T y <= 0`` or on the norm gate ``s^T y <= 1e-4 s^T s |g|`` (``|g|`` is the
    norm of the mean pre-activation gradient for ``H_g``, of ``[mean a; 1]`` for ``H_a``), or
    when ``s^T s`` is not finite. The code also keeps the old ``H`` when ``H+`` has an
    infinite entry; the caller checks that after the update.

    Returns:
        ``None`` to update, else a short reason.
    """
    sy = float(_dot(s, y))
    ss = float(_dot(s, s))
    if not (sy > 0):
        return "s^T y <= 0"
    if not (ss < float("inf")):
        return "s^T s is not finite"
    if sy <= CODE_NORM_GATE * ss * float(grad_norm):
        return "norm gate"
    return None


# ---------------------------------------------------------------- Hessian action (2.4)
def gram_action(x: Tensor, v: Tensor, scale: float, homogeneous: bool) -> Tensor:
    """``scale * Xbar^T (Xbar v)`` with ``Xbar = [X, 1]`` (or ``X``): the product (3.15).

    With the rows ``x_r`` of ``X`` the patches ``a_{n,t}`` of a minibatch and ``scale = 1/m``, this
    is ``A~ v = E_n[sum_t a_t (a_t^T v)]`` computed without forming ``A~``.

    Args:
        x: ``(N, d)`` rows without the homogeneous coordinate.
        v: ``(d + 1,)`` if ``homogeneous`` else ``(d,)``.
        scale: the factor (``1/m`` for a mean over examples and a sum over locations).
        homogeneous: whether ``Xbar`` has the appended column of ones.
    """
    if homogeneous:
        u = torch.mv(x, v[:-1]).add_(v[-1])
        return torch.cat([torch.mv(x.t(), u), u.sum().reshape(1)]).mul_(scale)
    return torch.mv(x.t(), torch.mv(x, v)).mul_(scale)


def hessian_action_pair(
    h: Tensor, a_mean: Tensor, a_times: Callable[[Tensor], Tensor], damping: float
) -> tuple[Tensor, Tensor]:
    """The Hessian-action pair for ``H_A``: ``s = H a``, ``y = A s + lambda_A s``.

    Section 2.4 (``A`` a moving average, ``A^LM = A + lambda_A I``) and (3.14) (``A`` the
    minibatch ``A~``, its product computed by (3.15)). Theorem 1: if ``H = A^-1`` and
    ``y = (A + c a a^T) s``, BFGS gives ``(A + c a a^T)^-1`` exactly.

    Args:
        h: current ``H_A``; a_mean: ``abar`` (mean of the layer inputs with the homogeneous 1).
        a_times: ``v -> A v``; damping: ``lambda_A``.
    """
    s = torch.mv(h, a_mean)
    return s, a_times(s).add_(s, alpha=damping)
