"""The thesis problems: data family, network, loss, batch size, metric and budget of each.

* ``curves``, ``mnist``, ``faces``: the autoencoders of Tables 2.4 / 3.6; summed BCE on logits
  (``1/2`` summed squared error for FACES); batch 1000; 500 s of process time (2000 s for FACES).
* ``cifar10-vgg16``, ``cifar10-resnet32``, ``cifar100-...``, ``...-resnet32-4``: VGG16-BN, ResNet32,
  ResNet32-4; cross-entropy; batch 128; 150 epochs (second-order) or 200 (first-order) with the
  LR step schedule.
* ``mnist-mlp`` (784-500-10, batch 60, 10 epochs), ``cifar10-mlp`` (3072-400-400-10, batch 100,
  10 epochs), ``webspam`` (254-400-400-1, batch 60, 1 epoch): logistic hidden units (5.8).
* ``charlm`` (not a thesis problem): a decoder-only character transformer on the ``text`` family
  (offline: ``python-docs``), next-character cross-entropy, batch 32 windows of 64 characters,
  300 s of process time; its test metric is the cross-entropy per character.

Metrics (docs/notes.md §10): the training loss is the mean of per-batch mean losses over the
``floor(N/m)`` full training batches, in ``eval()`` mode, without augmentation (plus the chapter-2
L2 term when the suite has one). The autoencoders' "test error" is the per-pixel mean squared
error of ``sigmoid(z)`` (BCE problems) or ``z`` (FACES) over full test batches; the CNNs' is the
classification error over full test batches of 128; the chapter-5 classifiers' over the whole test set.
CIFAR inputs are normalised per channel (docs/notes.md §10 constants for the real sets, the training
set's own statistics for stand-ins) and augmented per batch with a random crop (zero padding 4 in pixel
space) and a horizontal flip, on tensors. Chapter-5 inputs are standardised with the training mean and a
standard deviation floored at ``1/sqrt(d)`` (the thesis code's webspam rule, applied to every set).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..capture import Likelihood, infer_likelihood, losses
from . import models as M
from .dataset import Dataset

CIFAR_NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
}


@dataclass(frozen=True)
class Problem:
    """A thesis problem.

    Attributes:
        name: the CLI name.
        family: the data family (:data:`secondorder.bench.data.FAMILIES`).
        kind: ``"autoencoder"``, ``"cnn"`` or ``"classifier"``.
        build: ``num_classes -> model``.
        loss: ``"bce-sum"``, ``"half-sq"``, ``"ce"`` or ``"bce-binary"``.
        batch_size: m.
        time_budget: the thesis's process-time budget in seconds (autoencoders), else ``None``.
        epochs: the thesis's epoch count (CNNs: second-order methods; first-order ones get 200).
        description: one line for the outputs.
    """

    name: str
    family: str
    kind: Literal["autoencoder", "cnn", "classifier", "lm"]
    build: Callable[[int], nn.Module]
    loss: Literal["bce-sum", "half-sq", "ce", "bce-binary", "token-ce"]
    batch_size: int
    time_budget: float | None
    epochs: int | None
    description: str

    @property
    def classification(self) -> bool:
        return self.kind not in ("autoencoder", "lm")

    @property
    def test_metric(self) -> str:
        """What :func:`test_error` measures, for the outputs."""
        return {
            "autoencoder": "per-pixel MSE of the reconstruction",
            "lm": "cross-entropy per character (nats)",
        }.get(self.kind, "classification error")


def _ae(name: str, loss: str, budget: float) -> Problem:
    widths = M.AUTOENCODER_WIDTHS[name]
    return Problem(
        name,
        name,
        "autoencoder",
        lambda _c, w=widths: M.autoencoder(w),
        loss,
        1000,
        budget,
        None,
        f"{'-'.join(map(str, widths))} autoencoder (ReLU, linear code layer), "
        + (
            "BCE on logits summed over pixels"
            if loss == "bce-sum"
            else "1/2 squared error summed over pixels"
        ),
    )


def _cnn(family: str, arch: str) -> Problem:
    builders = {
        "vgg16": lambda c: M.vgg16_bn(c),
        "resnet32": lambda c: M.resnet32(c),
        "resnet32-4": lambda c: M.resnet32(c, width=4),
    }
    names = {
        "vgg16": "VGG16-BN (one FC layer)",
        "resnet32": "ResNet32 (option-A shortcuts)",
        "resnet32-4": "ResNet32-4 (4x wider)",
    }
    return Problem(
        f"{family}-{arch}",
        family,
        "cnn",
        builders[arch],
        "ce",
        128,
        None,
        150,
        f"{names[arch]} on {family.upper()}, crop + flip augmentation, step LR schedule",
    )


PROBLEMS: dict[str, Problem] = {
    "curves": _ae("curves", "bce-sum", 500.0),
    "mnist": _ae("mnist", "bce-sum", 500.0),
    "faces": _ae("faces", "half-sq", 2000.0),
    **{
        p.name: p
        for p in (_cnn(f, a) for f in ("cifar10", "cifar100") for a in ("vgg16", "resnet32", "resnet32-4"))
    },
    "mnist-mlp": Problem(
        "mnist-mlp",
        "mnist",
        "classifier",
        lambda c: M.mlp_classifier([784, 500, c]),
        "ce",
        60,
        None,
        10,
        "784-500-10 classifier, logistic hidden units, standardised inputs",
    ),
    "cifar10-mlp": Problem(
        "cifar10-mlp",
        "cifar10",
        "classifier",
        lambda c: M.mlp_classifier([3072, 400, 400, c]),
        "ce",
        100,
        None,
        10,
        "3072-400-400-10 classifier, logistic hidden units, standardised inputs",
    ),
    "charlm": Problem(
        "charlm",
        "text",
        "lm",
        lambda vocab: M.CharTransformer(vocab),
        "token-ce",
        32,
        300.0,
        None,
        "decoder-only character transformer (2 causal pre-norm layers, width 128, 4 heads, "
        "context 64), next-character cross-entropy (not a thesis problem)",
    ),
    "webspam": Problem(
        "webspam",
        "webspam",
        "classifier",
        lambda _c: M.mlp_classifier([254, 400, 400, 1]),
        "bce-binary",
        60,
        None,
        1,
        "254-400-400-1 classifier, logistic units, standardised inputs",
    ),
}


#: methods whose curvature needs one output row per example (per-example Jacobians or losses)
PER_EXAMPLE_METHODS = frozenset({"smw-gn", "smw-ng", "smw-ng-bd", "hf", "block-fisher"})


def unsupported(problem: Problem, method: str) -> str | None:
    """Why ``method`` cannot run on ``problem`` (``None`` when it can)."""
    if problem.kind == "lm" and method in PER_EXAMPLE_METHODS:
        return (
            f"{method} needs one output row per example; {problem.name}'s model returns one row per "
            "character of each sequence"
        )
    return None


def get(name: str) -> Problem:
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}")
    return PROBLEMS[name]


# ------------------------------------------------------------------------------------ losses
class L2Regularized(nn.Module):
    """``loss(z, t) + (eta / 2) |theta|^2`` (chapter 2; the reported loss includes the term).

    The term depends on the parameters only, so per-example output gradients (and thus every
    curvature statistic) are unchanged; the parameter gradient gains ``eta * theta`` before the
    momentum, as in the chapter-2 code (docs/notes.md §0).
    """

    def __init__(self, base: nn.Module, params: list[Tensor], eta: float):
        super().__init__()
        self.base = base
        self.eta = eta
        self._params = params  # a plain list: not registered, the model owns them

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        penalty = sum(p.pow(2).sum() for p in self._params)
        return self.base(outputs, targets) + 0.5 * self.eta * penalty


def base_loss(problem: Problem) -> nn.Module:
    return {
        "bce-sum": losses.SummedBCEWithLogitsLoss,
        "half-sq": losses.HalfSquaredErrorLoss,
        "ce": nn.CrossEntropyLoss,
        "bce-binary": nn.BCEWithLogitsLoss,
        "token-ce": losses.TokenCrossEntropyLoss,
    }[problem.loss]()


def make_loss(problem: Problem, model: nn.Module, l2: float) -> tuple[nn.Module, Likelihood]:
    """The training loss (with the L2 term when ``l2 > 0``) and its likelihood for ``so.Closure``."""
    base = base_loss(problem)
    likelihood = infer_likelihood(base)
    if l2 > 0:
        return L2Regularized(base, [p for p in model.parameters() if p.requires_grad], l2), likelihood
    return base, likelihood


# ------------------------------------------------------------------------------------ tensors
@dataclass
class Prepared:
    """A problem's data as tensors on the training device."""

    x_train: Tensor
    t_train: Tensor  # loss targets (the inputs themselves for autoencoders)
    x_test: Tensor
    t_test: Tensor
    num_classes: int
    augment: bool
    pad_value: Tensor | None  # per-channel value of a zero pixel after normalisation (crop padding)
    info: dict[str, Any]


