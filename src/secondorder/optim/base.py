"""The shared step protocol of every ``secondorder`` optimizer.

Each method is a ``torch.optim.Optimizer`` over the trainable parameters of one model, with
one parameter group whose entries are the hyper-parameters (``lr``, ``damping``,
``momentum``, ``stat_decay``, ``weight_decay``, ``update_freq``, ``inverse_freq``, ...), so
standard LR schedulers work. This base class provides what all of them share:

* the closure protocol: ``opt.step(so.Closure(...))`` runs the passes; a plain torch closure
  is accepted by the first-order methods;
* safety: :meth:`_check_loss` / :meth:`_check_grads` raise :class:`NonFiniteError` before any
  parameter or state changes;
* gradient momentum in the two thesis conventions (:class:`MomentumStyle`) and decoupled
  weight decay ``W <- W - lr (P + gamma W)`` (3.7.2);
* state keyed by parameter and module *name*: ``state_dict()`` / ``load_state_dict()``
  round-trip momentum buffers, curvature factors, the step counter and the sampling RNG;
* ``opt.stats``: forward/backward pass counts and time in curvature work.
"""

from __future__ import annotations

import copy
import enum
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..capture import Capture, Closure, PlainClosure, infer_likelihood, preserved_norm_buffers, unwrap
from ..capture.closure import ForwardResult, ambient_autocast, autocast_off, autocast_regions
from ..capture.hooks import at_least, eager, has_compiled
from ..capture.watch import Watch, WatchedBatch
from ..linalg.finite import all_finite

logger = logging.getLogger(__name__)

STATE_FORMAT = "secondorder/1"


class NonFiniteError(FloatingPointError):
    """A loss or gradient is NaN or infinite; nothing was updated."""


class MomentumStyle(str, enum.Enum):
    """Gradient momentum conventions of the thesis (docs/notes.md §0).

    ``ACCUMULATE``: ``m <- mu m + g`` (chapters 3-4: SGD-m, KFAC, K-BFGS Alg. 9, TNT, Shampoo).
    ``AVERAGE``: ``m <- mu m + (1 - mu) g`` (chapter 2 code, every method there).
    """

    ACCUMULATE = "accumulate"
    AVERAGE = "average"


@dataclass
class OptimizerStats:
    """Counters an optimizer keeps while it trains (warm-start passes counted apart)."""

    steps: int = 0
    forward_passes: int = 0
    backward_passes: int = 0
    curvature_seconds: float = 0.0
    warm_start_forward_passes: int = 0
    warm_start_backward_passes: int = 0
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))


