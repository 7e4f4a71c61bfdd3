"""Compact L-BFGS (linalg/lbfgs.py) against p sequential BFGS updates (3.16) and the two-loop recursion."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.linalg import bfgs as B
from secondorder.linalg import lbfgs as LB
from tests.helpers import roundtrip

F64 = torch.float64


def random_pairs(n, d, gen):
    """Pairs with s^T y > 0 (y = B s for an SPD B, plus a little noise)."""
    m = torch.randn(d, d, generator=gen, dtype=F64)
    b = m @ m.t() / d + 0.5 * torch.eye(d, dtype=F64)
    pairs = []
    while len(pairs) < n:
        s = torch.randn(d, generator=gen, dtype=F64)
        y = b @ s + 0.05 * torch.randn(d, generator=gen, dtype=F64)
        if s @ y > 0:
            pairs.append((s, y))
    return pairs


def recursion(pairs, d, gamma):
    """(3.16): H_i = (I - rho s y^T) H_{i-1} (I - rho y s^T) + rho s s^T from H_0 = gamma I, oldest first."""
    h = gamma * torch.eye(d, dtype=F64)
    for s, y in pairs:
        h = B.bfgs_update(h, s, y)
    return h


def build(pairs, d, gamma, history):
    mem = LB.lbfgs_empty(d, gamma, dtype=F64)
    for s, y in pairs:
        mem = LB.lbfgs_append(mem, s, y, history)
    return mem


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.integers(1, 8), st.integers(1, 7), st.integers(1, 5), st.floats(0.1, 5.0), st.integers(0, 2**30))
def test_compact_lbfgs_equals_sequential_bfgs_and_two_loop(d, n, history, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    pairs = random_pairs(n, d, gen)
    mem = build(pairs, d, gamma, history)
    kept = pairs[-history:]  # the oldest pairs beyond the memory are dropped
    assert mem.size == len(kept)
    dense = recursion(kept, d, gamma)
    assert torch.allclose(LB.lbfgs_dense(mem), dense, rtol=1e-9, atol=1e-11)
    v = torch.randn(d, 3, generator=gen, dtype=F64)
    hv = LB.lbfgs_apply(mem, v)  # applied to a matrix
    assert torch.allclose(hv, dense @ v, rtol=1e-9, atol=1e-11)
    assert torch.allclose(LB.lbfgs_apply_t(mem, v.t().contiguous()), hv.t(), rtol=1e-12, atol=1e-13)
    for j in range(v.shape[1]):  # per column: the two-loop recursion
        col = LB.two_loop(v[:, j], [s for s, _ in kept], [y for _, y in kept], gamma)
        assert torch.allclose(hv[:, j], col, rtol=1e-9, atol=1e-11)
        assert torch.allclose(LB.lbfgs_apply(mem, v[:, j]), col, rtol=1e-9, atol=1e-11)


def test_incremental_factors_equal_factors_built_from_scratch_after_dropping():
    gen = torch.Generator().manual_seed(0)
    d, gamma, p = 6, 0.7, 5
    pairs = random_pairs(9, d, gen)
    mem = build(pairs, d, gamma, p)
    s = torch.stack([s for s, _ in pairs[-p:]])
    y = torch.stack([y for _, y in pairs[-p:]])
    assert torch.equal(mem.s, s) and torch.equal(mem.y, y)
    r = torch.triu(s @ y.t())  # R_ij = s_i^T y_j, i <= j
    assert torch.allclose(mem.r_inv, torch.linalg.inv(r), rtol=1e-10, atol=1e-12)
    assert torch.allclose(mem.yty, y @ y.t(), rtol=1e-12)
    assert torch.allclose(mem.sty, (s * y).sum(1), rtol=1e-12)
    dropped = LB.lbfgs_drop_oldest(mem)
    expected = recursion(pairs[-p + 1 :], d, gamma)
    assert torch.allclose(LB.lbfgs_dense(dropped), expected, rtol=1e-9, atol=1e-11)


def test_empty_memory_is_gamma_identity_and_gamma_can_change():
    gen = torch.Generator().manual_seed(1)
    d = 4
    mem = LB.lbfgs_empty(d, 2.5, dtype=F64)
    v = torch.randn(d, 2, generator=gen, dtype=F64)
    assert torch.equal(LB.lbfgs_apply(mem, v), 2.5 * v)
    assert torch.equal(LB.lbfgs_apply_t(mem, v.t()), 2.5 * v.t())
    pairs = random_pairs(3, d, gen)
    mem = build(pairs, d, 2.5, 10)
    changed = LB.lbfgs_factors(mem, 0.3)  # a new initial matrix 0.3 I, same pairs
    assert changed.gamma == 0.3
    assert torch.allclose(LB.lbfgs_dense(changed), recursion(pairs, d, 0.3), rtol=1e-9, atol=1e-11)


def test_state_round_trips_through_a_checkpoint():
    gen = torch.Generator().manual_seed(2)
    mem = build(random_pairs(4, 5, gen), 5, 1.3, 3)
    state = roundtrip({"layer": mem.as_state()})["layer"]
    assert set(state) == {f"lbfgs_{k}" for k in ("s", "y", "sty", "r_inv", "yty", "left", "right", "gamma")}
    back = LB.CompactLBFGS.from_state(state)
    v = torch.randn(5, 2, generator=gen, dtype=F64)
    assert torch.equal(LB.lbfgs_apply(back, v), LB.lbfgs_apply(mem, v))


def test_history_size_must_be_positive():
    with pytest.raises(ValueError, match="history_size"):
        LB.lbfgs_append(LB.lbfgs_empty(2, 1.0, dtype=F64), torch.ones(2).double(), torch.ones(2).double(), 0)
