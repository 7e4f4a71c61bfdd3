"""Hessian-free: with enough CG iterations one step is the dense damped Gauss-Newton solve."""

from __future__ import annotations

import copy

import pytest
import torch

import secondorder as so
from tests.optim.test_smw import (
    LAM,
    TAU,
    bn_problem,
    conv_problem,
    dense_direction,
    dense_jacobian,
    flat_grad,
    flat_params,
    mlp_problem,
)

EXACT = dict(cg_max_iters=300, cg_tol=1e-13)


def hf_step(model, x, y, loss_fn, **hp):
    opt = so.make_optimizer("hf", model, lr=1.0, damping=LAM, tau=TAU, **hp)
    before = flat_params(model)
    opt.step(so.Closure(model, x, y, loss_fn))
    return opt, before - flat_params(model)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian", "categorical-sum"])
def test_converged_cg_equals_the_dense_gauss_newton_solve(likelihood):
    model, x, y, loss_fn = mlp_problem(likelihood)
    expected = dense_direction(model, x, y, loss_fn, "gn", n2=4)
    opt, step = hf_step(model, x, y, loss_fn, curvature_batch=4, **EXACT)
    assert opt.stats.diagnostics["cg_converged"]
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-6)
    assert float((step - expected).abs().max()) < 1e-9  # in fact far tighter in float64


@pytest.mark.parametrize("problem", [conv_problem, bn_problem])
def test_conv_and_batchnorm_models(problem):
    model, x, y, loss_fn = problem()
    expected = dense_direction(model, x, y, loss_fn, "gn", n2=x.shape[0] // 2)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)
    _, step = hf_step(model, x, y, loss_fn, **EXACT)
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-6)
    for (n, b), (_, b_ref) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(b, b_ref), n  # only pass 1 updated the running statistics


def test_truncated_cg_counts_products_and_keeps_the_solution_for_the_warm_start():
    model, x, y, loss_fn = mlp_problem("categorical")
    opt = so.make_optimizer("hf", model, cg_max_iters=3, cg_tol=0.0, cg_decay=0.5)
    c = so.Closure(model, x, y, loss_fn)
    g0 = [p.detach().clone() for p in model.parameters()]
    opt.step(c)
    assert opt.stats.diagnostics["cg_iterations"] == 3
    # pass 1 + S2 forward + 3 R-ops + trial; pass 1 + 3 VJPs
    assert (opt.stats.forward_passes, opt.stats.backward_passes) == (6, 4)
    lr = opt.param_groups[0]["lr"]
    for p, before in zip(model.parameters(), g0, strict=True):
        torch.testing.assert_close(opt.state[p]["cg_solution"], (before - p.detach()) / lr)
    opt.step(c)  # the warm start costs one more product (the initial residual)
    assert (opt.stats.forward_passes, opt.stats.backward_passes) == (6 + 7, 4 + 5)


def test_warm_start_from_the_exact_solution_needs_no_iteration():
    """cg_decay = 1 and the same batch and damping: CG starts at the solution of the last step."""
    model, x, y, loss_fn = mlp_problem("gaussian")
    opt = so.make_optimizer("hf", model, lr=0.0, lm_boost=1.0, lm_drop=1.0, cg_decay=1.0, **EXACT)
    c = so.Closure(model, x, y, loss_fn)
    opt.step(c)
    first = opt.stats.diagnostics["cg_iterations"]
    opt.step(c)  # lr = 0: same parameters, same system
    assert first > 5 and opt.stats.diagnostics["cg_iterations"] <= 1


def test_hf_model_reduction_uses_the_truncated_solution():
    """Damped reduction -g^T p - 1/2 p^T (B + lam I) p at the warm-started, truncated CG iterate.

    From x0 = 0 every CG iterate satisfies p^T (B + lam I) p = -g^T p, so the exact-step formula
    -1/2 g^T p would do; after a warm start it does not, and the true quadratic is needed.
    """
    model, x, y, loss_fn = mlp_problem("gaussian")
    opt = so.make_optimizer(
        "hf",
        model,
        lr=0.0,
        damping=LAM,
        tau=TAU,
        cg_max_iters=1,
        cg_tol=0.0,
        cg_decay=1.0,
        curvature_batch=1.0,
        lm_boost=1.0,
        lm_drop=1.0,
    )
    c = so.Closure(model, x, y, loss_fn)
    opt.step(c)
    opt.step(c)  # lr = 0: same point; CG starts from the first solution and takes one iteration
    d = torch.cat([opt.state[p]["cg_solution"].reshape(-1) for p in model.parameters()])
    g = flat_grad(model, x, y, loss_fn)
    jac, hess = dense_jacobian(model, x, y, loss_fn, "gn")
    b = jac.t() @ hess @ jac / x.shape[0]
    expected = float(g @ d - 0.5 * d @ (b + (LAM + TAU) * torch.eye(len(d), dtype=d.dtype)) @ d)
    assert opt.stats.diagnostics["predicted_reduction"] == pytest.approx(expected, rel=1e-8)
    assert expected != pytest.approx(0.5 * float(g @ d), rel=1e-3)


@pytest.mark.parametrize(
    "arg,value", [("cg_decay", 1.5), ("cg_decay", -0.1), ("cg_max_iters", 2.5), ("cg_tol", float("nan"))]
)
def test_invalid_cg_values_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=arg):
        so.make_optimizer("hf", mlp_problem("categorical")[0], **{arg: value})
