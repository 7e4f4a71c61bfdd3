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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

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
        with ctx:
            outputs = self._call_model(self.model)
            loss = self.loss_fn(outputs, self.targets)
        return ForwardResult(outputs, loss)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Targets drawn from the model's predictive distribution at ``outputs``."""
        return self.likelihood.sample(outputs, generator)

    def sampled_loss(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``loss_fn(outputs, t~)`` with ``t~`` sampled from the predictive distribution (same reduction)."""
        return self.loss_fn(outputs, self.sample_targets(outputs, generator))

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
            return torch.func.functional_call(module, dict(params), args, strict=False)

        return f

    def loss_at(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """The loss on this batch, at ``params`` (by name) or at the current parameters.

        Batch-norm running statistics are left as they were.
        """
        module = unwrap(self.model)
        with preserved_norm_buffers(module):
            if params is None:
                outputs = self._call_model(module)
            else:
                outputs = self.functional()(params, self.inputs)
            return self.loss_fn(outputs, self.targets)


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


def _norm_buffers(m: nn.Module) -> list[Tensor | None]:
    return [m.running_mean, m.running_var, m.num_batches_tracked]
