"""One training run of the thesis protocol.

* A fresh model (PyTorch default init under the run's seed), the optimizer from
  ``so.make_optimizer(method, model, **hp)``, data already on the training device.
* Warm start: ``opt.warm_start(closures)`` over one shuffled epoch of training minibatches (a
  no-op for methods without one); its time and passes are reported apart, not in the budget
  (3.7.2: "we did not include the times for warm starts").
* Training: ``opt.step(so.Closure(model, x, y, loss_fn))`` on shuffled minibatches (the last
  partial batch dropped), CIFAR batches augmented on the device; the LR step schedule of
  3.7.1 / 4.7.1 for the CNNs (``alpha_0 * 0.1^floor(epoch / E)``).
* Budget: process time (``time.process_time``, as the thesis) or wall-clock time (the default on
  CUDA, with synchronisation), counted over the training steps only; or a number of epochs.
* After each epoch (and at initialisation, and when the time budget ends mid-epoch) the full
  training loss and the test error are evaluated outside the timed region.
* A ``NonFiniteError`` ends the run as ``diverged`` (a finite result of the grid is always preferred).
"""

from __future__ import annotations

import copy
import enum
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..capture import Closure, layer_blocks
from ..optim import NonFiniteError, SecondOrderOptimizer, make_optimizer, optimizer_class
from ..optim.kronecker import KroneckerFactoredOptimizer, UnmodeledParametersWarning
from . import problems as P
from .external import TorchOptimizerRow, is_external
from .presets import FIRST_ORDER
from .store import run_key

logger = logging.getLogger(__name__)


class Clock(str, enum.Enum):
    PROCESS = "process"  # CPU time of this process (all threads), as the thesis
    WALL = "wall"  # perf_counter, with CUDA synchronisation


class MethodUnavailable(Exception):
    """A method that rejects its preset's hyper-parameters."""


@dataclass(frozen=True)
class Budget:
    """Exactly one of a time budget (seconds of the run's clock) and a number of epochs."""

    seconds: float | None = None
    epochs: int | None = None

    def __post_init__(self) -> None:
        if (self.seconds is None) == (self.epochs is None):
            raise ValueError("budget: give exactly one of seconds and epochs")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"time budget must be > 0 seconds, got {self.seconds}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    def describe(self, clock: str = "process") -> str:
        return f"{self.seconds:g} s of {clock} time" if self.seconds is not None else f"{self.epochs} epochs"


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run (its key in the store)."""

    problem: str
    dataset: str
    suite: str
    label: str
    method: str
    hp: dict[str, Any]
    seed: int
    budget: Budget
    batch_size: int
    l2: float = 0.0
    device: str = "cpu"
    clock: str = Clock.PROCESS.value
    decay_every: int | None = None

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        d["budget"] = asdict(self.budget)
        return d

    @property
    def key(self) -> str:
        """The store key: everything that determines the run; the suite is only a grouping (the same row
        in two suites, e.g. ``kbfgs`` in ``ch3`` and ``ablation``, is the same run)."""
        ident = self.identity()
        del ident["suite"]
        return run_key(ident)


@dataclass
class RunResult:
    status: str  # "done", "diverged" or "failed"
    records: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    epochs: float = 0.0
    steps: int = 0
    train_seconds: float = 0.0
    warm_start_seconds: float = 0.0
    forward_passes: int = 0
    backward_passes: int = 0
    warm_start_forward_passes: int = 0
    warm_start_backward_passes: int = 0
    curvature_seconds: float = 0.0
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def final_train_loss(self) -> float:
        return self.records[-1]["train_loss"] if self.records else math.nan

    @property
    def best_train_loss(self) -> float:
        """The lowest training loss at the end of an epoch (the thesis's selection criterion)."""
        vals = [r["train_loss"] for r in self.records if r["epoch"] > 0 and math.isfinite(r["train_loss"])]
        return min(vals) if vals else math.inf

    @property
    def final_test_error(self) -> float:
        return self.records[-1]["test_error"] if self.records else math.nan

    @property
    def best_test_error(self) -> float:
        vals = [r["test_error"] for r in self.records if r["epoch"] > 0 and math.isfinite(r["test_error"])]
        return min(vals) if vals else math.inf

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "records"}
        out.update(
            final_train_loss=self.final_train_loss,
            best_train_loss=self.best_train_loss,
            final_test_error=self.final_test_error,
            best_test_error=self.best_test_error,
        )
        return out


