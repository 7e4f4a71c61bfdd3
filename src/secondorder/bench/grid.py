"""Planning and executing a benchmark: best values or a grid search, then seeds; resumable.

``--hp best`` runs every selected row at its thesis values for each seed. ``--hp grid`` first
runs every grid point of a row with the first seed, selects the best point as the thesis did
(minimum over epochs of the training loss for the autoencoders and the chapter-5 classifiers,
maximum over epochs of the test accuracy for the CNNs; diverged runs lose), then runs the
remaining seeds at the best point. Every run goes through the store: a finished run (same key)
is read back instead of repeated, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import data as D
from . import presets as PR
from . import problems as P
from .external import is_external, resolve
from .runner import Budget, Clock, MethodUnavailable, RunResult, RunSpec, build_optimizer, decay_every, train
from .store import Store

logger = logging.getLogger(__name__)

#: the main job, ``secondorder bench`` with no ``--problem``: the MNIST autoencoder (on the 5,000 real
#: digits of the mnist5k stand-in unless real files are given) with this time budget
MAIN_PROBLEM = "mnist"
#: the main job's data without ``--data-dir`` / ``--dataset``
MAIN_DATASET = "mnist5k"
#: the main job's rows: the thesis's proposals (K-BFGS, K-BFGS(L), TNT), K-BFGS's chapter-2 form,
#: KFAC, Shampoo and the first-order baselines; ``--problem mnist`` runs all ten of Tables 3.5/4.3
MAIN_ROWS = ("kbfgs", "kbfgsl", "kbfgs20", "kfac", "tnt", "shampoo", "adam", "sgd")
#: the main job's time budget (process seconds per run): 8 rows in about 10 minutes on a 2-core
#: CPU, long enough for most methods to leave the mean-image plateau
MAIN_SECONDS = 60.0
#: the default time budget of ``--problem curves`` (process seconds per run): its 10 default rows
#: take about 8 minutes on a 2-core CPU
QUICK_SECONDS = 30.0


class BenchError(Exception):
    """A benchmark that cannot run as configured (the CLI prints the message, exit code 2)."""


@dataclass(frozen=True)
class BenchConfig:
    """One ``secondorder bench`` invocation."""

    problem: str = "curves"
    suite: str | None = None
    labels: tuple[str, ...] | None = None
    seconds: float | None = None
    epochs: int | None = None
    seeds: int = 1
    base_seed: int = 0
    hp_mode: Literal["best", "grid"] = "best"
    data: D.DataOptions = field(default_factory=D.DataOptions)
    device: str = "cpu"
    clock: str | None = None
    batch_size: int | None = None
    train_size: int | None = None
    test_size: int | None = None

    @property
    def suite_name(self) -> str:
        return self.suite or PR.default_suite(self.problem)


@dataclass
class RunRecord:
    """A finished run as the reports see it."""

    spec: RunSpec
    status: str
    result: dict[str, Any]
    epochs: list[dict[str, Any]]
    phase: str
    error: str | None = None


@dataclass
class Outcome:
    config: BenchConfig
    dataset: D.Dataset
    problem: P.Problem
    rows: list[PR.Preset]
    skipped: dict[str, str]
    finals: list[RunRecord]
    grid: dict[str, list[RunRecord]]
    best: dict[str, dict[str, Any]]
    budgets: dict[str, str]
    clock: str


ProgressFn = Callable[[str, dict[str, Any]], None]


def parse_label(spec: str) -> tuple[str, dict[str, Any]]:
    """``--optimizers`` entry ``"kfac:lr=0.1:damping=3"`` -> ``("kfac", {"lr": 0.1, "damping": 3})``.

    Values read as ``int``, then ``float``, then ``true``/``false``, else as the string itself
    (``pi=none``); the optimizer checks them when the benchmark validates its rows. A torch
    optimizer's ``module:Class`` path keeps its colon (``pytorch_optimizer:SOAP:lr=3e-3``).

    Raises:
        BenchError: an entry after ``:`` that is not ``name=value``, or a name set twice.
    """
    label, *items = spec.split(":")
    if items and "=" not in items[0] and _module_path(label) and items[0].strip().isidentifier():
        label, items = f"{label}:{items[0]}", items[1:]  # module:Class, a torch optimizer's path
    overrides: dict[str, Any] = {}
    for item in items:
        name, eq, raw = (x.strip() for x in item.partition("="))
        if not eq or not name or not raw:
            raise BenchError(f"--optimizers: in {spec!r}, expected name=value after ':', got {item!r}")
        if name in overrides:
            raise BenchError(f"--optimizers: in {spec!r}, {name} is set twice")
        overrides[name] = _literal(raw)
    return label.strip(), overrides


def _module_path(name: str) -> bool:
    """A dotted Python module name that is not a factory key (``pytorch_optimizer``)."""
    return name not in PR.METHOD_KEYS and all(part.isidentifier() for part in name.split("."))


def _literal(raw: str) -> Any:
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw.lower(), raw)


def select_rows(config: BenchConfig) -> tuple[list[PR.Preset], dict[str, str]]:
    """The rows to run and the rows skipped (label -> why; none are, since every method exists).

    Explicitly requested labels must exist (else :class:`BenchError`); a label that is a factory
    key without a thesis row runs with the library defaults; ``label:name=value:...`` sets
    hyper-parameters of that row (:func:`parse_label`), a row of its own. The default list is the
    suite's default rows.
    """
    rows = PR.rows_for(config.suite_name, config.problem)
    by_label = {r.label: r for r in rows}
    skipped: dict[str, str] = {}
    if config.labels:
        chosen = []
        for spec in config.labels:
            label, overrides = parse_label(spec)
            if label in by_label:
                row = by_label[label]
            elif label in PR.METHOD_KEYS:
                row = PR.Preset(label, label, {}, {}, "library defaults (no thesis row)", label)
            elif is_external(label):
                try:
                    resolve(label)
                except ValueError as err:
                    raise BenchError(str(err)) from None
                row = PR.Preset(label, label, {}, {}, "torch optimizer (its defaults)", label)
            else:
                raise BenchError(
                    f"unknown optimizer {label!r} for {config.problem} (suite {config.suite_name}); "
                    f"rows: {', '.join(by_label)}; or any factory key: {', '.join(PR.METHOD_KEYS)}; "
                    "or a torch optimizer class: module.Class or module:Class"
                )
            if overrides:  # a different row: its own label, its values, no grid over the set names
                row = dataclasses.replace(
                    row,
                    label=spec,
                    hp={**row.hp, **overrides},
                    grid={k: v for k, v in row.grid.items() if k not in overrides},
                    source=f"{row.source}; set on the command line: "
                    + ", ".join(f"{k}={v!r}" for k, v in overrides.items()),
                )
            chosen.append(row)
        return chosen, skipped
    chosen = [r for r in rows if r.default]
    if not chosen:
        raise BenchError(f"suite {config.suite_name} has no default rows for {config.problem}")
    return chosen, skipped


class Benchmark:
    """Runs a :class:`BenchConfig` against a store; ``progress(event, info)`` sees every step."""

    def __init__(
        self,
        config: BenchConfig,
        store: Store,
        progress: ProgressFn | None = None,
        dataset: D.Dataset | None = None,
    ):
        self.config = config
        self.store = store
        self.progress = progress or (lambda event, info: None)
        self.problem = P.get(config.problem)
        suite = PR.SUITES[config.suite_name]
        self.batch = config.batch_size or suite.batch_size or self.problem.batch_size
        self.l2 = suite.l2
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda: CUDA is not available on this machine")
        self.device = device
        self.clock = config.clock or (Clock.WALL.value if device.type == "cuda" else Clock.PROCESS.value)
        self.rows, self.skipped = select_rows(config)
        self.dataset = dataset or D.resolve(self.problem.family, config.data).subset(
            config.train_size, config.test_size
        )
        if len(self.dataset.x_train) < self.batch:
            raise BenchError(
                f"{len(self.dataset.x_train)} training examples, fewer than one batch of {self.batch} "
                "(use --batch-size or a larger --train-size)"
            )
        self.prepared = P.prepare(self.problem, self.dataset, device)
        self.validate()

    # ------------------------------------------------------------------------------ specs
    def budget_for(self, method: str) -> Budget:
        c = self.config
        if c.seconds is not None:
            return Budget(seconds=c.seconds)
        if c.epochs is not None:
            return Budget(epochs=c.epochs)
        if self.problem.name == "curves":
            return Budget(seconds=QUICK_SECONDS)
        if self.problem.time_budget is not None:
            return Budget(seconds=self.problem.time_budget)
        from .runner import thesis_epochs

        return Budget(epochs=thesis_epochs(self.problem, method) or 1)

    def spec(self, row: PR.Preset, hp: dict[str, Any], seed: int) -> RunSpec:
        budget = self.budget_for(row.method)
        return RunSpec(
            problem=self.problem.name,
            dataset=self.dataset.label,
            suite=self.config.suite_name,
            label=row.label,
            method=row.method,
            hp=dict(hp),
            seed=seed,
            budget=budget,
            batch_size=self.batch,
            l2=self.l2,
            device=self.device.type,
            clock=self.clock,
            decay_every=decay_every(self.problem, row.method, budget),
        )

    def validate(self) -> None:
        """Build every row's optimizer once, before anything runs.

        A row whose hyper-parameters its optimizer rejects stops the benchmark when it was asked
        for by name (:class:`BenchError`); in the default list it is skipped with the reason.
        """
        with torch.random.fork_rng(devices=[]):
            model = self.problem.build(self.prepared.num_classes).to(self.device)
        kept = []
        for row in self.rows:
            try:
                if (why := P.unsupported(self.problem, row.method)) is not None:
                    raise MethodUnavailable(why)
                build_optimizer(
                    row.method,
                    model,
                    row.grid_points()[0] if self.config.hp_mode == "grid" else row.hp,
                    thesis=self.problem.kind != "lm",
                )
            except MethodUnavailable as err:
                if self.config.labels:
                    raise BenchError(f"{row.label}: {err}") from None
                self.skipped[row.label] = str(err)
                continue
            kept.append(row)
        if not kept:
            raise BenchError(f"no method of {self.problem.name} can run: {self.skipped}")
        self.rows = kept

    # ------------------------------------------------------------------------------ runs
    def ensure(self, spec: RunSpec, phase: str, index: tuple[int, int]) -> RunRecord:
        """The run's record from the store, running it first if it has not finished before."""
        key = spec.key
        row = self.store.finished(key)
        info = {"spec": spec, "index": index, "phase": phase}
        if row is not None:
            self.progress("skip", info)
            return self._record(row)
        run_id = self.store.start(key, spec.identity(), phase)
        self.progress("start", info)

        def on_epoch(rec: dict[str, Any]) -> None:
            self.store.add_epoch(run_id, rec)
            self.progress("epoch", {**info, "record": rec})

        try:
            result = train(spec, self.problem, self.prepared, on_epoch)
            status, error = result.status, result.error
        except (KeyboardInterrupt, BenchError):
            raise
        except MethodUnavailable as err:
            result, status, error = RunResult("failed"), "failed", str(err)
        except Exception as err:  # noqa: BLE001 - a failing optimizer must not end a grid search
            logger.debug("run %s failed:\n%s", spec.label, traceback.format_exc())
            result, status, error = RunResult("failed"), "failed", f"{type(err).__name__}: {err}"
        self.store.finish(run_id, status, result.summary(), error)
        record = self._record(self.store.run_by_key(key))
        self.progress("end", {**info, "run": record})
        return record

    def _record(self, row: Any) -> RunRecord:
        import json

        ident = json.loads(row["config"])
        ident["budget"] = Budget(**ident["budget"])
        spec = RunSpec(**ident)
        result = {k: row[k] for k in row.keys()}
        result["final_train_loss"] = _nan(result["final_train_loss"])
        result["final_test_error"] = _nan(result["final_test_error"])
        epochs = [dict(e) for e in self.store.epochs(row["id"])]
        for e in epochs:
            e["diagnostics"] = json.loads(e["diagnostics"] or "{}")
        return RunRecord(spec, row["status"], result, epochs, row["phase"], row["error"])

    def run(self) -> Outcome:
        """Execute the plan; returns what the reports need."""
        c = self.config
        seeds = [c.base_seed + i for i in range(c.seeds)]
        finals: list[RunRecord] = []
        grids: dict[str, list[RunRecord]] = {}
        best: dict[str, dict[str, Any]] = {}
        total = sum((len(r.grid_points()) if c.hp_mode == "grid" else 0) + len(seeds) for r in self.rows)
        done = 0
        for row in self.rows:
            hp = row.hp
            if c.hp_mode == "grid":
                records = []
                for point in row.grid_points():
                    done += 1
                    records.append(self.ensure(self.spec(row, point, seeds[0]), "grid", (done, total)))
                grids[row.label] = records
                hp = select_best(records, self.problem.kind == "cnn").spec.hp
            best[row.label] = hp
            for seed in seeds:
                done += 1
                rec = self.ensure(self.spec(row, hp, seed), "final", (done, total))
                if rec.phase == "grid":
                    self.store.mark_phase(rec.spec.key, "grid+final")
                finals.append(rec)
        budgets = {r.label: self.budget_for(r.method).describe(self.clock) for r in self.rows}
        return Outcome(
            c, self.dataset, self.problem, self.rows, self.skipped, finals, grids, best, budgets, self.clock
        )


