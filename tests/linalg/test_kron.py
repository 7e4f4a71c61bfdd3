"""``damped_inverse``: the Cholesky path, the eigendecomposition fallback, and its failure path."""

from __future__ import annotations

import pytest
import torch

from secondorder.linalg import LinAlgError, damped_inverse


def test_damped_inverse_matches_the_dense_inverse() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64, generator=g)
    m = x @ x.t()  # PSD, rank 4
    expected = torch.linalg.inv(m + 0.1 * torch.eye(6, dtype=torch.float64))
    assert torch.allclose(damped_inverse(m, 0.1), expected, rtol=1e-10, atol=1e-12)


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
