"""Shampoo (Algorithm 16) against the dense float64 Kronecker formula with eigendecomposition roots."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.optim import shampoo as shampoo_module
from secondorder.optim.shampoo import Shampoo
from tests.helpers import image_data, tiny_conv_bn, tiny_mlp
from tests.optim.test_tnt import ORACLE_HP, dense_step, problem, true_and_sampled_grads

LR, EPS = ORACLE_HP["lr"], ORACLE_HP["damping"]


@pytest.mark.parametrize("root_method,tol", [("newton", 1e-4), ("eigh", 1e-9), ("auto", 1e-9)])
@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_step_equals_the_dense_kronecker_formula(kind, root_method, tol):
    """One step (momentum 0, stat_decay 0, T1 = T2 = 1): theta - lr (K_1 (x) ... (x) K_k) vec(grad) with
    K_i = (G^(i) + eps I)^(-1/(2k)) of the true-label minibatch gradient; conv kernels as (out, in, 9)
    (p = 6), Linear weights p = 4, biases p = 2. Newton stops at max|M - I| <= 1e-6, hence its tolerance."""
    model, x, y = problem(kind)
    loss_fn = nn.CrossEntropyLoss()
    grads, mean, _ = true_and_sampled_grads(model, x, y, loss_fn)
    expected = dense_step(model, grads, mean, "shampoo", LR, EPS)
    opt = so.make_optimizer("shampoo", model, root_method=root_method, **ORACLE_HP)
    opt.step(so.Closure(model, x, y, loss_fn))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=tol, atol=tol * 1e-2, msg=name)
    assert opt.stats.backward_passes == 1  # no extra pass


def test_root_exponents_and_auto_method(monkeypatch):
    seen = []
    original = shampoo_module.inverse_root

    def recording(factor, p, damping, *, method):
        seen.append((tuple(factor.shape), p, method))
        return original(factor, p, damping, method=method)

    monkeypatch.setattr(shampoo_module, "inverse_root", recording)
    model, x, y = problem("conv")
    opt = so.make_optimizer("shampoo", model)
    opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))
    assert sorted(seen) == sorted(
        [
            ((3, 3), 6, "eigh"),
            ((2, 2), 6, "eigh"),
            ((9, 9), 6, "eigh"),  # conv kernel (3, 2, 9): p = 2k = 6
            ((3, 3), 2, "eigh"),  # conv bias
            ((3, 3), 4, "eigh"),
            ((27, 27), 4, "eigh"),  # Linear weight
            ((3, 3), 2, "eigh"),
        ]  # Linear bias
    )  # auto = eigh on CPU


@pytest.mark.parametrize("timing,expected", [("less", [0, 5, 10]), ("tnt", [0, 1, 2, 3, 4, 5, 10])])
def test_inverse_timing(monkeypatch, timing, expected):
    calls = []
    original = Shampoo._preconditioner

    def counting(self, factors, view, damping):
        calls.append(self.step_count)
        return original(self, factors, view, damping)

    monkeypatch.setattr(Shampoo, "_preconditioner", counting)
    model, x, y = problem("fc")
    opt = so.make_optimizer("shampoo", model, inverse_freq=5, inverse_timing=timing)
    c = so.Closure(model, x, y, nn.CrossEntropyLoss())
    for _ in range(12):
        opt.step(c)
    assert sorted(set(calls)) == expected


def test_warm_start_uses_true_labels_and_step_zero_keeps_it():
    model, x, y = problem("fc")
    loss_fn = nn.CrossEntropyLoss()
    _, mean, _ = true_and_sampled_grads(model, x, y, loss_fn)
    opt = so.make_optimizer("shampoo", model)
    c = so.Closure(model, x, y, loss_fn)
    opt.warm_start([c, c])
    w = dict(model.named_parameters())["0.weight"]
    torch.testing.assert_close(opt.state[w]["factors"][0], mean["0.weight"] @ mean["0.weight"].t())
    torch.testing.assert_close(opt.state[w]["factors"][1], mean["0.weight"].t() @ mean["0.weight"])
    before = [f.clone() for f in opt.state[w]["factors"]]
    opt.step(c)
    assert all(torch.equal(a, b) for a, b in zip(before, opt.state[w]["factors"], strict=True))


def test_defaults_and_validation():
    opt = Shampoo(tiny_mlp())
    assert (opt.hp["lr"], opt.hp["damping"], opt.hp["inverse_freq"], opt.hp["inverse_timing"]) == (
        3e-4,
        3e-4,
        20,
        "less",
    )
    with pytest.raises(ValueError, match="root_method"):
        Shampoo(tiny_mlp(), root_method="svd")
    with pytest.raises(ValueError, match="inverse_timing"):
        Shampoo(tiny_mlp(), inverse_timing="sometimes")


@pytest.mark.parametrize("method", ["shampoo", "tnt-ef"])
def test_channels_last_parameters_take_the_same_steps(method):
    """A channels_last conv weight is not contiguous, so the update goes through the unfused path
    (``p.add_`` of the formed direction) instead of one GEMM into ``p``: same parameters."""
    x, y = image_data()
    models = [tiny_conv_bn(), tiny_conv_bn().to(memory_format=torch.channels_last)]
    assert not models[1][0].weight.is_contiguous()
    hp = dict(lr=0.1, damping=0.1, update_freq=1, inverse_freq=1)
    opts = [so.make_optimizer(method, m, **hp) for m in models]
    for _ in range(3):
        for m, opt in zip(models, opts, strict=True):
            opt.step(so.Closure(m, x, y, nn.CrossEntropyLoss()))
    assert not models[1][0].weight.is_contiguous()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
