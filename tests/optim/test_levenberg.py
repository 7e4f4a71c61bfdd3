"""The LM rule of 5.2.3 (rho of (5.5), boost/drop/eps, lam >= tau) and the Theorem-6 accept test."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.optim.levenberg import LMRule, ModelReduction, curvature_size
from tests.optim.test_smw import LAM, TAU, dense_direction, flat_grad, flat_params, mlp_problem

DT = torch.float64


# ----------------------------------------------------------------------- the rule itself
def test_rule_moves_lambda_by_region():
    rule = LMRule()  # thesis constants
    assert (rule.boost, rule.drop, rule.epsilon, rule.tau) == (1.01, 0.99, 0.25, 1e-3)
    assert rule.update(2.0, 0.1) == pytest.approx(2.02)  # rho < eps: boost
    assert rule.update(2.0, 0.5) == 2.0  # eps <= rho <= 1 - eps: unchanged
    assert rule.update(2.0, 0.25) == 2.0 and rule.update(2.0, 0.75) == 2.0
    assert rule.update(2.0, 0.9) == pytest.approx(1.98)  # rho > 1 - eps: drop
    assert rule.update(2.0, -math.inf) == pytest.approx(2.02)
    assert rule.update(2.0, math.nan) == 2.0


def test_ratio_conventions():
    assert LMRule.ratio(1.0, 0.5, 1.0) == 0.5
    assert LMRule.ratio(1.0, 1.5, 1.0) == -math.inf  # a loss increase (the code's rule)
    assert LMRule.ratio(1.0, math.nan, 1.0) == -math.inf
    assert LMRule.ratio(1.0, math.inf, 1.0) == -math.inf
    assert math.isnan(LMRule.ratio(1.0, 1.0, 0.0))  # no predicted reduction: no information


def test_model_reductions_on_a_quadratic():
    """Exact LM step p = -(B + lam I)^-1 g: damped = -1/2 g^T p; undamped = 1/2 p^T B p + lam |p|^2 (5.5)."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=gen, dtype=DT)
    b = m @ m.t()
    g = torch.randn(6, generator=gen, dtype=DT)
    lam = 0.4
    p = -torch.linalg.solve(b + lam * torch.eye(6, dtype=DT), g)
    gp, pp = float(g @ p), float(p @ p)
    model = lambda q: float(g @ q + 0.5 * q @ b @ q)  # noqa: E731  m_t(q) - f
    damped = LMRule(reduction=ModelReduction.DAMPED)
    undamped = LMRule(reduction=ModelReduction.UNDAMPED)
    assert damped.predicted_reduction(gp, pp, lam) == pytest.approx(-0.5 * gp, rel=1e-12)
    assert damped.predicted_reduction(gp, pp, lam) == pytest.approx(-model(p) - 0.5 * lam * pp, rel=1e-12)
    assert undamped.predicted_reduction(gp, pp, lam) == pytest.approx(-model(p), rel=1e-12)
    assert undamped.predicted_reduction(gp, pp, lam) == pytest.approx(float(0.5 * p @ b @ p) + lam * pp)
    # an inexact step: the curvature p^T (B + lam I) p must be supplied
    q = 0.7 * p
    curv = float(q @ (b + lam * torch.eye(6, dtype=DT)) @ q)
    assert undamped.predicted_reduction(float(g @ q), float(q @ q), lam, curv) == pytest.approx(-model(q))


def test_lambda_never_falls_below_tau():
    rule = LMRule(drop=0.5)
    lam_lm = 1.0
    for _ in range(3000):  # lam_LM underflows to 0 on the way
        lam_lm = rule.update(lam_lm, 1.0)
        assert rule.damping(lam_lm) >= rule.tau
    assert rule.damping(lam_lm) == pytest.approx(rule.tau)


def test_curvature_size():
    assert curvature_size(None, 60) == 30 and curvature_size(None, 1) == 1
    assert curvature_size(0.5, 60) == 30 and curvature_size(0.01, 60) == 1 and curvature_size(1.0, 7) == 7
    assert curvature_size(30, 60) == 30 and curvature_size(100, 60) == 60


