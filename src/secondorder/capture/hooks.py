"""Layer capture for the modules a layer block models: inputs, pre-activations, their gradients.

Hooks exist only inside :meth:`Capture.record`, a phase the optimizer controls: outside it
the user's modules carry no hooks and no state. Inside, every registered module records

* ``inputs``  -- the layer input ``a`` (detached),
* ``outputs`` -- the pre-activation ``h`` (still attached to the graph, so an optimizer can
  differentiate a second loss w.r.t. it with ``torch.autograd.grad``),
* ``output_grads`` -- ``dL/dh`` from the ordinary ``loss.backward()`` of that phase (via a
  tensor hook; unscaled: multiply by :meth:`Likelihood.batch_factor` for the per-example
  ``g_n = dl_n/dh_n`` of docs/notes.md §0).

The helpers below turn these into the matrices of the Kronecker methods:

* :func:`input_rows` -- the ``abar`` rows, one per example and output location, with the
  homogeneous coordinate appended when the layer has a bias. Conv layers use im2col
  (``F.unfold``), whose column order (channel, kernel row, kernel column) is the order of
  ``weight.view(out_channels, -1)``.
* :func:`output_rows` -- the matching rows of ``h`` or ``dL/dh`` (channels last).
* :func:`num_locations` -- ``|T|``, the number of output locations (1 for FC layers).

Each of these asks the module's :class:`~secondorder.capture.blocks.LayerBlock` (the per-layer
seam, :func:`layer_blocks` finds them in a model); they are kept as functions of the module.

Means and second moments of these live in :mod:`secondorder.capture.statistics`.

Nothing here is specific to one method.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from .blocks import LayerBlock, block_for, block_type_for
from .blocks import conv_padding as conv_padding  # re-exported
from .blocks import patches as patches  # re-exported

logger = logging.getLogger(__name__)

Modeled = nn.Module  # a module with a registered layer block (see capture.blocks)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind a ``DistributedDataParallel``/``DataParallel`` wrapper."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


def block(module: nn.Module) -> LayerBlock:
    """The layer block of ``module`` (see :mod:`secondorder.capture.blocks`).

    Raises:
        ValueError: no block models ``module``.
    """
    b = block_for(module)
    if b is None:
        raise ValueError(f"module: no layer block models {type(module).__name__} {module}")
    return b


def is_supported(module: nn.Module) -> bool:
    """Whether a registered layer block models ``module`` (built in: Linear; Conv2d, groups=1)."""
    return block_for(module) is not None


#: modules that use their children's weights through functional calls instead of calling them
#: (``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward``):
#: a forward hook on such a child never fires, so no block is given to it
FUNCTIONAL_PARENTS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _functional_children(model: nn.Module) -> dict[str, str]:
    """Names of the modules inside a :data:`FUNCTIONAL_PARENTS` module -> that parent's name."""
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, FUNCTIONAL_PARENTS) and name not in out:
            for child, _ in module.named_modules(prefix=name):
                if child != name:
                    out.setdefault(child, name)
    return out


def layer_blocks(model: nn.Module) -> dict[str, LayerBlock]:
    """The layer block of every module of ``model`` (unwrapped) that one models, by module name.

    Modules whose weight is frozen (``requires_grad=False``) are left out, and so are the
    children of :data:`FUNCTIONAL_PARENTS` (see :func:`unmodeled_modules`).
    """
    model = unwrap(model)
    functional = _functional_children(model)
    found: dict[str, LayerBlock] = {}
    for name, module in model.named_modules():
        b = block_for(module) if name not in functional else None
        if b is not None and b.weight.requires_grad:
            found[name] = b
    return found


def unmodeled_modules(model: nn.Module) -> dict[str, str]:
    """Why each module that owns trainable parameters has no block: module name -> reason."""
    model = unwrap(model)
    functional = _functional_children(model)
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        kind = type(module).__name__
        cls = block_type_for(module)
        if name in functional:
            parent = functional[name]
            out[name] = (
                f"{kind} used through a functional call by its parent "
                f"{type(model.get_submodule(parent)).__name__} '{parent}'"
            )
        elif cls is None:
            out[name] = f"no layer block for {kind}"
        elif (why := cls.unsupported(module)) is not None:
            out[name] = f"{kind} with {why} is not supported by {cls.__name__}"
        elif not module.weight.requires_grad:
            out[name] = f"{kind} with a frozen weight"
    return out


def supported_modules(model: nn.Module) -> dict[str, Modeled]:
    """The modules of :func:`layer_blocks`, by name."""
    return {name: b.module for name, b in layer_blocks(model).items()}


