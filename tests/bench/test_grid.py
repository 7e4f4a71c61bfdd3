"""Grid search, selection and resumption: an interrupted grid run repeats no finished run."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from secondorder.bench import curves as CV
from secondorder.bench import data as D
from secondorder.bench import grid as G
from secondorder.bench import models as M
from secondorder.bench import presets as PR
from secondorder.bench import problems as P
from secondorder.bench.runner import Budget, RunSpec
from secondorder.bench.store import Store


class Interrupt(BaseException):  # like KeyboardInterrupt: not a failure of the run
    pass


def _config(tmp_path: Path, **kw) -> G.BenchConfig:
    base = dict(
        problem="curves",
        labels=("sgd",),
        epochs=1,
        seeds=2,
        hp_mode="grid",
        batch_size=100,
        train_size=200,
        test_size=100,
        data=D.DataOptions(cache_dir=tmp_path / "cache", curves=CV.CurvesParams(n_train=200, n_test=100)),
    )
    base.update(kw)
    return G.BenchConfig(**base)


def _events(
    config: G.BenchConfig, store: Store, stop_after: tuple[str, int] | None = None
) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    counts: dict[str, int] = {}

    def progress(event: str, info: dict) -> None:
        events.append((event, info["spec"].key))
        counts[event] = counts.get(event, 0) + 1
        if stop_after and event == stop_after[0] and counts[event] == stop_after[1]:
            raise Interrupt

    G.Benchmark(config, store, progress).run()
    return events


@pytest.fixture
def small_curves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The curves problem with a narrow network (the runs' identity does not include the model)."""
    narrow = dataclasses.replace(P.get("curves"), build=lambda _c: M.autoencoder([784, 16, 4, 16, 784]))
    monkeypatch.setitem(P.PROBLEMS, "curves", narrow)


def test_interrupted_grid_resumes_without_repeating(tmp_path: Path, small_curves: None) -> None:
    config = _config(tmp_path)
    n_grid = len(next(r for r in PR.rows_for("ch3", "curves") if r.label == "sgd").grid_points())
    assert n_grid == 10
    with Store(tmp_path / "bench.sqlite") as store:
        with pytest.raises(Interrupt):
            _events(config, store, stop_after=("end", 4))  # 4 grid runs finished, then the process "dies"
        done_before = {r["key"]: (r["id"], r["finished_at"]) for r in store.runs(status="done")}
        assert len(done_before) == 4
    with Store(tmp_path / "bench.sqlite") as store:
        with pytest.raises(Interrupt):  # now die in the middle of a run (it stays 'running')
            _events(config, store, stop_after=("epoch", 2))
        assert len(store.runs(status="running")) == 1
    with Store(tmp_path / "bench.sqlite") as store:
        events = _events(config, store)
        skipped = {k for e, k in events if e == "skip"}
        started = [k for e, k in events if e == "start"]
        assert set(done_before) <= skipped  # every finished run is read back, none repeated
        assert not set(done_before) & set(started)
        assert len(started) == n_grid - 4 + 1  # the rest of the grid, the interrupted one again, and seed 1
        for key, (run_id, finished_at) in done_before.items():
            row = store.run_by_key(key)
            assert (row["id"], row["finished_at"]) == (run_id, finished_at)
        assert not store.runs(status="running")
        assert len(store.runs()) == n_grid + 1
        assert len(store.runs(phase="grid+final")) == 1  # the best grid point doubles as seed 0
    with Store(tmp_path / "bench.sqlite") as store:  # a complete benchmark reruns nothing at all
        events = _events(config, store)
        assert {e for e, _ in events} == {"skip"}


