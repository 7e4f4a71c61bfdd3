"""Layer capture for ``nn.Linear`` and ``nn.Conv2d``: inputs, pre-activations, their gradients.

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

Means and second moments of these live in :mod:`secondorder.capture.statistics`.

Nothing here is specific to one method.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

Modeled = nn.Linear | nn.Conv2d


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind a ``DistributedDataParallel``/``DataParallel`` wrapper."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


def conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric zero padding of a conv layer as two ints, or ``None`` when unfold cannot express it."""
    if module.padding_mode != "zeros":
        return None
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        out = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                return None
            out.append(total // 2)
        return (out[0], out[1])
    return (int(pad[0]), int(pad[1]))


def is_supported(module: nn.Module) -> bool:
    """Whether the Kronecker methods can model ``module`` (Linear; Conv2d with groups=1, zero padding)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and conv_padding(module) is not None
    return False


def supported_modules(model: nn.Module) -> dict[str, Modeled]:
    """Every Linear/Conv2d layer of ``model`` (unwrapped) that :func:`is_supported`, by name."""
    found: dict[str, Modeled] = {}
    for name, module in unwrap(model).named_modules():
        if is_supported(module) and module.weight.requires_grad:
            found[name] = module  # type: ignore[assignment]
    return found


def has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def input_dim(module: Modeled) -> int:
    """Length of an ``abar`` row: ``d_i`` (+1 for the bias), or ``J k_h k_w`` (+1) for conv."""
    w = module.weight
    return w[0].numel() + (1 if has_bias(module) else 0)


def output_dim(module: Modeled) -> int:
    return module.weight.shape[0]


def patches(module: nn.Conv2d, a: Tensor) -> Tensor:
    """im2col of a conv input: ``(m, J k_h k_w, |T|)`` in the ``weight.view(I, -1)`` order."""
    pad = conv_padding(module)
    assert pad is not None
    return F.unfold(a, module.kernel_size, dilation=module.dilation, padding=pad, stride=module.stride)


def input_rows(module: Modeled, a: Tensor, bias: bool | None = None) -> Tensor:
    """The ``abar`` rows of a layer: ``(m |T|, D)`` with the homogeneous 1 last if the layer has a bias.

    For Linear layers extra leading dimensions of ``a`` (sequences) count as locations.
    """
    if isinstance(module, nn.Conv2d):
        p = patches(module, a)  # (m, D, T)
        rows = p.transpose(1, 2).reshape(-1, p.shape[1])
    else:
        rows = a.reshape(-1, a.shape[-1])
    if has_bias(module) if bias is None else bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def output_rows(module: Modeled, h: Tensor) -> Tensor:
    """Rows of a pre-activation (or its gradient): ``(m |T|, d_o)``, channels last."""
    if isinstance(module, nn.Conv2d):
        return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    return h.reshape(-1, h.shape[-1])


def num_locations(module: Modeled, h: Tensor) -> int:
    """``|T|``: output locations per example (``H_out W_out`` for conv, 1 for a plain FC layer)."""
    return h.numel() // (h.shape[0] * output_dim(module))


def grad_matrix(module: Modeled, weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
    """``[dW | db]`` as a ``(d_o, D)`` matrix in the ``abar`` column order."""
    g = weight_grad.reshape(weight_grad.shape[0], -1)
    if bias_grad is not None:
        g = torch.cat([g, bias_grad.reshape(-1, 1)], dim=1)
    return g


def split_matrix(module: Modeled, mat: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`grad_matrix`: the weight-shaped and bias-shaped parts of ``mat``."""
    w = module.weight
    if has_bias(module):
        return mat[:, :-1].reshape(w.shape), mat[:, -1].reshape(module.bias.shape)
    return mat.reshape(w.shape), None


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

    def __init__(self, modules: Mapping[str, Modeled]):
        self.modules = dict(modules)
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

            def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
                rec.calls += 1
                if rec.calls > 1:
                    raise RuntimeError(
                        f"layer '{rec.name}' ran {rec.calls} times in one forward pass; weight "
                        "sharing is not supported by the Kronecker-factored methods"
                    )
                if inputs:
                    rec.inputs = args[0].detach()
                if outputs:
                    rec.outputs = out
                if output_grads and out.requires_grad:
                    out.register_hook(store_grad)

            return hook

        for name, module in self.modules.items():
            handles.append(module.register_forward_hook(make_hook(records[name])))
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
                    + ". Exclude them from the model or freeze their parameters (requires_grad=False)."
                )