def decay_every(problem: P.Problem, method: str, budget: Budget) -> int | None:
    """E of the CNN step schedule: 60 (first-order, 200 epochs) / 50 (second-order, 150 epochs); scaled to
    ``--epochs`` (0.3 and 1/3 of it), the thesis values under a time budget; ``None`` for other problems."""
    if problem.kind != "cnn":
        return None
    first = method in FIRST_ORDER or is_external(method)
    if budget.epochs is None:
        return 60 if first else 50
    return max(1, round(budget.epochs * (0.3 if first else 1 / 3)))


def thesis_epochs(problem: P.Problem, method: str) -> int | None:
    """The thesis's epoch count: CNNs 200 (first-order) / 150 (second-order); classifiers as in 5.8."""
    if problem.kind == "cnn":
        return 200 if method in FIRST_ORDER or is_external(method) else 150
    return problem.epochs


def thesis_rules(cls: type[SecondOrderOptimizer], model: nn.Module, hp: dict[str, Any]) -> dict[str, Any]:
    """``hp`` with the thesis's treatment of the tensors KFAC / K-BFGS give no Kronecker factors:
    the momentum gradient (3.4.3, 3.7.2; ``fallback="momentum"``), normalisation layers included
    (KFAC would otherwise model their scale and shift). What ``hp`` sets itself wins."""
    if not issubclass(cls, KroneckerFactoredOptimizer):
        return hp
    out = dict(hp)
    out.setdefault("fallback", "momentum")
    if "channel" in cls.block_kinds and "exclude" not in out and "layers" not in out:
        norms = {type(b.module) for b in layer_blocks(model).values() if b.curvature == "channel"}
        if norms:
            out["exclude"] = sorted(norms, key=lambda t: t.__name__)
    return out


def build_optimizer(
    method: str, model: nn.Module, hp: dict[str, Any], *, thesis: bool = True
) -> SecondOrderOptimizer:
    """``so.make_optimizer`` with rejected hyper-parameters turned into :class:`MethodUnavailable`.

    ``thesis``: apply :func:`thesis_rules` (every thesis problem; not ``charlm``, which runs the
    library's defaults).
    """
    if is_external(method):  # a torch.optim class by its import path
        try:
            return TorchOptimizerRow(method, model, hp)  # type: ignore[return-value]
        except ValueError as err:
            raise MethodUnavailable(f"{method}: hyper-parameters rejected ({err})") from None
    cls = optimizer_class(method)
    if thesis:
        hp = thesis_rules(cls, model, hp)
    try:
        with warnings.catch_warnings():
            # the thesis presets leave what KFAC / K-BFGS do not model to the momentum gradient on
            # purpose (thesis_rules); charlm's defaults take the diagonal fallback
            warnings.simplefilter("ignore", UnmodeledParametersWarning)
            return make_optimizer(method, model, **hp)
    except ValueError as err:
        raise MethodUnavailable(f"{method}: hyper-parameters rejected ({err})") from None


