"""Real torch.distributed (gloo, 2 CPU processes): DDP on N ranks with batch m/N = one process, batch m."""

from __future__ import annotations

import gc
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import secondorder as so
from tests.helpers import TEST_HP, classification_data, tiny_mlp

WORLD = 2
STEPS = 4
BATCH = 8

#: deterministic methods (no sampled targets), where the equivalence is exact up to round-off
DETERMINISTIC = [
    n
    for n in (
        "sgd",
        "adam",
        "rmsprop",
        "kfac-ef",
        "kbfgs",
        "kbfgsl",
        "kbfgs20",
        "kbfgsl20",
        "tnt-ef",
        "shampoo",
    )
    if n in so.implemented()
]


def _train(name, model, batches, warm):
    opt = so.make_optimizer(
        name, model, **{**TEST_HP[name], "inverse_freq": 1} if "kfac" in name else TEST_HP[name]
    )
    loss_fn = nn.CrossEntropyLoss()
    opt.warm_start([so.Closure(model, x, y, loss_fn) for x, y in warm])
    for x, y in batches:
        opt.step(so.Closure(model, x, y, loss_fn))
    return opt


def _worker(rank, name, init_file, out_file):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=120),
    )
    x, y = classification_data(n=STEPS * BATCH)
    model = tiny_mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    half = BATCH // WORLD
    mine = [
        (
            x[k * BATCH + rank * half : k * BATCH + (rank + 1) * half],
            y[k * BATCH + rank * half : k * BATCH + (rank + 1) * half],
        )
        for k in range(STEPS)
    ]
    opt = _train(name, ddp, mine, mine[:2])
    if rank == 0:
        torch.save({"params": model.state_dict(), "opt": opt.state_dict()}, out_file)
    # Orderly shutdown: every rank is done with communication, DDP (whose reducer holds gloo work
    # objects) is freed before its process group, and the process leaves without interpreter
    # finalisation, where gloo's worker threads can abort it ("terminate called without an active
    # exception", seen about once in 60 runs on 2 CPU cores before this).
    dist.barrier()
    del opt, ddp
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_ddp_on_two_ranks_equals_one_process(name, tmp_path):
    out_file = tmp_path / "rank0.pt"
    mp.start_processes(
        _worker,
        args=(name, str(tmp_path / "init"), str(out_file)),
        nprocs=WORLD,
        start_method="spawn",
        join=True,
    )
    result = torch.load(out_file, weights_only=False)

    x, y = classification_data(n=STEPS * BATCH)
    model = tiny_mlp()
    full = [(x[k * BATCH : (k + 1) * BATCH], y[k * BATCH : (k + 1) * BATCH]) for k in range(STEPS)]
    # the warm start saw each rank's halves of the first two batches: the statistics of full batches 0 and 1
    opt = _train(name, model, full, full[:2])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(result["params"][k], v, rtol=1e-10, atol=1e-12, msg=k)
    for layer, st in opt.state_dict()["module_state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(
                    result["opt"]["module_state"][layer][key], value, rtol=1e-9, atol=1e-12
                )
