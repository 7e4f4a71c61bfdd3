"""Coupled Newton inverse p-th roots and damped inverses against numpy eigh (docs/notes.md §6, §12.14)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from secondorder.linalg import kron, roots
from secondorder.linalg.kron import LinAlgError
from secondorder.linalg.roots import (
    coupled_newton,
    coupled_newton_inverse_root,
    eigh_inverse_root,
    inverse_root,
)


def spd(n: int, cond: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    """A random SPD matrix with eigenvalues log-spaced in [1, cond]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    evals = torch.logspace(0, float(np.log10(cond)), n, dtype=torch.float64)
    return ((q * evals) @ q.t()).to(dtype)


def numpy_root(g: torch.Tensor, p: float, damping: float = 0.0) -> torch.Tensor:
    """The oracle: (G + damping I)^(-1/p) from numpy's eigendecomposition in float64."""
    a = g.double().numpy()
    w, v = np.linalg.eigh(0.5 * (a + a.T) + damping * np.eye(a.shape[0]))
    return torch.from_numpy((v * w ** (-1.0 / p)) @ v.T)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


@pytest.mark.parametrize("p", [1, 2, 4, 6])
@pytest.mark.parametrize("cond", [2.0, 1e3, 1e6])
@pytest.mark.parametrize("n", [5, 40])
def test_coupled_newton_matches_the_eigendecomposition_in_float64(p, cond, n):
    """Run to convergence (tolerance 1e-10): the fixed point is (G + eps I)^(-1/p) to 1e-8 relative."""
    g = spd(n, cond, seed=n + p)
    result = coupled_newton(g, p, damping=1e-3, tol=1e-10)
    assert result.iterations < 100
    assert rel(result.root, numpy_root(g, p, 1e-3)) < 1e-8


@pytest.mark.parametrize("p", [1, 2, 4, 6])
def test_coupled_newton_with_the_thesis_tolerance_stops_at_1e_6(p):
    """Defaults (100 iterations, tolerance 1e-6): max|H^p G_d - I| <= 1e-6, the root within ~1e-6 relative."""
    g = spd(30, 1e6, seed=3)
    result = coupled_newton(g, p)
    assert result.error <= 1e-6 and 0 < result.iterations < 100
    m = torch.linalg.matrix_power(result.root, p) @ g
    assert float((m - torch.eye(30, dtype=g.dtype)).abs().max()) == pytest.approx(
        result.error, rel=1e-3, abs=1e-9
    )
    assert rel(result.root, numpy_root(g, p)) < 1e-5


def test_coupled_newton_stops_when_the_error_stops_decreasing():
    """An indefinite "factor" (a negative eigenvalue from round-off gone wrong) makes the error grow: the loop
    stops at the first iteration whose error is not below 1.2x the previous one and returns the previous
    root; the wrapper then falls back to the eigendecomposition (negative eigenvalues clamped at 0)."""
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    g = (q * torch.tensor([2.0, 1.0, 0.5, 0.3, 0.1, -0.4], dtype=torch.float64)) @ q.t()
    p = 2
    result = coupled_newton(g, p)
    assert result.iterations < 100 and result.error > 1e-2
    # replay: the returned root is iterate number `iterations`; the next one failed the 1.2x test
    eye = torch.eye(6, dtype=g.dtype)
    z = (1 + p) / (2 * float(torch.linalg.matrix_norm(g)))
    m, h = z * g, z ** (1 / p) * eye
    errors = [float((m - eye).abs().max())]
    for _ in range(result.iterations + 1):
        step = (1 + 1 / p) * eye - m / p
        m, h_next = torch.linalg.matrix_power(step, p) @ m, h @ step
        errors.append(float((m - eye).abs().max()))
        if len(errors) <= result.iterations + 1:
            h = h_next
    assert all(b < 1.2 * a for a, b in zip(errors[:-2], errors[1:-1], strict=True))
    assert not errors[-1] < 1.2 * errors[-2]
    torch.testing.assert_close(result.root, h)
    assert result.error == pytest.approx(errors[-2])
    fallback = coupled_newton_inverse_root(g, p, 0.1)
    w, v = torch.linalg.eigh(g)
    torch.testing.assert_close(fallback, (v * (w.clamp_min(0) + 0.1) ** -0.5) @ v.t())


def test_coupled_newton_rejects_bad_input():
    with pytest.raises(ValueError, match="p"):
        coupled_newton(torch.eye(3), 0)
    with pytest.raises(LinAlgError):
        coupled_newton(torch.zeros(3, 3), 2)
    with pytest.raises(LinAlgError, match="non-finite"):
        coupled_newton_inverse_root(torch.full((3, 3), float("nan")), 2)


def test_newton_falls_back_to_the_eigendecomposition(monkeypatch):
    g = spd(10, 1e2, seed=7)

    def broken(*args, **kwargs):
        return roots.NewtonResult(torch.full((10, 10), float("nan"), dtype=g.dtype), 3, float("nan"))

    monkeypatch.setattr(roots, "coupled_newton", broken)
    out = coupled_newton_inverse_root(g, 4, 1e-2)
    assert rel(out, numpy_root(g, 4, 1e-2)) < 1e-10


