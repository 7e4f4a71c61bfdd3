"""The thesis hyper-parameter tables: every row builds its optimizer, best values lie in their grids."""

from __future__ import annotations

import importlib

import pytest
import torch

from secondorder.bench import presets as PR
from secondorder.bench import problems as P
from secondorder.optim import make_optimizer
from secondorder.optim.registry import METHODS


def _model(problem: str) -> torch.nn.Module:
    prob = P.get(problem)
    if prob.kind == "cnn":  # the hyper-parameters do not depend on the depth: use the small ResNet32
        return P.get("cifar10-resnet32").build(10)
    return prob.build(10 if prob.loss == "ce" else 1)


@pytest.mark.parametrize("suite", list(PR.SUITES))
def test_rows_build_their_optimizers(suite: str) -> None:
    for problem, rows in PR.SUITES[suite].rows.items():
        assert problem in P.PROBLEMS
        labels = [r.label for r in rows]
        assert len(labels) == len(set(labels)), f"{suite}/{problem}: duplicate labels"
        model = _model(problem)
        for row in rows:
            assert row.method in METHODS, row.method
            make_optimizer(row.method, model, **row.hp)
            make_optimizer(row.method, model, **row.grid_points()[-1])


@pytest.mark.parametrize("suite", list(PR.SUITES))
def test_best_values_lie_in_the_grid(suite: str) -> None:
    for problem, rows in PR.SUITES[suite].rows.items():
        for row in rows:
            for name, values in row.grid.items():
                assert row.hp[name] in values, (
                    f"{suite}/{problem}/{row.label}: {name}={row.hp[name]} not in grid"
                )


def test_chapter_conventions() -> None:
    for row in PR.rows_for("ch2", "curves"):
        if row.method not in ("adam", "rmsprop"):
            assert row.hp["momentum_style"] == "average", row.label
        else:
            assert row.hp["stat_decay"] == 0.9  # beta2 = 0.9 in chapter 2
    assert PR.SUITES["ch2"].l2 == 1e-5 and PR.SUITES["ch3"].l2 == 0.0
    assert {r.method for r in PR.rows_for("ch2", "mnist")} == {
        "kbfgs20",
        "kbfgsl20",
        "kfac",
        "adam",
        "rmsprop",
        "sgd",
    }
    kfac2 = next(r for r in PR.rows_for("ch2", "mnist") if r.label == "kfac")
    assert kfac2.hp["pi"] == "none"  # Algorithm 7
    for row in PR.rows_for("ch3", "curves"):
        if row.method in ("kbfgs20", "kbfgsl20"):
            assert row.hp["momentum_style"] == "accumulate"
    ch3 = {r.label: r for r in PR.rows_for("ch3", "curves")}
    assert ch3["kbfgs-t20"].method == "kbfgs" and ch3["kbfgs-t20"].hp["update_freq"] == 20
    assert ch3["kfac"].hp["inverse_freq"] == 20 and ch3["tnt"].hp["inverse_freq"] == 20
    # the thesis pi-split by default; the published code's pi = 1 as an extra, non-default row
    assert "pi" not in ch3["kfac"].hp and ch3["kfac"].default
    assert ch3["kfac-pi1"].hp == {**ch3["kfac"].hp, "pi": "none"} and not ch3["kfac-pi1"].default
    cnn = {r.label: r for r in PR.rows_for("ch3", "cifar100-resnet32")}
    assert cnn["kbfgs"].hp["update_freq"] == 20 and cnn["kfac"].hp["inverse_freq"] == 100
    assert cnn["kbfgs"].hp == {
        "update_freq": 20,
        "lr": 1e3,
        "weight_decay": 1e-6,
        "damping": 1e4,
    }  # Table 3.7
    assert PR.rows_for("ch5", "webspam")[0].hp == {"lr": 0.05, "curvature_batch": 30}  # SMW-GN, 5.8


def test_ablation_switches_match_the_kbfgs_options() -> None:
    variants = importlib.import_module("secondorder.optim.kbfgs").VARIANTS
    assert PR.ABLATION_SWITCHES["improvement1_off"] == variants["improvement1-off"]
    assert PR.ABLATION_SWITCHES["improvement2_off"] == variants["improvement2-off"]
    rows = {r.label: r for r in PR.rows_for("ablation", "curves")}
    assert rows["kbfgs-no-dpdlm"].hp["pair_damping"] == "dd" and rows["kbfgs20"].method == "kbfgs20"


def test_unknown_suite_or_problem() -> None:
    with pytest.raises(ValueError, match="unknown suite"):
        PR.rows_for("ch9", "curves")
    with pytest.raises(ValueError, match="suites with webspam: ch5"):
        PR.rows_for("ch3", "webspam")


def test_thesis_values() -> None:
    assert PR.thesis_value("ch3", "curves", "kfac") == 55.12
    assert PR.thesis_value("ch3", "cifar100-resnet32", "tnt") == 71.70
    assert PR.thesis_value("ablation", "faces", "kbfgs-no-minibatch-ha") == 5.26
    assert PR.thesis_value("ch2", "curves", "kfac") is None


@pytest.mark.parametrize("problem", PR.CNNS)
def test_chapter2_kbfgs_rows_on_cnns_are_inferred_from_table_3_7(problem: str) -> None:
    """Not in the thesis: damping 0.3 (DD needs <= 1), T = 20, and Table 3.7 kbfgs's BatchNorm
    learning rate lr/lam and per-step decoupled decay lr * wd, so lr' = lr/lam, wd' = wd * lam."""
    lr, wd, lam = PR.TABLE_3_7["kbfgs"][problem]
    rows = {r.label: r for r in PR.rows_for("ch3", problem)}
    for label in ("kbfgs20", "kbfgsl20"):
        row = rows[label]
        assert not row.default and "[inferred]" in row.source and row.method == label
        assert row.hp["lr"] == pytest.approx(lr / lam) and row.hp["damping"] == 0.3
        assert row.hp["lr"] * row.hp["weight_decay"] == pytest.approx(lr * wd)
        assert row.hp["update_freq"] == 20 and row.hp["momentum_style"] == "accumulate"
    assert rows["kbfgsl20"].hp["history_size"] == 100
