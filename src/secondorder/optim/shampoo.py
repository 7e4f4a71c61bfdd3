"""Shampoo as implemented for the chapter-4 comparisons: Algorithm 16 (4.7.2), docs/notes.md §6.

The same tensor views, moving averages, T1/T2, momentum and weight decay as TNT
(:mod:`secondorder.optim.tnt`), with two differences:

* line 9: the statistics are the contractions ``G^(i)`` of the **true-label** minibatch-mean
  gradient (the empirical Fisher; no extra pass, the warm start uses true labels too);
* line 12: the factors are ``K_i = (G^^(i) + eps I)^(-1/(2k))`` for a ``k``-way tensor (``p = 2``
  for biases and BatchNorm, 4 for matrices, 6 for 3-way conv kernels), computed by the coupled
  Newton iteration (:func:`secondorder.linalg.roots.coupled_newton_inverse_root`: at most 100
  iterations, tolerance 1e-6, eigendecomposition fallback). The damping is added before the root;
  no grafting, no blocking, no damping relative to ``lambda_max`` (4.7.2 (i)-(ii)).

Then ``p = m x_1 K_1 ... x_k K_k`` and ``W <- W - alpha (p + gamma W)`` (lines 7, 14-16).

Root algorithm (``root_method``): ``"newton"`` is the coupled Newton iteration of line 12;
``"eigh"`` computes the same root from an eigendecomposition; ``"auto"`` (the default) uses
coupled Newton on accelerators, where the thesis chose it for speed (4.7.2, footnote 2), and the
eigendecomposition on CPU, where it is several times faster (a 1000 x 1000 float32 factor: about
0.2 s for ``eigh`` against 0.5-1.5 s for 7-20 Newton iterations of four matrix products each).
Both give the root to the Newton tolerance (tested).

Inverse timing: ``inverse_timing="less"`` (the autoencoder runs, "lessInverse", the default) recomputes
the roots only when ``k % T2 == 0`` (step 0 included); ``"tnt"`` also recomputes every T1 steps
during the first T2 steps, as TNT does (the CNN runs).
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor, nn

from ..linalg.roots import inverse_root
from . import hparams as H
from .tnt import MAX_FACTOR_DIM, TensorFactoredOptimizer, TensorView


class InverseTiming(str, enum.Enum):
    """When Shampoo recomputes its inverse roots (docs/notes.md §6)."""

    LESS = "less"  # only when k % T2 == 0 (autoencoders)
    TNT = "tnt"  # also every T1 steps during the first T2 steps (CNNs)


class RootMethod(str, enum.Enum):
    """How Shampoo computes ``(G^^(i) + eps I)^(-1/(2k))``."""

    AUTO = "auto"  # coupled Newton on accelerators, eigendecomposition on CPU
    NEWTON = "newton"  # coupled Newton (Algorithm 16 line 12)
    EIGH = "eigh"  # symmetric eigendecomposition


class Shampoo(TensorFactoredOptimizer):
    """Shampoo with moving averages and coupled-Newton inverse roots (Algorithm 16).

    Args:
        model: the network (DDP-wrapped or not).
        lr: learning rate alpha (Table 4.3, MNIST: 3e-4).
        damping: epsilon of ``(G^^(i) + eps I)^(-1/(2k))`` (Table 4.3, MNIST: 3e-4).
        momentum: mu of ``m <- mu m + grad`` (0.9; 0 turns momentum off).
        stat_decay: beta of the moving averages of the contractions (0.9; 0 = current batch only).
        weight_decay: decoupled weight decay gamma (0).
        update_freq: T1, statistics every T1 steps (1 for autoencoders, 10 for CNNs).
        inverse_freq: T2, roots every T2 steps (20 for autoencoders, 100 for CNNs).
        inverse_timing: ``"less"`` (default) or ``"tnt"`` (see the module docstring).
        root_method: ``"auto"`` (default), ``"newton"`` or ``"eigh"`` (see the module docstring).
        max_factor_dim: modes larger than this get a diagonal factor (4096).
        loss_fn: the loss module instance a plain torch closure calls (``nn.CrossEntropyLoss()``, ...);
            it lets ``step`` take such a closure (see ``SecondOrderOptimizer.step``).
        factor_dtype: the least precision of the curvature statistics, their inverses and the
            directions (``torch.float32``; ``torch.float64`` allowed): half-precision activations
            and gradients (autocast, bf16 parameters) are read in it, and each update is
            returned in its parameter's dtype.
    """

    method = "shampoo"
    sampled_fisher = False
    steps_without_closure = True  # its statistics are the minibatch gradient's contractions

    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-4,
        damping: float = 3e-4,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        inverse_freq: int = 20,
        inverse_timing: str = InverseTiming.LESS.value,
        root_method: str = RootMethod.AUTO.value,
        max_factor_dim: int = MAX_FACTOR_DIM,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        defaults = dict(
            **H.shared(
                lr=lr,
                damping=damping,
                momentum=momentum,
                stat_decay=stat_decay,
                weight_decay=weight_decay,
                update_freq=update_freq,
                inverse_freq=inverse_freq,
            ),
            inverse_timing=H.choice("inverse_timing", inverse_timing, InverseTiming),
            root_method=H.choice("root_method", root_method, RootMethod),
        )
        super().__init__(
            model,
            defaults,
            seed=None,
            max_factor_dim=max_factor_dim,
            loss_fn=loss_fn,
            factor_dtype=factor_dtype,
        )

    def _inverse_due(self, k: int, stats_due: bool) -> bool:
        g = self.param_groups[0]
        if g["inverse_timing"] == InverseTiming.LESS.value:
            return k % g["inverse_freq"] == 0
        return super()._inverse_due(k, stats_due)

    def _preconditioner(self, factors: list[Tensor], view: TensorView, damping: float) -> list[Tensor]:
        """Line 12: ``(G^^(i) + eps I)^(-1/(2k))`` for each mode of a ``k``-way tensor."""
        method = self.param_groups[0]["root_method"]
        if method == RootMethod.AUTO.value:
            method = RootMethod.EIGH.value if factors[0].device.type == "cpu" else RootMethod.NEWTON.value
        p = 2 * view.order
        return [inverse_root(f, p, damping, method=method) for f in factors]
