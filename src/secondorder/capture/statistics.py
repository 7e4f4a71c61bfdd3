"""Layer statistics from captured tensors: spatial means and the input second moment ``A``.

Pure functions of a ``Linear``/``Conv2d`` module's configuration and the tensors that
:class:`~secondorder.capture.hooks.Capture` records (``a``, ``h``, ``dL/dh``). With ``abar_{n,t}``
the patch of example ``n`` at output location ``t`` (the homogeneous 1 appended when the layer
has a bias; ``t`` ranges over one location for a plain FC layer):

* :func:`spatial_mean` -- the mean over examples and locations of ``h`` or ``dL/dh``, ``(d_o,)``;
* :func:`spatial_abs_mean` -- the same mean of ``|h|`` or ``|dL/dh|``: the scale of the rounding
  error in :func:`spatial_mean`;
* :func:`input_mean` -- ``abar``, the mean over examples and locations of the patches, ``(D,)``;
* :func:`input_action` -- ``A v`` with ``A = (1/m) sum_{n,t} abar_{n,t} abar_{n,t}^T`` (thesis
  (3.14)-(3.15)), without forming ``A`` or im2col;
* :func:`input_gram` -- ``A`` itself, dense (conv: im2col in chunks of examples).

Nothing here is specific to one method.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..linalg import bfgs as B
from ..linalg.kron import gram, gram_
from . import hooks as C


def conv_kwargs(module: nn.Conv2d) -> dict[str, Any]:
    """The geometry of a conv layer as keyword arguments of ``F.conv2d`` and ``conv2d_weight``."""
    return dict(stride=module.stride, padding=C.conv_padding(module), dilation=module.dilation)


def spatial_mean(module: C.Modeled, h: Tensor) -> Tensor:
    """The mean over examples and locations of ``h`` (or ``dL/dh``): ``(d_o,)``.

    (A sum divided by the count: on CPU ``Tensor.mean(0)`` is much slower than ``sum(0)``.)
    """
    if isinstance(module, nn.Conv2d):
        return h.sum((0, 2, 3)).div_(h.numel() // h.shape[1])
    rows = h.reshape(-1, h.shape[-1])
    return rows.sum(0).div_(rows.shape[0])


def spatial_abs_mean(module: C.Modeled, h: Tensor) -> Tensor:
    """The mean over examples and locations of ``|h|`` (or ``|dL/dh|``): ``(d_o,)``.

    The rounding error of :func:`spatial_mean` in component ``c`` is at most a small multiple of
    the unit round-off times this mean (the sum of the magnitudes it adds up, over the count), so
    a difference of two spatial means below that level carries no information.
    """
    if isinstance(module, nn.Conv2d):
        return torch.linalg.vector_norm(h, 1, dim=(0, 2, 3)).div_(h.numel() // h.shape[1])
    rows = h.reshape(-1, h.shape[-1])
    return torch.linalg.vector_norm(rows, 1, dim=0).div_(rows.shape[0])


def input_mean(module: C.Modeled, a: Tensor, out_hw: tuple[int, ...]) -> Tensor:
    """``abar``: the mean over examples and locations of the ``abar_{n,t}`` rows (with the 1).

    Args:
        module: the layer.
        a: its input, ``(m, ...)``.
        out_hw: the spatial shape of its output (conv) or ``()`` (FC).
    """
    if isinstance(module, nn.Conv2d):
        ones = a.new_ones(a.shape[0], 1, *out_hw)
        shape = (1, *module.weight.shape[1:])
        total = torch.nn.grad.conv2d_weight(a, shape, ones, **conv_kwargs(module)).reshape(-1)
        mean = total.div_(ones.numel())
    else:
        rows = a.reshape(-1, a.shape[-1])
        mean = rows.sum(0).div_(rows.shape[0])
    if C.has_bias(module):
        mean = torch.cat([mean, mean.new_ones(1)])
    return mean


def input_action(module: C.Modeled, a: Tensor, v: Tensor) -> Tensor:
    """(3.15): ``A v = (1/m) sum_{n,t} abar_{n,t} (abar_{n,t}^T v)`` without forming ``A`` or im2col.

    For conv layers ``abar_t^T v`` is a one-filter convolution and the sum over ``(n, t)`` is that
    filter's weight gradient.
    """
    m = a.shape[0]
    bias = C.has_bias(module)
    if isinstance(module, nn.Conv2d):
        shape = (1, *module.weight.shape[1:])
        d0 = module.weight[0].numel()
        vw = v[:d0].reshape(shape)
        u = F.conv2d(a, vw, v[d0:] if bias else None, **conv_kwargs(module))
        out = torch.nn.grad.conv2d_weight(a, shape, u, **conv_kwargs(module)).reshape(-1)
        if bias:
            out = torch.cat([out, u.sum().reshape(1)])
        return out.div_(m)
    return B.gram_action(a.reshape(-1, a.shape[-1]), v, 1.0 / m, bias)


def input_gram(module: C.Modeled, a: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """``A = (1/m) sum_{n,t} abar_{n,t} abar_{n,t}^T``, dense ``(D, D)``.

    Conv layers unfold ``chunk_elements`` patch entries at a time, so memory stays bounded.
    """
    m = a.shape[0]
    if not isinstance(module, nn.Conv2d):
        return gram(C.input_rows(module, a), 1.0 / m)
    dim = C.input_dim(module)
    out = a.new_zeros(dim, dim)
    per_example = C.patches(module, a[:1]).numel()
    step = max(1, chunk_elements // max(1, per_example))
    for i in range(0, m, step):
        gram_(out, C.input_rows(module, a[i : i + step]), 1.0)
    return out.div_(m)
