"""Layer statistics from captured tensors: spatial means and the input second moment ``A``.

Pure functions of a modeled module's configuration and the tensors that
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

Each function asks the module's :class:`~secondorder.capture.blocks.LayerBlock`, which
holds the layer-specific forms (Conv2d: ``conv2d_weight`` instead of im2col). Nothing here is
specific to one method.
"""

from __future__ import annotations

from torch import Tensor

from . import hooks as C
from .blocks import conv_kwargs as conv_kwargs  # re-exported


def spatial_mean(module: C.Modeled, h: Tensor) -> Tensor:
    """The mean over examples and locations of ``h`` (or ``dL/dh``): ``(d_o,)``."""
    return C.block(module).spatial_mean(h)


def spatial_abs_mean(module: C.Modeled, h: Tensor) -> Tensor:
    """The mean over examples and locations of ``|h|`` (or ``|dL/dh|``): ``(d_o,)``.

    The rounding error of :func:`spatial_mean` in component ``c`` is at most a small multiple of
    the unit round-off times this mean (the sum of the magnitudes it adds up, over the count), so
    a difference of two spatial means below that level carries no information.
    """
    return C.block(module).spatial_abs_mean(h)


def input_mean(module: C.Modeled, a: Tensor, out_hw: tuple[int, ...]) -> Tensor:
    """``abar``: the mean over examples and locations of the ``abar_{n,t}`` rows (with the 1).

    Args:
        module: the layer.
        a: its input, ``(m, ...)``.
        out_hw: the spatial shape of its output (conv) or ``()`` (FC).
    """
    return C.block(module).input_mean(a, out_hw)


def input_action(module: C.Modeled, a: Tensor, v: Tensor) -> Tensor:
    """(3.15): ``A v = (1/m) sum_{n,t} abar_{n,t} (abar_{n,t}^T v)`` without forming ``A`` or im2col.

    For conv layers ``abar_t^T v`` is a one-filter convolution and the sum over ``(n, t)`` is that
    filter's weight gradient.
    """
    return C.block(module).input_action(a, v)


def input_gram(module: C.Modeled, a: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """``A = (1/m) sum_{n,t} abar_{n,t} abar_{n,t}^T``, dense ``(D, D)``.

    Conv layers unfold ``chunk_elements`` patch entries at a time, so memory stays bounded.
    """
    return C.block(module).input_gram(a, chunk_elements)
