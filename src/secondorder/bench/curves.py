"""Offline synthetic CURVES (``curves-synth-v1``): the recipe of docs/datasets.md §1.3.

The real CURVES set (``digs3pts_1.mat``, Hinton & Salakhutdinov 2006) has no public generator.
This is a calibrated reconstruction, *not* the original: it matches the shapes (28x28, 20,000
train / 10,000 test), the value range ([0, 1], about 80 % exact zeros), the intrinsic dimension
(6 numbers per image) and the paper's PCA-18 reconstruction error (5.90 per image). Its losses
are not comparable with the thesis's; every output labels it ``curves-synth-v1`` (synthetic).

Recipe, per image:

1. three points ``P0, P1, P2`` i.i.d. uniform in ``[lo, hi]^2`` (the unit square mapped onto the
   pixel centres ``0 .. 27``); these six numbers are the latent code (kept in ``latent``);
2. a smooth curve through them: the quadratic Bezier ``B(t) = (1-t)^2 P0 + 2t(1-t) P1 + t^2 P2``
   (``family="bezier"``) or the parabola through the three points at ``t = 0, 1/2, 1``
   (``family="parabola"``);
3. ``T`` samples ``t_k`` in ``[0, 1]``, each with ink weight equal to its local arc length;
4. each sample splatted with an isotropic Gaussian of width ``sigma`` pixels, scaled so that an
   infinitely long straight stroke has peak intensity ``gain``
   (``c = gain / (sigma sqrt(2 pi))``); the Gaussian is separable, so an image is
   ``Gy^T diag(w) Gx``;
5. clipped to ``[0, 1]``; no noise, no binarisation.

Train and test images come from two independent streams spawned from one seed, so the first
``n`` training images do not depend on how many are generated (a smaller sample is a prefix of
the full set). Images are stored row-major (the real file is MATLAB column-major; irrelevant
for the MLP autoencoder).

Calibration (full size, PCA fitted on the training set, squared error per test image): see
:func:`calibration` and the README (``PCA-18`` in ``[5, 7]``, mean pixel in ``[0.04, 0.07]``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

VERSION = "curves-synth-v1"
SIDE = 28


class CurveFamily(str, enum.Enum):
    BEZIER = "bezier"
    PARABOLA = "parabola"


@dataclass(frozen=True)
class CurvesParams:
    """Parameters of the generator (defaults: docs/datasets.md §1.3's suggested setting).

    Attributes:
        family: ``"bezier"`` (default) or ``"parabola"``.
        lo, hi: the point range in the unit square (0.1, 0.9).
        sigma: stroke width in pixels (1.1).
        gain: peak intensity of a long straight stroke before clipping (1.0).
        samples: ``T``, samples along each curve (128).
        min_chord: reject draws whose end points are closer than this (unit-square units; 0 = off).
        seed: base seed (0).
        n_train, n_test: 20,000 and 10,000 as in the real set.
    """

    family: str = CurveFamily.BEZIER.value
    lo: float = 0.1
    hi: float = 0.9
    sigma: float = 1.1
    gain: float = 1.0
    samples: int = 128
    min_chord: float = 0.0
    seed: int = 0
    n_train: int = 20_000
    n_test: int = 10_000

    def __post_init__(self) -> None:
        CurveFamily(self.family)
        if not 0.0 <= self.lo < self.hi <= 1.0:
            raise ValueError(f"curves: need 0 <= lo < hi <= 1, got lo={self.lo}, hi={self.hi}")
        if self.sigma <= 0 or self.gain <= 0:
            raise ValueError(f"curves: sigma and gain must be > 0, got {self.sigma}, {self.gain}")
        if self.samples < 2 or self.n_train < 1 or self.n_test < 1:
            raise ValueError("curves: samples >= 2 and n_train, n_test >= 1 are required")
        if not 0.0 <= self.min_chord < (self.hi - self.lo) * np.sqrt(2):
            raise ValueError(f"curves: min_chord must be in [0, {(self.hi - self.lo) * np.sqrt(2):.3f})")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A short hash of the parameters and the generator version (the cache file name)."""
        blob = json.dumps({"version": VERSION, **self.as_dict()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class CurvesData:
    """Generated images (float32, ``(n, 784)`` in ``[0, 1]``) and their 6-number latent codes."""

    x_train: np.ndarray
    x_test: np.ndarray
    latent_train: np.ndarray
    latent_test: np.ndarray
    params: CurvesParams
    sha256: str


def _draw_points(rng: np.random.Generator, n: int, p: CurvesParams) -> np.ndarray:
    """``(n, 3, 2)`` control points in unit-square coordinates, with the optional chord rejection."""
    pts = rng.uniform(p.lo, p.hi, size=(n, 3, 2))
    if p.min_chord > 0:
        bad = np.linalg.norm(pts[:, 2] - pts[:, 0], axis=1) < p.min_chord
        while bad.any():
            pts[bad] = rng.uniform(p.lo, p.hi, size=(int(bad.sum()), 3, 2))
            bad = np.linalg.norm(pts[:, 2] - pts[:, 0], axis=1) < p.min_chord
    return pts


def _basis(family: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights of ``P0, P1, P2`` in ``B(t)`` and in ``B'(t)``, each ``(T, 3)``."""
    if family == CurveFamily.BEZIER.value:
        b = np.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], axis=1)
        db = np.stack([-2 * (1 - t), 2 - 4 * t, 2 * t], axis=1)
    else:  # Lagrange parabola through the points at t = 0, 1/2, 1
        b = np.stack([2 * t**2 - 3 * t + 1, -4 * t**2 + 4 * t, 2 * t**2 - t], axis=1)
        db = np.stack([4 * t - 3, -8 * t + 4, 4 * t - 1], axis=1)
    return b, db


def render(points: np.ndarray, p: CurvesParams) -> np.ndarray:
    """Images ``(n, 784)`` float32 for control points ``(n, 3, 2)`` (unit-square coordinates)."""
    t = np.linspace(0.0, 1.0, p.samples)
    b, db = _basis(p.family, t)
    scale = SIDE - 1  # unit square -> pixel centres 0..27
    curve = np.einsum("tk,nkd->ntd", b, points) * scale  # (n, T, 2) in pixels, (x, y)
    speed = np.linalg.norm(np.einsum("tk,nkd->ntd", db, points) * scale, axis=2)  # |B'(t)|
    dt = np.full(p.samples, 1.0 / (p.samples - 1))
    dt[[0, -1]] *= 0.5  # trapezoid weights: sum_k w_k = arc length
    weight = speed * dt * (p.gain / (p.sigma * np.sqrt(2 * np.pi)))  # (n, T)
    grid = np.arange(SIDE, dtype=np.float64)
    gx = np.exp(-((grid[None, None, :] - curve[:, :, 0:1]) ** 2) / (2 * p.sigma**2))  # (n, T, 28)
    gy = np.exp(-((grid[None, None, :] - curve[:, :, 1:2]) ** 2) / (2 * p.sigma**2))
    img = np.einsum("nty,ntx->nyx", gy * weight[:, :, None], gx)
    return np.clip(img, 0.0, 1.0).reshape(len(points), SIDE * SIDE).astype(np.float32)


def _render_chunked(points: np.ndarray, p: CurvesParams, chunk: int = 2000) -> np.ndarray:
    return np.concatenate([render(points[i : i + chunk], p) for i in range(0, len(points), chunk)], axis=0)


def generate(params: CurvesParams | None = None) -> CurvesData:
    """Generate the training and test images (deterministic in ``params``; about 10 s at full size)."""
    p = params or CurvesParams()
    train_seq, test_seq = np.random.SeedSequence(p.seed).spawn(2)
    pts_train = _draw_points(np.random.Generator(np.random.PCG64(train_seq)), p.n_train, p)
    pts_test = _draw_points(np.random.Generator(np.random.PCG64(test_seq)), p.n_test, p)
    x_train = _render_chunked(pts_train, p)
    x_test = _render_chunked(pts_test, p)
    digest = hashlib.sha256(x_train.tobytes() + x_test.tobytes()).hexdigest()
    return CurvesData(
        x_train,
        x_test,
        pts_train.reshape(-1, 6).astype(np.float32),
        pts_test.reshape(-1, 6).astype(np.float32),
        p,
        digest,
    )


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where generated data sets are cached: ``override``, else ``$SECONDORDER_CACHE``, else
    ``$XDG_CACHE_HOME/secondorder``, else ``~/.cache/secondorder``."""
    if override is not None:
        return Path(override)
    env = os.environ.get("SECONDORDER_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "secondorder"


def load_or_generate(
    params: CurvesParams | None = None, cache: str | os.PathLike | None = None
) -> CurvesData:
    """:func:`generate` with an on-disk cache (``<cache>/<version>-<key>.npz``, written atomically).

    A cache file that cannot be read is regenerated; a cache directory that cannot be written
    only costs the regeneration next time (logged).
    """
    p = params or CurvesParams()
    directory = cache_dir(cache)
    path = directory / f"{VERSION}-{p.key()}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                stored = json.loads(str(z["params"]))
                if stored == {"version": VERSION, **p.as_dict()}:
                    data = CurvesData(
                        z["x_train"], z["x_test"], z["latent_train"], z["latent_test"], p, str(z["sha256"])
                    )
                    logger.info("curves-synth: loaded %s", path)
                    return data
        except (OSError, ValueError, KeyError) as err:
            logger.warning("curves-synth: ignoring unreadable cache file %s (%s)", path, err)
    data = generate(p)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                x_train=data.x_train,
                x_test=data.x_test,
                latent_train=data.latent_train,
                latent_test=data.latent_test,
                params=json.dumps({"version": VERSION, **p.as_dict()}),
                sha256=data.sha256,
            )
        os.replace(tmp, path)
        logger.info("curves-synth: cached %s", path)
    except OSError as err:
        logger.warning("curves-synth: could not write the cache %s (%s)", path, err)
    return data


def pca_test_error(x_train: np.ndarray, x_test: np.ndarray, components: int) -> float:
    """Squared reconstruction error per test image of PCA with ``components`` fitted on ``x_train``.

    The principal directions are the top eigenvectors of the training covariance (float64).
    """
    mean = x_train.mean(axis=0, dtype=np.float64)
    centred = x_train.astype(np.float64) - mean
    _, vecs = np.linalg.eigh(centred.T @ centred)
    basis = vecs[:, ::-1][:, :components].T
    t = x_test.astype(np.float64) - mean
    recon = (t @ basis.T) @ basis
    return float(((t - recon) ** 2).sum(axis=1).mean())


def calibration(data: CurvesData) -> dict[str, float]:
    """The fingerprints of docs/datasets.md §1.3: PCA-6/PCA-18 test error, mean pixel, share of (near) zeros.

    The Gaussian splat is not truncated, so few pixels are *exactly* zero; the share below
    ``1e-3`` is the "mostly black" statistic.
    """
    return {
        "pca6_test_error": pca_test_error(data.x_train, data.x_test, 6),
        "pca18_test_error": pca_test_error(data.x_train, data.x_test, 18),
        "mean_pixel": float(np.concatenate([data.x_train, data.x_test]).mean()),
        "zero_fraction": float((data.x_train == 0).mean()),
        "below_1e-3_fraction": float((data.x_train < 1e-3).mean()),
        "above_half_fraction": float((data.x_train > 0.5).mean()),
    }
