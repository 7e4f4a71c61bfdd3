"""Character-level text for the ``charlm`` problem: a corpus every machine has, or your own file.

* ``python-docs`` (offline, the default): the English prose of the Python Language Reference and
  library topics that every CPython installation ships as ``pydoc_data.topics`` (the text behind
  ``help("assert")``); about 465,000 characters and 103 distinct ones for Python 3.11. The text
  depends on the interpreter's version: every output records the version and the text's SHA-256.
* ``text``: ``input.txt`` (UTF-8) in ``--data-dir``, e.g. the "tiny Shakespeare" file.

The characters are numbered in sorted order; the first 90% of the text trains and the last 10%
tests. Each example is a window of ``context + 1`` characters (non-overlapping windows): the
inputs are its first ``context`` characters and the targets the ``context`` next ones.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import numpy as np

from .dataset import Dataset, DatasetError

#: characters per example (the model's context)
CONTEXT = 64
TRAIN_FRACTION = 0.9


def python_docs_text() -> str:
    """The ``pydoc_data.topics`` texts, in sorted topic order, separated by blank lines."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # a Python built without its documentation topics
        raise DatasetError(
            "python-docs: this Python has no pydoc_data.topics module",
            file="pydoc_data/topics.py",
            source="any CPython installation (or pass --data-dir with an input.txt)",
        ) from err
    return "\n\n".join(topics[k] for k in sorted(topics))


def from_text(text: str, name: str, description: str, context: int = CONTEXT, **info: object) -> Dataset:
    """Windows of ``context + 1`` characters of ``text``: inputs, next-character targets, vocabulary."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    codes = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    split = int(TRAIN_FRACTION * len(codes))

    def windows(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = (len(part) - 1) // context
        if n < 1:
            raise DatasetError(f"{name}: too little text for one window of {context + 1} characters")
        x = part[: n * context].reshape(n, context)
        y = part[1 : n * context + 1].reshape(n, context)
        return x, y

    x_train, y_train = windows(codes[:split])
    x_test, y_test = windows(codes[split:])
    return Dataset(
        name,
        x_train,
        x_test,
        y_train,
        y_test,
        num_classes=len(vocab),
        synthetic=False,
        stand_in_for=None,
        verified=True,
        description=description,
        info=dict(
            characters=len(text),
            vocabulary="".join(vocab),
            sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
            context=context,
            **info,
        ),
    )


def python_docs(context: int = CONTEXT) -> Dataset:
    text = python_docs_text()
    return from_text(
        text,
        "python-docs",
        f"pydoc_data.topics of Python {platform.python_version()} ({len(text)} characters)",
        context,
        python=platform.python_version(),
    )


def text_file(directory: Path, context: int = CONTEXT) -> Dataset:
    """``input.txt`` (UTF-8) in ``directory``."""
    path = Path(directory) / "input.txt"
    if not path.is_file():
        raise DatasetError(
            "text: input.txt not found",
            file="input.txt",
            directory=directory,
            source="any UTF-8 text, e.g. https://raw.githubusercontent.com/karpathy/char-rnn/master/"
            "data/tinyshakespeare/input.txt",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"text: input.txt is not UTF-8 ({err})", file=path, directory=directory) from None
    return from_text(text, "text", f"{path} ({len(text)} characters)", context, file=str(path))
