"""``damped_inverse``: the Cholesky path, the eigendecomposition fallback, and its failure path."""

from __future__ import annotations

import pytest
import torch

from secondorder.linalg import (
    LinAlgError,
    damped_eigh,
    damped_inverse,
    damped_inverses,
    ema_gram_,
    gram,
    gram_,
    gram_fits,
)
from secondorder.linalg import kron as K


def test_damped_inverse_matches_the_dense_inverse() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64, generator=g)
    m = x @ x.t()  # PSD, rank 4
    expected = torch.linalg.inv(m + 0.1 * torch.eye(6, dtype=torch.float64))
    assert torch.allclose(damped_inverse(m, 0.1), expected, rtol=1e-10, atol=1e-12)


def test_damped_inverse_falls_back_to_the_clamped_eigendecomposition() -> None:
    """An eigenvalue made negative by round-off (-1e-3) beats the damping (1e-4): Cholesky fails,
    and the eigen path inverts ``max(lam, 0) + damping``."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=g))
    lam = torch.tensor([-1e-3, 0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    m = (q * lam) @ q.t()
    assert int(torch.linalg.cholesky_ex(m + 1e-4 * torch.eye(5, dtype=torch.float64))[1]) != 0
    expected = (q / (lam.clamp_min(0) + 1e-4)) @ q.t()
    torch.testing.assert_close(damped_inverse(m, 1e-4), expected, rtol=1e-9, atol=1e-6)


def test_damped_eigh_clamps_at_the_damping_and_retries_in_float64(monkeypatch) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, generator=g)
    m = x @ x.t()  # float32, rank 3: four eigenvalues at 0 (round-off either side)
    evals, evecs = damped_eigh(m, 0.25)
    assert evals.dtype == evecs.dtype == torch.float32
    assert float(evals.min()) >= 0.25
    torch.testing.assert_close((evecs * evals) @ evecs.t(), m + 0.25 * torch.eye(7), rtol=1e-5, atol=1e-5)
    undamped, _ = damped_eigh(m, 0.0)
    assert float(undamped.min()) >= 0.0
    original = K._eigh
    monkeypatch.setattr(K, "_eigh", lambda sym: (None, None) if sym.dtype == torch.float32 else original(sym))
    retried, vecs = damped_eigh(m, 0.25)
    assert retried.dtype == vecs.dtype == torch.float32
    torch.testing.assert_close(retried, evals, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(K, "_eigh", lambda sym: (None, None))
    with pytest.raises(LinAlgError, match="eigendecomposition"):
        damped_eigh(m, 0.25)
    with pytest.raises(LinAlgError, match="non-finite"):
        damped_eigh(torch.full((2, 2), float("inf")), 0.25)


def test_non_finite_factor_raises_our_error() -> None:
    m = torch.eye(3, dtype=torch.float64)
    m[0, 1] = float("nan")
    with pytest.raises(LinAlgError, match="non-finite"):
        damped_inverse(m, 0.1)


def test_failing_eigendecomposition_becomes_our_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """When Cholesky fails and ``eigh`` does not converge, callers get ``LinAlgError`` (and keep
    their previous inverse), not torch's exception."""
    m = -torch.eye(3, dtype=torch.float64)  # indefinite after damping: Cholesky fails

    def no_convergence(_: torch.Tensor):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", no_convergence)
    with pytest.raises(LinAlgError, match="eigendecomposition"):
        damped_inverse(m, 0.1)


