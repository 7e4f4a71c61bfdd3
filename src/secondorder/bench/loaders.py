"""Loaders for the real benchmark files: IDX (MNIST, Fashion-MNIST), CIFAR python batches,
MATLAB ``.mat`` (CURVES ``digs3pts_1.mat``, FACES ``newfaces_rot_single.mat``) and LIBSVM text (webspam).

Each loader checks names, sizes, shapes and headers, recognises the published checksums
(:mod:`.checksums`) and says which data set it found. A structurally valid file with an unknown
checksum loads with a warning naming it. A missing, truncated or malformed file raises
:class:`~.dataset.DatasetError` naming the file, the directory searched and where to download it.
Formats: docs/datasets.md §1-§3; preprocessing as the thesis author's code (§4): MNIST ``/255``,
CURVES and FACES as stored, CIFAR ``/255`` (normalisation and augmentation belong to the problem).
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import checksums as CK
from .dataset import Dataset, DatasetError

logger = logging.getLogger(__name__)

MNIST_SOURCE = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of http://yann.lecun.com/exdb/mnist/); "
    "Fashion-MNIST: https://github.com/zalandoresearch/fashion-mnist (data/fashion/) or "
    "`apt-get install dataset-fashion-mnist`"
)
CIFAR10_SOURCE = (
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (unpack or leave the .tar.gz in place)"
)
CIFAR100_SOURCE = (
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (unpack or leave the .tar.gz in place)"
)
CURVES_SOURCE = "http://www.cs.toronto.edu/~jmartens/digs3pts_1.mat"
FACES_SOURCE = "http://www.cs.toronto.edu/~jmartens/newfaces_rot_single.mat"
WEBSPAM_SOURCE = (
    "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/webspam_wc_normalized_unigram.svm.xz"
)

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES, IDX_LABELS = 2051, 2049


# ---------------------------------------------------------------------------------------- helpers
def find_file(directory: Path, names: list[str], subdirs: tuple[str, ...] = ("",)) -> Path | None:
    """The first ``directory/subdir/name`` that exists."""
    for sub in subdirs:
        for name in names:
            path = directory / sub / name
            if path.is_file():
                return path
    return None


def _searched(directory: Path, subdirs: tuple[str, ...]) -> str:
    dirs = [str(directory / s) if s else str(directory) for s in subdirs]
    return dirs[0] + (f" (also {', '.join(dirs[1:])})" if len(dirs) > 1 else "")


def _read_compressed(path: Path, source: str) -> bytes:
    """The file's bytes, decompressed by extension (.gz, .xz, .bz2); corrupt archives raise DatasetError."""
    opener: Callable[..., io.IOBase] | None = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}.get(
        path.suffix
    )
    try:
        if opener is None:
            return path.read_bytes()
        with opener(path, "rb") as fh:
            return fh.read()
    except (EOFError, OSError, zlib.error, lzma.LZMAError) as err:
        raise DatasetError(
            f"truncated or corrupt compressed file ({err})", file=path, directory=path.parent, source=source
        ) from None


