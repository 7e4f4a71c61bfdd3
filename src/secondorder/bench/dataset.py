"""The in-memory data set every loader returns, and the one error every loader raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class DatasetError(Exception):
    """A data file is missing, truncated or malformed; the message says which and where to get it.

    Attributes:
        file: the file (or file name) concerned.
        directory: the directory searched (``None`` for generated data).
        source: where to download the data.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        directory: str | Path | None = None,
        source: str | None = None,
    ):
        parts = [message]
        if file is not None:
            parts.append(f"file: {file}")
        if directory is not None:
            parts.append(f"directory searched: {directory}")
        if source is not None:
            parts.append(f"download: {source}")
        super().__init__("\n  ".join(parts))
        self.file = None if file is None else str(file)
        self.directory = None if directory is None else str(directory)
        self.source = source


@dataclass
class Dataset:
    """Training and test arrays plus what they are.

    Attributes:
        name: what was loaded, e.g. ``"mnist"``, ``"fashion-mnist"``, ``"curves-synth-v1"``.
        x_train, x_test: float32 arrays; images ``(n, C, H, W)`` for CIFAR-like sets, else ``(n, d)``.
        y_train, y_test: int64 labels (``None`` for autoencoder data).
        num_classes: number of classes (0 without labels).
        synthetic: generated data (not comparable with the thesis's numbers).
        stand_in_for: the thesis data set this one replaces offline (``None`` for the real one).
        verified: every file matched a published checksum.
        description: one line saying which data set was found, and how it was identified.
        info: provenance: files, checksums, split, generator parameters.
    """

    name: str
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray | None = None
    y_test: np.ndarray | None = None
    num_classes: int = 0
    synthetic: bool = False
    stand_in_for: str | None = None
    verified: bool = False
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The name as every output shows it (``"curves-synth-v1 (synthetic)"``)."""
        tags = []
        if self.synthetic:
            tags.append("synthetic")
        if self.stand_in_for:
            tags.append(f"stand-in for {self.stand_in_for}")
        if not self.synthetic and not self.verified:
            tags.append("unverified checksum")
        if self.info.get("subset"):
            tags.append(self.info["subset"])
        return f"{self.name} ({', '.join(tags)})" if tags else self.name

    def subset(self, n_train: int | None, n_test: int | None) -> Dataset:
        """The first ``n_train`` / ``n_test`` examples (for quick runs and tests)."""
        if n_train is None and n_test is None:
            return self
        tr = len(self.x_train) if n_train is None else min(n_train, len(self.x_train))
        te = len(self.x_test) if n_test is None else min(n_test, len(self.x_test))
        info = dict(self.info)
        info["subset"] = f"first {tr} of {len(self.x_train)} train, {te} of {len(self.x_test)} test"
        return Dataset(
            self.name,
            self.x_train[:tr],
            self.x_test[:te],
            None if self.y_train is None else self.y_train[:tr],
            None if self.y_test is None else self.y_test[:te],
            self.num_classes,
            self.synthetic,
            self.stand_in_for,
            self.verified,
            self.description,
            info,
        )

    def summary(self) -> dict[str, Any]:
        """JSON-able description (no arrays)."""
        return {
            "name": self.name,
            "label": self.label,
            "synthetic": self.synthetic,
            "stand_in_for": self.stand_in_for,
            "verified": self.verified,
            "description": self.description,
            "n_train": int(len(self.x_train)),
            "n_test": int(len(self.x_test)),
            "input_shape": list(self.x_train.shape[1:]),
            "num_classes": self.num_classes,
            **{k: v for k, v in self.info.items() if k != "subset"},
            **({"subset": self.info["subset"]} if "subset" in self.info else {}),
        }
