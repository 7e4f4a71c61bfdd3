"""The four K-BFGS classes: K-BFGS and K-BFGS(L) (Algorithm 9, chapter 3) and their chapter-2
forms (Algorithm 4), each with the thesis's defaults in its signature."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..base import MomentumStyle
from ..kronecker import Fallback, LayerSpec
from .base import KBFGSBase
from .options import (
    AInverse,
    AStatistic,
    PairDamping,
    SkipRule,
)


def _arguments(frame_locals: dict[str, Any]) -> dict[str, Any]:
    """A constructor's arguments from its ``locals()`` (the four public constructors keep their own
    signatures and defaults, Tables 2.5 / 3.5, and hand everything to ``_setup``)."""
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


class KBFGS(KBFGSBase):
    """K-BFGS, Algorithm 9 (chapter 3): dense BFGS for ``H_G``.

    Args:
        model: the network (DDP-wrapped or not).
        lr: learning rate alpha (Table 3.5, MNIST: 0.03).
        damping: lambda (Table 3.5, MNIST: 0.3), split as ``lambda_A = sqrt(|T| lam)``,
            ``lambda_G = sqrt(lam/|T|)``.
        momentum: mu of ``DW <- mu DW + DW`` (0.9; 0 turns momentum off).
        stat_decay: beta of the ``(s_G, y_G)`` moving averages (and of ``A`` with
            ``a_statistic="moving-average"``) (0.9).
        weight_decay: decoupled weight decay gamma (0).
        update_freq: T, curvature updates (second pass) every T steps (1; 20 for K-BFGS† and CNNs).
        mu1: Powell's parameter (0.2).
        pair_damping, a_statistic, a_inverse, skip_rule, double_grad, lr_decay_power: thesis
            variants (module docstring, :data:`VARIANTS`).
        momentum_style: ``"accumulate"`` (ch. 3) or ``"average"`` (ch. 2).
        layers, exclude: which layers get Kronecker factors (module names, ``fnmatch`` patterns or
            types; default every layer a block models); see
            :class:`~secondorder.optim.kronecker.KroneckerFactoredOptimizer`.
        fallback: what preconditions the tensors no block models: ``"momentum"`` (the thesis's
            rule: the momentum gradient with ``lr/lam``; ``lr`` in chapter 2) or ``"diagonal"``
            (``m / (v + lam)`` with the naive diagonal ``v``; :mod:`secondorder.optim.kronecker`).
        loss_fn: the loss module instance a plain torch closure calls (``nn.CrossEntropyLoss()``, ...);
            it lets ``step`` take such a closure (see ``SecondOrderOptimizer.step``).
        factor_dtype: the least precision of the curvature statistics, their inverses and the
            directions (``torch.float32``; ``torch.float64`` allowed): half-precision activations
            and gradients (autocast, bf16 parameters) are read in it, and each update is
            returned in its parameter's dtype.
    """

    method = "kbfgs"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.03,
        damping: float = 0.3,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        mu1: float = 0.2,
        pair_damping: str = PairDamping.DP_DLM.value,
        a_statistic: str = AStatistic.MINIBATCH.value,
        a_inverse: str = AInverse.HESSIAN_ACTION.value,
        skip_rule: str = SkipRule.POSITIVE.value,
        double_grad: bool = False,
        lr_decay_power: float = 0.0,
        momentum_style: str = MomentumStyle.ACCUMULATE.value,
        layers: LayerSpec | Iterable[LayerSpec] | None = None,
        exclude: LayerSpec | Iterable[LayerSpec] | None = None,
        fallback: str = Fallback.DIAGONAL.value,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        self._setup(**_arguments(locals()))


class KBFGSL(KBFGSBase):
    """K-BFGS(L), Algorithm 9 (chapter 3) with compact L-BFGS for ``H_G`` (initial matrix ``I/lambda_G``).

    Args: as :class:`KBFGS` (Table 3.5, MNIST: lr 0.03, damping 0.3), plus
        history_size: p, the number of ``(s, y)`` pairs kept (100).
    """

    method = "kbfgsl"
    limited_memory = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.03,
        damping: float = 0.3,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        history_size: int = 100,
        mu1: float = 0.2,
        pair_damping: str = PairDamping.DP_DLM.value,
        a_statistic: str = AStatistic.MINIBATCH.value,
        a_inverse: str = AInverse.HESSIAN_ACTION.value,
        skip_rule: str = SkipRule.POSITIVE.value,
        double_grad: bool = False,
        lr_decay_power: float = 0.0,
        momentum_style: str = MomentumStyle.ACCUMULATE.value,
        layers: LayerSpec | Iterable[LayerSpec] | None = None,
        exclude: LayerSpec | Iterable[LayerSpec] | None = None,
        fallback: str = Fallback.DIAGONAL.value,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        self._setup(**_arguments(locals()))


class KBFGS20(KBFGSBase):
    """K-BFGS-20, Algorithm 4 (chapter 2): DD, moving-average ``A`` with Hessian action, ``H_g = I``.

    Args: as :class:`KBFGS` with the chapter-2 defaults (Table 2.5, MNIST: lr 0.3, damping 0.3;
        ``pair_damping="dd"`` so ``damping <= 1``, ``a_statistic="moving-average"``,
        ``momentum_style="average"``). Other parameters (BatchNorm) use the learning rate ``lr``.
    """

    method = "kbfgs20"
    chapter = 2

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.3,
        damping: float = 0.3,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        mu1: float = 0.2,
        pair_damping: str = PairDamping.DD.value,
        a_statistic: str = AStatistic.MOVING_AVERAGE.value,
        a_inverse: str = AInverse.HESSIAN_ACTION.value,
        skip_rule: str = SkipRule.POSITIVE.value,
        double_grad: bool = False,
        lr_decay_power: float = 0.0,
        momentum_style: str = MomentumStyle.AVERAGE.value,
        layers: LayerSpec | Iterable[LayerSpec] | None = None,
        exclude: LayerSpec | Iterable[LayerSpec] | None = None,
        fallback: str = Fallback.DIAGONAL.value,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        self._setup(**_arguments(locals()))


class KBFGSL20(KBFGSBase):
    """K-BFGS(L)-20, Algorithm 4 (chapter 2) with compact L-BFGS for ``H_g`` (initial matrix ``I``).

    Args: as :class:`KBFGS20` (Table 2.5, MNIST: lr 0.3, damping 0.3), plus
        history_size: p (100).
    """

    method = "kbfgsl20"
    chapter = 2
    limited_memory = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.3,
        damping: float = 0.3,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        history_size: int = 100,
        mu1: float = 0.2,
        pair_damping: str = PairDamping.DD.value,
        a_statistic: str = AStatistic.MOVING_AVERAGE.value,
        a_inverse: str = AInverse.HESSIAN_ACTION.value,
        skip_rule: str = SkipRule.POSITIVE.value,
        double_grad: bool = False,
        lr_decay_power: float = 0.0,
        momentum_style: str = MomentumStyle.AVERAGE.value,
        layers: LayerSpec | Iterable[LayerSpec] | None = None,
        exclude: LayerSpec | Iterable[LayerSpec] | None = None,
        fallback: str = Fallback.DIAGONAL.value,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        self._setup(**_arguments(locals()))