# ---------------------------------------------------------------------------------------- IDX
def read_idx(path: Path, *, source: str = MNIST_SOURCE) -> tuple[np.ndarray, int, bytes]:
    """An IDX file of unsigned bytes: ``(array, magic, decompressed bytes)``.

    Header: two zero bytes, type code 0x08 (ubyte), the number of dimensions, then one
    big-endian int32 per dimension (images: magic 2051 = (N, 28, 28); labels: 2049 = (N,)).
    """
    raw = _read_compressed(path, source)

    def bad(what: str) -> DatasetError:
        return DatasetError(f"not a valid IDX file: {what}", file=path, directory=path.parent, source=source)

    if len(raw) < 8:
        raise bad(f"only {len(raw)} bytes")
    magic = struct.unpack(">I", raw[:4])[0]
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise bad(f"magic number 0x{magic:08x} (expected 0x00000801 for labels or 0x00000803 for images)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise bad("header cut short")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) < expected:
        raise DatasetError(
            f"truncated IDX file: header says {dims} ({expected} bytes), file has {len(raw)} bytes",
            file=path,
            directory=path.parent,
            source=source,
        )
    if len(raw) > expected:
        raise bad(f"{len(raw) - expected} bytes after the data announced by the header {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims), magic, raw


def load_idx_set(directory: Path, *, expect: str = "mnist", source: str = MNIST_SOURCE) -> Dataset:
    """MNIST or Fashion-MNIST (same file names and format): pixels ``/255`` as ``(n, 784)``, labels 0-9."""
    directory = Path(directory)
    subdirs = ("", "mnist", "MNIST/raw", "fashion-mnist", "FashionMNIST/raw")
    arrays, identities, files = {}, {}, {}
    for key, stem in MNIST_FILES.items():
        names = [stem + ".gz", stem, stem.replace("-idx", ".idx")]
        path = find_file(directory, names, subdirs)
        if path is None:
            raise DatasetError(
                f"{expect}: file {stem}.gz (or {stem}) not found",
                file=stem + ".gz",
                directory=_searched(directory, subdirs),
                source=source,
            )
        arr, magic, raw = read_idx(path, source=source)
        want = IDX_IMAGES if key.endswith("images") else IDX_LABELS
        if magic != want:
            raise DatasetError(
                f"{path.name}: magic number {magic} but {key.replace('_', ' ')} need {want}",
                file=path,
                directory=path.parent,
                source=source,
            )
        if key.endswith("images") and arr.shape[1:] != (28, 28):
            raise DatasetError(
                f"{path.name}: images of shape {arr.shape[1:]}, expected 28x28",
                file=path,
                directory=path.parent,
                source=source,
            )
        if key.endswith("labels") and arr.size and arr.max() > 9:
            raise DatasetError(
                f"{path.name}: label {int(arr.max())} out of range 0-9",
                file=path,
                directory=path.parent,
                source=source,
            )
        md5_file = CK.file_digest(path, "md5")
        identities[key] = CK.identify_md5(md5_file, CK.md5_bytes(raw))
        arrays[key] = arr
        files[path.name] = md5_file
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise DatasetError(
                f"{expect}: {n_img} {split} images but {n_lab} labels", directory=directory, source=source
            )
    found = {i[0] for i in identities.values() if i is not None}
    name = found.pop() if len(found) == 1 else expect
    unknown = [MNIST_FILES[k] for k, i in identities.items() if i is None]
    for stem in unknown:
        logger.warning(
            "%s: %s has an unknown checksum (md5 not published); loading it as %s, unverified "
            "(a subset or a variant?)",
            directory,
            stem,
            name,
        )
    verified = not unknown and len({i[0] for i in identities.values() if i}) == 1
    if verified:
        desc = f"{name}: {', '.join(sorted({i[1] for i in identities.values() if i}))}"
    else:
        desc = f"{name} (unverified: {len(unknown)} of 4 files with unknown checksums)"
    return Dataset(
        name=name,
        x_train=arrays["train_images"].reshape(-1, 784).astype(np.float32) / 255.0,
        x_test=arrays["test_images"].reshape(-1, 784).astype(np.float32) / 255.0,
        y_train=arrays["train_labels"].astype(np.int64),
        y_test=arrays["test_labels"].astype(np.int64),
        num_classes=10,
        verified=verified,
        description=desc,
        info={"directory": str(directory), "md5": files, "preprocessing": "pixels / 255"},
    )


# ---------------------------------------------------------------------------------------- CIFAR
class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, bytes and numpy arrays (pickles can run code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _cifar_reader(
    directory: Path, folder: str, tarball: str, source: str
) -> tuple[Callable[[str], bytes], str]:
    """A member reader (unpacked folder, flat directory or the .tar.gz) and where it reads from."""
    for base in (directory / folder, directory):
        if base.is_dir() and any((base / n).is_file() for n in ("test_batch", "test")):
            return (lambda name, b=base: _read_member_file(b / name, source)), str(base)
    tar_path = directory / tarball
    if tar_path.is_file():
        try:
            tar = tarfile.open(tar_path, "r:gz")
            members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise DatasetError(
                f"truncated or corrupt archive ({err})", file=tar_path, directory=directory, source=source
            ) from None

        def read(name: str) -> bytes:
            if name not in members:
                raise DatasetError(
                    f"{name} missing from the archive", file=tar_path, directory=directory, source=source
                )
            try:
                fh = tar.extractfile(members[name])
                assert fh is not None
                return fh.read()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
                raise DatasetError(
                    f"truncated or corrupt archive ({err})", file=tar_path, directory=directory, source=source
                ) from None

        return read, str(tar_path)
    raise DatasetError(
        f"no CIFAR batches found ({folder}/ or {tarball})",
        file=f"{folder}/test_batch",
        directory=_searched(directory, (folder, "")),
        source=source,
    )


def _read_member_file(path: Path, source: str) -> bytes:
    if not path.is_file():
        raise DatasetError(f"{path.name} not found", file=path, directory=path.parent, source=source)
    return path.read_bytes()


def _unpickle_batch(
    raw: bytes, name: str, where: str, source: str, label_key: bytes, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt or foreign file
        raise DatasetError(
            f"{name}: not a CIFAR python batch ({type(err).__name__}: {err})",
            file=name,
            directory=where,
            source=source,
        ) from None
    if not isinstance(obj, dict) or b"data" not in obj or label_key not in obj:
        raise DatasetError(
            f"{name}: expected a dict with keys b'data' and {label_key!r}",
            file=name,
            directory=where,
            source=source,
        )
    data, labels = obj[b"data"], np.asarray(obj[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetError(
            f"{name}: b'data' must be uint8 of shape (n, 3072), got {shape}",
            file=name,
            directory=where,
            source=source,
        )
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() >= classes)):
        raise DatasetError(
            f"{name}: {labels.shape[0] if labels.ndim else 0} labels for {len(data)} images, "
            f"or labels outside 0-{classes - 1}",
            file=name,
            directory=where,
            source=source,
        )
    return data, labels.astype(np.int64)


def load_cifar(directory: Path, classes: int = 10) -> Dataset:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``).

    Returns images ``(n, 3, 32, 32)`` in [0, 1] and integer labels.
    """
    directory = Path(directory)
    if classes == 10:
        name, source, folder, tarball = (
            "cifar10",
            CIFAR10_SOURCE,
            "cifar-10-batches-py",
            "cifar-10-python.tar.gz",
        )
        train_files, test_files, label_key = (
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            b"labels",
        )
    elif classes == 100:
        name, source, folder, tarball = (
            "cifar100",
            CIFAR100_SOURCE,
            "cifar-100-python",
            "cifar-100-python.tar.gz",
        )
        train_files, test_files, label_key = ["train"], ["test"], b"fine_labels"
    else:
        raise ValueError(f"classes must be 10 or 100, got {classes}")
    read, where = _cifar_reader(directory, folder, tarball, source)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    md5s, unknown = {}, []
    for split, names in (("train", train_files), ("test", test_files)):
        for fname in names:
            raw = read(fname)
            md5 = CK.md5_bytes(raw)  # checked before unpickling
            md5s[fname] = md5
            ident = CK.identify_md5(md5)
            if ident is None or ident[0] != name:
                unknown.append(fname)
                logger.warning(
                    "%s: %s has an unknown checksum (md5 %s); loading it unverified (a subset or a variant?)",
                    where,
                    fname,
                    md5,
                )
            parts[split].append(_unpickle_batch(raw, fname, where, source, label_key, classes))
    x_tr = np.concatenate([d for d, _ in parts["train"]]).reshape(-1, 3, 32, 32)
    y_tr = np.concatenate([lab for _, lab in parts["train"]])
    x_te = np.concatenate([d for d, _ in parts["test"]]).reshape(-1, 3, 32, 32)
    y_te = np.concatenate([lab for _, lab in parts["test"]])
    verified = not unknown
    if verified and classes == 10 and y_tr[:10].tolist() != [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]:
        raise DatasetError(
            "CIFAR-10: checksums match but the first labels do not", directory=where, source=source
        )
    desc = (
        f"{name}: official python batches (published md5)"
        if verified
        else f"{name} (unverified: unknown checksums for {', '.join(unknown)})"
    )
    return Dataset(
        name=name,
        x_train=x_tr.astype(np.float32) / 255.0,
        x_test=x_te.astype(np.float32) / 255.0,
        y_train=y_tr,
        y_test=y_te,
        num_classes=classes,
        verified=verified,
        description=desc,
        info={"location": where, "md5": md5s, "preprocessing": "pixels / 255"},
    )


# ---------------------------------------------------------------------------------------- .mat
def _loadmat(path: Path, source: str) -> dict:
    """``scipy.io.loadmat`` with v7.3 (HDF5) detection and readable errors."""
    try:
        from scipy import io as sio  # the bench extra; only needed for .mat files
    except ImportError:
        raise DatasetError(
            "reading .mat files needs scipy: pip install 'secondorder[bench]'",
            file=path,
            directory=path.parent,
        ) from None

    with open(path, "rb") as fh:
        head = fh.read(520)
    if b"MATLAB 7.3" in head[:128] or head[512:520] == b"\x89HDF\r\n\x1a\n":
        raise DatasetError(
            "a MATLAB v7.3 (HDF5) file; re-save it as v7 (save -v7) or download the original",
            file=path,
            directory=path.parent,
            source=source,
        )
    try:
        return sio.loadmat(str(path))
    except Exception as err:  # noqa: BLE001 - scipy raises many types for truncated/corrupt files
        raise DatasetError(
            f"truncated or malformed .mat file ({type(err).__name__}: {err})",
            file=path,
            directory=path.parent,
            source=source,
        ) from None


def _mat_variable(mat: dict, key: str, path: Path, source: str) -> np.ndarray:
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetError(
            f"variable '{key}' not found (variables: {', '.join(found) or 'none'})",
            file=path,
            directory=path.parent,
            source=source,
        )
    arr = np.asarray(mat[key])
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise DatasetError(
            f"variable '{key}' must be a numeric matrix, got {arr.dtype} {arr.shape}",
            file=path,
            directory=path.parent,
            source=source,
        )
    return arr


def load_curves_mat(directory: Path, cache: Path) -> Dataset:
    """``digs3pts_1.mat``: ``bdata`` (20000 x 784), ``bdatatest`` (10000 x 784), in [0, 1], as stored."""
    directory = Path(directory)
    path = find_file(directory, ["digs3pts_1.mat"], ("", "curves"))
    if path is None:
        raise DatasetError(
            "CURVES: digs3pts_1.mat not found",
            file="digs3pts_1.mat",
            directory=_searched(directory, ("", "curves")),
            source=CURVES_SOURCE,
        )
    mat = _loadmat(path, CURVES_SOURCE)
    arrays = []
    for key in ("bdata", "bdatatest"):
        arr = _mat_variable(mat, key, path, CURVES_SOURCE)
        if arr.shape[1] != 784:
            raise DatasetError(
                f"'{key}' has shape {arr.shape}, expected (n, 784)",
                file=path,
                directory=directory,
                source=CURVES_SOURCE,
            )
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise DatasetError(
                f"'{key}' has values outside [0, 1]", file=path, directory=directory, source=CURVES_SOURCE
            )
        arrays.append(arr.astype(np.float32))
    sha = CK.file_digest(path)
    note = CK.record_first_use(cache, path, sha)
    full = arrays[0].shape[0] == 20000 and arrays[1].shape[0] == 10000
    if not full:
        logger.warning(
            "%s: %d train / %d test images, not the full 20000 / 10000 (a subset or a variant?)",
            path,
            arrays[0].shape[0],
            arrays[1].shape[0],
        )
    return Dataset(
        name="curves",
        x_train=arrays[0],
        x_test=arrays[1],
        verified=full,
        description=f"curves: {path.name}, structurally valid "
        f"(no published checksum; sha256 {sha[:16]}..., {note})",
        info={"file": str(path), "sha256": sha, "checksum_note": note, "preprocessing": "as stored"},
    )


FACES_TEST_SPLITS = ("last41400", "rest62100")


def faces_split(columns: np.ndarray, faces_test: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Split FACES images (one column each, ordered by person, 40 people) as Martens' and the thesis code.

    Train = the first 25/40 (103,500 of 165,600); test = the last 10/40 (41,400, ``"last41400"``,
    the author's code) or everything after the training part (62,100, ``"rest62100"``, Table 2.3).
    """
    if faces_test not in FACES_TEST_SPLITS:
        raise ValueError(f"faces_test must be one of {FACES_TEST_SPLITS}, got {faces_test!r}")
    total = columns.shape[1]
    n_train = total * 25 // 40
    n_test = total * 10 // 40 if faces_test == "last41400" else total - n_train
    x = columns.T
    info = {"faces_test": faces_test, "split": f"train [0, {n_train}), test [{total - n_test}, {total})"}
    return x[:n_train], x[total - n_test :], info


def load_faces_mat(directory: Path, cache: Path, faces_test: str = "last41400") -> Dataset:
    """``newfaces_rot_single.mat``: ``newfaces_single`` (625 x 165600, 25x25 images as columns), as stored."""
    directory = Path(directory)
    path = find_file(directory, ["newfaces_rot_single.mat"], ("", "faces"))
    if path is None:
        raise DatasetError(
            "FACES: newfaces_rot_single.mat not found",
            file="newfaces_rot_single.mat",
            directory=_searched(directory, ("", "faces")),
            source=FACES_SOURCE,
        )
    arr = _mat_variable(_loadmat(path, FACES_SOURCE), "newfaces_single", path, FACES_SOURCE)
    if arr.shape[0] != 625:
        raise DatasetError(
            f"'newfaces_single' has shape {arr.shape}, expected (625, n)",
            file=path,
            directory=directory,
            source=FACES_SOURCE,
        )
    if not np.isfinite(arr).all():
        raise DatasetError(
            "'newfaces_single' has non-finite values", file=path, directory=directory, source=FACES_SOURCE
        )
    x_tr, x_te, info = faces_split(arr.astype(np.float32), faces_test)
    sha = CK.file_digest(path)
    note = CK.record_first_use(cache, path, sha)
    full = arr.shape[1] == 165600
    if not full:
        logger.warning("%s: %d images, not the full 165600 (a subset or a variant?)", path, arr.shape[1])
    return Dataset(
        name="faces",
        x_train=x_tr,
        x_test=x_te,
        verified=full,
        description=f"faces: {path.name}, structurally valid "
        f"(no published checksum; sha256 {sha[:16]}..., {note})",
        info={"file": str(path), "sha256": sha, "checksum_note": note, "preprocessing": "as stored", **info},
    )


# ---------------------------------------------------------------------------------------- LIBSVM
def parse_libsvm(text: str, n_features: int, *, file: Path, source: str) -> tuple[np.ndarray, np.ndarray]:
    """``label idx:val ...`` lines (1-based indices) -> dense ``(n, n_features)`` float32, labels ``(n,)``."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    x = np.zeros((len(lines), n_features), dtype=np.float32)
    y = np.empty(len(lines), dtype=np.float64)
    for row, line in enumerate(lines):
        parts = line.split()
        try:
            y[row] = float(parts[0])
            if len(parts) > 1:
                pairs = np.array(" ".join(parts[1:]).replace(":", " ").split(), dtype=np.float64).reshape(
                    -1, 2
                )
                idx = pairs[:, 0].astype(np.int64)
                if idx.min() < 1 or idx.max() > n_features or not np.array_equal(idx, pairs[:, 0]):
                    raise ValueError(f"feature index outside 1..{n_features}")
                x[row, idx - 1] = pairs[:, 1]
        except ValueError as err:
            raise DatasetError(
                f"malformed LIBSVM line {row + 1}: {err}", file=file, directory=file.parent, source=source
            ) from None
    return x, y


def load_webspam(directory: Path, cache: Path) -> Dataset:
    """webspam unigram (LIBSVM, 350,000 x 254, labels +-1 -> {0, 1}); first 6/7 train, last 1/7 test.

    The split is the thesis code's ordered 300,000 / 50,000 (not shuffled). Standardisation is
    the problem's job. The parsed arrays are cached by the file's sha256.
    """
    directory = Path(directory)
    stem = "webspam_wc_normalized_unigram.svm"
    path = find_file(directory, [stem + ".xz", stem + ".bz2", stem], ("", "webspam"))
    if path is None:
        raise DatasetError(
            f"webspam: {stem}.xz (or .bz2, or unpacked) not found",
            file=stem + ".xz",
            directory=_searched(directory, ("", "webspam")),
            source=WEBSPAM_SOURCE,
        )
    sha = CK.file_digest(path)
    cached = Path(cache) / f"webspam-{sha[:16]}.npz"
    if cached.is_file():
        with np.load(cached) as z:
            x, y = z["x"], z["y"]
    else:
        raw = _read_compressed(path, WEBSPAM_SOURCE)
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise DatasetError(
                "not a LIBSVM text file (non-ASCII bytes)",
                file=path,
                directory=directory,
                source=WEBSPAM_SOURCE,
            ) from None
        x, y = parse_libsvm(text, 254, file=path, source=WEBSPAM_SOURCE)
        try:
            Path(cache).mkdir(parents=True, exist_ok=True)
            np.savez(cached, x=x, y=y)
        except OSError as err:
            logger.warning("could not cache the parsed webspam arrays in %s (%s)", cached, err)
    if len(y) < 2 or not np.isin(y, (-1.0, 1.0)).all():
        raise DatasetError(
            "webspam labels must be -1 or +1 (and at least 2 rows)",
            file=path,
            directory=directory,
            source=WEBSPAM_SOURCE,
        )
    note = CK.record_first_use(cache, path, sha)
    n = len(y)
    n_train = n * 6 // 7
    full = n == 350000
    if not full:
        logger.warning("%s: %d rows, not the full 350000 (a subset or a variant?)", path, n)
    labels = (y > 0).astype(np.int64)
    return Dataset(
        name="webspam",
        x_train=x[:n_train],
        x_test=x[n_train:],
        y_train=labels[:n_train],
        y_test=labels[n_train:],
        num_classes=2,
        verified=full,
        description=f"webspam: {path.name}, {n} rows (no published checksum; sha256 {sha[:16]}..., {note})",
        info={
            "file": str(path),
            "sha256": sha,
            "checksum_note": note,
            "split": f"ordered: first {n_train} train, last {n - n_train} test",
        },
    )
