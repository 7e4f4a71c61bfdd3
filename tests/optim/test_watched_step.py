"""``loss.backward(); opt.step()`` for the methods whose statistics need the caller's forward:
``kfac``, ``kfac-ef`` and ``tnt`` built with ``loss_fn=`` watch it (hooks on the model and on the
loss module, :class:`secondorder.capture.watch.Watch`) and take exactly the steps of the
``so.Closure`` form."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

import secondorder as so
from tests.helpers import TEST_HP, classification_data, image_data, tiny_conv_bn, tiny_mlp

WATCHED = ["kfac", "kfac-ef", "tnt"]


def build(key: str, model: nn.Module, **extra):
    hp = dict(TEST_HP[key], seed=3, **extra) if key != "kfac-ef" else dict(TEST_HP[key], **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return so.make_optimizer(key, model, **hp)


def state_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in model.state_dict().values()])


@pytest.mark.parametrize("key", WATCHED)
def test_without_a_closure_the_steps_are_those_of_the_closure_form(key):
    """float64, conv + BatchNorm + linear, statistics every other step: five steps of
    ``loss.backward(); opt.step()`` equal five ``so.Closure`` steps bit for bit (parameters,
    batch-norm statistics, curvature state); an evaluation forward under ``no_grad`` between
    the backward and the step is not watched."""
    x, y = image_data(n=8)
    runs = []
    for form in ("closure", "none"):
        model = tiny_conv_bn()
        loss_fn = nn.CrossEntropyLoss()
        opt = build(key, model, loss_fn=loss_fn, update_freq=2)
        for _ in range(5):
            if form == "closure":
                opt.step(so.Closure(model, x, y, loss_fn))
            else:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                with torch.no_grad():
                    model.eval()
                    model(x)  # a validation pass: not watched
                    model.train()
                assert opt.step() is None
        curvature = [t for st in opt.state_dict()["module_state"].values() for t in st.values()]
        curvature += [
            t for st in opt.state_dict()["param_state"].values() for v in st.values() for t in _tensors(v)
        ]
        runs.append((state_of(model), curvature, opt.stats.backward_passes))
    assert torch.equal(runs[0][0], runs[1][0])
    assert len(runs[0][1]) == len(runs[1][1]) > 0
    assert all(
        torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True) if isinstance(a, torch.Tensor)
    )
    assert runs[0][2] - 5 == runs[1][2]  # the caller's own backward passes are not the optimizer's


def _tensors(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, list | tuple):
        return [t for x in v for t in _tensors(x)]
    return []


@pytest.mark.parametrize("key", WATCHED)
def test_a_step_without_a_forward_says_what_is_missing_and_changes_nothing(key):
    model = tiny_mlp()
    x, y = classification_data(n=8)
    loss_fn = nn.CrossEntropyLoss()
    opt = build(key, model, loss_fn=loss_fn)
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    before = state_of(model)
    with pytest.raises(RuntimeError, match=rf"{key}: step\(\) without a closure found no forward pass"):
        opt.step()  # the gradients are still there, but no forward was seen since the last step
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # not the loss_fn instance
    with pytest.raises(RuntimeError, match="found no call of loss_fn on the outputs"):
        opt.step()
    assert torch.equal(before, state_of(model))
    assert opt.step_count == 1


def test_the_hooks_go_with_the_optimizer():
    model = tiny_mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = build("kfac", model, loss_fn=loss_fn)
    assert len(model._forward_pre_hooks) == 1 and len(loss_fn._forward_pre_hooks) == 1
    del opt
    gc.collect()
    assert not model._forward_pre_hooks and not loss_fn._forward_pre_hooks
    opt = build("kfac", model, loss_fn=loss_fn)
    opt.watch.remove()
    assert not model._forward_pre_hooks and not loss_fn._forward_pre_hooks
    assert build("kfac", model).watch is None  # no loss_fn: no hooks
    assert not model._forward_pre_hooks
