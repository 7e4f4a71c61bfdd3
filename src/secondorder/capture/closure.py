"""``so.Closure``: one minibatch, one model, one loss, and every pass an optimizer may need.

Calling a closure is the standard torch closure contract (zero the gradients, forward, loss,
backward, return the loss), so ``torch.optim.SGD``/``Adam`` run unchanged in the one loop::

    for x, y in loader:
        loss = opt.step(so.Closure(model, x, y, loss_fn))

Our second-order optimizers use its richer interface instead, so that the optimizer, never the
user, runs the extra passes it needs:

* :meth:`forward` -- a forward pass that keeps the graph (optionally outside DDP's gradient
  synchronisation, for passes whose parameter gradients are discarded);
* :meth:`sampled_loss` -- the same loss on targets drawn from the model's predictive distribution;
* :meth:`grad` -- ``torch.autograd.grad`` w.r.t. chosen tensors: writes no ``.grad`` and, since
  no parameter gradient is accumulated, triggers no DDP all-reduce;
* :meth:`loss_at` / :meth:`functional` -- re-evaluation on the same batch, and
  ``torch.func.functional_call`` access for JVP/VJP and per-example Jacobians.

A plain torch closure (``def closure(): opt.zero_grad(); loss = loss_fn(model(x), y);
loss.backward(); return loss``, as PyTorch Lightning and hand-written loops pass) is seen through
the same interface by :class:`PlainClosure`, given the loss module the closure calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .hooks import unwrap
from .likelihood import Likelihood, infer_likelihood


@dataclass
class ForwardResult:
    """Outputs and loss of one forward pass, still attached to the graph."""

    outputs: Tensor
    loss: Tensor


class Closure:
    """A minibatch closure that knows its likelihood.

    Args:
        model: the network (possibly wrapped in ``DistributedDataParallel``).
        inputs: the minibatch inputs (a tensor, or a tuple of tensors passed positionally).
        targets: the minibatch targets.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.BCEWithLogitsLoss``, ``nn.MSELoss`` (``mean``
            or ``sum``), ``so.losses.SummedBCEWithLogitsLoss`` or
            ``so.losses.HalfSquaredErrorLoss``. Any other callable works with first-order
            optimizers when ``likelihood`` is left out; the second-order ones need a likelihood.
        likelihood: override the likelihood inferred from ``loss_fn``.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor | tuple[Tensor, ...],
        targets: Tensor,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        likelihood: Likelihood | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.inputs = inputs
        self.targets = targets
        self.loss_fn = loss_fn
        self._likelihood = likelihood
        self._likelihood_error: ValueError | None = None
        #: the autocast regions the caller's ``step`` ran in: the model's forward passes run in
        #: them, the optimizer's curvature work outside (set by the optimizer's ``step``)
        self.autocast: list[tuple[str, torch.dtype]] = []
        if likelihood is None:
            try:
                self._likelihood = infer_likelihood(loss_fn)  # type: ignore[arg-type]
            except ValueError as err:  # first-order optimizers do not need one
                self._likelihood_error = err

    # ------------------------------------------------------------ torch contract
    def __call__(self) -> Tensor:
        """Zero the gradients, run forward, loss and backward; return the (detached) loss."""
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            result = self.forward()
            result.loss.backward()
        return result.loss.detach()

    # ------------------------------------------------------------- richer interface
    @property
    def likelihood(self) -> Likelihood:
        """The likelihood behind ``loss_fn`` (raises ``ValueError`` if there is none)."""
        if self._likelihood is None:
            assert self._likelihood_error is not None
            raise self._likelihood_error
        return self._likelihood

    @property
    def batch_size(self) -> int:
        x = self.inputs[0] if isinstance(self.inputs, tuple | list) else self.inputs
        return int(x.shape[0])

    @property
    def batch_factor(self) -> float:
        """``m`` for batch-mean losses, 1 for sums: ``g_n = batch_factor * dL/dh_n``."""
        return self.likelihood.batch_factor(self.batch_size)

    def _call_model(self, module: nn.Module) -> Tensor:
        if isinstance(self.inputs, tuple | list):
            return module(*self.inputs)
        return module(self.inputs)

    def forward(self, *, sync: bool = True) -> ForwardResult:
        """A forward pass that keeps the graph.

        Args:
            sync: when ``False`` and the model is DDP-wrapped, run under ``no_sync()`` so
                that a following backward does not all-reduce (for passes whose parameter
                gradients are discarded, e.g. K-BFGS's second pass).
        """
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if not sync and isinstance(self.model, nn.parallel.DistributedDataParallel):
            ctx = self.model.no_sync()
        with ctx, autocast_regions(self.autocast):
            outputs = self._call_model(self.model)
            loss = self.loss_fn(outputs, self.targets)
        return ForwardResult(outputs, loss)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets drawn from the model's predictive distribution at ``outputs``."""
        return self.likelihood.sample(outputs, generator)

    def sampled_loss(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``loss_fn(outputs, t~)`` with ``t~`` sampled from the predictive distribution (same
        reduction; half-precision outputs are read in float32, as autocast computes losses)."""
        return self.loss_fn(_at_least_float32(outputs), self.sample_targets(outputs, generator))

    @staticmethod
    def grad(loss: Tensor, tensors: list[Tensor], *, retain_graph: bool = False) -> list[Tensor | None]:
        """Gradients of ``loss`` w.r.t. ``tensors`` without touching ``.grad`` (no DDP all-reduce)."""
        grads = torch.autograd.grad(loss, tensors, retain_graph=retain_graph, allow_unused=True)
        return list(grads)

    def named_parameters(self) -> dict[str, Tensor]:
        """Trainable parameters of the (unwrapped) model by name."""
        return {n: p for n, p in unwrap(self.model).named_parameters() if p.requires_grad}

    def functional(self) -> Callable[[Mapping[str, Tensor], Tensor | tuple[Tensor, ...]], Tensor]:
        """``f(params, inputs) -> outputs`` through ``torch.func.functional_call`` on the unwrapped model.

        Parameters missing from ``params`` (and all buffers) are taken from the model.
        """
        module = unwrap(self.model)

        def f(params: Mapping[str, Tensor], inputs: Tensor | tuple[Tensor, ...]) -> Tensor:
            args = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
            with autocast_regions(self.autocast):
                return torch.func.functional_call(module, dict(params), args, strict=False)

        return f

    def loss_at(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """The loss on this batch, at ``params`` (by name) or at the current parameters.

        Batch-norm running statistics are left as they were.
        """
        module = unwrap(self.model)
        with preserved_norm_buffers(module), autocast_regions(self.autocast):
            if params is None:
                outputs = self._call_model(module)
            else:
                outputs = self.functional()(params, self.inputs)
            return self.loss_fn(outputs, self.targets)


class _LossWithGradient(torch.autograd.Function):
    """The closure's loss value, whose gradient flows to ``inner`` (a scalar whose gradient is the
    loss's): the loss of a :class:`PlainClosure` pass, differentiable through the model's graph."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, inner: Tensor) -> Tensor:  # type: ignore[override]
        ctx.inner_dtype = inner.dtype
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        return None, grad.to(ctx.inner_dtype)


@dataclass
class _Evaluation:
    """What one call of a plain closure showed: its loss and where the loss came from."""

    value: Tensor  # the loss the closure returned (detached)
    outputs: Tensor  # the input of loss_fn, attached to the model's graph
    output_grad: Tensor | None  # dL/d(outputs)
    direct: list[tuple[Tensor, Tensor]]  # (parameter, dL/dparameter) not through the outputs


class PlainClosure(Closure):
    """A plain torch closure seen through :class:`Closure`'s interface.

    ``fn`` follows the torch contract (zero the gradients, forward, loss, backward, return the
    loss) and computes its loss with ``loss_fn``, the loss module given here (the optimizer's
    ``loss_fn=``). While ``fn`` runs, two hooks watch it: one on the (unwrapped) model records its
    inputs; one on ``loss_fn`` records the outputs and the targets it is called with, and hands
    ``loss_fn`` a detached copy of the outputs, so that the closure's own ``backward()`` stops at
    the outputs (it costs nothing through the model). :meth:`forward` then returns the outputs,
    still attached to the model's graph, and a loss with the closure's value whose gradient is the
    closure's gradient (through the outputs, plus any term the closure adds on the parameters
    directly, a penalty say). So a method runs its passes exactly as on a :class:`Closure`: the
    same forward, the same backward, the same sampled targets; :meth:`loss_at` at other parameters
    evaluates ``fn`` again with those parameters in the model. ``.grad`` is left as ``fn`` found it.

    Args:
        fn: the closure.
        model: the model it calls (possibly DDP-wrapped).
        loss_fn: the loss module instance the closure calls, once per call on the model's outputs
            (a supported loss: :func:`~secondorder.capture.likelihood.infer_likelihood`).

    Raises:
        ValueError: (from :meth:`forward`) the closure did not call ``loss_fn`` on outputs that
            require grad exactly once, or did not call the model; or returned no loss.
    """

    def __init__(self, fn: Callable[[], Any], model: nn.Module, loss_fn: nn.Module):
        if not callable(fn):
            raise TypeError(f"closure must be callable, got {type(fn).__name__}")
        if not isinstance(loss_fn, nn.Module):
            raise TypeError(f"loss_fn must be a loss module, got {type(loss_fn).__name__}")
        self.fn = fn
        self.model = model
        self.loss_fn = loss_fn
        self.inputs: Tensor | tuple[Tensor, ...] = ()
        self.targets: Tensor = torch.empty(0)
        self._kwargs: dict[str, Any] = {}
        self._likelihood = infer_likelihood(loss_fn)
        self._likelihood_error = None
        self._seen = False
        self.autocast = []

    def __call__(self) -> Tensor:
        return self.fn()

    @property
    def batch_size(self) -> int:
        if not self._seen:
            raise RuntimeError("PlainClosure: the batch is known once the closure has been evaluated")
        return super().batch_size

    def _evaluate(self) -> _Evaluation:
        """Call ``fn`` under the two hooks; ``.grad`` of every parameter is restored afterwards."""
        module = unwrap(self.model)
        params = [p for p in module.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        outer = self.model  # a DDP or torch.compile wrapper runs its hooks eagerly
        calls: list[tuple[Tensor, Tensor, Any]] = []  # (outputs, detached copy, targets)
        model_calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        def on_model(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            model_calls.append((args, kwargs))

        def on_loss(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            args, kwargs = list(args), dict(kwargs)
            outputs = args[0] if args else kwargs.get("input")
            if not isinstance(outputs, Tensor) or not outputs.requires_grad:
                return None  # a metric under no_grad, say: not the training loss
            targets = args[1] if len(args) > 1 else kwargs.get("target")
            copy = outputs.detach().requires_grad_(True)
            calls.append((outputs, copy, targets))
            if args:
                args[0] = copy
            else:
                kwargs["input"] = copy
            return tuple(args), kwargs

        for p in params:
            p.grad = None
        handles = [
            outer.register_forward_pre_hook(on_model, with_kwargs=True),
            self.loss_fn.register_forward_pre_hook(on_loss, with_kwargs=True),
        ]
        try:
            with torch.enable_grad(), autocast_regions(self.autocast):
                value = self.fn()
            if len(calls) != 1 or not model_calls:
                raise ValueError(
                    f"closure: it called the model {len(model_calls)} times and the optimizer's "
                    f"loss_fn ({type(self.loss_fn).__name__}) {len(calls)} times on outputs that "
                    "require grad; a plain closure must call that loss_fn instance once on the "
                    "model's outputs (or pass a so.Closure)"
                )
            outputs, copy, targets = calls[0]
            if value is None:
                raise ValueError("closure: returned None; a closure returns its loss")
            value = value if isinstance(value, Tensor) else torch.as_tensor(value)
            output_grad = copy.grad
            direct = [(p, p.grad) for p in params if p.grad is not None]
            if output_grad is None and value.requires_grad:  # the closure did not call backward
                grads = torch.autograd.grad(value, [copy, *params], allow_unused=True)
                output_grad = grads[0]
                direct = [(p, g) for p, g in zip(params, grads[1:], strict=True) if g is not None]
        finally:
            for h in handles:
                h.remove()
            for p, g in zip(params, saved, strict=True):
                p.grad = g
        self.inputs, self._kwargs = model_calls[0]
        self.inputs = tuple(self.inputs) if len(self.inputs) != 1 else self.inputs[0]
        self.targets = targets
        self._seen = True
        return _Evaluation(value.detach(), outputs, output_grad, direct)

    def forward(self, *, sync: bool = True) -> ForwardResult:
        """One call of ``fn``: its outputs (attached) and its loss, differentiable through the model."""
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        if not sync and isinstance(self.model, nn.parallel.DistributedDataParallel):
            ctx = self.model.no_sync()
        with ctx:
            ev = self._evaluate()
            terms = [(ev.outputs * ev.output_grad).sum()] if ev.output_grad is not None else []
            terms += [(p * g).sum() for p, g in ev.direct]
            # float32 whatever the dtypes of the terms; only its gradient (1) is used
            inner = torch.stack([t.float() for t in terms]).sum() if terms else None
        if inner is None:  # the loss does not depend on the parameters
            return ForwardResult(ev.outputs, ev.value)
        return ForwardResult(ev.outputs, _LossWithGradient.apply(ev.value, inner))

    def _call_model(self, module: nn.Module) -> Tensor:
        args = self.inputs if isinstance(self.inputs, tuple) else (self.inputs,)
        return module(*args, **self._kwargs)

    def functional(self) -> Callable[[Mapping[str, Tensor], Tensor | tuple[Tensor, ...]], Tensor]:
        module = unwrap(self.model)
        kwargs = self._kwargs

        def f(params: Mapping[str, Tensor], inputs: Tensor | tuple[Tensor, ...]) -> Tensor:
            args = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
            with autocast_regions(self.autocast):
                return torch.func.functional_call(module, dict(params), args, kwargs, strict=False)

        return f

    def loss_at(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """The closure's loss (``fn`` evaluated again) at ``params`` (by name) or at the current
        parameters; the model's parameters, ``.grad`` and batch-norm running statistics are left
        as they were."""
        module = unwrap(self.model)
        named = dict(module.named_parameters())
        swapped = {n: named[n] for n in params or {}}
        with preserved_norm_buffers(module):
            with torch.no_grad():
                backup = {n: p.detach().clone() for n, p in swapped.items()}
                for n, p in swapped.items():
                    p.copy_(params[n])  # type: ignore[index]
            try:
                return self._evaluate().value
            finally:
                with torch.no_grad():
                    for n, p in swapped.items():
                        p.copy_(backup[n])


#: the device types whose autocast state a step carries into the closure's forward passes
AUTOCAST_DEVICES = ("cpu", "cuda")


def ambient_autocast() -> list[tuple[str, torch.dtype]]:
    """The autocast regions active here: ``[(device_type, dtype), ...]``."""
    out = []
    for device in AUTOCAST_DEVICES:
        try:
            on, dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        except (TypeError, AttributeError):  # torch < 2.4: the per-device functions
            if device == "cpu":
                on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
            else:
                on, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        if on:
            out.append((device, dtype))
    return out


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """No autocast inside (curvature statistics, inverses and updates keep their own dtypes)."""
    with contextlib.ExitStack() as stack:
        for device, _ in ambient_autocast():
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


@contextlib.contextmanager
def autocast_regions(regions: list[tuple[str, torch.dtype]]) -> Iterator[None]:
    """Enter the autocast regions ``regions`` (from :func:`ambient_autocast`)."""
    with contextlib.ExitStack() as stack:
        for device, dtype in regions:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        yield


@contextlib.contextmanager
def preserved_norm_buffers(model: nn.Module, *, only_on_error: bool = False) -> Iterator[None]:
    """Restore the running statistics of every batch-norm layer on exit.

    Used by passes that are not training steps (warm starts, K-BFGS's second pass, trial
    losses), so that they leave BatchNorm state exactly as they found it. With
    ``only_on_error`` the statistics are restored only if the block raises (a training step
    that hits a non-finite loss leaves the model as it found it).
    """
    saved = []
    for m in unwrap(model).modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            saved.append((m, [b.clone() if b is not None else None for b in _norm_buffers(m)]))
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        if failed or not only_on_error:
            with torch.no_grad():
                for m, bufs in saved:
                    for dst, src in zip(_norm_buffers(m), bufs, strict=True):
                        if dst is not None and src is not None:
                            dst.copy_(src)


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Forward passes whose graph is differentiated twice (Gauss-Newton products by double
    backward): ``scaled_dot_product_attention`` runs its math kernel, the one with a double
    backward (the fused CPU/CUDA kernels have none). The function computed is the same.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _at_least_float32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _norm_buffers(m: nn.Module) -> list[Tensor | None]:
    return [m.running_mean, m.running_var, m.num_batches_tracked]
