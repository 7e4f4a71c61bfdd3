"""benchmarks/step_cost.py runs (the transformer problem at one timed step) and refuses bad counts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_cost.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_the_transformer_problem_times_a_kronecker_method_against_sgd():
    out = run(
        "--problem",
        "transformer",
        "--methods",
        "kfac",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--block",
        "1",
        "--threads",
        "1",
    )
    assert out.returncode == 0, out.stderr
    assert "character transformer (2 layers, width 128, context 64), batch 32" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("| kfac")]
    assert len(rows) == 1 and rows[0].rstrip().endswith("|  |")  # no autoencoder goal on this problem


@pytest.mark.parametrize(
    "args", [("--steps", "0"), ("--block", "0"), ("--warmup", "-1"), ("--problem", "lstm")]
)
def test_bad_arguments_exit_with_a_message(args):
    out = run(*args)
    assert out.returncode == 2
    assert args[0] in out.stderr
