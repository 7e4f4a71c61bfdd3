"""Short runs of every thesis row at the thesis's values: do they stay finite?

The thesis's values were tuned for full runs on the real data; a method that produces a NaN
within a few dozen steps at those values is broken, whatever its oracles say (the K-BFGS
ResNet32 failure was found this way). This module runs each preset row of every suite on a
problem for a fixed number of steps with the pieces of ``secondorder bench`` (the problem's
network and loss, ``so.Closure``, augmentation, warm start) and reports whether any value
turned non-finite.

* :func:`stand_in` -- small generated data of the right shape for every problem, offline and in
  seconds: synthetic digits (28x28) for MNIST, grey 25x25 procedural images (standardised per
  image) for FACES, the CURVES generator, procedural 32x32 images for CIFAR, the webspam
  generator. They are not the thesis's data (nor the bench's default stand-ins, which may need
  extra packages).
* :func:`rows` -- every distinct ``(method, hyper-parameters)`` preset of the suites that have
  the problem, with the suite's L2 term.
* :func:`run` -- one row for ``steps`` steps (one epoch of ``steps * batch`` examples), with an
  optional narrower VGG16 (``vgg_width``) or autoencoder (``ae_width``);
* :func:`finite_result` -- no ``NonFiniteError``, every loss, parameter and optimizer-state
  tensor finite, no curvature update refused.

``benchmarks/thesis_smoke.py`` runs it at full size; ``tests/bench/test_thesis_smoke.py`` at a
reduced batch (and VGG width) on every problem.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from .. import diagnostics_data
from ..capture import Closure
from ..optim import NonFiniteError
from . import curves as CV
from . import models as M
from . import presets as PR
from . import problems as P
from . import runner as R
from . import standins
from .dataset import Dataset

#: the problems of the thesis's experiments (the autoencoders, the CNNs, the chapter-5 classifiers)
PROBLEMS = PR.AUTOENCODERS + PR.CNNS + PR.CLASSIFIERS


@dataclass(frozen=True)
class SmokeRow:
    """One distinct configuration: a preset row and the L2 term of its suite."""

    label: str
    method: str
    hp: dict[str, Any]
    l2: float
    source: str
    suite: str

    @property
    def name(self) -> str:
        return self.label if self.l2 == 0 else f"{self.label}+l2"


def rows(problem: str) -> list[SmokeRow]:
    """Every distinct ``(method, hp, l2)`` among the preset rows of the suites that have ``problem``.

    Raises:
        ValueError: an unknown problem (naming the known ones).
    """
    P.get(problem)
    out: list[SmokeRow] = []
    seen: set[str] = set()
    for suite in PR.SUITES.values():
        for row in suite.rows.get(problem, []):
            key = repr((row.method, sorted(row.hp.items()), suite.l2))
            if key in seen:
                continue
            seen.add(key)
            label = row.label if not any(r.label == row.label for r in out) else f"{row.label}@{suite.name}"
            out.append(SmokeRow(label, row.method, dict(row.hp), suite.l2, row.source, suite.name))
    return out


def method_rows(problem: str) -> list[SmokeRow]:
    """Every method at least once: the rows of the problem's default suite (the values a plain
    ``secondorder bench --problem P`` uses, e.g. K-BFGS and K-BFGS† both), then the first row of
    each method that suite lacks (e.g. RMSprop, chapter 2 only)."""
    default = PR.default_suite(problem)
    everything = rows(problem)
    out = [r for r in everything if r.suite == default]
    for r in everything:
        if all(r.method != o.method for o in out):
            out.append(r)
    return out


def _grey_25(images: np.ndarray) -> np.ndarray:
    """``(n, 3, 32, 32)`` colour images -> ``(n, 625)`` grey 25x25 images, each of zero mean and
    unit variance (as FACES and its stand-ins, ``standins.transform_faces``)."""
    grey = torch.as_tensor(images).mean(1, keepdim=True)
    small = F.interpolate(grey, size=(25, 25), mode="area").reshape(len(images), -1)
    small = (small - small.mean(1, keepdim=True)) / small.std(1, keepdim=True).clamp_min(1e-6)
    return small.numpy().astype(np.float32)


def _digits_28(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = diagnostics_data.synthetic_digits(n, seed=seed, size=28)
    return x.numpy().astype(np.float32), y.numpy().astype(np.int64)


@functools.lru_cache(maxsize=8)
def stand_in(problem: str, n_train: int, n_test: int = 64, seed: int = 0) -> Dataset:
    """Generated data of ``problem``'s shape (see the module docstring); labelled synthetic.

    Cached per process (the arrays are shared: treat them as read-only).
    """
    family = P.get(problem).family
    n = n_train + n_test

    def dataset(name: str, x: np.ndarray, y: np.ndarray | None, classes: int) -> Dataset:
        return Dataset(
            name=name,
            x_train=x[:n_train],
            x_test=x[n_train:],
            y_train=None if y is None else y[:n_train],
            y_test=None if y is None else y[n_train:],
            num_classes=classes,
            synthetic=True,
            stand_in_for=family,
            description=f"{name}: generated smoke-test data for {problem} (seed {seed})",
        )

    if family == "curves":
        data = CV.generate(CV.CurvesParams(n_train=n_train, n_test=n_test, seed=seed))
        return dataset("curves-synth", np.concatenate([data.x_train, data.x_test]), None, 0)
    if family == "mnist":
        x, y = _digits_28(n, seed)
        return dataset(
            "digits28-synth", x, None if problem == "mnist" else y, 0 if problem == "mnist" else 10
        )
    if family == "faces":
        images = standins.cifar_synth(10, n_train=n_train, n_test=n_test, seed=seed)
        x = _grey_25(np.concatenate([images.x_train, images.x_test]))
        return dataset("grey25-synth", x, None, 0)
    if family in ("cifar10", "cifar100"):
        classes = 10 if family == "cifar10" else 100
        return standins.cifar_synth(classes, n_train=n_train, n_test=n_test, seed=seed)
    if family == "webspam":
        return standins.webspam_synth(n_train=n_train, n_test=n_test, seed=seed)
    raise ValueError(f"no smoke-test data for {problem!r}")


def problem_at(problem: str, vgg_width: float = 1.0, ae_width: float = 1.0) -> P.Problem:
    """The problem, with a VGG16 of ``vgg_width`` times the channels and an autoencoder whose hidden
    layers (not the code layer) have ``ae_width`` times the units (1, 1: the thesis networks)."""
    for arg, value in (("vgg_width", vgg_width), ("ae_width", ae_width)):
        if not 0 < value <= 1:
            raise ValueError(f"{arg} must be in (0, 1], got {value!r}")
    prob = P.get(problem)
    if vgg_width != 1.0 and problem.endswith("-vgg16"):
        return dataclasses.replace(prob, build=lambda c: M.vgg16_bn(c, width=vgg_width))
    if ae_width != 1.0 and prob.kind == "autoencoder":
        widths = M.AUTOENCODER_WIDTHS[problem]
        code = min(widths)
        narrow = [
            w if i in (0, len(widths) - 1) or w == code else max(code, round(w * ae_width))
            for i, w in enumerate(widths)
        ]
        return dataclasses.replace(prob, build=lambda _c: M.autoencoder(narrow))
    return prob


@dataclass
class SmokeResult:
    """What a short run gives: ``status`` is ``"done"`` or ``"diverged"`` (a ``NonFiniteError``)."""

    status: str
    losses: list[float]  # the minibatch loss of every step taken
    state_finite: bool  # every parameter and optimizer-state tensor finite at the end
    diagnostics: dict[str, Any]
    seconds: float
    error: str | None = None

    @property
    def steps(self) -> int:
        return len(self.losses)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


def run(
    problem: str,
    row: SmokeRow,
    *,
    steps: int,
    batch: int | None = None,
    vgg_width: float = 1.0,
    ae_width: float = 1.0,
    seed: int = 0,
    warm_batches: int = 4,
) -> SmokeResult:
    """``row`` on ``problem`` for ``steps`` steps of ``batch`` generated examples each.

    The pieces of ``secondorder bench`` (the problem's network and loss with the suite's L2
    term, ``so.Closure``, CIFAR crop-and-flip augmentation, the warm start, here over
    ``warm_batches`` minibatches), without its evaluations and LR schedule.
    """
    for arg, value in (("steps", steps), ("batch", batch), ("warm_batches", warm_batches)):
        if value is not None and (not isinstance(value, int) or value < (0 if arg == "warm_batches" else 1)):
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    prob = problem_at(problem, vgg_width, ae_width)
    m = batch or prob.batch_size
    data = P.prepare(prob, stand_in(problem, steps * m, seed=seed))
    start = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = prob.build(data.num_classes)
        loss_fn, likelihood = P.make_loss(prob, model, row.l2)
        opt = R.build_optimizer(row.method, model, row.hp, thesis=prob.kind != "lm")
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(data.x_train), generator=gen)

        def closure(k: int) -> Closure:
            idx = order[(k * m) % len(order) :][:m]
            x = data.x_train[idx]
            if data.augment:
                x = P.augment(x, data.pad_value, gen)
            return Closure(model, x, data.t_train[idx], loss_fn, likelihood)

        losses: list[float] = []
        status, error = "done", None
        try:
            opt.warm_start(closure(k) for k in range(warm_batches))
            for k in range(steps):
                losses.append(float(opt.step(closure(k))))
        except NonFiniteError as err:
            status, error = "diverged", str(err)
    tensors = _tensors([list(model.parameters()), opt.state_dict()])
    return SmokeResult(
        status=status,
        losses=losses,
        state_finite=all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()),
        diagnostics=R.jsonable(opt.stats.diagnostics),
        seconds=time.perf_counter() - start,
        error=error,
    )


def nonfinite_updates(result: SmokeResult) -> int:
    """Curvature updates that were refused because a value was not finite (K-BFGS counters)."""
    diag = result.diagnostics.get("kbfgs", {})
    return sum(int(d.get("h_g_nonfinite", 0)) + int(d.get("h_a_nonfinite", 0)) for d in diag.values())


def finite_result(result: SmokeResult) -> bool:
    """No ``NonFiniteError``, every loss, parameter and state tensor finite, no refused update."""
    return (
        result.status == "done"
        and all(math.isfinite(v) for v in result.losses)
        and result.state_finite
        and nonfinite_updates(result) == 0
    )
