"""Damped conjugate gradient against dense float64 solves."""

from __future__ import annotations

import pytest
import torch

from secondorder.linalg.cg import conjugate_gradient

DT = torch.float64


def _problem(n: int = 20, rank: int | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, rank or n, generator=gen, dtype=DT)
    a = m @ m.t()  # PSD (singular when rank < n)
    b = torch.randn(n, generator=gen, dtype=DT)
    return a, b


class Counted:
    def __init__(self, a):
        self.a, self.calls = a, 0

    def __call__(self, v):
        self.calls += 1
        return self.a @ v


@pytest.mark.parametrize("rank", [None, 5])
def test_damped_cg_converges_to_the_dense_solve(rank):
    a, b = _problem(rank=rank)
    lam = 0.3
    op = Counted(a)
    res = conjugate_gradient(op, b, damping=lam, max_iters=200, tol=1e-13)
    expected = torch.linalg.solve(a + lam * torch.eye(20, dtype=DT), b)
    assert res.converged
    torch.testing.assert_close(res.x, expected, rtol=1e-9, atol=1e-10)
    # at most n distinct eigenvalues -> at most n iterations in exact arithmetic (a few more in floats)
    assert res.iterations <= 30 and op.calls == res.iterations
    if rank is not None:  # rank-5 PSD + lam I has 6 distinct eigenvalues
        assert res.iterations <= 8


def test_residual_is_the_true_residual():
    a, b = _problem()
    lam = 0.1
    res = conjugate_gradient(lambda v: a @ v, b, damping=lam, max_iters=7, tol=0.0)
    assert res.iterations == 7 and not res.converged
    true_r = b - (a + lam * torch.eye(20, dtype=DT)) @ res.x
    torch.testing.assert_close(res.residual, true_r, rtol=1e-8, atol=1e-10)


def test_iterates_decrease_the_quadratic_monotonically():
    a, b = _problem(seed=3)
    lam = 0.05
    g = a + lam * torch.eye(20, dtype=DT)
    values = []
    for k in range(1, 8):
        x = conjugate_gradient(lambda v: a @ v, b, damping=lam, max_iters=k, tol=0.0).x
        values.append(float(0.5 * x @ g @ x - b @ x))
    assert all(v2 < v1 for v1, v2 in zip(values, values[1:], strict=False))


def test_warm_start_at_the_solution_needs_no_iteration():
    a, b = _problem(seed=1)
    lam = 0.2
    exact = torch.linalg.solve(a + lam * torch.eye(20, dtype=DT), b)
    op = Counted(a)
    res = conjugate_gradient(op, b, damping=lam, x0=exact, max_iters=50, tol=1e-8)
    assert res.iterations == 0 and res.converged and op.calls == 1  # one product for the initial residual
    torch.testing.assert_close(res.x, exact)
    # a nearby warm start converges in fewer iterations than a cold one
    cold = conjugate_gradient(lambda v: a @ v, b, damping=lam, max_iters=50, tol=1e-8)
    warm = conjugate_gradient(lambda v: a @ v, b, damping=lam, x0=0.999 * exact, max_iters=50, tol=1e-8)
    assert warm.iterations < cold.iterations


def test_zero_right_hand_side_and_bad_arguments():
    res = conjugate_gradient(lambda v: v, torch.zeros(4, dtype=DT), max_iters=3)
    assert res.iterations == 0 and torch.equal(res.x, torch.zeros(4, dtype=DT))
    with pytest.raises(ValueError, match="max_iters"):
        conjugate_gradient(lambda v: v, torch.ones(3), max_iters=0)
    with pytest.raises(ValueError, match="tol"):
        conjugate_gradient(lambda v: v, torch.ones(3), tol=-1.0)


def test_stops_on_negative_curvature():
    a = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=DT))
    b = torch.ones(3, dtype=DT)
    res = conjugate_gradient(lambda v: a @ v, b, max_iters=10, tol=1e-12)
    assert not res.converged and res.iterations < 3
    assert torch.isfinite(res.x).all()