# ----------------------------------------------------------------------- inside the optimizers
def linear_regression(n: int = 10):
    """f is exactly quadratic in theta and its Gauss-Newton matrix is its Hessian."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(n, 4, generator=gen, dtype=DT), torch.randn(n, 2, generator=gen, dtype=DT)


@pytest.mark.parametrize("name,extra", [("smw-gn", {}), ("hf", dict(cg_max_iters=100, cg_tol=1e-13))])
def test_exact_quadratic_gives_rho_one_for_the_undamped_model_and_lambda_drops(name, extra):
    model, x, y = linear_regression()
    opt = so.make_optimizer(
        name, model, lr=0.5, damping=LAM, tau=TAU, curvature_batch=1.0, model_reduction="undamped", **extra
    )
    opt.step(so.Closure(model, x, y, so.losses.HalfSquaredErrorLoss()))
    assert opt.stats.diagnostics["rho"] == pytest.approx(1.0, abs=1e-9)
    assert opt.lm_damping == pytest.approx(0.99 * LAM)


def test_exact_quadratic_with_the_damped_model():
    """rho = (1/2 p^T B p + lam |p|^2) / (1/2 p^T (B + lam I) p) > 1 - eps: lambda drops."""
    model, x, y = linear_regression()
    loss_fn = so.losses.HalfSquaredErrorLoss()
    d = dense_direction(model, x, y, loss_fn, "gn")
    g = flat_grad(model, x, y, loss_fn)
    lam = LAM + TAU
    pbp = float(g @ d) - lam * float(d @ d)  # p^T B p = -g^T p - lam |p|^2 for the exact step
    expected = (0.5 * pbp + lam * float(d @ d)) / (0.5 * float(g @ d))
    opt = so.make_optimizer("smw-gn", model, lr=1.0, damping=LAM, tau=TAU, curvature_batch=1.0)
    opt.step(so.Closure(model, x, y, loss_fn))
    assert opt.stats.diagnostics["rho"] == pytest.approx(expected, rel=1e-8)
    assert expected > 1.0 and opt.lm_damping == pytest.approx(0.99 * LAM)


def _closure_with_trial(model, x, y, loss_fn, trial_loss):
    c = so.Closure(model, x, y, loss_fn)
    c.loss_at = lambda params=None: torch.tensor(trial_loss, dtype=DT)
    return c


@pytest.mark.parametrize("target,factor", [(0.1, 1.01), (0.5, 1.0), (0.9, 0.99), (-0.2, 1.01)])
@pytest.mark.parametrize("name", ["smw-ng", "smw-gn"])
def test_known_rho_moves_lambda_as_the_rule_says(name, target, factor):
    """The trial loss is set so that rho has a known value; lambda then moves by boost, 1 or drop."""
    model, x, y, loss_fn = mlp_problem("categorical")
    kind = "ng" if name == "smw-ng" else "gn"
    d = dense_direction(model, x, y, loss_fn, kind, n2=4)
    g = flat_grad(model, x, y, loss_fn)
    predicted = 0.5 * float(g @ d)  # damped model, exact step
    with torch.no_grad():
        loss = float(loss_fn(model(x), y))
    opt = so.make_optimizer(name, model, lr=1.0, damping=LAM, tau=TAU)
    before = flat_params(model)
    opt.step(_closure_with_trial(model, x, y, loss_fn, loss - target * predicted))
    rho = opt.stats.diagnostics["rho"]
    if target < 0:
        assert rho == -math.inf  # a loss increase
    else:
        assert rho == pytest.approx(target, rel=1e-8)
    assert opt.lm_damping == pytest.approx(factor * LAM)
    assert opt.current_damping == pytest.approx(factor * LAM + TAU)
    torch.testing.assert_close(before - flat_params(model), d)  # Algorithm 23 always steps


@pytest.mark.parametrize("target,accepted", [(0.05, False), (-1.0, False), (0.15, True), (0.9, True)])
def test_theorem_6_variant_takes_the_step_only_if_rho_reaches_eta(target, accepted):
    model, x, y, loss_fn = mlp_problem("gaussian")
    d = dense_direction(model, x, y, loss_fn, "gn", n2=4)
    g = flat_grad(model, x, y, loss_fn)
    with torch.no_grad():
        loss = float(loss_fn(model(x), y))
    opt = so.make_optimizer("smw-gn", model, lr=1.0, damping=LAM, tau=TAU, accept_threshold=0.1)
    before = flat_params(model)
    opt.step(_closure_with_trial(model, x, y, loss_fn, loss - target * 0.5 * float(g @ d)))
    assert opt.stats.diagnostics["accepted"] is accepted
    if accepted:
        torch.testing.assert_close(before - flat_params(model), d)
    else:
        assert torch.equal(flat_params(model), before)
        assert opt.lm_damping == pytest.approx(1.01 * LAM)


def test_theorem_6_full_gradient_run_is_monotone():
    """N1 = N (one closure over the whole data set), alpha = 1, random S2, accept iff rho >= eta:
    f never increases, rejected steps leave theta unchanged and boost lambda (the mechanics of the
    proof; the limit |g| -> 0 itself is asymptotic)."""
    model, x, y, loss_fn = mlp_problem("gaussian", n=24)
    opt = so.make_optimizer(
        "smw-gn", model, lr=1.0, accept_threshold=0.1, curvature_batch=8, curvature_sample="random", seed=0
    )
    full = so.Closure(model, x, y, loss_fn)
    losses, rejected = [], 0
    for _ in range(40):
        before, lam = flat_params(model), opt.lm_damping
        losses.append(float(opt.step(full)))
        if not opt.stats.diagnostics["accepted"]:
            rejected += 1
            assert torch.equal(flat_params(model), before)
            assert opt.lm_damping == pytest.approx(1.01 * lam)
        else:
            assert opt.stats.diagnostics["rho"] >= 0.1
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    assert 0 < rejected < 40
    assert losses[-1] < 0.5 * losses[0]


def test_lm_damping_round_trips_through_state_dict():
    model, x, y, loss_fn = mlp_problem("categorical")
    opt = so.make_optimizer("smw-ng", model, damping=2.0)
    opt.lm_damping = 0.123
    other = so.make_optimizer("smw-ng", model, damping=2.0)
    other.load_state_dict(opt.state_dict())
    assert other.lm_damping == 0.123 and other.param_groups[0]["damping"] == 2.0
