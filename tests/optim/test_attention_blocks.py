"""nn.MultiheadAttention in KFAC and K-BFGS: its packed input projection (one Kronecker block,
captured where ``F.multi_head_attention_forward`` calls ``F.linear``) and its ``out_proj``.

The reference is the same network written with explicit ``nn.Linear`` projections around
``F.scaled_dot_product_attention`` (the computation ``F.multi_head_attention_forward`` does):
KFAC and the K-BFGS keys take the same steps on both, in float64, and the projection's factors
match a dense computation from per-example gradients (``torch.func``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so
from secondorder.capture import hooks as C

E, HEADS, L, N, CLASSES = 8, 2, 5, 10, 3


class AttnNet(nn.Module):
    def __init__(self, batch_first: bool = True, causal: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first).double()
        self.head = nn.Linear(E, CLASSES).double()
        self.batch_first, self.causal = batch_first, causal

    def forward(self, x: Tensor) -> Tensor:  # x: (N, L, E)
        xs = x if self.batch_first else x.transpose(0, 1)
        mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype) if self.causal else None
        out = self.attn(xs, xs, xs, need_weights=False, attn_mask=mask, is_causal=self.causal)[0]
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(torch.tanh(out).mean(1))


class ExplicitNet(nn.Module):
    """The same function with nn.Linear projections (the built-in Linear block)."""

    def __init__(self, net: AttnNet):
        super().__init__()
        self.in_proj = nn.Linear(E, 3 * E, dtype=torch.float64)
        self.out_proj = nn.Linear(E, E, dtype=torch.float64)
        with torch.no_grad():
            self.in_proj.weight.copy_(net.attn.in_proj_weight)
            self.in_proj.bias.copy_(net.attn.in_proj_bias)
            self.out_proj.weight.copy_(net.attn.out_proj.weight)
            self.out_proj.bias.copy_(net.attn.out_proj.bias)
        self.head = copy.deepcopy(net.head)
        self.causal = net.causal

    def attend(self, qkv: Tensor) -> Tensor:
        q, k, v = (t.reshape(N, L, HEADS, E // HEADS).transpose(1, 2) for t in qkv.chunk(3, -1))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return att.transpose(1, 2).reshape(N, L, E)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.out_proj(self.attend(self.in_proj(x)))).mean(1))


def data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, L, E, generator=g, dtype=torch.float64)
    return x, (x[:, 0, 0] > 0).long() + (x[:, -1, 1] > 0.5).long()


def run(key: str, model: nn.Module, x: Tensor, y: Tensor, steps: int = 5, **hp) -> list[float]:
    torch.manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = so.make_optimizer(key, model, **hp)
    return [float(opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))) for _ in range(steps)]


@pytest.mark.parametrize("key", ["kfac", "kfac-ef", "kbfgs", "kbfgsl", "kbfgs20"])
@pytest.mark.parametrize("layout", ["batch-first", "sequence-first", "causal"])
def test_attention_takes_the_steps_of_explicit_linear_projections(key, layout):
    net = AttnNet(batch_first=layout != "sequence-first", causal=layout == "causal")
    ref = ExplicitNet(net)
    x, y = data()
    torch.testing.assert_close(net(x), ref(x))
    hp = {"lr": 0.01} if "kbfgs" in key else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert so.make_optimizer(key, net).modeled_modules == ["attn", "attn.out_proj", "head"]
    losses, ref_losses = run(key, net, x, y, **hp), run(key, ref, x, y, **hp)
    assert losses == pytest.approx(ref_losses, rel=1e-9, abs=1e-12)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(net.attn.in_proj_weight, ref.in_proj.weight, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(net.attn.out_proj.weight, ref.out_proj.weight, rtol=1e-8, atol=1e-10)


def test_projection_factors_against_per_example_gradients():
    """Omega = E_n[sum_t xbar xbar^T], Gamma = E_{n,t}[g g^T] with g_{n,t} = dl_n/d[q;k;v]_{n,t}."""
    net = AttnNet()
    ref = ExplicitNet(net)
    x, y = data()
    opt = so.make_optimizer("kfac-ef", net, stat_decay=0.0)
    opt.step(so.Closure(net, x, y, nn.CrossEntropyLoss()))
    qkv = ref.in_proj(x).detach()

    def loss_n(qkv_n, n):  # example n alone: attention within its own sequence
        q, k, v = (t.reshape(L, HEADS, E // HEADS).transpose(0, 1) for t in qkv_n.chunk(3, -1))
        att = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(L, E)
        return F.cross_entropy(ref.head(torch.tanh(ref.out_proj(att)).mean(0)).unsqueeze(0), y[n : n + 1])

    g = torch.stack([torch.func.grad(loss_n)(qkv[n], n) for n in range(N)])  # (N, L, 3E)
    xbar = torch.cat([x, torch.ones(N, L, 1, dtype=x.dtype)], 2)
    st = opt.module_state["attn"]
    torch.testing.assert_close(
        st["omega"], torch.einsum("nti,ntj->ij", xbar, xbar) / N, rtol=1e-12, atol=1e-13
    )
    torch.testing.assert_close(
        st["gamma"], torch.einsum("nti,ntj->ij", g, g) / (N * L), rtol=1e-10, atol=1e-13
    )


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dec = nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dec(x, x.flip(1)).mean(1))


def test_cross_attention_of_a_decoder_layer_is_modeled_and_trains():
    model = Decoder()
    x, y = (t.float() if t.is_floating_point() else t for t in data())
    why = C.unmodeled_modules(model)
    assert not any(n.startswith("dec.multihead_attn") or n.startswith("dec.self_attn") for n in why)
    losses = run("kfac", model, x, y, steps=15)
    assert losses[-1] < losses[0]


def test_an_attention_module_called_as_cross_attention_is_refused_with_the_fix():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True).double()
            self.head = nn.Linear(E, CLASSES).double()

        def forward(self, x):
            return self.head(self.attn(x, x.flip(1), x.flip(1), need_weights=False)[0].mean(1))

    x, y = data()
    model = Cross()
    with pytest.raises(C.HookNeverFiredError, match=r"never ran in the forward pass: attn\. .*exclude"):
        run("kfac", model, x, y, steps=1)
    assert F.linear is torch._C._nn.linear  # the capture's wrapper is gone after the failure
    losses = run("kfac", model, x, y, steps=10, exclude="attn")
    assert losses[-1] < losses[0]


def test_reduce_refuses_the_flattened_attention_rows():
    with pytest.raises(ValueError, match=r"weight_sharing='reduce' .* \(attn.out_proj\)"):
        so.make_optimizer("kfac", AttnNet(), weight_sharing="reduce")
    so.make_optimizer("kfac", AttnNet(), weight_sharing="reduce", exclude="attn.out_proj")


def test_unsupported_attention_configurations_fall_back():
    sep = nn.MultiheadAttention(E, HEADS, kdim=4, vdim=4)
    kv = nn.MultiheadAttention(E, HEADS, add_bias_kv=True)
    why = C.unmodeled_modules(nn.ModuleDict({"sep": sep, "kv": kv}))
    assert why["sep"].startswith("MultiheadAttention with kdim/vdim != embed_dim")
    assert why["kv"] == "MultiheadAttention with add_bias_kv=True is not supported by MultiheadAttentionBlock"
    assert "which has no block" in why["sep.out_proj"]
