"""Behaviour every method shares: the one loop, bad input, NaN safety, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secondorder as so
from tests.helpers import TEST_HP, classification_data, image_data, roundtrip, tiny_conv_bn, tiny_mlp

METHODS = list(so.METHODS)
MODELS = ["mlp", "convbn"]


def problem(kind: str):
    if kind == "mlp":
        x, y = classification_data(n=24)
        return tiny_mlp(), x, y
    x, y = image_data(n=16)
    return tiny_conv_bn(), x, y


def make(name: str, model: nn.Module, **extra):
    hp = dict(TEST_HP[name])
    hp.update(extra)
    return so.make_optimizer(name, model, **hp)


def closures(model, x, y, size=8):
    loss_fn = nn.CrossEntropyLoss()
    return [so.Closure(model, x[i : i + size], y[i : i + size], loss_fn) for i in range(0, x.shape[0], size)]


def full_loss(model, x, y) -> float:
    with torch.no_grad():
        model.eval()
        out = float(nn.CrossEntropyLoss()(model(x), y))
        model.train()
    return out


def test_registry_lists_every_design_name():
    expected = {
        "sgd",
        "adam",
        "rmsprop",
        "kbfgs",
        "kbfgsl",
        "kbfgs20",
        "kbfgsl20",
        "kfac",
        "kfac-ef",
        "tnt",
        "tnt-ef",
        "shampoo",
        "smw-gn",
        "smw-ng",
        "smw-ng-bd",
        "hf",
        "block-fisher",
    }
    assert set(so.METHODS) == expected
    assert {"sgd", "adam", "rmsprop", "kfac", "kfac-ef"} <= set(METHODS)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="known: sgd"):
        so.make_optimizer("lbfgs-typo", tiny_mlp())


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name", METHODS)
def test_trains_in_the_one_loop(name, kind):
    model, x, y = problem(kind)
    opt = make(name, model)
    opt.warm_start(closures(model, x, y))
    before = full_loss(model, x, y)
    for _ in range(15):
        for c in closures(model, x, y):
            loss = opt.step(c)
            assert loss.shape == () and torch.isfinite(loss)
    after = full_loss(model, x, y)
    assert after < 0.9 * before, (name, kind, before, after)
    assert opt.stats.steps == 15 * len(closures(model, x, y))
    assert opt.stats.forward_passes >= opt.stats.steps


@pytest.mark.parametrize("name", METHODS)
def test_unknown_hyper_parameter_is_named(name):
    with pytest.raises(ValueError, match="not_a_hyper_parameter"):
        so.make_optimizer(name, tiny_mlp(), not_a_hyper_parameter=1)


BAD_VALUES = {
    "lr": [-1.0, float("nan"), "0.1"],
    "damping": [0.0, -1.0, float("inf")],
    "momentum": [1.0, -0.1],
    "stat_decay": [1.0, -0.5],
    "weight_decay": [-1e-3],
    "update_freq": [0, 1.5, True],
    "inverse_freq": [0, -2],
    "history_size": [0],
    "curvature_batch": [0, -3],
    "cg_max_iters": [0],
    "cg_tol": [-1.0],
    "tau": [-1.0],
}


@pytest.mark.parametrize("name", METHODS)
def test_invalid_values_raise_value_error_naming_the_argument(name):
    accepted = set(so.optim.optimizer_class(name).__init__.__code__.co_varnames)
    checked = 0
    for arg, values in BAD_VALUES.items():
        if arg not in accepted:
            continue
        for v in values:
            with pytest.raises(ValueError, match=arg):
                so.make_optimizer(name, tiny_mlp(), **{arg: v})
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name", METHODS)
def test_non_finite_loss_raises_before_anything_changes(name, kind):
    model, x, y = problem(kind)
    opt = make(name, model)
    cs = closures(model, x, y)
    opt.warm_start(cs)
    for c in cs[:2]:
        opt.step(c)
    params = copy.deepcopy(model.state_dict())
    state = opt.state_dict()
    bad_x = x[:8].clone()
    bad_x[0].fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        opt.step(so.Closure(model, bad_x, y[:8], nn.CrossEntropyLoss()))
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    _assert_same_state(state, opt.state_dict())
    # an infinite loss from a finite input: the loss function itself overflows
    with pytest.raises(so.NonFiniteError):
        opt.step(so.Closure(model, x[:8], y[:8], lambda out, t: out.sum() * float("inf")))
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    _assert_same_state(state, opt.state_dict())


@pytest.mark.parametrize("name", METHODS)
def test_non_finite_gradient_raises_before_anything_changes(name):
    model, x, y = problem("mlp")
    opt = make(name, model)
    cs = closures(model, x, y)
    opt.warm_start(cs)
    opt.step(cs[0])
    params = copy.deepcopy(model.state_dict())
    state = opt.state_dict()
    # finite loss, NaN gradient: sqrt at 0 has an infinite derivative, times 0 -> NaN
    weird = so.Closure(model, x[:8], y[:8], nn.CrossEntropyLoss())
    weird.loss_fn = lambda out, t: (
        nn.functional.cross_entropy(out, t) + 0.0 * (out - out.detach()).abs().sqrt().sum()
    )
    with pytest.raises(so.NonFiniteError, match="gradient"):
        opt.step(weird)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    _assert_same_state(state, opt.state_dict())


def _assert_same_state(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            if k == "stats":
                continue
            _assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(u, v, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), (path, a, b)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name", METHODS)
def test_resumed_run_is_bit_for_bit_the_uninterrupted_run(name, kind):
    model, x, y = problem(kind)
    opt = make(name, model)
    cs = closures(model, x, y)
    opt.warm_start(cs)
    for _epoch in range(2):
        for c in cs:
            opt.step(c)
    checkpoint = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    for _epoch in range(2):
        for c in cs:
            opt.step(c)
    reference = copy.deepcopy(model.state_dict())

    resumed, _, _ = problem(kind)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = make(name, resumed, seed=12345) if "seed" in _args(name) else make(name, resumed)
    opt2.load_state_dict(checkpoint["opt"])
    cs2 = closures(resumed, x, y)
    for _epoch in range(2):
        for c in cs2:
            opt2.step(c)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, reference[k]), (name, k)
    _assert_same_state(opt.state_dict(), opt2.state_dict())


def _args(name):
    return set(so.optim.optimizer_class(name).__init__.__code__.co_varnames)


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_is_keyed_by_name_and_checks_its_owner(name):
    model, x, y = problem("convbn")
    opt = make(name, model)
    cs = closures(model, x, y)
    opt.warm_start(cs)
    opt.step(cs[0])
    sd = opt.state_dict()
    names = {n for n, _ in model.named_parameters()}
    assert set(sd["param_state"]) <= names
    assert all(isinstance(k, str) for k in sd["module_state"])
    assert set(sd["module_state"]) <= {n for n, _ in model.named_modules()}
    other = "sgd" if name != "sgd" else "adam"
    with pytest.raises(ValueError, match="method"):
        make(other, model).load_state_dict(sd)
    with pytest.raises(ValueError, match="parameter names"):
        make(name, tiny_mlp()).load_state_dict(sd)


@pytest.mark.parametrize("name", METHODS)
def test_lr_scheduler_drives_the_lr(name):
    model, x, y = problem("mlp")
    opt = make(name, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lr0 = opt.param_groups[0]["lr"]
    cs = closures(model, x, y)
    opt.warm_start(cs)
    opt.step(cs[0])
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5)


def test_shared_hyper_parameters_have_one_rule() -> None:
    """``hparams.shared`` is the one validation of the names every method shares."""
    from secondorder.optim import hparams as H

    assert H.shared(lr=0, momentum=0.9, update_freq=3) == {"lr": 0.0, "momentum": 0.9, "update_freq": 3}
    for name, bad in [
        ("lr", -1.0),
        ("damping", 0.0),
        ("momentum", 1.0),
        ("stat_decay", -0.1),
        ("weight_decay", float("nan")),
        ("update_freq", 0),
        ("inverse_freq", 1.5),
    ]:
        with pytest.raises(ValueError, match=name):
            H.shared(**{name: bad})
    with pytest.raises(TypeError):
        H.shared(history_size=3)
