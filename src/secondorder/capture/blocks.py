"""Layer blocks: the per-layer seam of the Kronecker-factored methods, and its open registry.

A Kronecker-factored method (KFAC, Algorithm 12; K-BFGS, Algorithms 9 and 4) sees a layer as a map
``h_t = W abar_t`` per example and output location ``t``: ``abar_t`` is the layer input (a patch
of it for a convolution) with the homogeneous 1 appended when the layer has a bias,
``W = [weight | bias]`` is a ``(d_o, D)`` matrix, and ``h_t`` the pre-activation. A
:class:`LayerBlock` says, for one layer type, how the captured tensors of that view are laid out:

* :meth:`LayerBlock.layer_input` -- which tensor of the module's call is ``a`` (default: the
  first positional argument);
* :meth:`LayerBlock.input_rows` / :meth:`LayerBlock.output_rows` -- the ``abar_t`` rows and the
  matching rows of ``h`` (or ``dL/dh``), one per example and location;
* :meth:`LayerBlock.grad_matrix` / :meth:`LayerBlock.split_matrix` -- the parameters' gradient as
  the ``(d_o, D)`` matrix and back;
* the statistics the methods need (Algorithm 12 line 14's ``Omega`` from the rows; K-BFGS's means
  over examples and locations, ``A v`` of (3.15) and ``A``), with generic defaults computed from
  the rows, which a block overrides with faster forms.

The methods never test a module's type: they ask the registry (:func:`block_for`) for the block
of each module. Built in: ``nn.Linear`` (extra leading dimensions count as locations),
``nn.Conv2d`` and ``nn.Conv1d`` (zero padding; a grouped conv splits into one block per group),
``nn.Embedding``, self-attention ``nn.MultiheadAttention``, and the scale and shift of the
normalisation layers (:class:`ScaleShiftBlock`, a per-channel form); a user adds a layer type
with :func:`register_layer`. Nothing here is specific to one method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..linalg import bfgs as B
from ..linalg.kron import gram, gram_

__all__ = [
    "BatchNormBlock",
    "Conv1dBlock",
    "Conv1dGroupBlock",
    "Conv2dBlock",
    "Conv2dGroupBlock",
    "EmbeddingBlock",
    "GroupNormBlock",
    "LayerBlock",
    "LayerNormBlock",
    "LinearBlock",
    "AttentionProjectionBlock",
    "MultiheadAttentionBlock",
    "MultiheadCrossAttentionBlock",
    "RMSNormBlock",
    "RecurrentBlock",
    "RecurrentPartBlock",
    "ScaleShiftBlock",
    "block_for",
    "block_type_for",
    "conv_kwargs",
    "conv_padding",
    "patches",
    "register_layer",
    "registered_layers",
    "unregister_layer",
    "unrolled_rnn",
]


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


def conv_kwargs(module: nn.Conv2d) -> dict[str, Any]:
    """The geometry of a conv layer as keyword arguments of ``F.conv2d`` and ``conv2d_weight``."""
    return dict(stride=module.stride, padding=conv_padding(module), dilation=module.dilation)


def patches(module: nn.Conv2d, a: Tensor) -> Tensor:
    """im2col of a conv input: ``(m, J k_h k_w, |T|)`` in the ``weight.view(I, -1)`` order."""
    pad = conv_padding(module)
    assert pad is not None
    return F.unfold(a, module.kernel_size, dilation=module.dilation, padding=pad, stride=module.stride)


class LayerBlock:
    """How one layer type presents itself to the Kronecker-factored methods (see the module doc).

    A block wraps one module. A new layer type needs :meth:`input_rows` and :meth:`output_rows`
    (and :meth:`unsupported` when only some configurations fit the ``h_t = W abar_t`` view); the
    rest has defaults that assume the module has a ``weight`` whose first dimension is ``d_o`` and
    an optional ``bias`` of shape ``(d_o,)``. Register it with :func:`register_layer`.
    """

    #: captured where :attr:`weight` enters ``F.linear`` instead of by a forward hook on the
    #: module (for weights a parent module uses through a functional call)
    functional: bool = False
    #: whether the rows of :meth:`input_rows` / :meth:`output_rows` run example by example (all
    #: locations of example 0 first); statistics that group rows by example need it
    example_major: bool = True
    #: captured by running the module step by step (recurrent layers, :func:`unrolled_rnn`)
    unrolled: bool = False
    #: the form of the curvature this block offers: ``"kronecker"`` (the ``h_t = W abar_t`` view
    #: of this class) or ``"channel"`` (:class:`ScaleShiftBlock`); each method says which forms
    #: it uses (``KroneckerFactoredOptimizer.block_kinds``)
    curvature: str = "kronecker"

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    # ------------------------------------------------------------------ configuration
    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot be modeled by this block (a short phrase), or ``None`` if it can."""
        return None

    @property
    def weight(self) -> Tensor:
        return self.module.weight  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def functional_key(self) -> int | tuple[int, int, int]:
        """What identifies this block's weight in an ``F.linear`` call (:attr:`functional`): its
        ``id``, or ``(id(parameter), first row, rows)`` for a block of a row slice of a parameter
        (a parent that splits a packed weight passes views)."""
        return id(self.weight)

    def parameters(self) -> list[Tensor]:
        """The parameter tensors this block preconditions (all of them or a part, see
        :meth:`update_targets`): ``weight`` and, if present, ``bias``. :meth:`grad_matrix` takes
        tensors of their shapes."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    #: the suffix of a block that models one part of its module (``"[2]"``: group 2), else ``""``
    part: str = ""

    def split(self) -> list[LayerBlock]:
        """The blocks this module is modeled by: itself, or one per part (a grouped conv's groups),
        each with its own :attr:`part`."""
        return [self]

    def update_targets(self) -> tuple[Tensor, Tensor | None]:
        """Where the two parts of :meth:`split_matrix` are applied: the weight and the bias, or
        views of the parts of them this block covers."""
        return self.weight, self.bias

    @property
    def input_dim(self) -> int:
        """``D``: the length of an ``abar`` row (the homogeneous 1 included)."""
        return self.weight[0].numel() + (1 if self.has_bias else 0)

    @property
    def output_dim(self) -> int:
        """``d_o``: the length of an ``h`` row."""
        return self.weight.shape[0]

    # ------------------------------------------------------------------ captured tensors
    def layer_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """The input ``a`` among the arguments of one call of the module (default: the first)."""
        return args[0]

    def input_rows(self, a: Tensor, bias: bool | None = None) -> Tensor:
        """The ``abar`` rows, ``(m |T|, D)``, the homogeneous 1 last when ``bias`` (default: the layer's;
        :meth:`homogeneous` appends it)."""
        raise NotImplementedError(f"{type(self).__name__} must define input_rows")

    def homogeneous(self, rows: Tensor, bias: bool | None = None) -> Tensor:
        """``rows`` with the homogeneous coordinate 1 appended when ``bias`` (default: when the layer
        has a bias): ``abar = [a; 1]``, so that ``[W | b] abar = W a + b``."""
        if self.has_bias if bias is None else bias:
            return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows

    def output_rows(self, h: Tensor) -> Tensor:
        """The rows of ``h`` (or ``dL/dh``), ``(m |T|, d_o)``, in the order of :meth:`input_rows`."""
        raise NotImplementedError(f"{type(self).__name__} must define output_rows")

    def num_locations(self, h: Tensor, batch_size: int | None = None) -> int:
        """``|T|``: output locations per example -- the rows of ``h`` over the batch size
        (default ``h.shape[0]``; a block whose captured tensors do not lead with the batch, such as
        attention's flattened projections, needs the closure's)."""
        return h.numel() // ((h.shape[0] if batch_size is None else batch_size) * self.output_dim)

    def output_spatial_shape(self, h: Tensor) -> tuple[int, ...]:
        """The shape of the locations of ``h`` as :meth:`input_mean` wants it (``()`` by default)."""
        return ()

    # ------------------------------------------------------------------ gradient layout
    def grad_matrix(self, weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
        """``[dW | db]`` as a ``(d_o, D)`` matrix in the ``abar`` column order."""
        g = weight_grad.reshape(weight_grad.shape[0], -1)
        if bias_grad is not None:
            g = torch.cat([g, bias_grad.reshape(-1, 1)], dim=1)
        return g

    def split_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`grad_matrix`: the weight-shaped and bias-shaped parts of ``mat``."""
        w, b = self.weight, self.bias
        if b is not None:
            return mat[:, :-1].reshape(w.shape), mat[:, -1].reshape(b.shape)
        return mat.reshape(w.shape), None

    # ------------------------------------------------------------------ statistics
    def spatial_mean(self, h: Tensor) -> Tensor:
        """The mean over examples and locations of ``h`` (or ``dL/dh``): ``(d_o,)``.

        (A sum divided by the count: on CPU ``Tensor.mean(0)`` is much slower than ``sum(0)``.)
        """
        rows = self.output_rows(h)
        return rows.sum(0).div_(rows.shape[0])

    def spatial_abs_mean(self, h: Tensor) -> Tensor:
        """The mean over examples and locations of ``|h|`` (or ``|dL/dh|``): ``(d_o,)``.

        The rounding error of :meth:`spatial_mean` in component ``c`` is at most a small multiple
        of the unit round-off times this mean, so a difference of two spatial means below that
        level carries no information.
        """
        rows = self.output_rows(h)
        return torch.linalg.vector_norm(rows, 1, dim=0).div_(rows.shape[0])

    def input_mean(self, a: Tensor, out_hw: tuple[int, ...]) -> Tensor:
        """``abar``: the mean over examples and locations of the ``abar_{n,t}`` rows (with the 1).

        ``out_hw`` is :meth:`output_spatial_shape` of the layer's output.
        """
        rows = self.input_rows(a, bias=False)
        mean = rows.sum(0).div_(rows.shape[0])
        if self.has_bias:
            mean = torch.cat([mean, mean.new_ones(1)])
        return mean

    def examples(self, a: Tensor, batch_size: int | None = None) -> int:
        """``m``: the examples in a captured input -- ``batch_size`` when the caller knows it,
        else the input's batch dimension (the first, by default)."""
        return a.shape[0] if batch_size is None else batch_size

    def input_action(self, a: Tensor, v: Tensor, batch_size: int | None = None) -> Tensor:
        """(3.15): ``A v = (1/m) sum_{n,t} abar_{n,t} (abar_{n,t}^T v)`` without forming ``A``."""
        m = self.examples(a, batch_size)
        return B.gram_action(self.input_rows(a, bias=False), v, 1.0 / m, self.has_bias)

    def input_gram(self, a: Tensor, chunk_elements: int = 1 << 24, batch_size: int | None = None) -> Tensor:
        """``A = (1/m) sum_{n,t} abar_{n,t} abar_{n,t}^T``, dense ``(D, D)``.

        ``chunk_elements`` bounds the row entries a block forms at once where it builds rows
        bigger than its input (im2col); the default form builds them all.
        """
        return gram(self.input_rows(a), 1.0 / self.examples(a, batch_size))


class LinearBlock(LayerBlock):
    """``nn.Linear``: ``abar`` is the input row; leading dimensions beyond the batch are locations."""

    def input_rows(self, a: Tensor, bias: bool | None = None) -> Tensor:
        rows = a.reshape(-1, a.shape[-1])
        return self.homogeneous(rows, bias)

    def output_rows(self, h: Tensor) -> Tensor:
        return h.reshape(-1, h.shape[-1])


class Conv2dBlock(LayerBlock):
    """``nn.Conv2d`` with ``groups == 1`` and zero padding: ``abar_t`` is the im2col patch at ``t``.

    The patch order (channel, kernel row, kernel column) is that of ``weight.view(d_o, -1)``.
    """

    module: nn.Conv2d

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        assert isinstance(module, nn.Conv2d)
        if conv_padding(module) is None:
            return f"padding {module.padding!r} with padding_mode={module.padding_mode!r}"
        return None

    def split(self) -> list[LayerBlock]:
        if self.module.groups == 1:
            return [self]
        return [Conv2dGroupBlock(self.module, g) for g in range(self.module.groups)]

    def input_rows(self, a: Tensor, bias: bool | None = None) -> Tensor:
        p = patches(self.module, a)  # (m, D, T)
        rows = p.transpose(1, 2).reshape(-1, p.shape[1])
        return self.homogeneous(rows, bias)

    def output_rows(self, h: Tensor) -> Tensor:
        return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])

    def output_spatial_shape(self, h: Tensor) -> tuple[int, ...]:
        return tuple(h.shape[2:])

    def spatial_mean(self, h: Tensor) -> Tensor:
        return h.sum((0, 2, 3)).div_(h.numel() // h.shape[1])

    def spatial_abs_mean(self, h: Tensor) -> Tensor:
        return torch.linalg.vector_norm(h, 1, dim=(0, 2, 3)).div_(h.numel() // h.shape[1])

    def input_mean(self, a: Tensor, out_hw: tuple[int, ...]) -> Tensor:
        # the patch sum is the weight gradient of a one-filter convolution whose output gradient is 1
        ones = a.new_ones(a.shape[0], 1, *out_hw)
        shape = (1, *self.module.weight.shape[1:])
        total = torch.nn.grad.conv2d_weight(a, shape, ones, **conv_kwargs(self.module)).reshape(-1)
        mean = total.div_(ones.numel())
        if self.has_bias:
            mean = torch.cat([mean, mean.new_ones(1)])
        return mean

    def input_action(self, a: Tensor, v: Tensor, batch_size: int | None = None) -> Tensor:
        # abar_t^T v is a one-filter convolution; the sum over (n, t) is that filter's weight gradient
        m = self.examples(a, batch_size)
        kw = conv_kwargs(self.module)
        shape = (1, *self.module.weight.shape[1:])
        d0 = self.module.weight[0].numel()
        u = F.conv2d(a, v[:d0].reshape(shape), v[d0:] if self.has_bias else None, **kw)
        out = torch.nn.grad.conv2d_weight(a, shape, u, **kw).reshape(-1)
        if self.has_bias:
            out = torch.cat([out, u.sum().reshape(1)])
        return out.div_(m)

    def input_gram(self, a: Tensor, chunk_elements: int = 1 << 24, batch_size: int | None = None) -> Tensor:
        # im2col of chunk_elements patch entries at a time, so memory stays bounded
        dim = self.input_dim
        out = a.new_zeros(dim, dim)
        per_example = patches(self.module, a[:1]).numel()
        step = max(1, chunk_elements // max(1, per_example))
        for i in range(0, a.shape[0], step):
            gram_(out, self.input_rows(a[i : i + step]), 1.0)
        return out.div_(self.examples(a, batch_size))


def _as_conv2d(module: nn.Conv1d | nn.Conv2d, c_in: int | None = None, c_out: int | None = None) -> nn.Conv2d:
    """The geometry of ``module`` (a Conv2d, or a Conv1d as a ``(1, k)`` Conv2d) as an ungrouped Conv2d
    with ``c_in`` / ``c_out`` channels (default the module's), on the meta device: shapes, no memory.
    The blocks of one group and of 1-d convolutions reuse the Conv2d block's forms through it."""
    if isinstance(module, nn.Conv1d):  # length L as the width of a height-1 image
        kernel, stride, dilation = (1, module.kernel_size[0]), (1, module.stride[0]), (1, module.dilation[0])
        padding: Any = module.padding if isinstance(module.padding, str) else (0, module.padding[0])
    else:
        kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
    return nn.Conv2d(
        module.in_channels if c_in is None else c_in,
        module.out_channels if c_out is None else c_out,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=module.bias is not None,
        padding_mode=module.padding_mode,
        device="meta",
    )


class Conv2dGroupBlock(LayerBlock):
    """Group ``g`` of an ``nn.Conv2d`` with ``groups > 1`` (depthwise included): the filters
    ``weight[g d_g : (g+1) d_g]`` see only the input channels of group ``g``, so each group is a
    convolution of its own, with its own Kronecker factors (the factors of the whole layer are
    block-diagonal over the groups). Its rows are the Conv2d block's on the group's channels.
    """

    module: nn.Conv2d

    def __init__(self, module: nn.Conv2d, group: int) -> None:
        super().__init__(module)
        groups = module.groups
        self.group = group
        self.part = f"[{group}]"
        c_in, c_out = module.in_channels // groups, module.out_channels // groups
        self._in = slice(group * c_in, (group + 1) * c_in)
        self._out = slice(group * c_out, (group + 1) * c_out)
        self._geometry = Conv2dBlock(_as_conv2d(module, c_in, c_out))

    @staticmethod
    def _image(t: Tensor) -> Tensor:
        """The captured tensor as an image batch ``(m, C, H, W)`` (a 1-d group lifts it)."""
        return t

    @property
    def weight(self) -> Tensor:
        return self.module.weight[self._out]

    @property
    def bias(self) -> Tensor | None:
        return None if self.module.bias is None else self.module.bias[self._out]

    def parameters(self) -> list[Tensor]:
        m = self.module
        return [m.weight] if m.bias is None else [m.weight, m.bias]

    def grad_matrix(self, weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
        return super().grad_matrix(
            weight_grad[self._out], None if bias_grad is None else bias_grad[self._out]
        )

    def input_rows(self, a: Tensor, bias: bool | None = None) -> Tensor:
        return self._geometry.input_rows(self._image(a)[:, self._in], bias)

    def output_rows(self, h: Tensor) -> Tensor:
        return self._geometry.output_rows(self._image(h)[:, self._out])

    def num_locations(self, h: Tensor, batch_size: int | None = None) -> int:
        return self._geometry.num_locations(self._image(h)[:, self._out], batch_size)

    def output_spatial_shape(self, h: Tensor) -> tuple[int, ...]:
        return tuple(self._image(h).shape[2:])

    def spatial_mean(self, h: Tensor) -> Tensor:
        return self._geometry.spatial_mean(self._image(h)[:, self._out])

    def spatial_abs_mean(self, h: Tensor) -> Tensor:
        return self._geometry.spatial_abs_mean(self._image(h)[:, self._out])

    def input_mean(self, a: Tensor, out_hw: tuple[int, ...]) -> Tensor:
        return self._geometry.input_mean(self._image(a)[:, self._in], out_hw)

    def input_action(self, a: Tensor, v: Tensor, batch_size: int | None = None) -> Tensor:
        return self._geometry.input_action(self._image(a)[:, self._in], v, batch_size)

    def input_gram(self, a: Tensor, chunk_elements: int = 1 << 24, batch_size: int | None = None) -> Tensor:
        return self._geometry.input_gram(self._image(a)[:, self._in], chunk_elements, batch_size)


class Conv1dGroupBlock(Conv2dGroupBlock):
    """Group ``g`` of an ``nn.Conv1d`` with ``groups > 1``: the Conv2d group block on the input
    seen as ``(m, C, 1, L)``."""

    @staticmethod
    def _image(t: Tensor) -> Tensor:
        return t.unsqueeze(2)


class Conv1dBlock(LayerBlock):
    """``nn.Conv1d`` with zero padding: the Conv2d block (Algorithm 12's im2col patches) on the
    input seen as ``(m, C, 1, L)`` with the kernel ``(1, k)``; the patch order (channel, kernel
    position) is that of ``weight.view(d_o, -1)``. With ``groups > 1`` one
    :class:`Conv1dGroupBlock` per group.
    """

    module: nn.Conv1d

    def __init__(self, module: nn.Conv1d) -> None:
        super().__init__(module)
        self._geometry = Conv2dBlock(_as_conv2d(module))

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        assert isinstance(module, nn.Conv1d)
        if conv_padding(_as_conv2d(module)) is None:
            return f"padding {module.padding!r} with padding_mode={module.padding_mode!r}"
        return None

    def split(self) -> list[LayerBlock]:
        if self.module.groups == 1:
            return [self]
        return [Conv1dGroupBlock(self.module, g) for g in range(self.module.groups)]  # type: ignore[arg-type]

    def input_rows(self, a: Tensor, bias: bool | None = None) -> Tensor:
        return self._geometry.input_rows(a.unsqueeze(2), bias)

    def output_rows(self, h: Tensor) -> Tensor:
        return self._geometry.output_rows(h.unsqueeze(2))

    def output_spatial_shape(self, h: Tensor) -> tuple[int, ...]:
        return (1, h.shape[2])

    def spatial_mean(self, h: Tensor) -> Tensor:
        return self._geometry.spatial_mean(h.unsqueeze(2))

    def spatial_abs_mean(self, h: Tensor) -> Tensor:
        return self._geometry.spatial_abs_mean(h.unsqueeze(2))

    def input_mean(self, a: Tensor, out_hw: tuple[int, ...]) -> Tensor:
        return self._geometry.input_mean(a.unsqueeze(2), out_hw)

    def input_action(self, a: Tensor, v: Tensor, batch_size: int | None = None) -> Tensor:
        return self._geometry.input_action(a.unsqueeze(2), v, batch_size)

    def input_gram(self, a: Tensor, chunk_elements: int = 1 << 24, batch_size: int | None = None) -> Tensor:
        return self._geometry.input_gram(a.unsqueeze(2), chunk_elements, batch_size)


class EmbeddingBlock(LayerBlock):
    """``nn.Embedding``: ``h_t = W^T e_{x_t}`` with ``W`` the ``(V, d)`` table, so in the
    ``h = W abar`` view the matrix is ``weight^T`` and ``abar_t`` the one-hot row of token ``x_t``.

    The input factor is diagonal (token frequencies); it is formed densely, ``(V, V)``, so this
    block suits vocabularies of a few thousand. Tokens equal to ``padding_idx`` get a zero row
    (their output does not depend on the table). ``sparse=True`` is not supported.
    """

    module: nn.Embedding

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        assert isinstance(module, nn.Embedding)
        return "sparse=True" if module.sparse else None

    @property
    def bias(self) -> Tensor | None:
        return None

    @property
    def input_dim(self) -> int:
        return self.module.num_embeddings

    @property
    def output_dim(self) -> int:
        return self.module.embedding_dim

    def input_rows(self, a: Tensor, bias: bool | None = None) -> Tensor:
        tokens = a.reshape(-1)
        rows = F.one_hot(tokens, self.module.num_embeddings).to(self.weight.dtype)
        if self.module.padding_idx is not None:
            rows[tokens == self.module.padding_idx] = 0
        return rows

    def output_rows(self, h: Tensor) -> Tensor:
        return h.reshape(-1, h.shape[-1])

    def _counts(self, a: Tensor) -> Tensor:
        """How often each token occurs in ``a`` (padding tokens not counted), as the weight's dtype."""
        tokens = a.reshape(-1)
        if self.module.padding_idx is not None:
            tokens = tokens[tokens != self.module.padding_idx]
        return torch.bincount(tokens, minlength=self.module.num_embeddings).to(self.weight.dtype)

    def input_mean(self, a: Tensor, out_hw: tuple[int, ...]) -> Tensor:
        return self._counts(a).div_(a.numel())

    def input_action(self, a: Tensor, v: Tensor, batch_size: int | None = None) -> Tensor:
        return self._counts(a).mul_(v).div_(self.examples(a, batch_size))  # A is diagonal

    def input_gram(self, a: Tensor, chunk_elements: int = 1 << 24, batch_size: int | None = None) -> Tensor:
        return torch.diag(self._counts(a).div_(self.examples(a, batch_size)))

    def grad_matrix(self, weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
        return weight_grad.t()

    def split_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        return mat.t(), None


class MultiheadAttentionBlock(LayerBlock):
    """``nn.MultiheadAttention``'s packed input projection in self-attention: ``[q; k; v] = W x + b``
    with ``W = in_proj_weight`` ``(3E, E)`` and ``b = in_proj_bias``, one Kronecker block over the
    positions of ``x``.

    The module never calls a submodule: ``F.multi_head_attention_forward`` applies ``W`` with one
    ``F.linear`` on the (sequence-first) input when query, key and value are the same tensor, so
    the block is captured there (:attr:`functional`); its ``out_proj`` is a Linear block captured
    the same way. Cross-attention (query differs from key and value) projects with slices of
    ``W``: :class:`MultiheadCrossAttentionBlock`. Separate q/k/v weights (``kdim``/``vdim``) and
    ``add_bias_kv`` are not modeled.
    """

    module: nn.MultiheadAttention
    functional = True

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        assert isinstance(module, nn.MultiheadAttention)
        if not module._qkv_same_embed_dim:
            return "kdim/vdim != embed_dim (separate q, k, v weights)"
        if module.bias_k is not None:
            return "add_bias_kv=True"
        return None

    @property
    def weight(self) -> Tensor:
        return self.module.in_proj_weight  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        return self.module.in_proj_bias

    def input_rows(self, a: Tensor, bias: bool | None = None) -> Tensor:
        rows = a.transpose(0, 1).reshape(-1, a.shape[-1])  # (L, N, E) -> example-major rows
        return self.homogeneous(rows, bias)

    def output_rows(self, h: Tensor) -> Tensor:
        return h.transpose(0, 1).reshape(-1, h.shape[-1])

    def examples(self, a: Tensor, batch_size: int | None = None) -> int:
        return a.shape[1] if batch_size is None else batch_size  # (L, N, E)

    def num_locations(self, h: Tensor, batch_size: int | None = None) -> int:
        return h.numel() // ((h.shape[1] if batch_size is None else batch_size) * self.output_dim)


class ScaleShiftBlock(LayerBlock):
    """The affine parameters of a normalisation layer: ``y = gamma * xhat + beta`` per channel ``c``.

    Not a Kronecker view (:attr:`curvature` ``"channel"``; used by KFAC, Algorithm 12, in place of
    ``Omega (x) Gamma``, which for a 2-vector input and a scalar output would only approximate
    this 2 x 2 block at the same cost): each channel's ``(gamma_c, beta_c)``
    (or ``gamma_c`` alone without a bias) gets its own dense ``k x k`` block (``k`` = 2 or 1) of the
    Fisher, built from the exact per-row gradients ``u = dL/dy_c * [xhat_c, 1]`` that
    :meth:`gradient_rows` returns: one row per example and location (``expand``) or per example
    (``reduce``, the sum over its locations). A subclass says how the input is normalised
    (:meth:`normalized`) and where the channels sit (:meth:`channel_rows`).
    """

    curvature = "channel"

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        if getattr(module, "weight", None) is None:
            return "no affine parameters"
        return None

    @property
    def channels(self) -> int:
        """``C``: the number of ``(gamma_c, beta_c)`` pairs."""
        return self.weight.numel()

    @property
    def input_dim(self) -> int:
        return 2 if self.has_bias else 1

    @property
    def output_dim(self) -> int:
        return self.channels

    def normalized(self, a: Tensor) -> Tensor:
        """``xhat``: the layer input normalised as in the forward pass, before the affine map."""
        raise NotImplementedError(f"{type(self).__name__} must define normalized")

    def channel_rows(self, t: Tensor) -> Tensor:
        """``t`` (shaped like the input) as ``(rows, C)``: one row per example and location,
        example-major when :attr:`example_major`."""
        return t.movedim(1, -1).reshape(-1, self.channels)  # (m, C, *) -> (m |T|, C)

    def gradient_rows(
        self, a: Tensor, dh: Tensor, batch_size: int | None = None, per_example: bool = False
    ) -> Tensor:
        """``(rows, C, k)``: the gradient of the loss with respect to ``(gamma_c, beta_c)`` from each
        row (example and location), or from each example (``per_example``: summed over its
        locations, which needs example-major rows and the batch size)."""
        xhat = self.channel_rows(self.normalized(a).to(dh.dtype))
        dy = self.channel_rows(dh)
        u = torch.stack([dy * xhat, dy] if self.has_bias else [dy * xhat], dim=-1)
        if per_example:
            m = u.shape[0] if batch_size is None else batch_size
            u = u.view(m, -1, *u.shape[1:]).sum(1)
        return u

    def gradient_gram(
        self, a: Tensor, dh: Tensor, batch_size: int | None = None, per_example: bool = False
    ) -> Tensor:
        """``sum_r u_r u_r^T`` per channel, ``(C, k, k)``, over the rows of :meth:`gradient_rows`,
        from three column sums instead of the stacked rows (the fast form KFAC uses)."""
        xhat = self.channel_rows(self.normalized(a).to(dh.dtype))
        dy = self.channel_rows(dh)
        g = dy * xhat  # dL/dgamma_c per row
        if per_example:
            m = g.shape[0] if batch_size is None else batch_size
            g, dy = g.view(m, -1, self.channels).sum(1), dy.view(m, -1, self.channels).sum(1)
        gg = torch.linalg.vecdot(g, g, dim=0)
        if not self.has_bias:
            return gg.view(-1, 1, 1)
        gb, bb = torch.linalg.vecdot(g, dy, dim=0), torch.linalg.vecdot(dy, dy, dim=0)
        return torch.stack([gg, gb, gb, bb], dim=-1).view(-1, 2, 2)

    def num_locations(self, h: Tensor, batch_size: int | None = None) -> int:
        return h.numel() // ((h.shape[0] if batch_size is None else batch_size) * self.channels)

    def grad_matrix(self, weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
        """``(C, k)``: ``[dgamma_c, dbeta_c]`` per channel."""
        cols = [weight_grad.reshape(-1)] + ([bias_grad.reshape(-1)] if bias_grad is not None else [])
        return torch.stack(cols, dim=1)

    def split_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        w, b = self.weight, self.bias
        return mat[:, 0].reshape(w.shape), (mat[:, 1].reshape(b.shape) if b is not None else None)


class BatchNormBlock(ScaleShiftBlock):
    """``nn.BatchNorm1d/2d/3d``: ``xhat`` from the batch's statistics in training mode (the running
    ones in eval mode); channels on dimension 1. ``nn.SyncBatchNorm`` normalises with statistics of
    all ranks, which the captured local input cannot reproduce: not modeled."""

    module: nn.modules.batchnorm._BatchNorm

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        if isinstance(module, nn.SyncBatchNorm):
            return "statistics synchronised across ranks"
        return super().unsupported(module)

    def normalized(self, a: Tensor) -> Tensor:
        bn = self.module
        batch = bn.training or bn.running_mean is None
        return F.batch_norm(
            a,
            None if batch else bn.running_mean,
            None if batch else bn.running_var,
            training=batch,
            momentum=0.0,
            eps=bn.eps,
        )


class GroupNormBlock(ScaleShiftBlock):
    """``nn.GroupNorm``: ``xhat`` per example and group; channels on dimension 1."""

    module: nn.GroupNorm

    def normalized(self, a: Tensor) -> Tensor:
        return F.group_norm(a, self.module.num_groups, eps=self.module.eps)


class LayerNormBlock(ScaleShiftBlock):
    """``nn.LayerNorm`` (and ``nn.RMSNorm``): ``xhat`` per row over ``normalized_shape``, whose
    ``numel`` entries are the channels; all leading dimensions are rows (batch first, then the
    locations, unless :attr:`example_major` says otherwise)."""

    module: nn.LayerNorm

    def normalized(self, a: Tensor) -> Tensor:
        return F.layer_norm(a, self.module.normalized_shape, eps=self.module.eps)

    def channel_rows(self, t: Tensor) -> Tensor:
        return t.reshape(-1, self.channels)


class RMSNormBlock(LayerNormBlock):
    """``nn.RMSNorm``: ``xhat = x / rms(x)`` over ``normalized_shape``; a scale only."""

    def normalized(self, a: Tensor) -> Tensor:
        return F.rms_norm(a, self.module.normalized_shape, eps=self.module.eps)


class RecurrentBlock(LayerBlock):
    """``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``: each weight matrix is a Linear map applied at every
    time step, one block per matrix (:class:`RecurrentPartBlock`, named ``rnn[ih_l0]``,
    ``rnn[hh_l0]``, ``rnn[ih_l0_reverse]``, ...), each step a location (``expand``): the
    independence-across-time approximation of Martens, Ba and Johnson (ICLR 2018), under which
    each part is an FC layer of Algorithm 12 (KFAC) and Algorithm 9 (K-BFGS) with ``|T|`` = steps.

    The fused kernel never exposes the gates, so while a pass is recorded the module runs
    :func:`unrolled_rnn`, the same recurrence written step by step (equal to round-off), which
    hands each part its input rows (``x_t`` for ``ih``, ``h_{t-1}`` for ``hh``) and the tensor of
    its outputs. ``proj_size > 0`` and ``PackedSequence`` inputs are not modeled.
    """

    module: nn.RNNBase

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        assert isinstance(module, nn.RNNBase)
        if getattr(module, "proj_size", 0):
            return f"proj_size={module.proj_size}"
        return None

    @property
    def weight(self) -> Tensor:
        return self.module.weight_ih_l0

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias_ih_l0", None) if self.module.bias else None

    def parameters(self) -> list[Tensor]:
        return [p for part in self.split() for p in part.parameters()]

    def split(self) -> list[LayerBlock]:
        m = self.module
        sfx = [
            f"_l{k}{'_reverse' if d else ''}" for k in range(m.num_layers) for d in range(1 + m.bidirectional)
        ]
        return [RecurrentPartBlock(m, kind + s) for s in sfx for kind in ("ih", "hh")]

    def input_rows(self, a: Tensor, bias: bool | None = None) -> Tensor:
        raise NotImplementedError("a recurrent layer is modeled through its parts (split())")

    def output_rows(self, h: Tensor) -> Tensor:
        raise NotImplementedError("a recurrent layer is modeled through its parts (split())")


class RecurrentPartBlock(LayerBlock):
    """One weight matrix of a recurrent layer (``key`` ``"ih_l0"``, ``"hh_l1_reverse"``, ...): a
    Linear map whose captured input is ``(m, T, D)`` (``x_t`` or ``h_{t-1}``) and output
    ``(m, T, G)``; its rows run example by example."""

    module: nn.RNNBase
    #: captured by running the module unrolled (:func:`unrolled_rnn`) while a pass is recorded
    unrolled = True

    def __init__(self, module: nn.RNNBase, key: str) -> None:
        super().__init__(module)
        self.key = key
        self.part = f"[{key}]"

    @property
    def weight(self) -> Tensor:
        return getattr(self.module, "weight_" + self.key)

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias_" + self.key) if self.module.bias else None

    def input_rows(self, a: Tensor, bias: bool | None = None) -> Tensor:
        return self.homogeneous(a.reshape(-1, a.shape[-1]), bias)

    def output_rows(self, h: Tensor) -> Tensor:
        return h.reshape(-1, h.shape[-1])


RNNHook = Callable[[Tensor, Tensor], None]


def unrolled_rnn(module: nn.RNNBase, hooks: dict[str, RNNHook]) -> Callable[..., Any]:
    """A ``forward`` for ``module`` (an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``) that runs the
    recurrence step by step and calls ``hooks[key](inputs, outputs)`` for each weight matrix
    (``key`` as :class:`RecurrentPartBlock`): ``inputs`` the detached ``(m, T, D)`` rows, ``outputs``
    an ``(m, T, G)`` tensor of the graph whose gradient is ``dL/d(W_key rows + b_key)``."""

    def forward(input: Any, hx: Any = None) -> Any:
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise ValueError(
                f"a PackedSequence input to {type(module).__name__} cannot be captured by its "
                "recurrent blocks; exclude the layer (exclude=[...]) or pad the sequences"
            )
        unbatched = input.dim() == 2
        x = input.unsqueeze(0 if module.batch_first else 1) if unbatched else input
        if module.batch_first:
            x = x.transpose(0, 1)  # (T, m, I)
        steps, m = x.shape[:2]
        dirs, size, lstm = 1 + module.bidirectional, module.hidden_size, module.mode == "LSTM"
        zeros = x.new_zeros(module.num_layers * dirs, m, size)
        if hx is None:
            h0, c0 = zeros, zeros
        else:
            h0, c0 = hx if lstm else (hx, None)
            if unbatched:
                h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
        h_n, c_n = [], []
        layer_in = x
        for k in range(module.num_layers):
            outs = []
            for d in range(dirs):
                sfx = f"_l{k}{'_reverse' if d else ''}"
                w_ih, w_hh = getattr(module, "weight_ih" + sfx), getattr(module, "weight_hh" + sfx)
                b_ih = getattr(module, "bias_ih" + sfx) if module.bias else None
                b_hh = getattr(module, "bias_hh" + sfx) if module.bias else None
                seq = (layer_in.flip(0) if d else layer_in).transpose(0, 1)  # (m, T, D)
                z_ih = F.linear(seq, w_ih, b_ih)  # all steps at once, (m, T, G)
                hook = hooks.get("hh" + sfx)
                eps = None  # dL/d(eps_t) = dL/d(W_hh h_{t-1} + b_hh) at step t
                if hook is not None and torch.is_grad_enabled():
                    eps = z_ih.new_zeros(z_ih.shape, requires_grad=True)
                h = h0[k * dirs + d]
                c = c0[k * dirs + d] if lstm else None
                prev, out = [], []
                for t in range(steps):
                    prev.append(h)
                    z_hh = F.linear(h, w_hh, b_hh)
                    if eps is not None:
                        z_hh = z_hh + eps[:, t]
                    h, c = _cell(module.mode, z_ih[:, t], z_hh, h, c)
                    out.append(h)
                if "ih" + sfx in hooks:
                    hooks["ih" + sfx](seq.detach(), z_ih)
                if eps is not None:
                    hook(torch.stack(prev, 1).detach(), eps)  # type: ignore[misc]
                seq_out = torch.stack(out, 0)  # (T, m, H)
                outs.append(seq_out.flip(0) if d else seq_out)
                h_n.append(h)
                c_n.append(c)
            layer_in = torch.cat(outs, -1) if dirs > 1 else outs[0]
            if k < module.num_layers - 1 and module.dropout and module.training:
                layer_in = F.dropout(layer_in, module.dropout, True)
        output = layer_in.transpose(0, 1) if module.batch_first else layer_in
        hn = torch.stack(h_n)
        cn = torch.stack(c_n) if lstm else None  # type: ignore[arg-type]
        if unbatched:
            output = output.squeeze(0 if module.batch_first else 1)
            hn, cn = hn.squeeze(1), (cn.squeeze(1) if cn is not None else None)
        return (output, (hn, cn)) if lstm else (output, hn)

    return forward


def _cell(mode: str, zi: Tensor, zh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One step of ``nn.LSTM`` (gates i, f, g, o), ``nn.GRU`` (r, z, n) or ``nn.RNN``."""
    if mode == "LSTM":
        i, f, g, o = (zi + zh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        ri, ui, ni = zi.chunk(3, -1)
        rh, uh, nh = zh.chunk(3, -1)
        r, u = torch.sigmoid(ri + rh), torch.sigmoid(ui + uh)
        n = torch.tanh(ni + r * nh)
        return (1 - u) * n + u * h, None
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(zi + zh), None


class MultiheadCrossAttentionBlock(MultiheadAttentionBlock):
    """``nn.MultiheadAttention`` used as cross-attention (``nn.TransformerDecoderLayer``'s
    ``multihead_attn``, or a subclass registered with this block): the query differs from the key
    and value, so ``F.multi_head_attention_forward`` projects with row slices of
    ``in_proj_weight``: ``W_q`` (rows ``0:E``) on the query and ``W_kv`` (rows ``E:3E``) on the
    memory when key and value are one tensor. One block per slice
    (:class:`AttentionProjectionBlock`, named ``attn[q]`` and ``attn[kv]``), each over the
    positions of its own input; ``out_proj`` is a Linear block as in self-attention. A key that
    is not the value tensor (three projections) is not captured."""

    def split(self) -> list[LayerBlock]:
        e = self.module.embed_dim
        return [
            AttentionProjectionBlock(self.module, "q", slice(0, e)),
            AttentionProjectionBlock(self.module, "kv", slice(e, 3 * e)),
        ]


class AttentionProjectionBlock(MultiheadAttentionBlock):
    """Rows ``rows`` of ``in_proj_weight`` (and ``in_proj_bias``): one projection of a
    cross-attention, captured where that slice enters ``F.linear``."""

    def __init__(self, module: nn.MultiheadAttention, name: str, rows: slice) -> None:
        super().__init__(module)
        self.part = f"[{name}]"
        self._rows = rows

    @property
    def weight(self) -> Tensor:
        return self.module.in_proj_weight[self._rows]  # type: ignore[index]

    @property
    def bias(self) -> Tensor | None:
        b = self.module.in_proj_bias
        return None if b is None else b[self._rows]

    def parameters(self) -> list[Tensor]:
        m = self.module
        return [m.in_proj_weight] if m.in_proj_bias is None else [m.in_proj_weight, m.in_proj_bias]  # type: ignore[list-item]

    @property
    def functional_key(self) -> tuple[int, int, int]:
        return (id(self.module.in_proj_weight), self._rows.start, self._rows.stop - self._rows.start)

    def grad_matrix(self, weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
        return super().grad_matrix(
            weight_grad[self._rows], None if bias_grad is None else bias_grad[self._rows]
        )


# ---------------------------------------------------------------------- the registry
_REGISTRY: dict[type[nn.Module], type[LayerBlock]] = {}
_BUILT_IN: dict[type[nn.Module], type[LayerBlock]] = {
    nn.Linear: LinearBlock,
    nn.Conv1d: Conv1dBlock,
    nn.Conv2d: Conv2dBlock,
    nn.Embedding: EmbeddingBlock,
    nn.MultiheadAttention: MultiheadAttentionBlock,
    nn.modules.batchnorm._BatchNorm: BatchNormBlock,
    nn.GroupNorm: GroupNormBlock,
    nn.LayerNorm: LayerNormBlock,
    nn.LSTM: RecurrentBlock,
    nn.GRU: RecurrentBlock,
    nn.RNN: RecurrentBlock,
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4; the project accepts torch >= 2.1
    _BUILT_IN[nn.RMSNorm] = RMSNormBlock
_REGISTRY.update(_BUILT_IN)

BlockT = TypeVar("BlockT", bound=type[LayerBlock])


def register_layer(
    module_type: type[nn.Module], block: BlockT | None = None
) -> BlockT | Callable[[BlockT], BlockT]:
    """Model every module of ``module_type`` (and of its subclasses) with ``block``.

    Use it as a call, ``register_layer(MyLayer, MyBlock)``, or as a class decorator of the
    block, ``@register_layer(MyLayer)``. A later registration of the same type replaces the
    earlier one (built-in types included); :func:`unregister_layer` removes it. Optimizers look
    blocks up when they are constructed.

    Raises:
        ValueError: ``module_type`` is not an ``nn.Module`` subclass, or ``block`` not a
            :class:`LayerBlock` subclass.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"module_type must be an nn.Module subclass, got {module_type!r}")

    def add(cls: BlockT) -> BlockT:
        if not (isinstance(cls, type) and issubclass(cls, LayerBlock)):
            raise ValueError(f"block must be a LayerBlock subclass, got {cls!r}")
        needed = ("normalized",) if cls.curvature == "channel" else ("input_rows", "output_rows")
        base = ScaleShiftBlock if cls.curvature == "channel" else LayerBlock
        missing = [m for m in needed if getattr(cls, m) is getattr(base, m)]
        if missing:
            raise ValueError(f"block {cls.__name__} must define {' and '.join(missing)}")
        _REGISTRY[module_type] = cls
        return cls

    return add if block is None else add(block)


def unregister_layer(module_type: type[nn.Module]) -> None:
    """Forget the block registered for ``module_type`` (a built-in type gets its built-in block back).

    Raises:
        ValueError: nothing is registered for ``module_type``.
    """
    if module_type not in _REGISTRY:
        raise ValueError(f"module_type: no block is registered for {module_type!r}")
    if module_type in _BUILT_IN:
        _REGISTRY[module_type] = _BUILT_IN[module_type]
    else:
        del _REGISTRY[module_type]


def registered_layers() -> dict[type[nn.Module], type[LayerBlock]]:
    """A copy of the registry: module type -> block class."""
    return dict(_REGISTRY)


def block_type_for(module: nn.Module) -> type[LayerBlock] | None:
    """The block class registered for ``module``'s type or its nearest registered base class."""
    for cls in type(module).__mro__:
        block = _REGISTRY.get(cls)  # type: ignore[arg-type]
        if block is not None:
            return block
    return None


def block_for(module: nn.Module) -> LayerBlock | None:
    """The block that models ``module``, or ``None`` (no block registered, or this configuration
    is unsupported)."""
    cls = block_type_for(module)
    if cls is None or cls.unsupported(module) is not None:
        return None
    return cls(module)
