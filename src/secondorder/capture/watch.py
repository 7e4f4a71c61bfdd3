"""Watching the caller's own forward and backward: the capture for ``loss.backward(); opt.step()``.

Without a closure the optimizer does not run the forward pass: the caller does, before
``step()``. A :class:`Watch` keeps two hooks on the caller's modules for the optimizer's
lifetime:

* a forward pre-hook on the (unwrapped) model: at the start of every forward pass in grad mode
  it notes the batch and, when the optimizer wants statistics at its next step, opens a
  :meth:`~secondorder.capture.hooks.Capture.record` phase over the modeled layers (inputs,
  outputs, and the tensor hooks that keep ``dL/dh`` of the caller's backward), closed when the
  model's forward returns; a new forward pass in grad mode replaces the previous one's records
  (the statistics come from the last such forward before ``step()``; forward passes under
  ``no_grad``, an evaluation say, are not watched);
* a forward pre-hook on the loss module the caller computes the loss with (the optimizer's
  ``loss_fn=``): it notes the outputs and targets and runs the optimizer's ``on_loss`` callback
  while the graph is alive (KFAC and TNT draw their sampled targets and take the sampled
  backward there).

``take()`` closes the phase and hands the optimizer a :class:`WatchedBatch`, which answers what
a method asks of a closure's batch (``batch_size``, ``batch_factor``, ``grad``,
``sampled_loss``). Forward passes run by the optimizer itself (inside ``step``) are not
watched (:meth:`Watch.paused`). The hooks hold the optimizer weakly and remove themselves once it
is gone; :meth:`Watch.remove` removes them at once.

Nothing here is specific to one method: the optimizer says what to record (``due``) and what to
do at the loss (``on_loss``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .closure import Closure, _at_least_float32
from .hooks import Capture, LayerRecord, eager, has_compiled, unwrap
from .likelihood import Likelihood, infer_likelihood


@dataclass
class WatchedBatch:
    """The caller's last training forward (and backward) before ``step()``."""

    inputs: tuple[Any, ...]
    likelihood: Likelihood
    loss_fn: nn.Module
    records: dict[str, LayerRecord] = field(default_factory=dict)
    outputs: Tensor | None = None
    targets: Any = None
    #: what the optimizer's ``on_loss`` computed (sampled gradients, say)
    extra: dict[str, Any] = field(default_factory=dict)
    #: the loss scale of the caller's backward (``torch.amp.GradScaler``): the recorded ``dL/dh``
    #: are this many times the gradients of the loss
    grad_scale: float = 1.0

    @property
    def batch_size(self) -> int:
        x = self.inputs[0]
        return int(x.shape[0]) if isinstance(x, Tensor) else len(x)

    @property
    def batch_factor(self) -> float:
        """``m`` for batch-mean losses, 1 for sums: ``g_n = batch_factor * dL/dh_n``."""
        return self.likelihood.batch_factor(self.batch_size)

    grad = staticmethod(Closure.grad)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.likelihood.sample(outputs, generator)

    def sampled_loss(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``loss_fn(outputs, t~)`` with ``t~`` drawn from the predictive distribution at ``outputs``
        (half-precision outputs read in float32)."""
        return self.loss_fn(_at_least_float32(outputs), self.sample_targets(outputs, generator))


class Watch:
    """Persistent hooks that record the caller's forward/backward for an optimizer (module docstring).

    Args:
        owner: the optimizer (held weakly).
        model: the model the caller runs (possibly DDP-wrapped).
        loss_fn: the loss module instance the caller computes the loss with.
        capture: the modeled layers to record (``None``: record none, only the batch and outputs).
        due: called with the optimizer at the start of a watched forward: the keyword arguments of
            :meth:`Capture.record` for this forward, or ``None`` when no statistics are due.
        on_loss: called with the optimizer and the :class:`WatchedBatch` when ``loss_fn`` is
            called on outputs that require grad (the graph is alive).
    """

    def __init__(
        self,
        owner: Any,
        model: nn.Module,
        loss_fn: nn.Module,
        capture: Capture | None,
        due: Callable[[Any], dict[str, bool] | None],
        on_loss: Callable[[Any, WatchedBatch], None] | None = None,
    ):
        self.module = unwrap(model)
        self.compiled = has_compiled(model)  # watched forward passes then run eagerly
        self.loss_fn = loss_fn
        self.likelihood = infer_likelihood(loss_fn)
        self.capture = capture
        self._owner = weakref.ref(owner)
        self._due = due
        self._loss_callback = on_loss
        self._paused = 0
        #: the loss scale of the caller's backward, stamped on the batch by :meth:`take`
        self.grad_scale = 1.0
        self._phase: contextlib.ExitStack | None = None
        self._batch: WatchedBatch | None = None
        ref = weakref.ref(self)
        self._handles = [
            # on the outermost module (a DDP or torch.compile wrapper runs its hooks eagerly)
            model.register_forward_pre_hook(lambda m, a, k: _call(ref, "_on_model", a, k), with_kwargs=True),
            # the layer hooks end with the model's forward (dL/dh still arrives in the backward)
            model.register_forward_hook(lambda m, a, o: _call(ref, "_close", None, None)),
            loss_fn.register_forward_pre_hook(lambda m, a, k: _call(ref, "_on_loss", a, k), with_kwargs=True),
        ]
        # the hooks go when the watch goes (with its optimizer)
        weakref.finalize(self, _remove_handles, list(self._handles))

    # ------------------------------------------------------------------ hooks
    def _on_model(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        owner = self._owner()
        if owner is None:
            self.remove()
            return
        if self._paused or not torch.is_grad_enabled():
            return
        self.discard()
        batch = WatchedBatch(tuple(args), self.likelihood, self.loss_fn)
        spec = self._due(owner) if self.capture is not None else None
        phase = contextlib.ExitStack()
        if self.compiled:  # the optimizer's hooks and backward passes need the eager graph
            phase.enter_context(eager())
        if spec is not None:
            batch.records = phase.enter_context(self.capture.record(check=False, **spec))  # type: ignore[union-attr]
        self._phase = phase
        self._batch = batch

    def _on_loss(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        owner = self._owner()
        if owner is None:
            self.remove()
            return
        batch = self._batch
        outputs = args[0] if args else kwargs.get("input")
        if self._paused or batch is None or not isinstance(outputs, Tensor) or not outputs.requires_grad:
            return
        batch.outputs = outputs
        batch.targets = args[1] if len(args) > 1 else kwargs.get("target")
        if self._loss_callback is not None:
            with self.paused():  # its own calls of loss_fn are not the caller's
                self._loss_callback(owner, batch)

    # ------------------------------------------------------------------ the optimizer's side
    def take(self) -> WatchedBatch | None:
        """The last watched batch (its recording phase closed), or ``None`` if none was seen since
        the last ``take``; the next forward starts afresh."""
        batch = self._batch
        self._close()
        self._batch = None
        if batch is not None:
            batch.grad_scale, self.grad_scale = self.grad_scale, 1.0
        return batch

    def discard(self) -> None:
        """Forget what was recorded (a step that ran its own passes, a skipped step)."""
        self._close()
        self._batch = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside are not watched (the optimizer's own passes)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def remove(self) -> None:
        """Remove the hooks from the model and the loss module."""
        self._close()
        _remove_handles(self._handles)

    def _close(self, *_: Any) -> None:
        if self._phase is not None:
            phase, self._phase = self._phase, None
            phase.close()


def _call(ref: weakref.ref[Watch], name: str, args: Any, kwargs: Any) -> None:
    watch = ref()
    if watch is not None:
        getattr(watch, name)(args, kwargs)


def _remove_handles(handles: list[Any]) -> None:
    for h in handles:
        h.remove()
