"""Results in SQLite: runs, their hyper-parameters and per-epoch metrics.

A run is identified by a key hashed from everything that determines it (problem, data set,
label, method, hyper-parameters, seed, budget, batch size, L2 term, device). A finished run
(``done`` or ``diverged``) is never repeated; a run left ``running`` by an interrupted process
is discarded and run again. Reports are queries over this file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE NOT NULL,
    problem TEXT NOT NULL,
    dataset TEXT NOT NULL,
    suite TEXT NOT NULL,
    label TEXT NOT NULL,
    method TEXT NOT NULL,
    seed INTEGER NOT NULL,
    hp TEXT NOT NULL,
    config TEXT NOT NULL,
    phase TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    final_train_loss REAL,
    best_train_loss REAL,
    final_test_error REAL,
    best_test_error REAL,
    epochs REAL,
    steps INTEGER,
    train_seconds REAL,
    warm_start_seconds REAL,
    forward_passes INTEGER,
    backward_passes INTEGER,
    warm_start_forward_passes INTEGER,
    warm_start_backward_passes INTEGER,
    curvature_seconds REAL,
    diagnostics TEXT,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    epoch REAL NOT NULL,
    step INTEGER NOT NULL,
    train_seconds REAL NOT NULL,
    train_loss REAL,
    test_error REAL,
    lr REAL,
    forward_passes INTEGER,
    backward_passes INTEGER,
    diagnostics TEXT
);
CREATE INDEX IF NOT EXISTS epochs_run ON epochs(run_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

FINISHED = ("done", "diverged")
RESULT_FIELDS = (
    "final_train_loss",
    "best_train_loss",
    "final_test_error",
    "best_test_error",
    "epochs",
    "steps",
    "train_seconds",
    "warm_start_seconds",
    "forward_passes",
    "backward_passes",
    "warm_start_forward_passes",
    "warm_start_backward_passes",
    "curvature_seconds",
)


def canonical(obj: Any) -> str:
    """Stable JSON (sorted keys, floats by ``repr``) for hashing and storage."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(identity).encode()).hexdigest()[:24]


class Store:
    """A SQLite results file (created on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=30)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA foreign_keys = ON")
        with self.conn:
            self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self.conn:
            yield self.conn

    # ------------------------------------------------------------------------- runs
    def finished(self, key: str) -> sqlite3.Row | None:
        """The finished run with this key, or ``None`` (a stale unfinished one is deleted)."""
        row = self.conn.execute("SELECT * FROM runs WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        if row["status"] in FINISHED:
            return row
        with self._tx() as c:
            c.execute("DELETE FROM runs WHERE id = ?", (row["id"],))
        return None

    def start(self, key: str, identity: dict[str, Any], phase: str) -> int:
        """Insert a ``running`` row; returns its id."""
        with self._tx() as c:
            c.execute("DELETE FROM runs WHERE key = ?", (key,))
            cur = c.execute(
                "INSERT INTO runs (key, problem, dataset, suite, label, method, seed, hp, config, phase,"
                " status,"
                " started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                (
                    key,
                    identity["problem"],
                    identity["dataset"],
                    identity["suite"],
                    identity["label"],
                    identity["method"],
                    identity["seed"],
                    canonical(identity["hp"]),
                    canonical(identity),
                    phase,
                    time.time(),
                ),
            )
            return int(cur.lastrowid)

    def add_epoch(self, run_id: int, record: dict[str, Any]) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO epochs (run_id, epoch, step, train_seconds, train_loss, test_error, lr,"
                " forward_passes,"
                " backward_passes, diagnostics) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    record["epoch"],
                    record["step"],
                    record["train_seconds"],
                    _num(record["train_loss"]),
                    _num(record["test_error"]),
                    record.get("lr"),
                    record.get("forward_passes"),
                    record.get("backward_passes"),
                    canonical(record.get("diagnostics") or {}),
                ),
            )

    def finish(self, run_id: int, status: str, result: dict[str, Any], error: str | None = None) -> None:
        fields = ", ".join(f"{f} = ?" for f in RESULT_FIELDS)
        with self._tx() as c:
            c.execute(
                f"UPDATE runs SET status = ?, error = ?, diagnostics = ?, finished_at = ?, {fields}"
                " WHERE id = ?",
                (
                    status,
                    error,
                    canonical(result.get("diagnostics") or {}),
                    time.time(),
                    *(_num(result.get(f)) for f in RESULT_FIELDS),
                    run_id,
                ),
            )

    def mark_phase(self, key: str, phase: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE runs SET phase = ? WHERE key = ?", (phase, key))

    def run_by_key(self, key: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM runs WHERE key = ?", (key,)).fetchone()

    def epochs(self, run_id: int) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,)).fetchall()

    def runs(self, **where: Any) -> list[sqlite3.Row]:
        clause = " AND ".join(f"{k} = ?" for k in where) or "1"
        return self.conn.execute(
            f"SELECT * FROM runs WHERE {clause} ORDER BY id", tuple(where.values())
        ).fetchall()

    # ------------------------------------------------------------------------- meta
    def set_meta(self, key: str, value: Any) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, canonical(value)))

    def get_meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row["value"])


def _num(value: Any) -> Any:
    """SQLite stores inf but not NaN (it becomes NULL); keep both readable as floats."""
    if isinstance(value, float) and value != value:
        return None
    return value