def prepare(problem: Problem, data: Dataset, device: torch.device | str = "cpu") -> Prepared:
    """Convert a data set for ``problem`` (normalise / standardise / flatten) and move it to ``device``."""
    info: dict[str, Any] = {}
    if problem.kind == "lm":  # character windows: token indices in, next tokens out
        if data.x_train.ndim != 2 or data.y_train is None or data.y_test is None:
            raise ValueError(f"{problem.name}: needs (n, T) token windows with next-token targets")
        as_long = dict(dtype=torch.long, device=device)
        return Prepared(
            torch.as_tensor(data.x_train, **as_long),
            torch.as_tensor(data.y_train, **as_long),
            torch.as_tensor(data.x_test, **as_long),
            torch.as_tensor(data.y_test, **as_long),
            data.num_classes,
            False,
            None,
            info,
        )
    x_tr, x_te = data.x_train.astype(np.float32), data.x_test.astype(np.float32)
    pad = None
    if problem.kind == "autoencoder":
        x_tr, x_te = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)
        expect = M.AUTOENCODER_WIDTHS[problem.name][0]
        if x_tr.shape[1] != expect:
            raise ValueError(
                f"{problem.name}: data has {x_tr.shape[1]} features, the network expects {expect}"
            )
    elif problem.kind == "cnn":
        if x_tr.ndim != 4 or x_tr.shape[1:] != (3, 32, 32):
            raise ValueError(f"{problem.name}: needs (n, 3, 32, 32) images, got {x_tr.shape[1:]}")
        if data.name in CIFAR_NORMALISATION:
            mean, std = (np.array(v, dtype=np.float32) for v in CIFAR_NORMALISATION[data.name])
            info["normalisation"] = f"docs/notes.md §10 {data.name} constants"
        else:
            mean, std = x_tr.mean(axis=(0, 2, 3)), x_tr.std(axis=(0, 2, 3)) + 1e-8
            info["normalisation"] = "per-channel training mean / std of the stand-in"
        x_tr = (x_tr - mean[:, None, None]) / std[:, None, None]
        x_te = (x_te - mean[:, None, None]) / std[:, None, None]
        pad = torch.as_tensor(-mean / std, device=device).view(1, 3, 1, 1)
    else:
        x_tr, x_te = x_tr.reshape(len(x_tr), -1), x_te.reshape(len(x_te), -1)
        mean = x_tr.mean(0)
        std = np.maximum(x_tr.std(0), 1.0 / math.sqrt(x_tr.shape[1]))
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
        info["standardisation"] = "training mean, std floored at 1/sqrt(d)"
    to = dict(device=device)
    xt, xe = torch.as_tensor(x_tr, **to), torch.as_tensor(x_te, **to)
    if problem.kind == "autoencoder":
        tt, te = xt, xe
        classes = 0
    elif problem.loss == "bce-binary":
        assert data.y_train is not None and data.y_test is not None
        tt = torch.as_tensor(data.y_train, dtype=torch.float32, device=device).view(-1, 1)
        te = torch.as_tensor(data.y_test, dtype=torch.float32, device=device).view(-1, 1)
        classes = 1
    else:
        assert data.y_train is not None and data.y_test is not None
        tt = torch.as_tensor(data.y_train, dtype=torch.long, device=device)
        te = torch.as_tensor(data.y_test, dtype=torch.long, device=device)
        classes = data.num_classes
    return Prepared(xt, tt, xe, te, classes, problem.kind == "cnn", pad, info)


