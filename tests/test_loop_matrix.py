"""Every method in every training loop and precision (issue 13's matrix test).

Each of the 17 methods x {``so.Closure``, a plain torch closure, no closure} x {float32, bf16
autocast inside the model's forward, bf16 autocast around the step} on an MLP and a small
transformer classifier: it trains (the mean of the last five of 50 losses is below the first),
its curvature statistics stay in float32, the parameters keep their dtype; or it raises a
``TypeError`` that names the forms it takes. Nothing crashes inside torch. (``torch.compile``'d
models are not in the matrix yet.)
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import secondorder as so
from tests.helpers import TEST_HP
from tests.test_usage_matrix import CLASSES, D, N, T, TransformerClassifier

STEPS = 50
FORMS = ["so.Closure", "plain", "none"]
PRECISIONS = ["float32", "bf16-forward", "bf16-around"]
NO_CLOSURE = set(so.optim.registry.steps_without_closure()) | set(so.optim.registry.steps_watched())


class Autocast(nn.Module):
    """The model's forward under autocast (bf16 unless told; as AMP recipes wrap a model)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=self.dtype):
            return self.inner(x)


def model_and_data(kind: str, precision: str, compiled: bool = False) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model: nn.Module = nn.Sequential(
            nn.Linear(D, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, CLASSES)
        )
        x = torch.randn(N, D, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    else:
        model = TransformerClassifier()
        x = torch.randn(N, T, D, generator=g)
        y = (x[:, 0, 0] > 0).long() + (x[:, -1, 1] > 0.5).long()
    model = Autocast(model) if precision == "bf16-forward" else model
    if compiled:  # dynamo's capture and AOT autograd's graphs, without a C++ build
        model = torch.compile(model, backend="aot_eager")  # type: ignore[assignment]
    return model, x, y


def floating_state(opt) -> list[Tensor]:
    state = opt.state_dict()
    out: list[Tensor] = []

    def walk(v):
        if isinstance(v, Tensor) and v.is_floating_point():
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)

    walk(state["module_state"])
    walk(state["param_state"])
    return out


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("key", list(so.METHODS))
def test_every_method_trains_in_every_loop_and_precision_or_names_the_forms(key, form, precision, mode, kind):
    model, x, y = model_and_data(kind, precision, compiled=mode == "compiled")
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = so.make_optimizer(key, model, loss_fn=loss_fn, **TEST_HP[key])
    around = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16-around"
        else contextlib.nullcontext()
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    def step() -> float:
        if form == "so.Closure":
            with around:
                return float(opt.step(so.Closure(model, x, y, loss_fn)))
        if form == "plain":
            with around:
                return float(opt.step(closure))
        opt.zero_grad()
        with around:
            loss = loss_fn(model(x), y)
            loss.backward()
            assert opt.step() is None
        return float(loss)

    if form == "none" and key not in NO_CLOSURE:
        with pytest.raises(TypeError, match="needs a so.Closure.*without a closure"):
            step()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's vmap fallback notices on attention
        losses = [step() for _ in range(STEPS)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0]
    assert {t.dtype for t in floating_state(opt)} <= {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sorted(opt.coverage()) == sorted(n for n, _ in so.capture.unwrap(model).named_parameters())


def train_with_closures(key: str, model: nn.Module, x: Tensor, y: Tensor):
    """``STEPS`` so.Closure steps of ``key`` at its test values; the losses stay finite and fall."""
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = so.make_optimizer(key, model, **TEST_HP[key])
        losses = [float(opt.step(so.Closure(model, x, y, loss_fn))) for _ in range(STEPS)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0]
    return opt


@pytest.mark.parametrize("key", [k for k in so.METHODS if k not in ("sgd", "adam", "rmsprop")])
def test_bf16_parameters_train_with_float32_statistics(key):
    """A bf16 model: the statistics, inverses and directions are float32 (``factor_dtype``), each
    update is applied in bf16, and it trains."""
    model, x, y = model_and_data("mlp", "float32")
    model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    opt = train_with_closures(key, model, x, y)
    curvature = [t for t in floating_state(opt) if t.dim() >= 2 and t.shape[-1] == t.shape[-2]]
    if key not in ("smw-gn", "smw-ng", "smw-ng-bd", "hf"):  # these keep no curvature between steps
        assert curvature and {t.dtype for t in curvature} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("key", ["kfac", "kbfgs", "tnt", "smw-ng"])
def test_factor_dtype_float64_keeps_the_statistics_in_float64(key):
    model, x, y = model_and_data("mlp", "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = so.make_optimizer(key, model, factor_dtype=torch.float64, **TEST_HP[key])
        for _ in range(3):
            opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))
    curvature = [t for t in floating_state(opt) if t.dim() >= 2 and t.shape[-1] == t.shape[-2]]
    if key != "smw-ng":  # it keeps no curvature between steps
        assert curvature and {t.dtype for t in curvature} == {torch.float64}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="factor_dtype: torch.float32 or torch.float64"):
        so.make_optimizer(key, model, factor_dtype=torch.bfloat16)


@pytest.mark.parametrize("key", ["kfac", "kbfgs", "tnt", "shampoo", "smw-gn", "block-fisher"])
def test_fp16_autocast_trains_with_float32_statistics(key):
    """fp16 autocast (CPU) inside the model's forward: as with bf16."""
    model, x, y = model_and_data("mlp", "float32")
    model = Autocast(model, torch.float16)
    opt = train_with_closures(key, model, x, y)
    assert {t.dtype for t in floating_state(opt)} <= {torch.float32}
