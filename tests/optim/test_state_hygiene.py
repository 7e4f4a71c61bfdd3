"""State hygiene common to every method: one parameter group (a second is refused, never silently
left unstepped), and torch's registered state-dict hooks run around state_dict / load_state_dict."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import secondorder as so
from tests.helpers import TEST_HP, classification_data, tiny_mlp

METHODS = list(so.METHODS)


def build(key: str, model: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return so.make_optimizer(key, model, **TEST_HP[key])


@pytest.mark.parametrize("key", METHODS)
def test_a_second_parameter_group_is_refused_by_name(key):
    model = tiny_mlp()
    opt = build(key, model)
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="param_group: .* one parameter group"):
        opt.add_param_group({"params": [extra], "lr": 0.1})
    assert len(opt.param_groups) == 1
    opt.param_groups.append({"params": [extra], "lr": 0.1})  # bypassing add_param_group
    x, y = classification_data(n=8)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="param_groups: .* found 2"):
        opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("key", ["sgd", "adam", "kfac", "kbfgs", "tnt", "shampoo", "smw-ng", "hf"])
def test_torch_state_dict_hooks_run(key):
    model = tiny_mlp()
    opt = build(key, model)
    x, y = classification_data(n=8)
    opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": "mine"})
    saved = opt.state_dict()
    assert saved["note"] == "mine" and calls == ["save-pre"]

    def halve_lr(o, sd):
        sd["param_groups"] = [dict(g, lr=g["lr"] / 2) for g in sd["param_groups"]]
        return sd

    fresh = build(key, tiny_mlp(seed=3))
    fresh.register_load_state_dict_pre_hook(halve_lr)
    fresh.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"] / 2)
    assert saved["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]  # the caller's dict is untouched
    assert calls == ["save-pre", "load-post"]


WITHOUT_CLOSURE = {"sgd", "adam", "rmsprop", "tnt-ef", "shampoo"}


def test_the_registry_lists_the_methods_that_step_without_a_closure():
    assert set(so.optim.registry.steps_without_closure()) == WITHOUT_CLOSURE


WATCHED = {"kfac", "kfac-ef", "tnt"}  # without a closure when built with loss_fn=


def test_the_registry_lists_the_methods_that_step_without_a_closure_given_loss_fn():
    assert set(so.optim.registry.steps_watched()) == WATCHED


@pytest.mark.parametrize("key", sorted(set(METHODS) - WITHOUT_CLOSURE))
def test_methods_that_need_a_closure_say_which_forms_they_take(key):
    model = tiny_mlp()
    opt = build(key, model)
    x, y = classification_data(n=8)
    torch.nn.CrossEntropyLoss()(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    if key in WATCHED:
        expected = rf"{key}: step\(\) without a closure needs loss_fn= at construction"
    else:
        expected = r"needs a so.Closure.*sgd, adam, rmsprop, tnt-ef and shampoo, and with loss_fn= for kfac"
    with pytest.raises(TypeError, match=expected):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("key", sorted(WITHOUT_CLOSURE))
def test_without_a_closure_the_steps_are_those_of_the_closure_form(key):
    """``loss.backward(); opt.step()`` takes exactly the so.Closure form's steps (float64,
    batch-mean loss): the baselines step on the gradient, tnt-ef and shampoo also take their
    statistics from it."""
    x, y = classification_data(n=24)
    runs = []
    for form in ("closure", "none"):
        model = tiny_mlp()
        opt = build(key, model)
        for i in range(3):
            xb, yb = x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]
            if form == "closure":
                opt.step(so.Closure(model, xb, yb, nn.CrossEntropyLoss()))
            else:
                opt.zero_grad()
                nn.CrossEntropyLoss()(model(xb), yb).backward()
                assert opt.step() is None
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
