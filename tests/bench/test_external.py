"""Torch optimizers as benchmark rows (``bench/external.py``): the step's loss and its divergence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secondorder.bench.external import TorchOptimizerRow
from secondorder.optim.base import NonFiniteError


def _closure(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    return closure


def test_a_non_finite_loss_raises_before_the_optimizer_moves_anything() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    row = TorchOptimizerRow("torch.optim.AdamW", model, {"lr": 0.1})
    x = torch.randn(4, 3)
    expected = float(model(x).detach().pow(2).mean())  # the loss at the parameters before the step
    assert float(row.step(_closure(model, x, row.optimizer))) == pytest.approx(expected)
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for s in row.optimizer.state.values() for k, v in s.items() if torch.is_tensor(v)}
    with pytest.raises(NonFiniteError, match=r"torch.optim.AdamW: non-finite loss \(nan\) at step 2"):
        row.step(_closure(model, torch.full((4, 3), float("nan")), row.optimizer))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    after = {k: v for s in row.optimizer.state.values() for k, v in s.items() if torch.is_tensor(v)}
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert row.stats.steps == 1


class _ReturnsNothing(torch.optim.SGD):
    """An optimizer whose ``step`` evaluates the closure but returns ``None``."""

    def step(self, closure=None):  # noqa: ANN001, ANN201
        super().step(closure)


def test_the_loss_is_the_closures_when_the_optimizer_returns_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.optim, "ReturnsNothing", _ReturnsNothing, raising=False)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    expected = float(model(x).detach().pow(2).mean())
    row = TorchOptimizerRow("torch.optim.ReturnsNothing", model, {"lr": 0.1})
    assert float(row.step(_closure(model, x, row.optimizer))) == pytest.approx(expected)
    assert (row.stats.steps, row.stats.forward_passes, row.stats.backward_passes) == (1, 1, 1)
