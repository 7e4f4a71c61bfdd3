"""The preconditioner form: a method's curvature applied to ``.grad``, any torch optimizer steps.

kfac-pytorch users know this form: the training loop keeps its own ``torch.optim`` optimizer,
LR scheduler and ``torch.amp.GradScaler``, and one call between the backward and the optimizer's
step replaces every gradient by the method's preconditioned direction::

    loss_fn = torch.nn.CrossEntropyLoss()
    precond = so.Preconditioner("kfac", model, loss_fn=loss_fn, damping=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    scaler = torch.amp.GradScaler()
    for x, y in loader:
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)        # before the statistics: they are taken from unscaled values
        precond.step(scaler)        # .grad <- the method's direction (skipped on inf/NaN)
        scaler.step(opt)
        scaler.update()

The methods are those whose step is ``(curvature)^-1 (momentum gradient)`` with the curvature
taken from the current batch: ``kfac`` and ``kfac-ef`` (Algorithm 12, lines 7-9:
``p = H_Gamma DW H_Omega``), ``tnt`` and ``tnt-ef`` (Algorithm 15, lines 18-20:
``p = m x_1 K_1 ... x_k K_k``) and ``shampoo`` (Algorithm 16). K-BFGS has none: its ``H_G``
update needs a second pass at the new parameters (Algorithm 9 line 13). The
preconditioner is the method's own optimizer class run with ``lr = 1``, ``momentum = 0`` and
``weight_decay = 0`` whose update writes its direction ``P`` into ``.grad`` instead of moving the
parameters, so the torch optimizer's ``W <- W - lr P`` (with its own momentum, weight decay and
schedule) follows; its curvature hyper-parameters (``damping``, ``stat_decay``, ``update_freq``,
``inverse_freq``, ...) keep their names and the thesis's defaults. ``kfac``, ``kfac-ef`` and
``tnt`` read the batch through hooks on the model and on ``loss_fn``
(:class:`~secondorder.capture.watch.Watch`), so ``loss_fn`` is required for them.

With a ``GradScaler``: call ``scaler.unscale_(opt)`` before :meth:`Preconditioner.step` and
pass the scaler. A step whose gradients are not finite (the scaler's overflow) is skipped: the
gradients and every curvature statistic are left as they are (``step`` returns ``False``) and
``scaler.step`` then skips the optimizer as usual. The ``dL/dh`` that KFAC-EF captures in the
scaled backward are divided by the scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..linalg.finite import all_finite
from .base import SecondOrderOptimizer
from .registry import make_optimizer

#: methods with a preconditioner form
METHODS = ("kfac", "kfac-ef", "tnt", "tnt-ef", "shampoo")
#: hyper-parameters of the step itself, which belong to the torch optimizer
_STEP_HPARAMS = ("lr", "momentum", "weight_decay")


class Preconditioner:
    """A method's preconditioner for any torch optimizer (module docstring).

    Args:
        method: ``"kfac"``, ``"kfac-ef"``, ``"tnt"``, ``"tnt-ef"`` or ``"shampoo"``.
        model: the network (possibly DDP-wrapped).
        loss_fn: the loss module instance the loop computes the loss with (required for
            ``kfac``, ``kfac-ef`` and ``tnt``; ``tnt-ef`` and ``shampoo`` use only ``.grad``).
        **hp: the method's curvature hyper-parameters (``damping``, ``stat_decay``,
            ``update_freq``, ``inverse_freq``, ``layers``/``exclude``, ``seed``, ...).

    Attributes:
        optimizer: the method's optimizer that computes the directions (its ``stats``,
            ``module_state``, ``coverage()`` and ``state_dict()`` are the preconditioner's).

    Raises:
        ValueError: an unknown method, a step hyper-parameter (``lr``, ``momentum``,
            ``weight_decay``: they belong to the torch optimizer), a missing ``loss_fn`` or an
            invalid hyper-parameter, each naming the argument.
    """

    def __init__(self, method: str, model: nn.Module, *, loss_fn: nn.Module | None = None, **hp: Any):
        if method not in METHODS:
            raise ValueError(
                f"method: {method!r} has no preconditioner form; choose one of {', '.join(METHODS)}"
            )
        for key in _STEP_HPARAMS:
            if key in hp:
                raise ValueError(
                    f"{key}: the step belongs to your torch optimizer (its lr, momentum and weight "
                    "decay); the preconditioner takes only curvature hyper-parameters"
                )
        if loss_fn is None and method in ("kfac", "kfac-ef", "tnt"):
            raise ValueError(
                f"loss_fn: {method} reads the batch off your loss call; pass the loss module "
                "instance your loop calls (nn.CrossEntropyLoss(), ...)"
            )
        self.method = method
        self.optimizer: SecondOrderOptimizer = make_optimizer(
            method, model, lr=1.0, momentum=0.0, weight_decay=0.0, loss_fn=loss_fn, **hp
        )
        self.optimizer.writes_grad = True

    def step(self, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Replace every ``.grad`` by the method's direction; ``False`` if the step was skipped.

        Call it after ``loss.backward()`` (and ``scaler.unscale_(opt)``) and before your
        optimizer's step. Skipped, with gradients and curvature state untouched, when a gradient
        is not finite.
        """
        opt = self.optimizer
        grads = [p.grad for _, p in opt.named_params() if p.grad is not None]
        if not all_finite(grads):
            if opt.watch is not None:
                opt.watch.discard()  # this batch's statistics are not used
            return False
        scale = 1.0
        if scaler is not None and scaler.is_enabled():
            scale = float(scaler.get_scale())
        if opt.watch is not None:
            opt.watch.grad_scale = scale
        opt.step()
        return True

    # the state of the curvature: the optimizer's
    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def coverage(self) -> dict[str, str]:
        return self.optimizer.coverage()

    def remove(self) -> None:
        """Remove the hooks from the model and the loss module."""
        if self.optimizer.watch is not None:
            self.optimizer.watch.remove()
