"""Writers of tiny files in each real format (IDX, CIFAR pickles, LIBSVM) for the loader tests."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, 0x08, ndim, big-endian dims, data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def write_idx_set(
    directory: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0
) -> dict:
    """Four MNIST-style IDX files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            with gzip.open(directory / (IDX_STEMS[key] + ".gz"), "wb") as fh:
                fh.write(data)
        else:
            (directory / IDX_STEMS[key]).write_bytes(data)
    return arrays


def cifar_batch(n: int, classes: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A pickled CIFAR python batch (protocol 2, bytes keys, as the originals)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, classes, n)
    key = b"labels" if classes == 10 else b"fine_labels"
    obj = {
        b"batch_label": b"test",
        b"data": data,
        key: [int(v) for v in labels],
        b"filenames": [b"x.png"] * n,
    }
    return pickle.dumps(obj, protocol=2), data, labels


def write_cifar10(
    directory: Path, per_batch: int = 4, tarball: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-batches-py/ (or the .tar.gz): 5 training batches, a test batch; returns train data, labels."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    blobs, datas, labels = {}, [], []
    for i, name in enumerate(names):
        raw, d, lab = cifar_batch(per_batch, 10, i)
        blobs[name] = raw
        if name != "test_batch":
            datas.append(d)
            labels.append(lab)
    directory.mkdir(parents=True, exist_ok=True)
    if tarball:
        with tarfile.open(directory / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, raw in blobs.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        folder = directory / "cifar-10-batches-py"
        folder.mkdir()
        for name, raw in blobs.items():
            (folder / name).write_bytes(raw)
    return np.concatenate(datas), np.concatenate(labels)


def write_libsvm(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """LIBSVM text with 1-based sparse indices (zeros omitted)."""
    lines = []
    for row, label in zip(x, y, strict=True):
        feats = " ".join(f"{j + 1}:{v:.6g}" for j, v in enumerate(row) if v != 0)
        lines.append(f"{int(label):+d} {feats}".rstrip())
    path.write_text("\n".join(lines) + "\n")
