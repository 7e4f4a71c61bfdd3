"""The cheap finiteness checks of linalg/finite.py: the sum fast path never changes the answer."""

from __future__ import annotations

import pytest
import torch

from secondorder.linalg.finite import all_finite, finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_non_finite_entry_is_found(bad: float, dtype: torch.dtype) -> None:
    t = torch.randn(50, 40, dtype=dtype)
    assert finite(t)
    t[17, 3] = bad
    assert not finite(t)
    assert not all_finite([torch.ones(3, dtype=dtype), t])


def test_opposite_infinities_are_found() -> None:
    t = torch.tensor([float("inf"), -float("inf"), 1.0])  # sum is NaN
    assert not finite(t)


def test_finite_tensors_whose_sum_overflows_are_finite() -> None:
    assert finite(torch.full((4,), 3e38, dtype=torch.float32))  # the float32 sum is inf
    assert finite(torch.full((4,), 1e300, dtype=torch.float64))  # the float64 sum cast to float32 is inf
    assert not finite(torch.tensor([1e300, float("nan")], dtype=torch.float64))


def test_empty_inputs_are_finite() -> None:
    assert all_finite([])
    assert finite(torch.empty(0))