def criterion(record: RunRecord, maximise_accuracy: bool) -> float:
    """Smaller is better: min training loss over epochs, or minus the max test accuracy (CNNs)."""
    if record.status == "failed":
        return math.inf
    if maximise_accuracy:
        errors = [e["test_error"] for e in record.epochs if e["test_error"] is not None and e["epoch"] > 0]
        return min(errors) if errors else math.inf
    losses = [
        e["train_loss"]
        for e in record.epochs
        if e["epoch"] > 0 and e["train_loss"] is not None and math.isfinite(e["train_loss"])
    ]
    return min(losses) if losses else math.inf


def select_best(records: list[RunRecord], maximise_accuracy: bool) -> RunRecord:
    """The grid point with the best criterion (ties: the first)."""
    if not records:
        raise BenchError("empty grid")
    return min(records, key=lambda r: criterion(r, maximise_accuracy))


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def out_paths(out: Path) -> dict[str, Path]:
    return {
        "db": out / "bench.sqlite",
        "json": out / "summary.json",
        "md": out / "summary.md",
        "epoch_png": out / "loss_vs_epoch.png",
        "time_png": out / "loss_vs_time.png",
    }


__all__ = [
    "BenchConfig",
    "BenchError",
    "Benchmark",
    "Outcome",
    "RunRecord",
    "criterion",
    "out_paths",
    "select_best",
    "select_rows",
]