class SecondOrderOptimizer(torch.optim.Optimizer):
    """Base class: one model, one parameter group of hyper-parameters, state keyed by name.

    Subclasses implement :meth:`_step` (and optionally :meth:`warm_start`).
    """

    method: ClassVar[str] = "base"
    #: whether ``step`` needs a ``so.Closure`` (True) or accepts any torch closure
    needs_closure: ClassVar[bool] = True
    #: ``step()`` without a closure (the caller ran ``loss.backward()``) is supported: the method
    #: needs nothing but the minibatch gradient in ``.grad``
    steps_without_closure: ClassVar[bool] = False
    #: ``step()`` without a closure works when the optimizer was built with ``loss_fn=``: hooks
    #: watch the caller's forward and backward (:class:`~secondorder.capture.watch.Watch`)
    steps_watched: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        seed: int | None = None,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss_fn is not None:
            if not isinstance(loss_fn, nn.Module):
                raise ValueError(
                    f"loss_fn: expected the loss module instance your closure calls "
                    f"(nn.CrossEntropyLoss(), ...), got {type(loss_fn).__name__}"
                )
            infer_likelihood(loss_fn)  # raises ValueError naming loss_fn for an unsupported loss
        #: the loss module a plain torch closure calls (``loss_fn=``), or None
        self.loss_fn = loss_fn
        if factor_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"factor_dtype: torch.float32 or torch.float64, got {factor_dtype!r}")
        #: the least precision of the curvature statistics (``factor_dtype=``)
        self.factor_dtype = factor_dtype
        #: the hooks on the caller's forward for ``step()`` without a closure (:meth:`_watch_caller`)
        self.watch: Watch | None = None
        #: the preconditioner form: the step writes its direction into ``.grad`` (:meth:`_apply_update`)
        self.writes_grad = False
        self._caller_autocast: list[tuple[str, torch.dtype]] = []  # the autocast step() was called in
        self.model = model
        self.module = unwrap(model)  # behind DDP and torch.compile: parameter names are the module's
        #: the model is ``torch.compile``'d: the passes of a method that needs more than the
        #: gradient run eagerly (:func:`~secondorder.capture.hooks.eager`)
        self.compiled = has_compiled(model)
        if self.compiled and not hasattr(torch.compiler, "set_stance") and not self.steps_without_closure:
            raise ValueError(
                f"model: {self.method} runs its passes on a torch.compile'd model eagerly, which needs "
                "torch >= 2.6 (torch.compiler.set_stance); pass the uncompiled module"
            )
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model: has no trainable parameters")
        self.param_names: dict[Tensor, str] = {p: n for n, p in named}
        super().__init__([p for _, p in named], defaults)
        self.stats = OptimizerStats()
        self.module_state: dict[str, dict[str, Any]] = {}
        self.step_count = 0  # k: steps taken so far (0-based index of the next step)
        device = named[0][1].device
        self.generator = torch.Generator(device=device)
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.generator.manual_seed(self.seed)

    # ------------------------------------------------------------------ properties
    @property
    def hp(self) -> dict[str, Any]:
        """The current hyper-parameters (the single parameter group, without ``params``)."""
        return {k: v for k, v in self.param_groups[0].items() if k != "params"}

    def named_params(self) -> Iterator[tuple[str, Tensor]]:
        for p in self.param_groups[0]["params"]:
            yield self.param_names[p], p

    def coverage(self) -> dict[str, str]:
        """Per trainable tensor (by name), what preconditions it.

        Here every tensor gets the method's own rule (its key); the Kronecker-factored methods
        name each tensor's layer block or their fallback.
        """
        return {n: self.method for n, _ in self.named_params()}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Torch's constructor adds the one group (every trainable parameter of the model); a
        second group is refused: every method reads one set of hyper-parameters, so its
        parameters would never be stepped.

        Raises:
            ValueError: when the optimizer already has its group.
        """
        if getattr(self, "param_groups", None):
            raise ValueError(
                f"param_group: {self.method} holds one parameter group (the model's trainable "
                "parameters) with one set of hyper-parameters; a second group would never be "
                "stepped. Freeze parameters (requires_grad=False) or exclude layers instead, or use "
                "a torch.optim optimizer for per-group settings"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One optimization step on the closure's minibatch; returns the minibatch loss (detached).

        ``closure`` is a ``so.Closure`` or a plain torch closure (zero the gradients, forward,
        loss, backward, return the loss). Every method takes a plain closure when the optimizer
        was built with ``loss_fn=`` (the loss module the closure calls; see
        :class:`~secondorder.capture.PlainClosure`); the first-order baselines, ``tnt-ef`` and
        ``shampoo`` take one without it.

        Methods with :attr:`steps_without_closure` (the first-order baselines, ``tnt-ef``,
        ``shampoo``) also take no closure, as any ``torch.optim`` optimizer: they step on the
        gradients already in ``.grad`` (checked for non-finite values first, and taken as a
        minibatch mean) and return ``None``.

        Raises:
            TypeError: a form of closure this method cannot take (the message names the forms).
        """
        if len(self.param_groups) != 1:
            raise ValueError(
                f"param_groups: {self.method} steps one parameter group, found {len(self.param_groups)} "
                "(a group appended by hand would never be stepped)"
            )
        if closure is None and not self.steps_without_closure and self.watch is None:
            from .registry import steps_watched, steps_without_closure  # it imports every method

            keys, watched = steps_without_closure(), steps_watched()
            if self.steps_watched:
                raise TypeError(
                    f"{self.method}: step() without a closure needs loss_fn= at construction (the loss "
                    "module instance your loop computes the loss with: the optimizer's hooks read the "
                    "outputs and targets off its call); or pass a so.Closure or a plain closure"
                )
            raise TypeError(
                f"{self.method}: step() needs a so.Closure(model, x, y, loss_fn) (it runs extra passes "
                "on the same batch); step() without a closure (after your own loss.backward()) works "
                f"for {', '.join(keys[:-1])} and {keys[-1]}, and with loss_fn= for "
                f"{', '.join(watched[:-1])} and {watched[-1]}"
            )
        plain_loss: Tensor | None = None
        if closure is not None and self.needs_closure and not isinstance(closure, Closure):
            if self.loss_fn is not None:
                closure = PlainClosure(closure, self.model, self.loss_fn)
            elif self.steps_without_closure:  # it needs nothing but the gradient the closure leaves
                plain_loss = self._gradient_pass(closure)
                closure = None
            else:
                raise TypeError(
                    f"{self.method}: a plain closure needs loss_fn= at construction (the loss module "
                    "instance your closure calls, e.g. nn.CrossEntropyLoss(): the method runs extra "
                    f"passes on the same batch and needs its likelihood); or pass a so.Closure, got "
                    f"{type(closure).__name__}"
                )
        watching: AbstractContextManager[Any] = nullcontext()
        if self.watch is not None and closure is not None:  # the step runs its own passes
            self.watch.discard()
            watching = self.watch.paused()
        self._caller_autocast = ambient_autocast()
        if isinstance(closure, Closure):  # the model's forward passes run in the caller's autocast
            closure.autocast = self._caller_autocast
        # the curvature work runs outside autocast: statistics, inverses and updates in their dtypes;
        # with a torch.compile'd model the passes of a method that records layers or differentiates
        # twice run the original modules (compiled graphs hide both)
        compiled = eager() if self.compiled and not self.steps_without_closure else nullcontext()
        with watching, compiled, autocast_off(), preserved_norm_buffers(self.module, only_on_error=True):
            loss = self._step(closure)
        if plain_loss is not None:
            loss = plain_loss
        self.step_count += 1
        self.stats.steps += 1
        return loss

    def _step(self, closure: Any) -> Tensor:
        raise NotImplementedError

    def _watch_caller(
        self,
        capture: Capture | None,
        due: Callable[[Any], dict[str, bool] | None],
        on_loss: Callable[[Any, WatchedBatch], None] | None = None,
    ) -> None:
        """Keep hooks on the caller's forward (and on ``loss_fn``) so that ``step()`` without a
        closure finds the batch, the records of ``capture`` when ``due(self)`` asks for them, and
        whatever ``on_loss(self, batch)`` computed (:class:`~secondorder.capture.watch.Watch`)."""
        if self.loss_fn is not None:
            self.watch = Watch(self, self.model, self.loss_fn, capture, due, on_loss)

    def _watched_batch(self) -> WatchedBatch:
        """The caller's last forward before this ``step()`` (its gradients checked).

        Raises:
            RuntimeError: no forward pass in grad mode ran since the last step, or the loss was not
                computed with ``loss_fn``.
        """
        assert self.watch is not None
        batch = self.watch.take()
        if batch is None or batch.outputs is None:
            raise RuntimeError(
                f"{self.method}: step() without a closure found "
                + ("no forward pass in grad mode" if batch is None else "no call of loss_fn on the outputs")
                + " since the last step; run model(x), loss_fn(outputs, y) (the instance given as "
                "loss_fn=) and loss.backward() before opt.step()"
            )
        self._check_grads()
        return batch

    def warm_start(self, closures: Iterable[Closure]) -> int:
        """Statistics from the whole training set before the first step (no-op by default).

        Returns the number of minibatches used.
        """
        return 0

    # -------------------------------------------------------------- passes
    def _forward_backward(
        self,
        closure: Closure,
        record: AbstractContextManager[Any] | None = None,
        *,
        retain_graph: bool = False,
    ) -> tuple[ForwardResult, Any]:
        """Pass 1 on ``closure``: zero grads, forward, finite-loss check, backward, gradient check.

        ``record`` (a capture context, e.g. ``self.capture.record(...)``) is active during the
        forward and the backward; its records are returned with the forward result. The loss is
        checked before the backward and the gradients after it, so a non-finite value raises
        before any parameter or optimizer state changes. Counts one forward and one backward.
        """
        self.zero_grad(set_to_none=True)
        with torch.enable_grad(), record if record is not None else nullcontext({}) as recs:
            result = closure.forward()
            self._check_loss(result.loss)
            result.loss.backward(retain_graph=retain_graph)
        self.stats.forward_passes += 1
        self.stats.backward_passes += 1
        self._check_grads()
        return result, recs

    def _gradient_pass(self, closure: Any) -> Tensor | None:
        """Pass 1: zero grads, forward, loss, backward; checks the loss and gradients. Without a
        closure, only checks the gradients the caller's backward left in ``.grad`` (returns ``None``)."""
        if closure is None:
            self._check_grads()
            return None
        if isinstance(closure, Closure):
            return self._forward_backward(closure)[0].loss.detach()
        self.zero_grad(set_to_none=True)
        with torch.enable_grad(), autocast_regions(self._caller_autocast):
            loss = closure()
        if not isinstance(loss, Tensor):
            loss = torch.as_tensor(loss)
        loss = loss.detach()
        self._check_loss(loss)
        self.stats.forward_passes += 1
        self.stats.backward_passes += 1
        self._check_grads()
        return loss

    def _check_loss(self, loss: Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteError(
                f"{self.method}: non-finite loss ({float(loss.detach().reshape(-1)[0])}) at step "
                f"{self.step_count}; parameters and optimizer state are unchanged"
            )

    def _check_grads(self) -> None:
        grads = [(n, p.grad) for n, p in self.named_params() if p.grad is not None]
        if not grads or all_finite([g for _, g in grads]):
            return
        ok = [bool(torch.isfinite(g).all()) for _, g in grads]
        if not all(ok):
            bad = [n for (n, _), good in zip(grads, ok, strict=True) if not good]
            raise NonFiniteError(
                f"{self.method}: non-finite gradient in {', '.join(bad)} at step {self.step_count}; "
                "parameters and optimizer state are unchanged"
            )

    def _check_tensors(self, what: str, tensors: Iterable[Tensor | None]) -> None:
        if not all_finite([t for t in tensors if t is not None]):
            raise NonFiniteError(
                f"{self.method}: non-finite {what} at step {self.step_count}; "
                "parameters and optimizer state are unchanged"
            )

    def _skip_statistics(self, layer: str, why: str) -> None:
        """A batch statistic that is not finite (a float32 Gram that overflowed, say) is not
        stored: the previous one is kept, the skip is counted in
        ``stats.diagnostics["skipped_statistics"][layer]`` and logged, and the step goes on."""
        counts = self.stats.diagnostics.setdefault("skipped_statistics", {})
        counts[layer] = counts.get(layer, 0) + 1
        logger.warning(
            "%s: %s for '%s'; its previous statistics are kept (%d skipped so far)",
            self.method,
            why,
            layer,
            counts[layer],
        )

    @contextmanager
    def _rng_restored_on_error(self) -> Iterator[None]:
        """Lose nothing on a non-finite value: a ``FloatingPointError`` (``NonFiniteError``)
        raised inside puts the optimizer's generator back where the step found it, so a retried
        step draws the same sampled targets."""
        rng = self.generator.get_state()
        try:
            yield
        except FloatingPointError:
            self.generator.set_state(rng)
            raise

    @contextmanager
    def _curvature_timer(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats.curvature_seconds += time.perf_counter() - start

    # -------------------------------------------------------------- common updates
    def _momentum(self, p: Tensor, grad: Tensor, mu: float, style: str) -> Tensor:
        """Update and return the momentum gradient ``m`` of ``p`` (``grad`` itself when ``mu = 0``)."""
        if mu == 0:
            return grad
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(p)
        if style == MomentumStyle.AVERAGE.value:
            buf.mul_(mu).add_(grad, alpha=1.0 - mu)
        else:
            buf.mul_(mu).add_(grad)
        return buf

    @staticmethod
    def _decay_weights(p: Tensor, lr: float, weight_decay: float) -> None:
        """The decoupled weight decay part of ``W <- W - lr (P + gamma W)``: ``W <- (1 - lr gamma) W``."""
        if weight_decay != 0:
            p.mul_(1.0 - lr * weight_decay)

    def _stat(self, t: Tensor) -> Tensor:
        """``t`` in at least :attr:`factor_dtype` (a bf16 activation or gradient, say)."""
        return at_least(t, self.factor_dtype)

    def _apply_update(self, p: Tensor, direction: Tensor, lr: float, weight_decay: float) -> None:
        """Decoupled weight decay and step: ``W <- W - lr (P + gamma W)`` (3.7.2, Alg. 15 line 19).

        In the preconditioner form (:class:`~secondorder.optim.preconditioner.Preconditioner`) the
        direction ``P`` replaces the gradient of ``p`` instead (``p`` may be a view of a parameter:
        the matching view of its gradient is written)."""
        if self.writes_grad:
            grad_view(p).copy_(direction)
            return
        self._decay_weights(p, lr, weight_decay)
        p.add_(direction.to(p.dtype), alpha=-lr)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """All optimizer state keyed by parameter and module name (tensors are copies).

        Torch's hooks run as for any optimizer: ``register_state_dict_pre_hook`` before, and
        ``register_state_dict_post_hook`` (which may return a replacement) after.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self._state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def _state_dict(self) -> dict[str, Any]:
        groups = []
        for g in self.param_groups:
            entry = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            entry["params"] = [self.param_names[p] for p in g["params"]]
            groups.append(entry)
        param_state = {
            self.param_names[p]: _clone(s) for p, s in self.state.items() if p in self.param_names and s
        }
        return {
            "format": STATE_FORMAT,
            "method": self.method,
            "step_count": self.step_count,
            "seed": self.seed,
            "param_groups": groups,
            "param_state": param_state,
            "module_state": _clone(self.module_state),
            "generator": self.generator.get_state().clone(),
            "stats": self.stats.as_dict(),
            "extra": _clone(self._extra_state()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict`; raises ``ValueError`` if it belongs to another method or model.

        Torch's hooks run as for any optimizer: ``register_load_state_dict_pre_hook`` (which may
        return a replacement of the dict) before, ``register_load_state_dict_post_hook`` after.
        """
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()  # shallow, as torch: a pre-hook may edit its copy
            for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
                result = pre_hook(self, state_dict)
                if result is not None:
                    state_dict = result
        self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError("state_dict: not a secondorder optimizer state (missing or unknown 'format')")
        if state_dict.get("method") != self.method:
            raise ValueError(
                f"state_dict: saved by method {state_dict.get('method')!r}, cannot load into {self.method!r}"
            )
        by_name = {n: p for n, p in self.named_params()}
        saved_names = [n for g in state_dict["param_groups"] for n in g["params"]]
        if sorted(saved_names) != sorted(by_name):
            missing = sorted(set(by_name) - set(saved_names))
            unexpected = sorted(set(saved_names) - set(by_name))
            raise ValueError(
                f"state_dict: parameter names differ (missing {missing}, unexpected {unexpected})"
            )
        device = next(iter(by_name.values())).device
        for g_saved, g in zip(state_dict["param_groups"], self.param_groups, strict=True):
            for k, v in g_saved.items():
                if k != "params":
                    g[k] = copy.deepcopy(v)
        self.state.clear()
        for name, s in state_dict["param_state"].items():
            p = by_name[name]
            self.state[p] = _to(s, p.device)
        self.module_state = _to(state_dict["module_state"], device)
        self.step_count = int(state_dict["step_count"])
        self.seed = int(state_dict["seed"])
        self.generator.set_state(state_dict["generator"].clone())
        stats = dict(state_dict["stats"])
        self.stats = OptimizerStats(**stats)
        self._load_extra_state(_to(state_dict.get("extra", {}), device))

    def _extra_state(self) -> dict[str, Any]:
        """Method-specific state that is neither per-parameter nor per-module."""
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass


def grad_view(target: Tensor) -> Tensor:
    """The gradient of ``target``: a parameter's ``.grad``, or for a view of a parameter (a block
    covering part of it) the same view of the parameter's ``.grad``."""
    base = target if target._base is None else target._base
    grad = base.grad
    if grad is None or grad.stride() != base.stride():
        raise RuntimeError("grad_view: the parameter's gradient is missing or laid out unlike it")
    if base is target:
        return grad
    offset = grad.storage_offset() + target.storage_offset() - base.storage_offset()
    return grad.as_strided(target.shape, target.stride(), offset)


def _clone(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone().to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to(v, device) for v in obj)
    return copy.deepcopy(obj)
