"""Plain torch closures (``def closure(): opt.zero_grad(); loss = loss_fn(model(x), y);
loss.backward(); return loss``, as Lightning and hand-written loops pass them): with ``loss_fn=``
at construction every method takes one and steps exactly as with a ``so.Closure``
(:class:`secondorder.capture.PlainClosure` sees the closure through the same interface)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.capture import PlainClosure
from tests.helpers import TEST_HP, classification_data, image_data, tiny_conv_bn, tiny_mlp

METHODS = list(so.METHODS)
SEEDED = {"kfac", "tnt", "smw-gn", "smw-ng", "smw-ng-bd", "hf", "block-fisher"}


def build(key: str, model: nn.Module, **extra):
    hp = dict(TEST_HP[key], **extra)
    if key in SEEDED:
        hp["seed"] = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return so.make_optimizer(key, model, **hp)


def plain(opt, model, x, y, loss_fn, *, backward=True):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        if backward:
            loss.backward()
        return loss

    return closure


def state_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in model.state_dict().values()])


@pytest.mark.parametrize("key", METHODS)
def test_a_plain_closure_takes_the_steps_of_a_so_closure(key):
    """float64, conv + BatchNorm + linear: three steps with a plain closure and ``loss_fn=`` give
    the same parameters, batch-norm statistics and losses as with a ``so.Closure``, bit for bit
    (the passes are the same; only where the loss comes from differs)."""
    x, y = image_data(n=8)
    runs = []
    for form in ("so", "plain"):
        model = tiny_conv_bn()
        loss_fn = nn.CrossEntropyLoss()
        opt = build(key, model, loss_fn=loss_fn)
        losses = []
        for _ in range(3):
            closure = so.Closure(model, x, y, loss_fn) if form == "so" else plain(opt, model, x, y, loss_fn)
            losses.append(opt.step(closure))
        runs.append((torch.stack(losses), state_of(model), opt.stats.forward_passes))
    (l0, s0, f0), (l1, s1, f1) = runs
    assert torch.equal(l0, l1)
    assert torch.equal(s0, s1)
    assert f0 == f1
    assert not torch.equal(s0, state_of(tiny_conv_bn()))  # it trained


@pytest.mark.parametrize("key", ["kbfgs", "kfac-ef", "tnt", "hf"])
def test_a_closure_that_returns_its_loss_without_backward_steps_the_same(key):
    x, y = classification_data(n=8)
    runs = []
    for backward in (True, False):
        model = tiny_mlp()
        opt = build(key, model, loss_fn=nn.CrossEntropyLoss())
        for _ in range(2):
            opt.step(plain(opt, model, x, y, opt.loss_fn, backward=backward))
        runs.append(state_of(model))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("key", ["tnt-ef", "shampoo"])
def test_methods_that_need_only_the_gradient_take_a_plain_closure_without_loss_fn(key):
    x, y = classification_data(n=8)
    runs = []
    for with_loss_fn in (True, False):
        model = tiny_mlp()
        loss_fn = nn.CrossEntropyLoss()
        opt = build(key, model, **({"loss_fn": loss_fn} if with_loss_fn else {}))
        losses = [opt.step(plain(opt, model, x, y, loss_fn)) for _ in range(3)]
        runs.append((torch.stack(losses), state_of(model)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def test_the_plain_closure_loss_has_the_closures_value_and_gradient_with_a_penalty():
    """A closure that adds a term on the parameters (an L2 penalty) besides ``loss_fn``: the loss
    of :meth:`PlainClosure.forward` has its value and, through the model's graph, its gradient;
    ``.grad`` is left as the closure found it; the batch is read off the calls."""
    model = tiny_mlp()
    x, y = classification_data(n=8)
    loss_fn = nn.CrossEntropyLoss()

    def closure():
        model.zero_grad()
        loss = loss_fn(model(x), y) + 0.1 * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    expected_value = closure()
    expected = [p.grad.clone() for p in model.parameters()]
    marker = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, m in zip(model.parameters(), marker, strict=True):
        p.grad = m
    pc = PlainClosure(closure, model, loss_fn)
    result = pc.forward()
    assert all(p.grad is m for p, m in zip(model.parameters(), marker, strict=True))  # untouched
    assert torch.equal(result.loss.detach(), expected_value.detach())
    grads = torch.autograd.grad(result.loss, list(model.parameters()))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-14, atol=1e-14)
    assert pc.inputs is x and pc.targets is y and pc.batch_size == 8
    torch.testing.assert_close(result.outputs, model(x), rtol=0, atol=0)
    assert pc.likelihood.family.value == "categorical"


def test_loss_at_evaluates_the_closure_at_other_parameters_and_restores_the_model():
    model = tiny_conv_bn()
    model.train()
    x, y = image_data(n=8)
    loss_fn = nn.CrossEntropyLoss()
    opt = build("smw-gn", model, loss_fn=loss_fn)
    pc = PlainClosure(plain(opt, model, x, y, loss_fn), model, loss_fn)
    pc.forward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    trial = {n: p.detach() + 0.01 for n, p in model.named_parameters()}
    value = pc.loss_at(trial)
    expected = so.Closure(model, x, y, loss_fn).loss_at(trial)
    assert torch.equal(value, expected.detach())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and BN statistics
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_plain_closure_errors_name_what_is_missing():
    model = tiny_mlp()
    x, y = classification_data(n=8)
    opt = build("kfac", model)
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match=r"kfac: a plain closure needs loss_fn= at construction"):
        opt.step(plain(opt, model, x, y, loss_fn))
    with pytest.raises(ValueError, match="loss_fn: expected the loss module instance"):
        build("kfac", model, loss_fn=nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="loss_fn: L1Loss has no known likelihood"):
        build("kfac", model, loss_fn=nn.L1Loss())
    opt = build("kfac", model, loss_fn=loss_fn)
    before = state_of(model)

    def other_loss():  # calls another instance than the one given to the optimizer
        opt.zero_grad()
        loss = nn.CrossEntropyLoss()(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"closure: it called the model 1 times and the optimizer's loss_fn"):
        opt.step(other_loss)
    assert torch.equal(before, state_of(model))
    assert opt.step_count == 0 and not opt.module_state


def test_a_metric_under_no_grad_with_the_same_loss_module_is_not_the_loss():
    model = tiny_mlp()
    x, y = classification_data(n=8)
    loss_fn = nn.CrossEntropyLoss()
    opt = build("kfac-ef", model, loss_fn=loss_fn)

    def closure():
        opt.zero_grad()
        out = model(x)
        loss_fn(out.detach(), y)  # a metric: not differentiable, not the training loss
        loss = loss_fn(out, y)
        loss.backward()
        return loss

    reference = tiny_mlp()
    ref = build("kfac-ef", reference, loss_fn=loss_fn)
    opt.step(closure)
    ref.step(so.Closure(reference, x, y, loss_fn))
    assert torch.equal(state_of(model), state_of(reference))