def test_killed_process_resumes(tmp_path: Path) -> None:
    """A real ``secondorder bench`` process killed with SIGKILL midway; the rerun skips its finished runs."""
    out = tmp_path / "out"
    args = [
        "bench",
        "--problem",
        "curves",
        "--optimizers",
        "sgd",
        "--hp",
        "grid",
        "--epochs",
        "1",
        "--seeds",
        "1",
        "--train-size",
        "200",
        "--test-size",
        "100",
        "--batch-size",
        "100",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--curves",
        "n_train=200,n_test=100",
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "secondorder.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = out / "bench.sqlite"
    deadline = time.monotonic() + 120
    done = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    with sqlite3.connect(db) as conn:
                        done = conn.execute(
                            "SELECT COUNT(*) FROM runs WHERE status IN ('done', 'diverged')"
                        ).fetchone()[0]
                except sqlite3.OperationalError:
                    done = 0
                if done >= 2:
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with sqlite3.connect(db) as conn:
        before = dict(
            conn.execute("SELECT key, finished_at FROM runs WHERE status IN ('done', 'diverged')").fetchall()
        )
    assert 2 <= len(before) < 10, "the process was not killed midway"

    from secondorder.cli import main

    assert main(args) == 0
    with sqlite3.connect(db) as conn:
        after = dict(
            conn.execute("SELECT key, finished_at FROM runs WHERE status IN ('done', 'diverged')").fetchall()
        )
    assert len(after) == 10
    assert all(after[k] == v for k, v in before.items())  # finished runs were not repeated


def _record(
    label: str, losses: list[float | None], errors: list[float | None], status: str = "done"
) -> G.RunRecord:
    spec = RunSpec("curves", "d", "ch3", label, "sgd", {"lr": 0.1}, 0, Budget(epochs=1), 10)
    epochs = [
        {"epoch": float(i), "train_loss": loss, "test_error": err}
        for i, (loss, err) in enumerate(zip(losses, errors, strict=True))
    ]
    return G.RunRecord(spec, status, {}, epochs, "grid")


def test_selection_criteria() -> None:
    a = _record("a", [500.0, 80.0, 70.0], [0.5, 0.3, 0.2])
    b = _record("b", [500.0, 60.0, 90.0], [0.5, 0.4, 0.35])  # lower minimum training loss, worse accuracy
    diverged = _record("c", [500.0, 1.0, None], [0.5, 0.01, None], status="diverged")
    failed = _record("d", [500.0], [0.5], status="failed")
    never = _record("e", [1.0], [0.0])  # epoch 0 (initialisation) does not count
    assert G.criterion(b, False) == 60.0 and G.criterion(a, True) == 0.2
    assert G.select_best([a, b, failed, never], False) is b  # autoencoders: min training loss over epochs
    assert G.select_best([a, b, failed, never], True) is a  # CNNs: max test accuracy over epochs
    assert G.select_best([a, diverged], False) is diverged  # its finite epochs still count, as in the thesis
    assert G.criterion(failed, False) == float("inf")


def test_select_rows() -> None:
    rows, skipped = G.select_rows(G.BenchConfig())
    labels = [r.label for r in rows]
    assert "kfac" in labels and "sgd" in labels and "kfac-ef" not in labels  # -EF rows are extras
    rows, _ = G.select_rows(G.BenchConfig(labels=("rmsprop",)))  # a factory key without a ch3 row
    assert rows[0].hp == {} and "library defaults" in rows[0].source
    assert not skipped
    with pytest.raises(G.BenchError, match="unknown optimizer 'nope'"):
        G.select_rows(G.BenchConfig(labels=("nope",)))


def test_rejected_hyper_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_curves: None
) -> None:
    """Default list: a row whose optimizer rejects its values is skipped (with why); by name: an error."""
    bad = PR.Suite(
        "bad",
        "test",
        {"curves": [PR.Preset("sgd", "sgd", {"lr": 0.1}), PR.Preset("broken", "kfac", {"bogus": 1})]},
    )
    monkeypatch.setitem(PR.SUITES, "bad", bad)
    ds = D.resolve(
        "curves", D.DataOptions(cache_dir=tmp_path, curves=CV.CurvesParams(n_train=200, n_test=100))
    )
    with Store(tmp_path / "s.sqlite") as store:
        bench = G.Benchmark(G.BenchConfig(suite="bad", epochs=1, batch_size=100), store, dataset=ds)
        assert [r.label for r in bench.rows] == ["sgd"]
        assert "unknown hyper-parameter(s) bogus" in bench.skipped["broken"]
        with pytest.raises(G.BenchError, match="broken: kfac: hyper-parameters rejected"):
            G.Benchmark(
                G.BenchConfig(suite="bad", labels=("sgd", "broken"), epochs=1, batch_size=100),
                store,
                dataset=ds,
            )
