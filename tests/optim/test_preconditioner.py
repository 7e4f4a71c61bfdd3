"""The preconditioner form (``so.Preconditioner``): the method's direction replaces ``.grad`` and
a torch optimizer takes the step, with LR schedulers and ``torch.amp.GradScaler``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import secondorder as so
from tests.helpers import image_data

FORMS = ["kfac", "kfac-ef", "tnt", "tnt-ef", "shampoo"]
SEEDED = {"kfac", "tnt"}


def grouped_net(dtype=torch.float64) -> nn.Sequential:
    """A grouped conv (two blocks on one weight: views of its gradient are written), a LayerNorm
    (KFAC's per-channel block) and a linear head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 2, 3, stride=2),
        nn.Flatten(),
        nn.LayerNorm(2 * 2 * 2),
        nn.Linear(8, 3),
    ).to(dtype)


def hp(key: str) -> dict:
    out = dict(damping=0.3 if key.startswith("kfac") else 0.1, inverse_freq=2)
    if key in SEEDED:
        out["seed"] = 5
    return out


def params_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("key", FORMS)
def test_the_preconditioner_with_sgd_takes_the_methods_steps_with_momentum_0(key):
    """float64: ``Preconditioner`` + ``torch.optim.SGD(momentum=0)`` = the method with
    ``momentum=0`` and the same ``lr``, over four steps (KFAC bit for bit; TNT / Shampoo to
    round-off: the method forms ``W - lr P`` in one fused product)."""
    x, y = image_data(n=8, seed=4)
    x = x[:, :, :5, :5]
    runs = []
    for form in ("method", "preconditioner"):
        model = grouped_net()
        loss_fn = nn.CrossEntropyLoss()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if form == "method":
                opt = so.make_optimizer(key, model, lr=0.05, momentum=0.0, loss_fn=loss_fn, **hp(key))
                for _ in range(4):
                    opt.step(so.Closure(model, x, y, loss_fn))
            else:
                precond = so.Preconditioner(key, model, loss_fn=loss_fn, **hp(key))
                sgd = torch.optim.SGD(model.parameters(), lr=0.05)
                for _ in range(4):
                    sgd.zero_grad()
                    loss_fn(model(x), y).backward()
                    assert precond.step() is True
                    sgd.step()
        runs.append(params_of(model))
    assert not torch.equal(runs[0], params_of(grouped_net()))
    if key.startswith("kfac"):
        assert torch.equal(runs[0], runs[1])
    else:
        torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-12)


def _curvature(precond: so.Preconditioner) -> list[torch.Tensor]:
    state = precond.state_dict()
    out = [t for st in state["module_state"].values() for t in st.values() if isinstance(t, torch.Tensor)]

    def walk(v):
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, list | tuple):
            for t in v:
                walk(t)

    for st in state["param_state"].values():
        for v in st.values():
            walk(v)
    return out


@pytest.mark.parametrize("key", FORMS)
def test_with_a_grad_scaler_an_inf_gradient_skips_the_step_and_keeps_every_statistic(key):
    """AdamW + GradScaler + a scheduler (float32): an inf injected into the scaled gradients
    makes ``precond.step`` return False with the gradients and every curvature statistic
    unchanged, the scaler skips AdamW and lowers its scale; the next step trains as usual."""
    x, y = image_data(n=8, seed=4, dtype=torch.float32)
    x = x[:, :, :5, :5]
    model = grouped_net(torch.float32)
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precond = so.Preconditioner(key, model, loss_fn=loss_fn, **hp(key))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def step(inject: bool) -> bool:
        opt.zero_grad()
        scaler.scale(loss_fn(model(x), y)).backward()
        if inject:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.unscale_(opt)
        grads = [p.grad.clone() for p in model.parameters()]
        done = precond.step(scaler)
        if not done:
            assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
        scaler.step(opt)
        scaler.update()
        sched.step()
        return done

    assert step(False)
    before, stats, params = _curvature(precond), precond.optimizer.step_count, params_of(model)
    assert step(True) is False
    after = _curvature(precond)
    assert len(before) == len(after) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert precond.optimizer.step_count == stats
    assert torch.equal(params, params_of(model))  # AdamW skipped
    assert scaler.get_scale() == 2.0**9
    assert step(False)
    assert not torch.equal(params, params_of(model))


def test_the_loss_scale_does_not_change_the_statistics():
    """kfac-ef captures ``dL/dh`` in the scaled backward and divides them by the scale: with a
    GradScaler at 2^12 (float64) the steps are those without one, to round-off."""
    x, y = image_data(n=8, seed=4)
    x = x[:, :, :5, :5]
    runs = []
    for scaled in (False, True):
        model = grouped_net()
        loss_fn = nn.CrossEntropyLoss()
        precond = so.Preconditioner("kfac-ef", model, loss_fn=loss_fn, **hp("kfac-ef"))
        sgd = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
        for _ in range(3):
            sgd.zero_grad()
            scaler.scale(loss_fn(model(x), y)).backward()
            scaler.unscale_(sgd)
            precond.step(scaler)
            scaler.step(sgd)
            scaler.update()
        runs.append(params_of(model))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-13)


def test_preconditioner_arguments_are_checked_by_name():
    model = grouped_net()
    with pytest.raises(ValueError, match="method: 'kbfgs' has no preconditioner form"):
        so.Preconditioner("kbfgs", model)
    for key in ("lr", "momentum", "weight_decay"):
        with pytest.raises(ValueError, match=f"{key}: the step belongs to your torch optimizer"):
            so.Preconditioner("shampoo", model, **{key: 0.1})
    with pytest.raises(ValueError, match="loss_fn: kfac reads the batch off your loss call"):
        so.Preconditioner("kfac", model)
    with pytest.raises(ValueError, match="damping"):
        so.Preconditioner("shampoo", model, damping=-1.0)
    precond = so.Preconditioner("kfac", model, loss_fn=nn.CrossEntropyLoss())
    assert set(precond.coverage()) == {n for n, _ in model.named_parameters()}
    precond.remove()
    assert not model._forward_pre_hooks