def jsonable(obj: Any) -> Any:
    """Tensors and numpy values -> Python numbers and lists (for diagnostics)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)


class _Timer:
    def __init__(self, clock: str, device: torch.device):
        self.cuda = device.type == "cuda"
        self.fn = time.process_time if clock == Clock.PROCESS.value else time.perf_counter

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return self.fn()


def train(
    spec: RunSpec,
    problem: P.Problem,
    data: P.Prepared,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run ``spec`` on prepared data; ``on_epoch`` sees each evaluation record (it may raise to abort)."""
    device = data.x_train.device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.seed)
        model = problem.build(data.num_classes).to(device)
        loss_fn, likelihood = P.make_loss(problem, model, spec.l2)
        if (why := P.unsupported(problem, spec.method)) is not None:
            raise MethodUnavailable(why)
        opt = build_optimizer(spec.method, model, spec.hp, thesis=problem.kind != "lm")
        return _train(spec, problem, data, model, loss_fn, likelihood, opt, on_epoch)


def _train(spec, problem, data, model, loss_fn, likelihood, opt, on_epoch) -> RunResult:  # noqa: ANN001
    device = data.x_train.device
    timer = _Timer(spec.clock, device)
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    m = spec.batch_size
    n = len(data.x_train)
    per_epoch = n // m
    if per_epoch < 1:
        raise ValueError(f"{spec.problem}: {n} training examples, fewer than one batch of {m}")
    lr0 = opt.param_groups[0]["lr"]
    result = RunResult(status="done")

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(n, generator=gen, device=device)
        for b in range(per_epoch):
            idx = perm[b * m : (b + 1) * m]
            x = data.x_train[idx]
            if data.augment:
                x = P.augment(x, data.pad_value, gen)
            yield x, data.t_train[idx]

    def evaluate(epoch: float) -> bool:
        loss = P.train_loss(problem, model, loss_fn, data, m)
        err = P.test_error(problem, model, data, m)
        rec = dict(
            epoch=epoch,
            step=result.steps,
            train_seconds=result.train_seconds,
            train_loss=loss,
            test_error=err,
            lr=opt.param_groups[0]["lr"],
            forward_passes=opt.stats.forward_passes,
            backward_passes=opt.stats.backward_passes,
            diagnostics=jsonable(copy.deepcopy(opt.stats.diagnostics)),
        )
        result.records.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
        return math.isfinite(loss)

    def finish() -> RunResult:
        s = opt.stats
        result.forward_passes, result.backward_passes = s.forward_passes, s.backward_passes
        result.warm_start_forward_passes = s.warm_start_forward_passes
        result.warm_start_backward_passes = s.warm_start_backward_passes
        result.curvature_seconds = s.curvature_seconds
        result.diagnostics = jsonable(copy.deepcopy(s.diagnostics))
        return result

    evaluate(0.0)
    start = timer.now()
    try:
        opt.warm_start(Closure(model, x, y, loss_fn, likelihood) for x, y in batches())
    except NonFiniteError as err:
        result.status, result.error = "diverged", str(err)
        return finish()
    result.warm_start_seconds = timer.now() - start

    epoch = 0
    while True:
        if spec.decay_every:
            opt.param_groups[0]["lr"] = lr0 * 0.1 ** (epoch // spec.decay_every)
        done_in_epoch = 0
        out_of_time = False
        tick = timer.now()
        try:
            for x, y in batches():
                opt.step(Closure(model, x, y, loss_fn, likelihood))
                result.steps += 1
                done_in_epoch += 1
                now = timer.now()
                result.train_seconds += now - tick
                tick = now
                if spec.budget.seconds is not None and result.train_seconds >= spec.budget.seconds:
                    out_of_time = True
                    break
        except NonFiniteError as err:
            result.status, result.error = "diverged", str(err)
            result.epochs = epoch + done_in_epoch / per_epoch
            evaluate(result.epochs)
            return finish()
        result.epochs = epoch + done_in_epoch / per_epoch
        epoch += 1
        if not evaluate(result.epochs):
            result.status, result.error = "diverged", "non-finite training loss at evaluation"
            return finish()
        if out_of_time or (spec.budget.epochs is not None and epoch >= spec.budget.epochs):
            return finish()