def has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def input_dim(module: Modeled) -> int:
    """Length of an ``abar`` row: ``d_i`` (+1 for the bias), or ``J k_h k_w`` (+1) for conv."""
    return block(module).input_dim


def output_dim(module: Modeled) -> int:
    return block(module).output_dim


def input_rows(module: Modeled, a: Tensor, bias: bool | None = None) -> Tensor:
    """The ``abar`` rows of a layer: ``(m |T|, D)`` with the homogeneous 1 last if the layer has a bias.

    For Linear layers extra leading dimensions of ``a`` (sequences) count as locations.
    """
    return block(module).input_rows(a, bias)


def output_rows(module: Modeled, h: Tensor) -> Tensor:
    """Rows of a pre-activation (or its gradient): ``(m |T|, d_o)``, channels last."""
    return block(module).output_rows(h)


def num_locations(module: Modeled, h: Tensor) -> int:
    """``|T|``: output locations per example (``H_out W_out`` for conv, 1 for a plain FC layer)."""
    return block(module).num_locations(h)


def grad_matrix(module: Modeled, weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
    """``[dW | db]`` as a ``(d_o, D)`` matrix in the ``abar`` column order."""
    return block(module).grad_matrix(weight_grad, bias_grad)


def split_matrix(module: Modeled, mat: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`grad_matrix`: the weight-shaped and bias-shaped parts of ``mat``."""
    return block(module).split_matrix(mat)


@dataclass
class LayerRecord:
    """What one module saw in one capture phase."""

    name: str
    module: Modeled
    inputs: Tensor | None = None
    outputs: Tensor | None = None
    output_grads: Tensor | None = None
    calls: int = 0
    extra: dict = field(default_factory=dict)


class HookNeverFiredError(RuntimeError):
    """A registered layer took no part in the forward pass of a capture phase."""


class Capture:
    """Forward/tensor hooks over a fixed set of layers, alive only inside :meth:`record`."""

    def __init__(self, modules: Mapping[str, Modeled | LayerBlock]):
        """``modules``: name -> module, or name -> its layer block (whose
        :meth:`~secondorder.capture.blocks.LayerBlock.layer_input` picks the recorded input;
        for a plain module it is the block's registered for it, else the first argument)."""
        self.blocks = {n: m if isinstance(m, LayerBlock) else block_for(m) for n, m in modules.items()}
        self.modules = {n: m.module if isinstance(m, LayerBlock) else m for n, m in modules.items()}
        logger.info("capturing %d layers: %s", len(self.modules), ", ".join(self.modules) or "(none)")

    @contextmanager
    def record(
        self, *, inputs: bool = True, outputs: bool = True, output_grads: bool = False, check: bool = True
    ) -> Iterator[dict[str, LayerRecord]]:
        """Record one phase (a forward pass and, optionally, its ordinary backward).

        Args:
            inputs: keep each layer's input ``a``.
            outputs: keep each layer's output ``h`` attached to the graph.
            output_grads: keep ``dL/dh`` from backward passes run inside the block.
            check: raise :class:`HookNeverFiredError` if a layer was not called.
        """
        records = {name: LayerRecord(name, m) for name, m in self.modules.items()}
        handles = []

        def make_hook(rec: LayerRecord):
            # The tensor hook lives on the output's autograd node; a strong reference to ``rec``
            # (which holds that output) would form a cycle through autograd that Python's garbage
            # collector cannot see, leaking every step's activations.
            ref = weakref.ref(rec)

            def store_grad(grad: Tensor) -> None:
                r = ref()
                if r is not None:
                    r.output_grads = grad.detach()

            block = self.blocks[rec.name]

            def hook(module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> None:
                rec.calls += 1
                if rec.calls > 1:
                    raise RuntimeError(
                        f"layer '{rec.name}' ran {rec.calls} times in one forward pass; weight "
                        "sharing is not supported by the Kronecker-factored methods"
                    )
                if inputs:
                    a = block.layer_input(args, kwargs) if block is not None else args[0]
                    rec.inputs = a.detach()
                if outputs:
                    rec.outputs = out
                if output_grads and out.requires_grad:
                    out.register_hook(store_grad)

            return hook

        for name, module in self.modules.items():
            handles.append(module.register_forward_hook(make_hook(records[name]), with_kwargs=True))
        try:
            yield records
        finally:
            for h in handles:
                h.remove()
        if check:
            silent = [n for n, r in records.items() if r.calls == 0]
            if silent:
                raise HookNeverFiredError(
                    "these registered layers never ran in the forward pass: "
                    + ", ".join(silent)
                    + ". A module whose weight is used through a functional call is never called: "
                    "pass exclude=[...] with these names to the optimizer, or freeze their "
                    "parameters (requires_grad=False)."
                )
