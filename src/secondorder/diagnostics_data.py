"""Synthetic 16x16 digits: a seeded, offline stand-in for the down-scaled MNIST of Figure 4.1.

Nothing is downloaded. Each of the ten digits is a set of pen strokes (polylines in the unit
square, ``x`` to the right, ``y`` down). A sample draws a class, a random affine jitter
(rotation, anisotropic scale, shear, translation) and a stroke width, renders the strokes as
a soft distance field on the ``16 x 16`` pixel centres (a Gaussian profile, which acts as the
blur), adds a little pixel noise and clips to ``[0, 1]``. The images are labelled "synthetic"
wherever they are reported: they are not MNIST, only MNIST-like.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SOURCE = "synthetic 16x16 digits (stroke renderings with random affine jitter and blur; not MNIST)"


def _arc(
    cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 14
) -> list[tuple[float, float]]:
    """Points on an elliptic arc from angle ``a0`` to ``a1`` (radians, ``y`` down: ``3 pi/2`` is the top)."""
    return [
        (cx + rx * math.cos(a0 + (a1 - a0) * i / (n - 1)), cy + ry * math.sin(a0 + (a1 - a0) * i / (n - 1)))
        for i in range(n)
    ]


PI = math.pi
#: pen strokes of each digit: a list of polylines in the unit square
STROKES: dict[int, list[list[tuple[float, float]]]] = {
    0: [_arc(0.5, 0.5, 0.24, 0.36, 0.0, 2 * PI, 20)],
    1: [[(0.36, 0.25), (0.52, 0.12), (0.52, 0.88)]],
    2: [_arc(0.5, 0.34, 0.23, 0.21, PI, 2.2 * PI) + [(0.24, 0.87), (0.78, 0.87)]],
    3: [_arc(0.49, 0.3, 0.2, 0.17, 1.1 * PI, 2.5 * PI), _arc(0.49, 0.66, 0.23, 0.21, 1.5 * PI, 2.9 * PI)],
    4: [[(0.63, 0.88), (0.63, 0.12), (0.2, 0.64), (0.8, 0.64)]],
    5: [[(0.75, 0.13), (0.33, 0.13), (0.3, 0.47)], _arc(0.5, 0.65, 0.23, 0.21, 1.2 * PI, 2.85 * PI)],
    6: [_arc(0.52, 0.5, 0.25, 0.38, 1.65 * PI, 0.6 * PI), _arc(0.5, 0.67, 0.21, 0.2, 0.0, 2 * PI, 16)],
    7: [[(0.22, 0.13), (0.78, 0.13), (0.42, 0.88)]],
    8: [_arc(0.5, 0.3, 0.18, 0.17, 0.0, 2 * PI, 16), _arc(0.5, 0.68, 0.22, 0.2, 0.0, 2 * PI, 16)],
    9: [_arc(0.49, 0.33, 0.21, 0.2, 0.0, 2 * PI, 16), [(0.7, 0.33), (0.65, 0.88)]],
}


def _segments() -> tuple[Tensor, Tensor]:
    """All stroke segments per class, padded: ``(10, S, 2, 2)`` endpoints and a ``(10, S)`` validity mask."""
    per_class = []
    for c in range(10):
        segs = [(a, b) for line in STROKES[c] for a, b in zip(line[:-1], line[1:], strict=True)]
        per_class.append(segs)
    s_max = max(len(s) for s in per_class)
    ends = torch.zeros(10, s_max, 2, 2, dtype=torch.float64)
    mask = torch.zeros(10, s_max, dtype=torch.bool)
    for c, segs in enumerate(per_class):
        ends[c, : len(segs)] = torch.tensor(segs, dtype=torch.float64)
        mask[c, : len(segs)] = True
    return ends, mask


def synthetic_digits(
    n: int, *, seed: int = 0, size: int = 16, noise: float = 0.08, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``n`` seeded synthetic digit images and their labels.

    Args:
        n: number of images (classes drawn uniformly).
        seed: the generator seed; the same seed gives the same images.
        size: image side in pixels (16 for Figure 4.1).
        noise: standard deviation of the additive pixel noise.
        dtype: dtype of the images.

    Returns:
        ``(x, y)``: images ``(n, size * size)`` in ``[0, 1]`` (row-major pixels) and labels ``(n,)``.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    ends, mask = _segments()

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    angle = uniform(-0.35, 0.35)
    sx, sy = uniform(0.7, 1.1), uniform(0.75, 1.1)
    shear = uniform(-0.35, 0.35)
    shift = torch.stack([uniform(-0.1, 0.1), uniform(-0.1, 0.1)], dim=1)
    width = uniform(0.04, 0.08)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # A = R(angle) [[1, shear], [0, 1]] diag(sx, sy), applied about the centre of the square
    a = torch.stack(
        [
            torch.stack([cos * sx, (cos * shear - sin) * sy], 1),
            torch.stack([sin * sx, (sin * shear + cos) * sy], 1),
        ],
        1,
    )
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    py, px = torch.meshgrid(centres, centres, indexing="ij")
    pixels = torch.stack([px.reshape(-1), py.reshape(-1)], dim=1)  # (P, 2) as (x, y)

    images = torch.empty(n, size * size, dtype=torch.float64)
    for start in range(0, n, 512):
        idx = slice(start, min(n, start + 512))
        seg = ends[y[idx]] - 0.5  # (b, S, 2, 2)
        seg = torch.einsum("bij,bskj->bski", a[idx], seg) + 0.5 + shift[idx, None, None, :]
        p0, d = seg[:, :, 0], seg[:, :, 1] - seg[:, :, 0]  # (b, S, 2)
        rel = pixels[None, None] - p0[:, :, None]  # (b, S, P, 2)
        t = ((rel * d[:, :, None]).sum(-1) / (d * d).sum(-1).clamp_min(1e-12)[:, :, None]).clamp(0, 1)
        dist2 = (rel - t[..., None] * d[:, :, None]).pow(2).sum(-1)  # (b, S, P)
        dist2 = dist2.masked_fill(~mask[y[idx]][:, :, None], float("inf"))
        ink = torch.exp(-dist2.min(dim=1).values / (2 * width[idx, None] ** 2))
        images[idx] = ink
    images += noise * torch.randn(images.shape, generator=g, dtype=torch.float64)
    return images.clamp_(0, 1).to(dtype), y
