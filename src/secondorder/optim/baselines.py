"""First-order baselines with the thesis conventions: SGD-m, Adam, RMSprop (2.8.2, 3.7.2, 4.7.2).

* **SGD-m** -- ``m <- mu m + g`` (chapters 3-4) or ``m <- mu m + (1 - mu) g`` (chapter 2,
  ``momentum_style="average"``); ``W <- W - lr (m + gamma W)``.
* **Adam** -- Kingma & Ba with ``beta1 = momentum``, ``beta2 = stat_decay``,
  ``epsilon = damping`` outside the square root. ``adam_variant="reference"`` reproduces
  the authors' code (docs/notes.md §8): the second moment is of the bias-corrected first
  moment, ``v <- beta2 v + (1 - beta2) mhat^2``.
* **RMSprop** -- as Adam without bias correction (2.8.2): ``m <- beta1 m + (1 - beta1) g``,
  ``v <- beta2 v + (1 - beta2) g^2``, ``P = m / (sqrt(v) + epsilon)``.
  ``rmsprop_variant="reference"`` squares the momentum gradient instead of ``g``
  (docs/notes.md §8, §11.9). ``warm_start`` initialises ``v`` with the average of the
  squared minibatch gradients over the given closures (2.8.2, "Initialization").

All three take decoupled weight decay ``W <- W - lr (P + gamma W)`` and accept a
``so.Closure`` or any torch closure.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..capture import Closure, preserved_norm_buffers
from . import hparams as H
from .base import MomentumStyle, SecondOrderOptimizer


class AdamVariant(str, enum.Enum):
    STANDARD = "standard"  # Kingma & Ba (the thesis text)
    REFERENCE = "reference"  # the authors' code: v from the bias-corrected first moment


class SGD(SecondOrderOptimizer):
    """SGD with momentum (SGD-m) in the thesis conventions.

    Args:
        model: the network.
        lr: learning rate alpha (thesis Table 3.5, MNIST: 0.003).
        momentum: mu (0.9); 0 gives plain SGD.
        weight_decay: decoupled weight decay gamma (0).
        momentum_style: ``"accumulate"`` (``m = mu m + g``) or ``"average"`` (``m = mu m + (1-mu) g``).
        loss_fn: accepted for a uniform signature; a first-order method takes any closure without it.
    """

    method = "sgd"
    needs_closure = False
    steps_without_closure = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.003,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        momentum_style: str = MomentumStyle.ACCUMULATE.value,
        loss_fn: nn.Module | None = None,
    ):
        defaults = dict(
            **H.shared(lr=lr, momentum=momentum, weight_decay=weight_decay),
            momentum_style=H.choice("momentum_style", momentum_style, MomentumStyle),
        )
        super().__init__(model, defaults, loss_fn=loss_fn)

    def _step(self, closure: Any) -> Tensor | None:
        loss = self._gradient_pass(closure)
        g = self.param_groups[0]
        with torch.no_grad():
            for _, p in self.named_params():
                if p.grad is None:
                    continue
                direction = self._momentum(p, p.grad, g["momentum"], g["momentum_style"])
                self._apply_update(p, direction, g["lr"], g["weight_decay"])
        return loss


class Adam(SecondOrderOptimizer):
    """Adam (Kingma & Ba) with decoupled weight decay; the authors' variant as an option.

    Args:
        model: the network.
        lr: learning rate (Table 3.5, MNIST: 1e-4).
        damping: epsilon, added outside the square root (1e-4 in Table 3.5; tuned as damping).
        momentum: beta1 (0.9).
        stat_decay: beta2 (0.999; chapter 2 used 0.9).
        weight_decay: decoupled weight decay gamma.
        adam_variant: ``"standard"`` or ``"reference"`` (see the module docstring).
        loss_fn: accepted for a uniform signature; a first-order method takes any closure without it.
    """

    method = "adam"
    needs_closure = False
    steps_without_closure = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        damping: float = 1e-4,
        momentum: float = 0.9,
        stat_decay: float = 0.999,
        weight_decay: float = 0.0,
        adam_variant: str = AdamVariant.STANDARD.value,
        loss_fn: nn.Module | None = None,
    ):
        defaults = dict(
            **H.shared(
                lr=lr,
                damping=damping,
                momentum=momentum,
                stat_decay=stat_decay,
                weight_decay=weight_decay,
            ),
            adam_variant=H.choice("adam_variant", adam_variant, AdamVariant),
        )
        super().__init__(model, defaults, loss_fn=loss_fn)

    def _step(self, closure: Any) -> Tensor | None:
        loss = self._gradient_pass(closure)
        g = self.param_groups[0]
        b1, b2, eps = g["momentum"], g["stat_decay"], g["damping"]
        t = self.step_count + 1
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        with torch.no_grad():
            for _, p in self.named_params():
                if p.grad is None:
                    continue
                s = self.state[p]
                if "exp_avg" not in s:
                    s["exp_avg"] = torch.zeros_like(p)
                    s["exp_avg_sq"] = torch.zeros_like(p)
                m, v = s["exp_avg"], s["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1.0 - b1)
                m_hat = m / c1
                second = m_hat if g["adam_variant"] == AdamVariant.REFERENCE.value else p.grad
                v.mul_(b2).addcmul_(second, second, value=1.0 - b2)
                direction = m_hat / ((v / c2).sqrt_().add_(eps))
                self._apply_update(p, direction, g["lr"], g["weight_decay"])
        return loss


class RMSprop(SecondOrderOptimizer):
    """RMSprop as used in chapter 2 (Adam without bias correction), with an optional warm start.

    Args:
        model: the network.
        lr: learning rate (Table 2.5, MNIST: 1e-4).
        damping: epsilon outside the square root (Table 2.5, MNIST: 1e-4).
        momentum: beta1 (0.9); 0 turns the first moment off.
        stat_decay: beta2 (0.9, footnote 5 of chapter 2).
        weight_decay: decoupled weight decay gamma.
        rmsprop_variant: ``"standard"`` squares ``g``; ``"reference"`` squares the momentum gradient.
        loss_fn: accepted for a uniform signature; a first-order method takes any closure without it.
    """

    method = "rmsprop"
    needs_closure = False
    steps_without_closure = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        damping: float = 1e-4,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        rmsprop_variant: str = AdamVariant.STANDARD.value,
        loss_fn: nn.Module | None = None,
    ):
        defaults = dict(
            **H.shared(
                lr=lr,
                damping=damping,
                momentum=momentum,
                stat_decay=stat_decay,
                weight_decay=weight_decay,
            ),
            rmsprop_variant=H.choice("rmsprop_variant", rmsprop_variant, AdamVariant),
        )
        super().__init__(model, defaults, loss_fn=loss_fn)

    def _step(self, closure: Any) -> Tensor | None:
        loss = self._gradient_pass(closure)
        g = self.param_groups[0]
        b1, b2, eps = g["momentum"], g["stat_decay"], g["damping"]
        with torch.no_grad():
            for _, p in self.named_params():
                if p.grad is None:
                    continue
                m = self._momentum(p, p.grad, b1, MomentumStyle.AVERAGE.value)
                s = self.state[p]
                if "square_avg" not in s:
                    s["square_avg"] = torch.zeros_like(p)
                v = s["square_avg"]
                second = m if g["rmsprop_variant"] == AdamVariant.REFERENCE.value else p.grad
                v.mul_(b2).addcmul_(second, second, value=1.0 - b2)
                direction = m / (v.sqrt().add_(eps))
                self._apply_update(p, direction, g["lr"], g["weight_decay"])
        return loss

    def warm_start(self, closures: Iterable[Closure]) -> int:
        """``v`` = average over the closures of the squared minibatch gradient (2.8.2)."""
        sums: dict[Tensor, Tensor] = {}
        count = 0
        for closure in closures:
            with preserved_norm_buffers(self.module), torch.enable_grad():
                result = closure.forward(sync=False)
                self._check_loss(result.loss)
                params = [p for _, p in self.named_params()]
                grads = torch.autograd.grad(result.loss, params, allow_unused=True)
            self.stats.warm_start_forward_passes += 1
            self.stats.warm_start_backward_passes += 1
            self._check_tensors("warm-start gradient", grads)
            D.all_reduce_mean([g for g in grads if g is not None])  # the global minibatch gradient under DDP
            for p, gr in zip(params, grads, strict=True):
                if gr is not None:
                    sums[p] = sums[p].addcmul_(gr, gr) if p in sums else gr * gr
            count += 1
        if count:
            for p, total in sums.items():
                self.state[p]["square_avg"] = total / count
        return count