def test_one_by_one_factor():
    g = torch.tensor([[4.0]], dtype=torch.float64)
    assert float(coupled_newton_inverse_root(g, 2, 5.0)) == pytest.approx(1 / 3)
    with pytest.raises(LinAlgError):
        coupled_newton_inverse_root(torch.tensor([[0.0]]), 2)


def test_eigh_root_retries_in_float64_when_float32_lapack_fails(monkeypatch):
    g = spd(8, 1e3, seed=8, dtype=torch.float32)
    original = kron._eigh

    def fails_in_float32(sym):
        return (None, None) if sym.dtype == torch.float32 else original(sym)

    monkeypatch.setattr(kron, "_eigh", fails_in_float32)
    out = eigh_inverse_root(g, 4, 1e-2)
    assert out.dtype == torch.float32 and rel(out, numpy_root(g, 4, 1e-2)) < 1e-6
    monkeypatch.setattr(kron, "_eigh", lambda sym: (None, None))
    with pytest.raises(LinAlgError, match="eigendecomposition"):
        eigh_inverse_root(g, 4, 1e-2)


def test_eigh_root_decomposes_the_damped_factor(monkeypatch):
    """LAPACK gets ``(G + G^T)/2 + damping I``; its eigenvalues are clamped at ``damping``."""
    g = spd(6, 10.0, seed=9)
    seen = []
    original = kron._eigh

    def recording(sym):
        seen.append(sym.clone())
        return original(sym)

    monkeypatch.setattr(kron, "_eigh", recording)
    out = eigh_inverse_root(g, 4, 0.5)
    torch.testing.assert_close(seen[0], g + 0.5 * torch.eye(6, dtype=g.dtype))
    assert rel(out, numpy_root(g, 4, 0.5)) < 1e-12
    eigh_inverse_root(g, 4, 0.0)
    torch.testing.assert_close(seen[1], g)  # undamped: G itself


@pytest.mark.parametrize("p", [2, 4])
def test_float32_eigh_root_of_a_low_rank_factor_with_a_zero_cluster(p):
    """A 400 x 400 float32 factor of rank 5 (a moving average of a few bias contractions: 395
    eigenvalues at 0, the cluster on which float32 LAPACK divide and conquer can fail) with
    Shampoo's damping well below its largest eigenvalue: the root matches float64 numpy to what
    float32 allows at this conditioning (``lambda_max / eps ~ 1e4``, times float32's 6e-8)."""
    gen = torch.Generator().manual_seed(p)
    v = torch.randn(400, 5, generator=gen, dtype=torch.float64) * torch.tensor([1e-1, 3e-2, 1e-2, 1e-3, 1e-4])
    g = (v @ v.t()).float()
    out = eigh_inverse_root(g, p, 3e-4)
    assert out.dtype == torch.float32
    assert rel(out, numpy_root(g, p, 3e-4)) < 1e-3


def test_eigh_root_clamps_negative_round_off_and_raises_when_singular():
    g = torch.tensor([[1.0, 0.0], [0.0, -1e-12]], dtype=torch.float64)
    torch.testing.assert_close(
        eigh_inverse_root(g, 2, 0.25), torch.diag(torch.tensor([1.25, 0.25]) ** -0.5).double()
    )
    with pytest.raises(LinAlgError, match="singular"):
        eigh_inverse_root(torch.zeros(2, 2), 2)


@pytest.mark.parametrize("p", [1, 2, 4, 6])
def test_inverse_root_dense_diagonal_and_methods_agree(p):
    g = spd(12, 1e4, seed=p)
    expected = numpy_root(g, p, 0.1)
    assert rel(inverse_root(g, p, 0.1), expected) < 1e-5  # Newton to 1e-6 (p = 1: Cholesky, exact)
    assert rel(inverse_root(g, p, 0.1, method="eigh"), expected) < 1e-10
    diag = torch.rand(12, dtype=torch.float64, generator=torch.Generator().manual_seed(p))
    torch.testing.assert_close(inverse_root(diag, p, 0.1), (diag + 0.1) ** (-1.0 / p))
    torch.testing.assert_close(
        inverse_root(diag, p, 0.1), torch.diagonal(numpy_root(torch.diag(diag), p, 0.1))
    )
    if p == 1:
        torch.testing.assert_close(
            inverse_root(g, 1, 0.1), torch.linalg.inv(g + 0.1 * torch.eye(12, dtype=g.dtype))
        )


def test_inverse_root_failure_path():
    bad = torch.eye(3)
    bad[0, 1] = float("inf")
    for p in (1, 2):
        with pytest.raises(LinAlgError):
            inverse_root(bad, p, 0.1)
    with pytest.raises(LinAlgError):
        inverse_root(torch.tensor([1.0, float("nan")]), 2, 0.1)
    with pytest.raises(ValueError, match="method"):
        inverse_root(torch.eye(3), 2, 0.1, method="svd")


def test_float32_roots_of_gradient_statistics(caplog):
    """The Shampoo use: a rank-deficient moving average of gradient outer products, float32, eps = 3e-4."""
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(64, 8, generator=gen)
    stat = g @ g.t() / 8
    expected = numpy_root(stat, 4, 3e-4)
    with caplog.at_level(logging.DEBUG, logger="secondorder.linalg.roots"):
        newton = inverse_root(stat, 4, 3e-4, method="newton")
    assert rel(newton, expected) < 1e-3
    assert rel(inverse_root(stat, 4, 3e-4, method="eigh"), expected) < 1e-3
