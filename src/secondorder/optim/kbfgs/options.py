"""K-BFGS options: the thesis variants (Tables 2.5, 3.5, 3.8), the damping split and the
round-off rule for uninformative pairs (see :mod:`secondorder.optim.kbfgs`)."""

from __future__ import annotations

import enum
import math
from typing import Any

import torch
from torch import Tensor

#: tau of the round-off rule: a pair whose mean output gradients are within ``tau * eps`` of the
#: magnitudes they add up, in every channel, carries no information and is skipped (module
#: docstring). 0 switches the rule off (only exactly zero means are skipped).
ROUNDOFF_FACTOR = 4096.0


class PairDamping(str, enum.Enum):
    """How the ``(s_G, y_G)`` pair is damped before the ``H_G`` update."""

    DP_DLM = "dp-dlm"  # Algorithm 8 (chapter 3; improvement #1 of Table 3.8)
    DD = "dd"  # Algorithm 3 (chapter 2; needs mu2 = lambda_G <= 1)
    DPI_DLM = "dpi-dlm"  # Algorithm 11 (Algorithm 10, the convergent variant)


class AStatistic(str, enum.Enum):
    """Which estimate of ``A`` feeds ``H_A``."""

    MINIBATCH = "minibatch"  # A~ of the current batch (3.14); improvement #2 of Table 3.8
    MOVING_AVERAGE = "moving-average"  # A <- beta A + (1 - beta) A_batch (chapter 2)


class AInverse(str, enum.Enum):
    """How ``H_A`` follows ``A``."""

    HESSIAN_ACTION = "hessian-action"  # one BFGS update with s = H_A abar, y = (A + lambda_A I) s
    EXACT = "exact"  # H_A = (A + lambda_A I)^-1 (Alg. 5 line 23, Alg. 10 line 12)


class SkipRule(str, enum.Enum):
    """When a BFGS update is skipped."""

    POSITIVE = "positive"  # only if s^T y <= 0 or non-finite (the thesis: always update)
    DD_SKIP = "dd-skip"  # H_G: Algorithm 5 line 17, skip unless s~^T y~ >= mu1 y~^T H y~
    CODE = "code"  # the chapter-2 code: s^T y <= 0, the norm gate, an infinite H+ (docs/notes.md §1)


#: option presets for the thesis variants, e.g. ``so.make_optimizer("kbfgsl20", model, **VARIANTS["alg5"])``.
#: The decay power 0.75 is one choice in (0.5, 1) (Theorems 2 and 4 leave it free).
VARIANTS: dict[str, dict[str, Any]] = {
    # Algorithm 5 (use with kbfgsl20): DD with skipping, exact inverse of the moving-average A,
    # minibatch gradient, alpha_k proportional to k^-beta
    "alg5": dict(skip_rule="dd-skip", a_inverse="exact", momentum=0.0, lr_decay_power=0.75),
    # Algorithm 10 (use with kbfgsl): D_P(I) D_LM, exact inverse of the minibatch A, no momentum
    "alg10": dict(
        pair_damping="dpi-dlm", a_statistic="minibatch", a_inverse="exact", momentum=0.0, lr_decay_power=0.75
    ),
    # Table 3.8 ablation of kbfgs: improvement #1 (D_P D_LM) off, improvement #2 (minibatch A) off
    "improvement1-off": dict(pair_damping="dd"),
    "improvement2-off": dict(a_statistic="moving-average"),
    # 2.8.3 / Fig. 2.7
    "double-grad": dict(double_grad=True),
    # the skip rules of the chapter-2 code, for reproducing its numbers
    "chapter2-code": dict(skip_rule="code"),
}


def damping_split(damping: float, locations: int) -> tuple[float, float]:
    """Alg. 9 line 2: ``(lambda_A, lambda_G) = (sqrt(|T|) sqrt(lam), sqrt(lam) / sqrt(|T|))``."""
    root, t = math.sqrt(damping), math.sqrt(locations)
    return t * root, root / t


def uninformative(bound: Tensor, scale: Tensor, factor: float | None = None) -> bool:
    """The round-off rule (module docstring): ``bound <= factor * eps * scale`` in every channel.

    Args:
        bound: ``b_y``, the moving average of ``|Dhbar+| + |Dhbar|`` (it bounds ``|y_G|``).
        scale: ``r_y``, the moving average of ``E|g+| + E|g|``, the magnitudes the means add up.
        factor: ``tau`` (default :data:`ROUNDOFF_FACTOR`).
    """
    tau = ROUNDOFF_FACTOR if factor is None else factor
    return bool((bound <= scale * (tau * torch.finfo(bound.dtype).eps)).all())
