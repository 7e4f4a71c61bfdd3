"""Tensor algebra of 4.2.1 against explicit index loops, Proposition 1 and the identification (4.10)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from secondorder.linalg.tensor import (
    add_multi_mode_product_,
    contraction,
    contractions,
    diag_contraction,
    factor_trace,
    kron_dense,
    matricize,
    mode_product,
    multi_mode_product,
    tensor_normal_factors,
    vec,
)

SHAPES = [(5,), (3, 4), (2, 3, 4), (2, 3, 2, 3)]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def slice_along(a: torch.Tensor, mode: int, j: int) -> torch.Tensor:
    return a.select(mode, j)


@pytest.mark.parametrize("shape", SHAPES)
def test_vec_and_matricization_follow_the_recursive_definitions(shape):
    a = rand(*shape)

    # vec(A) = [vec(A^1_1); ...; vec(A^1_{d_1})], recursively, with vec of a vector the vector itself
    def vec_rec(t):
        if t.dim() <= 1:
            return t.reshape(-1)  # a scalar or a vector
        return torch.cat([vec_rec(t[j]) for j in range(t.shape[0])])

    assert torch.equal(vec(a), vec_rec(a))
    for i in range(a.dim()):
        # row j of mat_i(A) is vec of the j-th slice along mode i (a scalar for a vector)
        rows = torch.stack([vec_rec(slice_along(a, i, j)) for j in range(shape[i])])
        assert torch.equal(matricize(a, i), rows.reshape(shape[i], -1))
    assert torch.equal(vec(a), vec(matricize(a, 0)))


@pytest.mark.parametrize("shape", SHAPES)
def test_mode_product_matches_its_index_definition(shape):
    a = rand(*shape)
    for i, d in enumerate(shape):
        u = rand(d + 1, d, seed=i + 1)  # a rectangular U: d'_i = d_i + 1
        b = mode_product(a, u, i)
        expected_shape = list(shape)
        expected_shape[i] = d + 1
        assert list(b.shape) == expected_shape
        for idx in itertools.product(*[range(s) for s in expected_shape]):
            rest = list(idx)
            val = sum(a[tuple(rest[:i] + [j] + rest[i + 1 :])] * u[idx[i], j] for j in range(d))
            assert float(b[idx]) == pytest.approx(float(val), abs=1e-12)
    if a.dim() == 2:
        u1, u2 = rand(shape[0], shape[0], seed=7), rand(shape[1], shape[1], seed=8)
        torch.testing.assert_close(mode_product(a, u1, 0), u1 @ a)  # A x_1 U = U A
        torch.testing.assert_close(mode_product(a, u2, 1), a @ u2.t())  # A x_2 U = A U^T


@pytest.mark.parametrize("shape", SHAPES)
def test_proposition_1_kronecker_product_equals_mode_products(shape):
    """(4.9): (U_1 (x) ... (x) U_k) vec(G) = vec(G x_1 U_1 ... x_k U_k), row-major vec, general U_i."""
    g = rand(*shape, seed=3)
    us = [rand(d, d, seed=10 + i) for i, d in enumerate(shape)]
    kron = us[0]
    for u in us[1:]:
        kron = torch.kron(kron, u)
    lhs = kron @ g.reshape(-1)
    rhs = vec(multi_mode_product(g, us))
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    # mode products commute and equal the chain of single products
    chain = g
    for i in reversed(range(len(shape))):
        chain = mode_product(chain, us[i], i)
    torch.testing.assert_close(chain, multi_mode_product(g, us), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_diagonal_factors_act_like_dense_diagonal_matrices(shape):
    g = rand(*shape, seed=4)
    us = [rand(d, d, seed=20 + i) for i, d in enumerate(shape)]
    us[0] = rand(shape[0], seed=30).abs()  # a diagonal factor given as its diagonal
    dense = [torch.diag(us[0])] + us[1:]
    torch.testing.assert_close(
        multi_mode_product(g, us), multi_mode_product(g, dense), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(kron_dense(us), kron_dense(dense))


@pytest.mark.parametrize("shape", SHAPES)
def test_contractions_are_inner_products_of_slices(shape):
    a = rand(*shape, seed=5)
    for i, d in enumerate(shape):
        expected = torch.empty(d, d, dtype=a.dtype)
        for p in range(d):
            for q in range(d):
                expected[p, q] = (slice_along(a, i, p) * slice_along(a, i, q)).sum()
        torch.testing.assert_close(contraction(a, i), expected)
        torch.testing.assert_close(diag_contraction(a, i), torch.diagonal(expected))
    cs = contractions(a, diagonal=[True] + [False] * (a.dim() - 1))
    assert cs[0].dim() == 1 and all(c.dim() == 2 for c in cs[1:])
    # every contraction has the same trace, |A|_F^2
    for c in cs:
        assert float(factor_trace(c)) == pytest.approx(float((a * a).sum()))


def test_identification_4_10_has_equal_normalised_traces():
    """tr(U~_i)/d_i = c_0 for every i, and tr(U~_1 (x) ... (x) U~_k)/D = tr(E[vec vec^T])/D."""
    shape = (3, 4, 5)
    samples = rand(200, *shape, seed=6)
    stats = [sum(contraction(s, i) for s in samples) / 200 for i in range(3)]
    factors = tensor_normal_factors(stats, shape)
    total = math.prod(shape)
    c0 = (float(torch.trace(stats[0])) / total) ** (1 / 3)
    for u, d in zip(factors, shape, strict=True):
        assert float(torch.trace(u)) / d == pytest.approx(c0, rel=1e-12)
    second_moment = sum(torch.outer(s.reshape(-1), s.reshape(-1)) for s in samples) / 200
    assert float(torch.trace(kron_dense(factors))) / total == pytest.approx(
        float(torch.trace(second_moment)) / total
    )


def test_identification_edge_cases():
    g = rand(6, seed=7)
    stats = [torch.outer(g, g)]
    assert torch.equal(tensor_normal_factors(stats, (6,))[0], stats[0])  # k = 1: U~ = E[G G^T]
    zeros = [torch.zeros(3, 3, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)]
    out = tensor_normal_factors(zeros, (3, 4))  # a gradient that is identically zero (conv bias before BN)
    assert all(torch.equal(u, z) for u, z in zip(out, zeros, strict=True))
    with pytest.raises(ValueError, match="stats"):
        tensor_normal_factors(zeros, (3, 4, 5))


def test_tensor_normal_samples_identify_the_kronecker_covariance():
    """Samples with vec(G) ~ N(0, U_1 (x) U_2 (x) U_3): E[G^(i)] = U_i prod_{j != i} tr(U_j) (4.2), and
    (4.10) applied to the sample contractions reproduces U_1 (x) U_2 (x) U_3 within sampling error."""
    shape = (3, 4, 5)
    gen = torch.Generator().manual_seed(11)
    us = []
    for d in shape:
        a = torch.randn(d, d, generator=gen, dtype=torch.float64)
        us.append(a @ a.t() / d + 0.5 * torch.eye(d, dtype=torch.float64))
    chols = [torch.linalg.cholesky(u) for u in us]
    n = 40000
    z = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    g = torch.einsum("nabc,ia,jb,kc->nijk", z, *chols)  # G = Z x_1 L_1 x_2 L_2 x_3 L_3 (Prop. 1)
    # E[G^(i)] estimated by the average of the per-sample contractions (batched: mat_i over the samples)
    mats = [g.movedim(i + 1, 1).reshape(n, d, -1) for i, d in enumerate(shape)]  # mat_i of every sample
    stats = [torch.einsum("nip,njp->ij", mat, mat) / n for mat in mats]
    traces = [float(torch.trace(u)) for u in us]
    for i, u in enumerate(us):
        expected = u * math.prod(t for j, t in enumerate(traces) if j != i)
        assert float(torch.linalg.norm(stats[i] - expected) / torch.linalg.norm(expected)) < 0.03
    identified = kron_dense(tensor_normal_factors(stats, shape))
    truth = kron_dense(us)
    assert float(torch.linalg.norm(identified - truth) / torch.linalg.norm(truth)) < 0.03
    # a wrong representation (Dees and Mandic: tr U~_i = 1) does not reproduce the covariance scale
    unit_trace = kron_dense([s / torch.trace(s) for s in stats])
    assert float(torch.linalg.norm(unit_trace - truth) / torch.linalg.norm(truth)) > 0.5


def test_multi_mode_product_checks_the_number_of_factors():
    with pytest.raises(ValueError, match="factors"):
        multi_mode_product(rand(2, 3), [torch.eye(2, dtype=torch.float64)])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("diagonal_first", [False, True])
def test_add_multi_mode_product_accumulates_the_kronecker_product(shape, diagonal_first):
    """``out + alpha (U_1 (x) ... (x) U_k) vec(G)`` in place, dense (one GEMM/GEMV) or not."""
    g = rand(*shape, seed=5)
    us = [rand(d, d, seed=40 + i) for i, d in enumerate(shape)]
    if diagonal_first:
        us[0] = rand(shape[0], seed=50).abs()
    out = rand(*shape, seed=6)
    expected = vec(out) - 0.3 * (kron_dense(us) @ vec(g))
    result = add_multi_mode_product_(out, g, us, -0.3)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(vec(out), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_add_multi_mode_product_with_rectangular_factors(shape):
    """``U_i`` of shape ``(d_i + 1, d_i)``: ``out`` has the product's shape, not ``A``'s."""
    g = rand(*shape, seed=7)
    us = [rand(d + 1, d, seed=60 + i) for i, d in enumerate(shape)]
    out = rand(*[d + 1 for d in shape], seed=8)
    expected = vec(out) + 2.0 * (kron_dense(us) @ vec(g))
    add_multi_mode_product_(out, g, us, 2.0)
    torch.testing.assert_close(vec(out), expected, rtol=1e-12, atol=1e-12)


def test_add_multi_mode_product_checks_the_output_shape_and_the_factor_count():
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 3\)"):
        add_multi_mode_product_(torch.zeros(3, 4), torch.zeros(4, 3), [torch.eye(4), torch.eye(3)])
    with pytest.raises(ValueError, match="factors: expected 2 factors"):
        add_multi_mode_product_(torch.zeros(4, 3), torch.zeros(4, 3), [torch.eye(4)])
