"""Any ``torch.optim.Optimizer`` as a row of the benchmark.

``--optimizers torch.optim.AdamW:lr=1e-3`` or ``--optimizers pytorch_optimizer:SOAP:lr=3e-3``
names an optimizer class by its import path (``module.Class`` or ``module:Class``), with
hyper-parameters after it. The runner drives it as it drives the library's methods (the same
budget, seeds, store and reports): :class:`TorchOptimizerRow` steps it on the same
``so.Closure`` (a standard torch closure), counts one forward and one backward pass per closure
call, and reports a non-finite loss as a divergence before the optimizer updates anything. It is
a first-order method for the CNN step schedules.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..optim.base import NonFiniteError, OptimizerStats


def is_external(method: str) -> bool:
    """Whether ``method`` is an import path (``module.Class`` / ``module:Class``), not a factory key."""
    return "." in method or ":" in method


def resolve(path: str) -> type[torch.optim.Optimizer]:
    """The optimizer class at ``path`` (``torch.optim.AdamW``, ``pytorch_optimizer:SOAP``).

    Raises:
        ValueError: the module or class cannot be imported, or is not a ``torch.optim.Optimizer``.
    """
    module_name, sep, class_name = path.partition(":")
    if not sep:
        module_name, _, class_name = path.rpartition(".")
    if not module_name or not class_name:
        raise ValueError(f"--optimizers: {path!r} is not module.Class or module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--optimizers: cannot import {module_name!r} for {path!r} ({err})") from None
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"--optimizers: {path!r} is not a torch.optim.Optimizer class")
    return cls


class TorchOptimizerRow:
    """A torch optimizer with the interface the runner uses: ``step(closure)`` returning the loss,
    ``param_groups``, ``stats``, ``warm_start`` (none: 0 batches).

    Raises:
        ValueError: the optimizer rejects its hyper-parameters (an unknown name or a bad value).
    """

    def __init__(self, path: str, model: nn.Module, hp: dict[str, Any]):
        self.method = path
        cls = resolve(path)
        try:
            self.optimizer = cls([p for p in model.parameters() if p.requires_grad], **hp)
        except TypeError as err:  # an unknown keyword
            raise ValueError(f"{path}: {err}") from None
        self.stats = OptimizerStats()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def warm_start(self, closures: Iterable[Any]) -> int:
        return 0

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One step of the torch optimizer; the loss at the parameters before it.

        Raises:
            NonFiniteError: the closure's loss is not finite; raised from inside the closure, so
                an optimizer that evaluates it before updating (every ``torch.optim`` one) leaves
                its parameters and state untouched.
        """
        losses: list[Tensor] = []

        def counted() -> Tensor:
            self.stats.forward_passes += 1
            self.stats.backward_passes += 1
            loss = closure()
            if not bool(torch.isfinite(loss.detach()).all()):
                raise NonFiniteError(
                    f"{self.method}: non-finite loss ({float(loss.detach())}) at step {self.stats.steps + 1}"
                )
            losses.append(loss.detach())
            return loss

        self.optimizer.step(counted)
        self.stats.steps += 1
        if not losses:
            raise RuntimeError(f"{self.method}: step(closure) did not evaluate the closure")
        return losses[0]  # some optimizers return None or the last of several evaluations
