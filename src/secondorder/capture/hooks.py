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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .blocks import LayerBlock, MultiheadCrossAttentionBlock, block_for, block_type_for, unrolled_rnn
from .blocks import conv_padding as conv_padding  # re-exported
from .blocks import patches as patches  # re-exported

logger = logging.getLogger(__name__)

Modeled = nn.Module  # a module with a registered layer block (see capture.blocks)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind ``DistributedDataParallel`` / ``DataParallel`` wrappers and
    ``torch.compile`` (whose parameters and submodules are the original module's)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif is_compiled(model):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile``'s wrapper (``OptimizedModule``)."""
    return type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    )


def has_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a wrapper inside it is ``torch.compile``'d."""
    while True:
        if is_compiled(model):
            return True
        if not isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            return False
        model = model.module


@contextmanager
def eager() -> Iterator[None]:
    """``torch.compile``'d code runs as the original Python inside (``set_stance("force_eager")``):
    the optimizer's recorded passes see every module call, hook and autograd node."""
    with torch.compiler.set_stance("force_eager"):
        yield


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
    """Whether a registered layer block models ``module`` (see :mod:`secondorder.capture.blocks`)."""
    return block_for(module) is not None


#: modules that use their children's weights through functional calls instead of calling them
#: (``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward``):
#: where the parent has a block, the children's blocks are captured at those calls
#: (``LayerBlock.functional``); otherwise the children have none
FUNCTIONAL_PARENTS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _cross_attention(model: nn.Module) -> set[str]:
    """Attention modules known to be called as cross-attention (``nn.TransformerDecoderLayer``'s
    ``multihead_attn``): their packed projection never runs in one call."""
    return {
        f"{name}.multihead_attn" if name else "multihead_attn"
        for name, m in model.named_modules()
        if isinstance(m, nn.TransformerDecoderLayer)
    }


def _parent_blocks(model: nn.Module) -> tuple[dict[str, str], dict[str, LayerBlock | None]]:
    """Names of the modules inside a :data:`FUNCTIONAL_PARENTS` module -> that parent's name, and
    each such parent's block (``None`` where it has none)."""
    children: dict[str, str] = {}
    parents: dict[str, LayerBlock | None] = {}
    cross = _cross_attention(model)
    for name, module in model.named_modules():
        if isinstance(module, FUNCTIONAL_PARENTS) and name not in children:
            if name in cross:  # its packed projection runs as two row slices
                ok = (
                    block_type_for(module) is not None
                    and MultiheadCrossAttentionBlock.unsupported(module) is None
                )
                parents[name] = MultiheadCrossAttentionBlock(module) if ok else None  # type: ignore[arg-type]
            else:
                parents[name] = block_for(module)
            for child, _ in module.named_modules(prefix=name):
                if child != name:
                    children.setdefault(child, name)
    return children, parents


def _sequence_first(model: nn.Module) -> set[str]:
    """Modules inside an ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` built with
    ``batch_first=False``: their inputs are ``(L, N, E)``, so their rows are position-major."""
    out: set[str] = set()
    for name, m in model.named_modules():
        if (
            isinstance(m, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer)
            and not m.self_attn.batch_first
        ):
            out.update(child for child, _ in m.named_modules(prefix=name) if child != name)
    return out


def layer_blocks(model: nn.Module) -> dict[str, LayerBlock]:
    """The layer block of every module of ``model`` (unwrapped) that one models, by module name.

    Modules whose weight is frozen (``requires_grad=False``) are left out, and so are the
    children of a :data:`FUNCTIONAL_PARENTS` module that has no block (see
    :func:`unmodeled_modules`); the children of one that has are captured functionally. Blocks
    inside a sequence-first transformer layer are marked position-major
    (``LayerBlock.example_major``).
    """
    model = unwrap(model)
    children, parents = _parent_blocks(model)
    seq_first = _sequence_first(model)
    found: dict[str, LayerBlock] = {}
    for name, module in model.named_modules():
        if name in parents:
            b = parents[name]
        elif name in children:
            b = block_for(module) if parents[children[name]] is not None else None
            if b is not None:
                b.functional = True
                b.example_major = False  # (L N, E) rows, position-major
        else:
            b = block_for(module)
        if b is not None and b.weight.requires_grad:
            if name in seq_first and name not in parents:  # attention transposes its rows itself
                b.example_major = False
            for part in b.split():
                found[name + part.part] = part
    return found


def unmodeled_modules(model: nn.Module) -> dict[str, str]:
    """Why each module that owns trainable parameters has no block: module name -> reason."""
    model = unwrap(model)
    children, parents = _parent_blocks(model)
    cross = _cross_attention(model)
    modeled = {id(b.module) for b in layer_blocks(model).values()}
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if id(module) in modeled or not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        kind = type(module).__name__
        cls = block_type_for(module)
        if name in cross:
            out[name] = f"{kind} used as cross-attention with kdim/vdim or add_bias_kv"
        elif name in children and parents[children[name]] is None:
            parent = children[name]
            out[name] = (
                f"{kind} used through a functional call by its parent "
                f"{type(model.get_submodule(parent)).__name__} '{parent}', which has no block"
            )
        elif cls is None:
            out[name] = f"no layer block for {kind}"
        elif (why := cls.unsupported(module)) is not None:
            out[name] = f"{kind} with {why} is not supported by {cls.__name__}"
        else:
            out[name] = f"{kind} with a frozen weight"
    return out


def supported_modules(model: nn.Module) -> dict[str, Modeled]:
    """The modules of :func:`layer_blocks`, by module name (once for a module modeled in parts)."""
    return {name[: len(name) - len(b.part)]: b.module for name, b in layer_blocks(model).items()}


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


def _row_slice_key(weight: Tensor) -> tuple[int, int, int] | None:
    """``(id(base), first row, rows)`` when ``weight`` is a block of whole rows of its base tensor
    (``w.split(...)`` of a packed projection), else ``None``."""
    base = weight._base
    assert base is not None
    if base.dim() != 2 or weight.stride() != base.stride() or weight.shape[1] != base.shape[1]:
        return None
    offset = weight.storage_offset() - base.storage_offset()
    return (id(base), offset // base.stride(0), weight.shape[0])


@contextmanager
def _functional_linear_capture(
    hooks: Mapping[int | tuple[int, int, int], Callable[[Tensor, Tensor], None]],
) -> Iterator[None]:
    """While active, every ``F.linear`` call whose weight is watched (by ``id``, or as a row slice
    of a watched parameter) also runs that weight's hook with the call's input and output: the
    capture of a layer whose weight a parent module uses through a functional call
    (``nn.MultiheadAttention``'s projections).

    ``F.multi_head_attention_forward`` looks ``linear`` up in ``torch.nn.functional`` at each
    call, so the wrapper is installed there for the phase and removed after it (the previous
    function is restored, so phases nest; like any module attribute it is process-wide, so a
    phase must not overlap a forward pass in another thread). (A
    ``TorchFunctionMode`` cannot see those calls: the mode is off while it handles the enclosing
    Python functional, and switching it back on dispatches that functional again.)
    """
    original = F.linear
    slices = any(isinstance(key, tuple) for key in hooks)  # row-slice keys only when watched

    def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        out = original(input, weight, bias)
        hook = hooks.get(id(weight))
        if hook is None and slices and weight._base is not None and weight.dim() == 2:
            hook = hooks.get(_row_slice_key(weight))
        if hook is not None:
            hook(input, out)
        return out

    F.linear = linear  # type: ignore[assignment]
    try:
        yield
    finally:
        F.linear = original


def at_least(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in at least the precision of ``dtype`` (floating ``t`` only; ``t`` itself if it has it)."""
    if not t.is_floating_point():
        return t
    return t.to(torch.promote_types(t.dtype, dtype))


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
        #: the least precision of the recorded ``inputs`` and ``output_grads``: a half-precision
        #: activation (autocast) is kept in this dtype, the statistics' (float32 by default)
        self.dtype = torch.float32
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
                    r.output_grads = at_least(grad.detach(), self.dtype)

            block = self.blocks[rec.name]

            def hook(module: nn.Module | None, args: tuple, kwargs: dict, out: Tensor) -> None:
                rec.calls += 1
                if rec.calls > 1:
                    raise RuntimeError(
                        f"layer '{rec.name}' ran {rec.calls} times in one forward pass; weight "
                        "sharing is not supported by the Kronecker-factored methods"
                    )
                if inputs:
                    a = (
                        block.layer_input(args, kwargs)
                        if block is not None and module is not None
                        else args[0]
                    )
                    rec.inputs = at_least(a.detach(), self.dtype)
                if outputs:
                    rec.outputs = out
                if output_grads and out.requires_grad:
                    out.register_hook(store_grad)

            return hook

        functional: dict[int | tuple[int, int, int], Callable[[Tensor, Tensor], None]] = {}
        unrolled: dict[int, tuple[nn.Module, dict[str, Callable[[Tensor, Tensor], None]]]] = {}
        own_forward: dict[int, Callable[..., object]] = {}  # an instance forward, put back
        for name, module in self.modules.items():
            hook = make_hook(records[name])
            block = self.blocks[name]
            if block is not None and block.functional:
                # captured where its weight enters F.linear (the module itself is never called)
                functional[block.functional_key] = lambda a, out, hook=hook: hook(None, (a,), {}, out)
            elif block is not None and block.unrolled:
                # a recurrent layer's matrices: captured by running the module step by step
                parts = unrolled.setdefault(id(module), (module, {}))[1]
                parts[block.key] = lambda a, out, hook=hook: hook(None, (a,), {}, out)  # type: ignore[attr-defined]
            else:
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        for key, (module, parts) in unrolled.items():
            if "forward" in module.__dict__:
                own_forward[key] = module.__dict__["forward"]
            module.forward = unrolled_rnn(module, parts)  # type: ignore[arg-type, method-assign]
        try:
            with _functional_linear_capture(functional) if functional else nullcontext():
                yield records
        finally:
            for h in handles:
                h.remove()
            for key, (module, _) in unrolled.items():
                if key in own_forward:
                    module.forward = own_forward[key]  # type: ignore[method-assign]
                else:
                    del module.forward  # the class's forward again
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
