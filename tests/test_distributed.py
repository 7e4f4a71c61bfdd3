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
from secondorder import distributed as D
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
        "smw-ng",
        "smw-ng-bd",
        "smw-gn",
        "hf",
    )
] + [
    "kbfgs+diagonal",  # K-BFGS with a Linear left to the diagonal fallback
    # plain torch closures (loss_fn= at construction) on the DDP-wrapped model
    "kfac-ef+plain",
    "kbfgs+plain",
    "smw-gn+plain",
    # torch.compile around the DDP wrapper (the optimizer's passes run it eagerly)
    "kfac-ef+compiled",
]

#: chapter-5 methods: the curvature subsample S2 is the whole batch, so the union of the ranks'
#: S2 is the one process's S2
LM_METHODS = {"smw-ng", "smw-ng-bd", "smw-gn", "hf"}


def _hparams(name):
    if name.endswith("+compiled"):
        return _hparams(name.split("+")[0])
    if name.endswith("+plain"):
        return dict(_hparams(name.split("+")[0]), loss_fn=nn.CrossEntropyLoss())
    if name.endswith("+diagonal"):  # v from the all-reduced gradient and the global batch size
        return dict(TEST_HP[name.split("+")[0]], exclude=["2"], fallback="diagonal")
    hp = dict(TEST_HP[name])
    if "kfac" in name:
        hp["inverse_freq"] = 1
    if name in LM_METHODS:
        hp["curvature_batch"] = 1.0
    return hp


def _train(name, model, batches, warm):
    hp = _hparams(name)
    opt = so.make_optimizer(name.split("+")[0], model, **hp)
    loss_fn = hp.get("loss_fn", nn.CrossEntropyLoss())
    opt.warm_start([so.Closure(model, x, y, loss_fn) for x, y in warm])
    for x, y in batches:
        if name.endswith("+plain"):  # the loop of a Lightning user

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            opt.step(so.Closure(model, x, y, loss_fn))
    return opt


def _run(job, tmp_path, *args):
    """Run ``job(rank, out_file, *args)`` on WORLD gloo ranks; returns what rank 0 saved."""
    out_file = tmp_path / "rank0.pt"
    mp.start_processes(
        _worker,
        args=(job, str(tmp_path / "init"), str(out_file), args),
        nprocs=WORLD,
        start_method="spawn",
        join=True,
    )
    return torch.load(out_file, weights_only=False)


def _worker(rank, job, init_file, out_file, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=120),
    )
    job(rank, out_file, *args)
    # Orderly shutdown: every rank is done with communication, the job's objects (DDP's reducer
    # holds gloo work objects) are freed before the process group, and the process leaves
    # without interpreter finalisation, where gloo's worker threads can abort it ("terminate
    # called without an active exception", seen about once in 60 runs on 2 CPU cores before this).
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train_job(rank, out_file, name):
    x, y = classification_data(n=STEPS * BATCH)
    model = tiny_mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    if name.endswith("+compiled"):
        ddp = torch.compile(ddp, backend="aot_eager")
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


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_ddp_on_two_ranks_equals_one_process(name, tmp_path):
    result = _run(_train_job, tmp_path, name)

    x, y = classification_data(n=STEPS * BATCH)
    model = tiny_mlp()
    full = [(x[k * BATCH : (k + 1) * BATCH], y[k * BATCH : (k + 1) * BATCH]) for k in range(STEPS)]
    # the warm start saw each rank's halves of the first two batches: the statistics of full batches 0 and 1
    opt = _train(name, model, full, full[:2])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(result["params"][k], v, rtol=1e-10, atol=1e-12, msg=k)
    state = opt.state_dict()
    for layer, st in state["module_state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(
                    result["opt"]["module_state"][layer][key], value, rtol=1e-9, atol=1e-12
                )
    if name.endswith("+diagonal"):  # the naive diagonals of the two fallback tensors agree
        diagonals = [
            (i, st["fallback_diagonal"])
            for i, st in state["param_state"].items()
            if "fallback_diagonal" in st
        ]
        assert len(diagonals) == 2
        for i, v in diagonals:
            torch.testing.assert_close(
                result["opt"]["param_state"][i]["fallback_diagonal"], v, rtol=1e-9, atol=1e-12
            )
    if name in LM_METHODS:  # the LM rule saw the same rho on every step
        assert result["opt"]["extra"]["lm_damping"] == pytest.approx(opt.lm_damping, rel=1e-10)


