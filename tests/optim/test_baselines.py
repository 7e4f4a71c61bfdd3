"""SGD-m, Adam, RMSprop against hand-computed updates in both thesis conventions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secondorder as so
from tests.helpers import classification_data, tiny_mlp


def grads_at(model, x, y):
    m = copy.deepcopy(model)
    nn.CrossEntropyLoss()(m(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def run_steps(name, steps=4, **hp):
    x, y = classification_data(n=16)
    model = tiny_mlp()
    opt = so.make_optimizer(name, model, **hp)
    history = []
    for k in range(steps):
        xb, yb = x[4 * k : 4 * k + 8], y[4 * k : 4 * k + 8]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = grads_at(model, xb, yb)
        opt.step(so.Closure(model, xb, yb, nn.CrossEntropyLoss()))
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        history.append((before, g, after))
    return history


@pytest.mark.parametrize("style", ["accumulate", "average"])
def test_sgd_momentum_conventions_and_decoupled_weight_decay(style):
    lr, mu, wd = 0.1, 0.9, 0.05
    hist = run_steps("sgd", lr=lr, momentum=mu, weight_decay=wd, momentum_style=style)
    buf = None
    for before, g, after in hist:
        for n in g:
            if buf is None:
                buf = {k: torch.zeros_like(v) for k, v in g.items()}
            buf[n] = mu * buf[n] + (g[n] if style == "accumulate" else (1 - mu) * g[n])
            torch.testing.assert_close(after[n], before[n] - lr * (buf[n] + wd * before[n]))


def test_sgd_matches_torch_sgd_without_weight_decay():
    x, y = classification_data(n=16)
    a, b = tiny_mlp(), tiny_mlp()
    ours = so.make_optimizer("sgd", a, lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for k in range(4):
        xb, yb = x[4 * k : 4 * k + 8], y[4 * k : 4 * k + 8]
        ours.step(so.Closure(a, xb, yb, nn.CrossEntropyLoss()))
        ref.step(so.Closure(b, xb, yb, nn.CrossEntropyLoss()))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


@pytest.mark.parametrize("variant", ["standard", "reference"])
def test_adam_both_variants(variant):
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-3, 0.02
    hist = run_steps(
        "adam", lr=lr, momentum=b1, stat_decay=b2, damping=eps, weight_decay=wd, adam_variant=variant
    )
    m = v = None
    for t, (before, g, after) in enumerate(hist, start=1):
        if m is None:
            m = {k: torch.zeros_like(x) for k, x in g.items()}
            v = {k: torch.zeros_like(x) for k, x in g.items()}
        for n in g:
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            m_hat = m[n] / (1 - b1**t)
            sq = m_hat if variant == "reference" else g[n]
            v[n] = b2 * v[n] + (1 - b2) * sq * sq
            v_hat = v[n] / (1 - b2**t)
            p = m_hat / (v_hat.sqrt() + eps)
            torch.testing.assert_close(after[n], before[n] - lr * (p + wd * before[n]))


def test_standard_adam_matches_torch_adamw():
    x, y = classification_data(n=16)
    a, b = tiny_mlp(), tiny_mlp()
    ours = so.make_optimizer("adam", a, lr=0.01, damping=1e-8, stat_decay=0.999, weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=0.01, eps=1e-8, betas=(0.9, 0.999), weight_decay=0.1)
    for k in range(4):
        xb, yb = x[4 * k : 4 * k + 8], y[4 * k : 4 * k + 8]
        ours.step(so.Closure(a, xb, yb, nn.CrossEntropyLoss()))
        ref.step(so.Closure(b, xb, yb, nn.CrossEntropyLoss()))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


@pytest.mark.parametrize("variant", ["standard", "reference"])
def test_rmsprop_is_adam_without_bias_correction(variant):
    lr, b1, b2, eps = 0.01, 0.9, 0.9, 1e-4
    hist = run_steps("rmsprop", lr=lr, momentum=b1, stat_decay=b2, damping=eps, rmsprop_variant=variant)
    m = v = None
    for before, g, after in hist:
        if m is None:
            m = {k: torch.zeros_like(x) for k, x in g.items()}
            v = {k: torch.zeros_like(x) for k, x in g.items()}
        for n in g:
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            sq = m[n] if variant == "reference" else g[n]
            v[n] = b2 * v[n] + (1 - b2) * sq * sq
            torch.testing.assert_close(after[n], before[n] - lr * m[n] / (v[n].sqrt() + eps))


def test_rmsprop_warm_start_is_the_mean_squared_minibatch_gradient():
    x, y = classification_data(n=16)
    model = tiny_mlp()
    closures = [so.Closure(model, x[i : i + 4], y[i : i + 4], nn.CrossEntropyLoss()) for i in range(0, 16, 4)]
    opt = so.make_optimizer("rmsprop", model)
    assert opt.warm_start(closures) == 4
    expected = {n: 0 for n, _ in model.named_parameters()}
    for c in closures:
        for n, g in grads_at(model, c.inputs, c.targets).items():
            expected[n] = expected[n] + g * g / 4
    for n, p in model.named_parameters():
        torch.testing.assert_close(opt.state[p]["square_avg"], expected[n])
        assert p.grad is None  # the warm start wrote no .grad


def test_plain_torch_closures_work_for_first_order_methods():
    x, y = classification_data(n=8)
    model = tiny_mlp()
    opt = so.make_optimizer("adam", model)

    def closure():
        opt.zero_grad()
        loss = nn.CrossEntropyLoss()(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert opt.stats.forward_passes == 1


def test_momentum_zero_is_plain_sgd():
    lr = 0.2
    hist = run_steps("sgd", lr=lr, momentum=0.0)
    for before, g, after in hist:
        for n in g:
            torch.testing.assert_close(after[n], before[n] - lr * g[n])


def test_without_a_closure_a_non_finite_gradient_raises_before_any_change():
    model = tiny_mlp()
    opt = so.make_optimizer("adam", model)
    x, y = classification_data(n=8)
    nn.CrossEntropyLoss()(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(so.NonFiniteError, match="0.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not opt.state
