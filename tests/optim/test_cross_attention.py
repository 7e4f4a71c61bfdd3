"""Cross-attention in KFAC and K-BFGS: ``nn.MultiheadAttention`` called with a query that differs
from its key and value projects with two row slices of ``in_proj_weight`` (``W_q`` on the query,
``W_kv`` on the memory), one block each, captured where the slices enter ``F.linear``. The
reference is the same network with explicit ``nn.Linear`` projections: the same steps in float64."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so
from secondorder.capture import blocks as LB
from secondorder.capture import hooks as C

E, HEADS, L, S, N, CLASSES = 8, 2, 5, 4, 10, 3


class CrossAttention(nn.MultiheadAttention):
    """An attention module this test's model always calls as cross-attention."""


@pytest.fixture
def cross_registered():
    so.register_layer(CrossAttention, LB.MultiheadCrossAttentionBlock)
    yield
    so.unregister_layer(CrossAttention)


def memory(x: Tensor) -> Tensor:
    return 0.5 * x[:, :S].flip(1)  # (N, S, E), no parameters


class CrossNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = CrossAttention(E, HEADS, batch_first=True).double()
        self.head = nn.Linear(E, CLASSES).double()

    def forward(self, x: Tensor) -> Tensor:
        mem = memory(x)
        out = self.attn(x, mem, mem, need_weights=False)[0]
        return self.head(torch.tanh(out).mean(1))


class ExplicitNet(nn.Module):
    def __init__(self, net: CrossNet):
        super().__init__()
        w, b = net.attn.in_proj_weight, net.attn.in_proj_bias
        self.q = nn.Linear(E, E, dtype=torch.float64)
        self.kv = nn.Linear(E, 2 * E, dtype=torch.float64)
        self.out_proj = copy.deepcopy(net.attn.out_proj)
        with torch.no_grad():
            self.q.weight.copy_(w[:E])
            self.q.bias.copy_(b[:E])
            self.kv.weight.copy_(w[E:])
            self.kv.bias.copy_(b[E:])
        self.head = copy.deepcopy(net.head)

    def forward(self, x: Tensor) -> Tensor:
        heads = lambda t, n: t.reshape(N, n, HEADS, E // HEADS).transpose(1, 2)  # noqa: E731
        q = heads(self.q(x), L)
        k, v = (heads(t, S) for t in self.kv(memory(x)).chunk(2, -1))
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, L, E)
        return self.head(torch.tanh(self.out_proj(att)).mean(1))


def data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, L, E, generator=g, dtype=torch.float64)
    return x, (x[:, 0, 0] > 0).long() + (x[:, -1, 1] > 0.5).long()


def run(key: str, model: nn.Module, x: Tensor, y: Tensor, **hp) -> tuple[list[float], list[str]]:
    torch.manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = so.make_optimizer(key, model, **hp)
    return [
        float(opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))) for _ in range(5)
    ], opt.modeled_modules


@pytest.mark.parametrize("key", ["kfac", "kfac-ef", "kbfgs", "kbfgsl20"])
def test_cross_attention_takes_the_steps_of_explicit_linear_projections(key, cross_registered):
    net = CrossNet()
    ref = ExplicitNet(net)
    x, y = data()
    torch.testing.assert_close(net(x), ref(x))
    hp = {"lr": 0.01} if "kbfgs" in key else {}
    (losses, names), (ref_losses, _) = run(key, net, x, y, **hp), run(key, ref, x, y, **hp)
    assert names == ["attn[q]", "attn[kv]", "attn.out_proj", "head"]
    assert losses == pytest.approx(ref_losses, rel=1e-9, abs=1e-12)
    assert losses[-1] < losses[0]
    w = net.attn.in_proj_weight
    torch.testing.assert_close(w[:E], ref.q.weight, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w[E:], ref.kv.weight, rtol=1e-8, atol=1e-10)


def test_a_decoder_layer_models_its_cross_attention():
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True).double()
    assert [n for n in C.layer_blocks(dec) if n.startswith("multihead_attn")] == [
        "multihead_attn[q]",
        "multihead_attn[kv]",
        "multihead_attn.out_proj",
    ]
    opt = so.KFAC(dec)
    cov = opt.coverage()
    assert (
        cov["multihead_attn.in_proj_weight"]
        == "AttentionProjectionBlock('multihead_attn[q]', 'multihead_attn[kv]')"
    )
    assert not any(what.startswith("fallback") for what in cov.values())
    x, mem = torch.randn(N, L, E, dtype=torch.float64), torch.randn(N, S, E, dtype=torch.float64)
    target = torch.randn(N, L, E, dtype=torch.float64)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = dec

        def forward(self, x, mem):
            return self.dec(x, mem).flatten(1)

    model = Wrap()
    opt = so.make_optimizer("kfac-ef", model)
    losses = [float(opt.step(so.Closure(model, (x, mem), target.flatten(1), nn.MSELoss()))) for _ in range(8)]
    assert losses[-1] < losses[0]


def test_cross_attention_with_separate_key_dims_is_not_modeled_and_says_why():
    dec = nn.TransformerDecoderLayer(E, HEADS, 16)
    dec.multihead_attn = nn.MultiheadAttention(E, HEADS, kdim=4, vdim=4)
    assert "multihead_attn" in C.unmodeled_modules(dec)
    assert "cross-attention with kdim/vdim" in C.unmodeled_modules(dec)["multihead_attn"]
