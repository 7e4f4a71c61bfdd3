"""The training protocol: budgets, evaluation records, warm start accounting, schedules, divergence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.bench import curves as CV
from secondorder.bench import problems as P
from secondorder.bench import runner as R
from secondorder.bench.dataset import Dataset


@pytest.fixture(scope="module")
def curves_data() -> P.Prepared:
    d = CV.generate(CV.CurvesParams(n_train=300, n_test=100))
    return P.prepare(P.get("curves"), Dataset("curves-synth-v1", d.x_train, d.x_test, synthetic=True))


def _spec(method: str, hp: dict, budget: R.Budget, seed: int = 0, batch: int = 100, **kw) -> R.RunSpec:
    return R.RunSpec("curves", "test", "ch3", method, method, hp, seed, budget, batch, **kw)


def test_epoch_budget_records_and_passes(curves_data: P.Prepared) -> None:
    res = R.train(_spec("sgd", {"lr": 0.003}, R.Budget(epochs=2)), P.get("curves"), curves_data)
    assert res.status == "done" and res.steps == 6 and res.epochs == 2.0
    assert [r["epoch"] for r in res.records] == [0.0, 1.0, 2.0]
    assert [r["step"] for r in res.records] == [0, 3, 6]
    assert res.forward_passes == res.backward_passes == 6
    assert res.records[0]["train_loss"] == pytest.approx(784 * math.log(2), rel=0.1)
    assert res.records[-1]["train_loss"] < res.records[0]["train_loss"]
    assert res.best_train_loss == min(r["train_loss"] for r in res.records[1:])
    assert res.warm_start_forward_passes == 0 and res.warm_start_seconds >= 0


def test_seeded_runs_repeat_exactly(curves_data: P.Prepared) -> None:
    spec = _spec("adam", {"lr": 1e-3, "damping": 1e-3}, R.Budget(epochs=1))
    a = R.train(spec, P.get("curves"), curves_data)
    b = R.train(spec, P.get("curves"), curves_data)
    c = R.train(
        _spec("adam", {"lr": 1e-3, "damping": 1e-3}, R.Budget(epochs=1), seed=1), P.get("curves"), curves_data
    )
    assert [r["train_loss"] for r in a.records] == [r["train_loss"] for r in b.records]
    assert a.records[0]["train_loss"] != c.records[0]["train_loss"]  # another init
    before = torch.random.get_rng_state()
    R.train(spec, P.get("curves"), curves_data)
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is left alone


def test_warm_start_is_outside_the_budget(curves_data: P.Prepared) -> None:
    hp = {"lr": 0.3, "damping": 30.0, "update_freq": 1, "inverse_freq": 20}
    res = R.train(_spec("kfac", hp, R.Budget(epochs=1)), P.get("curves"), curves_data)
    assert res.status == "done"
    assert res.warm_start_forward_passes == 3 and res.warm_start_backward_passes == 3  # one epoch of batches
    assert res.forward_passes == 3 and res.backward_passes == 6  # true-label + sampled-label backward
    assert res.warm_start_seconds > 0


def test_time_budget_stops_mid_epoch(curves_data: P.Prepared) -> None:
    res = R.train(_spec("sgd", {"lr": 0.003}, R.Budget(seconds=1e-9)), P.get("curves"), curves_data)
    assert res.steps == 1 and res.epochs == pytest.approx(1 / 3)
    assert [r["epoch"] for r in res.records] == [0.0, pytest.approx(1 / 3)]  # evaluated where it stopped
    assert res.train_seconds > 0


def test_divergence_ends_the_run(curves_data: P.Prepared) -> None:
    res = R.train(
        _spec("sgd", {"lr": 1e8, "momentum": 0.0}, R.Budget(epochs=3)), P.get("curves"), curves_data
    )
    assert res.status == "diverged" and res.error
    assert res.epochs < 3


def test_unavailable_method_message() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(R.MethodUnavailable, match="hyper-parameters rejected.*unknown hyper-parameter"):
        R.build_optimizer("sgd", model, {"lr": 0.1, "bogus": 1})


@pytest.mark.parametrize("method", ["kfac", "kfac-ef", "kbfgs", "kbfgsl20"])
def test_thesis_presets_leave_batchnorm_to_the_momentum_gradient(method: str) -> None:
    """The thesis's rule (3.4.3, 3.7.2) on its problems; charlm runs the library's defaults."""
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    opt = R.build_optimizer(method, model, {"lr": 0.1})
    assert opt.param_groups[0]["fallback"] == "momentum"
    assert opt.modeled_modules == ["0", "3"]
    assert opt.coverage()["1.weight"] == "fallback: momentum gradient"
    default = R.build_optimizer(method, model, {"lr": 0.1}, thesis=False)
    assert (
        default.param_groups[0]["fallback"]
        == so.make_optimizer(method, nn.Linear(2, 2)).param_groups[0]["fallback"]
    )
    if method.startswith("kfac"):
        assert "1" in default.modeled_modules
    mine = R.build_optimizer(
        method, model, {"lr": 0.1, "fallback": "diagonal"}
    )  # the preset's own value wins
    assert mine.param_groups[0]["fallback"] == "diagonal"
    assert R.build_optimizer("adam", model, {"lr": 0.1}).param_groups[0].get("fallback") is None


def test_cnn_schedule_and_augmentation() -> None:
    """Step decay ``lr_0 * 0.1^floor(epoch / E)`` per epoch; CNN batches are augmented on the fly."""
    prob = P.Problem(
        "tiny-cnn",
        "cifar10",
        "cnn",
        lambda c: nn.Sequential(
            nn.Conv2d(3, 2, 3, stride=4), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, c)
        ),
        "ce",
        16,
        None,
        3,
        "tiny",
    )
    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 3, 32, 32, generator=g).numpy()
    y = torch.randint(0, 10, (48,), generator=g).numpy()
    data = P.prepare(prob, Dataset("cifar-synth10", x, x[:16], y, y[:16], num_classes=10, synthetic=True))
    budget = R.Budget(epochs=3)
    every = R.decay_every(prob, "kfac", budget)
    assert every == 1
    spec = R.RunSpec(
        "tiny-cnn",
        "t",
        "ch3",
        "kfac",
        "kfac",
        {"lr": 0.01, "damping": 0.1, "update_freq": 1, "inverse_freq": 2, "weight_decay": 0.1},
        0,
        budget,
        16,
        decay_every=every,
    )
    res = R.train(spec, prob, data)
    assert res.status == "done"
    assert [r["lr"] for r in res.records] == pytest.approx([0.01, 0.01, 0.001, 0.0001])
    assert 0 <= res.records[-1]["test_error"] <= 1


def test_thesis_schedule_constants() -> None:
    cnn = P.get("cifar10-resnet32")
    assert R.decay_every(cnn, "sgd", R.Budget(seconds=10)) == 60
    assert R.decay_every(cnn, "kbfgs", R.Budget(seconds=10)) == 50
    assert R.decay_every(cnn, "kfac", R.Budget(epochs=150)) == 50
    assert R.decay_every(cnn, "adam", R.Budget(epochs=200)) == 60
    assert R.decay_every(P.get("curves"), "sgd", R.Budget(epochs=5)) is None
    assert R.thesis_epochs(cnn, "sgd") == 200 and R.thesis_epochs(cnn, "tnt") == 150
    assert R.thesis_epochs(P.get("webspam"), "hf") == 1


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        R.Budget()
    with pytest.raises(ValueError, match="exactly one"):
        R.Budget(seconds=1, epochs=1)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        R.Budget(epochs=0)