@pytest.mark.parametrize("d", [5, K.SYMMETRIC_BLOCKS_MIN + 7, 413, 1013])
def test_blocked_gram_equals_the_dense_product(d: int) -> None:
    """One GEMM (d below the threshold), 2, 3 and 8 row panels."""
    g = torch.Generator().manual_seed(d)
    rows = K.SYMMETRIC_ROWS_MIN + 9
    assert K._symmetric_blocks(d, rows, torch.device("cpu")) == {5: 1, 207: 2, 413: 3, 1013: 8}[d]
    x = torch.randn(rows, d, generator=g, dtype=torch.float64)
    dense = x.t() @ x
    torch.testing.assert_close(gram(x), dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gram(x, 0.25), 0.25 * dense, rtol=1e-12, atol=1e-12)
    old = gram(torch.randn(rows, d, generator=g, dtype=torch.float64))
    expected = 0.9 * old + 0.1 * 3.0 * dense
    torch.testing.assert_close(ema_gram_(old.clone(), x, 0.9, 3.0), expected, rtol=1e-12, atol=1e-12)
    acc = gram(x[: K.SYMMETRIC_ROWS_MIN])  # panels, then one GEMM for the remaining 9 rows
    torch.testing.assert_close(gram_(acc, x[K.SYMMETRIC_ROWS_MIN :], 1.0), dense, rtol=1e-12, atol=1e-12)
    # a transposed (non-contiguous) X, as for the contraction of a matrix's first mode
    cols = torch.randn(d, rows, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gram(cols.t()), cols @ cols.t(), rtol=1e-12, atol=1e-9)


def test_panel_edges_increase_from_zero_to_n() -> None:
    for n in range(K.SYMMETRIC_BLOCKS_MIN, 5001):
        blocks = K._symmetric_blocks(n, K.SYMMETRIC_ROWS_MIN, torch.device("cpu"))
        edges = K._panel_edges(n, blocks)
        assert len(edges) == blocks + 1 and edges[0] == 0 and edges[-1] == n, n
        assert all(b - a >= 64 for a, b in zip(edges[:-1], edges[1:], strict=True)), (n, edges)
        assert all(e % 16 == 0 for e in edges[1:-1]), (n, edges)


def test_blocked_gram_ignores_the_old_contents_when_beta_is_zero() -> None:
    x = torch.randn(K.SYMMETRIC_ROWS_MIN, 2 * K.SYMMETRIC_BLOCKS_MIN + 1, dtype=torch.float64)
    out = torch.full((x.shape[1], x.shape[1]), float("nan"), dtype=torch.float64)
    torch.testing.assert_close(gram_(out, x), x.t() @ x, rtol=1e-12, atol=1e-12)


def test_blocked_gram_rejects_a_wrong_output_shape() -> None:
    with pytest.raises(ValueError, match="out: expected shape"):
        gram_(torch.zeros(3, 3), torch.zeros(4, 2))


def test_blocked_gram_keeps_one_gemm_off_the_cpu_and_for_few_rows() -> None:
    cpu = torch.device("cpu")
    assert K._symmetric_blocks(1000, 1000, cpu) == 8
    assert K._symmetric_blocks(300, 1000, cpu) == 2
    assert K._symmetric_blocks(100, 1000, cpu) == 1
    assert K._symmetric_blocks(1000, K.SYMMETRIC_ROWS_MIN - 1, cpu) == 1
    assert K._symmetric_blocks(1000, 1000, torch.device("meta")) == 1


def test_gram_fits_bounds_the_product_and_its_moving_average():
    big = torch.full((4, 3), 1e19)  # 4 * 1e38 overflows float32
    assert not gram_fits(big)
    assert not torch.isfinite(big.t() @ big).all()
    assert gram_fits(big, 1e-3)  # the scale keeps it below max/4
    assert gram_fits(torch.randn(100, 5))
    assert gram_fits(torch.randn(100, 5, dtype=torch.float64) * 1e100)  # float64 has room
    assert not gram_fits(torch.tensor([[float("nan"), 1.0]]))
    assert not gram_fits(torch.tensor([[-1e20]]))  # negative entries count too
    assert gram_fits(torch.empty(0, 3))


def test_damped_inverses_invert_each_block_and_fall_back_on_indefinite_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 5, generator=g, dtype=torch.float64)
    m = x @ x.transpose(-1, -2)
    eye = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(damped_inverses(m, 0.1), torch.linalg.inv(m + 0.1 * eye))
    m[0] = torch.tensor([[1.0, 0.0], [0.0, -5.0]], dtype=torch.float64)  # round-off made it indefinite
    inv = damped_inverses(m, 0.1)
    torch.testing.assert_close(inv[0], torch.diag(torch.tensor([1 / 1.1, 1 / 0.1], dtype=torch.float64)))
    torch.testing.assert_close(inv[1:], torch.linalg.inv(m[1:] + 0.1 * eye))
    with pytest.raises(LinAlgError):
        damped_inverses(m * float("nan"), 0.1)
