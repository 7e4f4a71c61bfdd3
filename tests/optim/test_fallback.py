"""The fallback of the Kronecker-factored methods for tensors no block models (optim.kronecker):
the thesis's momentum rule, and the naive diagonal ``m / (v + lambda)`` checked against
per-example gradients from ``torch.func``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import secondorder as so
from secondorder.optim.kronecker import FALLBACK, FALLBACK_DIAGONAL, UnmodeledParametersWarning
from tests.helpers import classification_data, tiny_mlp

KRONECKER = ["kfac", "kfac-ef", "kbfgs", "kbfgsl", "kbfgs20", "kbfgsl20"]
LR, DAMPING, MU, BETA = 0.1, 0.3, 0.9, 0.8
FALLEN = ("2.weight", "2.bias")  # tiny_mlp's middle Linear, excluded


def build(key, model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmodeledParametersWarning)
        return so.make_optimizer(
            key,
            model,
            lr=LR,
            damping=DAMPING,
            momentum=MU,
            momentum_style="accumulate",
            stat_decay=BETA,
            exclude=["2"],
            **kw,
        )


def naive_diagonal(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """``(sum_n g_n)^2 / M`` per tensor, ``g_n`` the gradient of example n's own loss."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {k: g.sum(0).square() / x.shape[0] for k, g in per_example.items()}


def batch_grad(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return {k: v.grad.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("key", KRONECKER)
def test_an_unknown_fallback_is_refused_by_name(key):
    with pytest.raises(ValueError, match="fallback"):
        build(key, tiny_mlp(), fallback="adam")


@pytest.mark.parametrize("key", KRONECKER)
def test_coverage_names_the_fallback_in_use(key):
    for mode, label in (("momentum", FALLBACK), ("diagonal", FALLBACK_DIAGONAL)):
        cov = build(key, tiny_mlp(), fallback=mode).coverage()
        assert [n for n, what in cov.items() if what == label] == list(FALLEN)


def test_the_warning_names_the_fallback_in_use():
    with pytest.warns(UnmodeledParametersWarning, match="'diagonal' fallback"):
        so.KFAC(tiny_mlp(), exclude=["2"], fallback="diagonal")


@pytest.mark.parametrize("key", KRONECKER)
def test_the_momentum_fallback_is_the_thesis_rule(key):
    """kfac and chapter 2: ``W <- W - lr m``; K-BFGS chapter 3: ``W <- W - (lr/lam) m`` (3.4.3)."""
    model = tiny_mlp()
    x, y = classification_data(n=16)
    opt = build(key, model, fallback="momentum")
    scale = 1.0 / DAMPING if key in ("kbfgs", "kbfgsl") else 1.0
    bufs = {k: torch.zeros_like(v) for k, v in model.named_parameters() if k in FALLEN}
    for i in range(2):
        xb, yb = x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]
        g = batch_grad(model, xb, yb)
        old = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt.step(so.Closure(model, xb, yb, nn.CrossEntropyLoss()))
        for k in FALLEN:
            bufs[k] = MU * bufs[k] + g[k]
            new = dict(model.named_parameters())[k].detach()
            torch.testing.assert_close(new, old[k] - LR * scale * bufs[k])
            assert "fallback_diagonal" not in opt.state[dict(model.named_parameters())[k]]


@pytest.mark.parametrize("key", KRONECKER)
def test_the_diagonal_fallback_matches_per_example_gradients(key):
    """``v <- beta v + (1 - beta) (sum_n g_n)^2 / M`` (the first batch sets ``v``),
    ``W <- W - lr m / (v + lam)``."""
    model = tiny_mlp()
    x, y = classification_data(n=16)
    opt = build(key, model, fallback="diagonal")
    params = dict(model.named_parameters())
    v = {k: None for k in FALLEN}
    bufs = {k: torch.zeros_like(params[k]) for k in FALLEN}
    for i in range(2):
        xb, yb = x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]
        diag, g = naive_diagonal(model, xb, yb), batch_grad(model, xb, yb)
        old = {k: p.detach().clone() for k, p in params.items()}
        opt.step(so.Closure(model, xb, yb, nn.CrossEntropyLoss()))
        for k in FALLEN:
            v[k] = diag[k] if v[k] is None else BETA * v[k] + (1 - BETA) * diag[k]
            bufs[k] = MU * bufs[k] + g[k]
            torch.testing.assert_close(opt.state[params[k]]["fallback_diagonal"], v[k])
            torch.testing.assert_close(params[k].detach(), old[k] - LR * bufs[k] / (v[k] + DAMPING))


def test_the_diagonal_fallback_of_a_sum_loss_uses_the_per_example_scale():
    """With ``reduction="sum"`` the gradient is ``sum_n g_n`` itself: ``v = grad^2 / M``."""
    model = tiny_mlp()
    x, y = classification_data(n=8)
    opt = build("kfac-ef", model, fallback="diagonal")
    expected = naive_diagonal(model, x, y)
    opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss(reduction="sum")))
    for k in FALLEN:
        p = dict(model.named_parameters())[k]
        torch.testing.assert_close(opt.state[p]["fallback_diagonal"], expected[k])


def test_the_diagonal_fallback_survives_a_checkpoint():
    x, y = classification_data(n=24)
    runs = []
    for resume in (False, True):
        model = tiny_mlp()
        opt = build("kbfgs", model, fallback="diagonal")
        for i in range(3):
            if resume and i == 2:
                saved_model, saved_opt = model.state_dict(), opt.state_dict()
                model = tiny_mlp(seed=5)
                model.load_state_dict(saved_model)
                opt = build("kbfgs", model, fallback="diagonal")
                opt.load_state_dict(saved_opt)
            opt.step(so.Closure(model, x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8], nn.CrossEntropyLoss()))
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