def augment(x: Tensor, pad_value: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Random crop (a border of ``padding`` zero pixels, in pixel space) and horizontal flip of a batch."""
    n, c, h, w = x.shape
    padded = pad_value.expand(n, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = x
    dev = x.device
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


# ------------------------------------------------------------------------------------ metrics
def _batches(n: int, size: int, drop_last: bool) -> list[tuple[int, int]]:
    if n <= size or not drop_last:
        return [(i, min(i + size, n)) for i in range(0, n, size)]
    return [(i * size, (i + 1) * size) for i in range(n // size)]


#: language models: the training loss is measured on the first windows only (a full pass over
#: every window costs as much as an epoch of first-order training)
LM_TRAIN_EVAL_WINDOWS = 1024


@torch.no_grad()
def train_loss(problem: Problem, model: nn.Module, loss_fn: nn.Module, data: Prepared, batch: int) -> float:
    """Mean of per-batch mean losses over the full training batches, ``eval()`` mode, no augmentation
    (language models: over the first :data:`LM_TRAIN_EVAL_WINDOWS` windows)."""
    was = model.training
    model.eval()
    n = len(data.x_train) if problem.kind != "lm" else min(len(data.x_train), LM_TRAIN_EVAL_WINDOWS)
    try:
        values = [
            float(loss_fn(model(data.x_train[a:b]), data.t_train[a:b]))
            for a, b in _batches(n, batch, drop_last=True)
        ]
    finally:
        model.train(was)
    return float(np.mean(values))


@torch.no_grad()
def test_error(problem: Problem, model: nn.Module, data: Prepared, batch: int) -> float:
    """Autoencoders: per-pixel MSE of the reconstruction; classifiers: the error rate (0-1);
    language models: the mean cross-entropy per character."""
    was = model.training
    model.eval()
    try:
        kind = problem.kind
        ranges = _batches(
            len(data.x_test), batch if kind != "classifier" else 4096, drop_last=kind != "classifier"
        )
        total, count = 0.0, 0
        for a, b in ranges:
            z = model(data.x_test[a:b])
            t = data.t_test[a:b]
            if kind == "autoencoder":
                pred = torch.sigmoid(z) if problem.loss == "bce-sum" else z
                total += float(((pred - t) ** 2).mean()) * (b - a)
            elif kind == "lm":
                total += float(F.cross_entropy(z, t.reshape(-1))) * (b - a)
            elif problem.loss == "bce-binary":
                total += float(((z > 0).float() != t).float().sum())
            else:
                total += float((z.argmax(1) != t).float().sum())
            count += b - a
    finally:
        model.train(was)
    return total / max(count, 1)
