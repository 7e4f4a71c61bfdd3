"""What the two passes of a K-BFGS curvature step give each layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class _Pass1:
    """What pass 1 gives one layer on a curvature step."""

    inputs: Tensor  # the layer input a (detached), for A~ v
    batch_size: int  # m, the examples behind ``inputs``
    out_hw: tuple[int, ...]  # spatial shape of h (conv) or () (FC)
    locations: int  # |T|
    h_mean: Tensor  # hbar, (d_o,)
    g_mean: Tensor  # Dhbar = mean of g_n, (d_o,)
    a_mean: Tensor  # abar, (D,)
    g_abs: Tensor  # E|g_n|, the round-off scale of Dhbar, (d_o,)


@dataclass
class _Pass2:
    """What the second pass (at theta_{k+1}) gives one layer."""

    h_mean: Tensor  # hbar+
    g_mean: Tensor  # Dhbar+
    g_abs: Tensor  # E|g+|

    def tensors(self) -> list[Tensor]:
        return [self.h_mean, self.g_mean, self.g_abs]
