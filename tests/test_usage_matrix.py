"""Every method on the architectures people train today (issue 12's usage matrix).

Each of the 17 methods, on an MLP, a residual CNN with BatchNorm in ``channels_last``, an
``nn.TransformerEncoderLayer`` classifier, a hand-written attention block, an LSTM and a GRU
classifier: it trains (the mean of the last five losses of 50 steps is below the first loss)
or raises a clear error at construction; and no tensor is left to a fallback silently (a
Kronecker method that leaves any tensor to its fallback warns, and ``coverage()`` names every
tensor).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so
from secondorder.optim.kronecker import UnmodeledParametersWarning
from tests.helpers import TEST_HP

STEPS = 50
N, T, D, CLASSES = 32, 6, 8, 3

#: per model, hyper-parameters that differ from TEST_HP (smaller steps where the tiny recurrent
#: and attention models need them)
OVERRIDES: dict[tuple[str, str], dict] = {}


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.block = Residual(4)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(F.relu(self.bn(self.stem(x))))
        return self.head(h.mean((2, 3)))


class HandAttention(nn.Module):
    """Single-head attention written out: q, k, v, out projections and SDPA, then a head."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        att = F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))
        return self.head(self.norm(x + self.o(att)).mean(1))


class TransformerClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(x).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.rnn = cell(D, 8, batch_first=True)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def model_and_data(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, CLASSES))
        x = torch.randn(N, D, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    elif kind == "resnet-bn":
        model = ResNetBN().to(memory_format=torch.channels_last)
        x = torch.randn(N, 2, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
        y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1, 0, 0] > 0.5).long()
    else:
        model = {
            "transformer": TransformerClassifier,
            "attention": HandAttention,
            "lstm": lambda: Recurrent(nn.LSTM),
            "gru": lambda: Recurrent(nn.GRU),
        }[kind]()
        x = torch.randn(N, T, D, generator=g)
        y = (x[:, 0, 0] > 0).long() + (x[:, -1, 1] > 0.5).long()
    return model, x, y


KINDS = ["mlp", "resnet-bn", "transformer", "attention", "lstm", "gru"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("key", list(so.METHODS))
def test_every_method_trains_every_architecture_or_refuses_it_clearly(key, kind):
    model, x, y = model_and_data(kind)
    hp = {**TEST_HP[key], **OVERRIDES.get((key, kind), {})}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = so.make_optimizer(key, model, **hp)
    coverage = opt.coverage()
    assert sorted(coverage) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    fallback = [n for n, what in coverage.items() if what.startswith("fallback")]
    warned = [w for w in caught if issubclass(w.category, UnmodeledParametersWarning)]
    assert bool(fallback) == bool(warned), "a fallback must be announced, and only then"
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's vmap fallback notices on attention
        losses = [float(opt.step(so.Closure(model, x, y, loss_fn))) for _ in range(STEPS)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0]
