"""The scripts in ``examples/`` run as a user runs them (a fresh interpreter, at a tiny size) and
train: the final loss is below the first epoch's mean. The two-process torchrun example follows
the one-process closure loop (same method, data and batches)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--epochs", "2", "--examples", "1024"]


def run(*command: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, *command], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def losses(out: str) -> tuple[float, float]:
    first = float(re.findall(r"epoch 0: mean loss.*?(\d+\.\d+)", out)[0])
    final = float(re.findall(r"final loss ([0-9.]+)", out)[0])
    return first, final


@pytest.mark.parametrize(
    "script",
    ["plain_loop.py", "closure_loop.py", "preconditioner_amp.py"],
)
def test_an_example_runs_and_trains(script):
    first, final = losses(run(script, *TINY))
    assert final < first


def test_the_torchrun_example_follows_the_one_process_closure_loop():
    out = run(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "ddp_torchrun.py", *TINY
    )
    assert "(2 ranks)" in out
    first, final = losses(out)
    assert final < first
    _, single = losses(run("closure_loop.py", "--method", "kbfgs", *TINY))
    assert final == pytest.approx(single, abs=2e-4)  # printed to 4 decimals