def _gather_job(rank, out_file):
    rows = 2 + rank  # uneven: rank 0 holds 2 rows, rank 1 holds 3
    a = torch.full((rows, 3), float(rank), dtype=torch.float64) + torch.arange(rows).view(-1, 1)
    b = torch.full((1 + rank, 2, 2), 10.0 + rank)
    gathered = D.all_gather_examples([a, b])
    if rank == 0:
        torch.save(gathered, out_file)


def test_all_gather_examples_concatenates_uneven_ranks_in_rank_order(tmp_path):
    a, b = _run(_gather_job, tmp_path)
    f64 = torch.float64
    parts = [torch.full((2 + r, 3), float(r), dtype=f64) + torch.arange(2 + r).view(-1, 1) for r in (0, 1)]
    expected_a = torch.cat(parts)
    torch.testing.assert_close(a, expected_a)
    torch.testing.assert_close(b, torch.cat([torch.full((1, 2, 2), 10.0), torch.full((2, 2, 2), 11.0)]))


def _mismatch_job(rank, out_file):
    try:
        D.all_gather_examples([torch.zeros(2, 3 + rank)])
        message = "no error"
    except ValueError as err:  # raised on every rank alike, so no rank waits in a collective
        message = str(err)
    if rank == 0:
        torch.save(message, out_file)


def test_all_gather_examples_rejects_rows_of_different_shapes(tmp_path):
    message = _run(_mismatch_job, tmp_path)
    assert "tensor 0" in message and "on rank 1" in message
    assert "only the first dimension may differ" in message


def test_all_gather_examples_without_a_process_group_is_the_identity():
    t = torch.randn(3, 2)
    (out,) = D.all_gather_examples([t])
    assert out is t


UNEVEN = (3, 5)  # examples on rank 0 and rank 1


def _smw_uneven_job(rank, out_file, name, lam, tau):
    x, y = classification_data(n=sum(UNEVEN))
    lo = sum(UNEVEN[:rank])
    model = tiny_mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = so.make_optimizer(name, ddp, lr=1.0, damping=lam, tau=tau, curvature_batch=1.0)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt.step(so.Closure(ddp, x[lo : lo + UNEVEN[rank]], y[lo : lo + UNEVEN[rank]], nn.CrossEntropyLoss()))
    if rank == 0:
        torch.save(before - torch.cat([p.detach().reshape(-1) for p in model.parameters()]), out_file)


@pytest.mark.parametrize("name,kind", [("smw-ng", "ng"), ("smw-gn", "gn")])
def test_smw_on_uneven_ranks_solves_with_the_union_of_their_examples(name, kind, tmp_path):
    """Ranks with 3 and 5 examples: the step is ``(lam I + (1/8) J^T H J)^-1 g`` with ``J`` over all
    8 examples (s = 1/sum N2) and ``g`` the DDP gradient (the mean of the ranks' mean gradients)."""
    from tests.optim.test_smw import LAM, TAU, dense_jacobian, flat_grad

    step = _run(_smw_uneven_job, tmp_path, name, LAM, TAU)
    x, y = classification_data(n=sum(UNEVEN))
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    g = 0.5 * (flat_grad(model, x[:3], y[:3], loss_fn) + flat_grad(model, x[3:], y[3:], loss_fn))
    jac, hess = dense_jacobian(model, x, y, loss_fn, kind)
    curvature = jac.t() @ hess @ jac / sum(UNEVEN)
    expected = torch.linalg.solve((LAM + TAU) * torch.eye(len(g), dtype=g.dtype) + curvature, g)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-12)
