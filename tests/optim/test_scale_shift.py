"""KFAC's scale-and-shift blocks (BatchNorm, GroupNorm, LayerNorm, RMSNorm affine parameters):
the per-channel Fisher blocks and one step against dense float64 computations of the gradient of
every example and location (autograd through copies of ``gamma`` and ``beta`` placed at each
position, on a normalisation written out by hand), under ``expand`` and ``reduce``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so
from secondorder.optim.kronecker import UnmodeledParametersWarning

M, LR, LAM, EPS = 5, 0.1, 0.5, 1e-5
F64 = torch.float64


def bias(norm: nn.Module) -> Tensor | None:
    return getattr(norm, "bias", None)  # nn.RMSNorm has none


class Net(nn.Module):
    """``pre`` (conv or per-position Linear) -> ``norm`` -> tanh -> mean over locations -> head."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        if kind in ("batch", "group"):
            self.pre = nn.Conv2d(2, 4, 3, padding=1)
            self.norm = nn.BatchNorm2d(4, eps=EPS) if kind == "batch" else nn.GroupNorm(2, 4, eps=EPS)
        else:
            self.pre = nn.Linear(3, 4)
            self.norm = nn.LayerNorm(4, eps=EPS) if kind == "layer" else nn.RMSNorm(4, eps=EPS)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():  # away from the initial (1, 0), so that gamma enters the gradients
            self.norm.weight.uniform_(0.5, 1.5)
            if bias(self.norm) is not None:
                bias(self.norm).uniform_(-0.5, 0.5)
        self.double()

    def post(self, y: Tensor) -> Tensor:
        dims = (2, 3) if self.kind in ("batch", "group") else (1,)
        return self.head(torch.tanh(y).mean(dims))

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.norm(self.pre(x)))


def data(kind: str):
    g = torch.Generator().manual_seed(3)
    shape = (M, 2, 4, 4) if kind in ("batch", "group") else (M, 6, 3)
    return torch.randn(*shape, generator=g, dtype=F64), torch.randint(0, 3, (M,), generator=g)


def xhat_by_hand(kind: str, h: Tensor) -> Tensor:
    """The normalised input, written out (biased variance, as in training mode)."""
    if kind == "batch":
        dims = (0, 2, 3)
    elif kind == "group":
        g = h.view(M, 2, -1)
        mean, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
        return ((g - mean) / (var + EPS).sqrt()).view_as(h)
    else:
        dims = (-1,)
    if kind == "rms":
        return h / (h.square().mean(-1, keepdim=True) + EPS).sqrt()
    mean, var = h.mean(dims, keepdim=True), h.var(dims, unbiased=False, keepdim=True)
    return (h - mean) / (var + EPS).sqrt()


def dense_fisher(net: Net, x: Tensor, y: Tensor, sharing: str) -> tuple[Tensor, Tensor]:
    """``F_c`` (``(C, k, k)``) from ``u = m dL/d(gamma, beta)`` at each example and location, and
    the batch gradient ``(C, k)``."""
    h = net.pre(x).detach()
    xhat = xhat_by_hand(net.kind, h)
    channel_axis = 1 if net.kind in ("batch", "group") else -1
    shape = [1] * h.dim()
    shape[channel_axis] = -1
    gamma = net.norm.weight.detach().view(shape).expand_as(h).clone().requires_grad_()
    params = [gamma]
    if bias(net.norm) is not None:
        params.append(bias(net.norm).detach().view(shape).expand_as(h).clone().requires_grad_())
    out = gamma * xhat + (params[1] if len(params) == 2 else 0)
    loss = F.cross_entropy(net.post(out), y)
    grads = torch.autograd.grad(loss, params)
    u = torch.stack([M * gr.movedim(channel_axis, -1) for gr in grads], dim=-1)  # (M, ..., C, k)
    u = u.reshape(M, -1, u.shape[-2], u.shape[-1])  # (M, |T|, C, k)
    if sharing == "reduce":
        u = u.sum(1, keepdim=True)
    fisher = torch.einsum("ntci,ntcj->cij", u, u) / M
    return fisher, u.sum((0, 1)) / M


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
@pytest.mark.parametrize("kind", ["layer", "rms", "batch", "group"])
def test_channel_fisher_and_one_step_against_dense_gradients(kind, sharing):
    net = Net(kind)
    x, y = data(kind)
    fisher, grad = dense_fisher(net, x, y, sharing)
    ref = copy.deepcopy(net)
    F.cross_entropy(ref(x), y).backward()
    batch_grad = torch.stack(
        [ref.norm.weight.grad] + ([bias(ref.norm).grad] if bias(ref.norm) is not None else []), 1
    )
    torch.testing.assert_close(grad, batch_grad)  # the rows add up to the batch gradient
    k = fisher.shape[-1]
    step = -LR * torch.linalg.solve(fisher + LAM * torch.eye(k, dtype=F64), batch_grad.unsqueeze(-1)).squeeze(
        -1
    )

    before = [p.detach().clone() for p in (net.norm.weight, bias(net.norm)) if p is not None]
    opt = so.make_optimizer(
        "kfac-ef", net, lr=LR, damping=LAM, momentum=0.0, weight_sharing=sharing, inverse_freq=1
    )
    block = {
        "batch": "BatchNormBlock",
        "group": "GroupNormBlock",
        "layer": "LayerNormBlock",
        "rms": "RMSNormBlock",
    }
    assert opt.coverage()["norm.weight"] == f"{block[kind]}('norm')"
    opt.step(so.Closure(net, x, y, nn.CrossEntropyLoss()))
    torch.testing.assert_close(opt.module_state["norm"]["fisher"], fisher)
    after = [p.detach() for p in (net.norm.weight, bias(net.norm)) if p is not None]
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        torch.testing.assert_close(a - b, step[:, i].view_as(a))


def test_batchnorm_in_eval_mode_uses_the_running_statistics():
    net = Net("batch")
    x, y = data("batch")
    with torch.no_grad():
        net.norm.running_mean.uniform_(-1, 1)
        net.norm.running_var.uniform_(0.5, 2)
    net.eval()
    block = so.capture.blocks.block_for(net.norm)
    h = net.pre(x).detach()
    expected = (h - net.norm.running_mean.view(1, -1, 1, 1)) / (
        net.norm.running_var.view(1, -1, 1, 1) + EPS
    ).sqrt()
    torch.testing.assert_close(block.normalized(h), expected)


@pytest.mark.parametrize("key", ["kbfgs", "kbfgsl", "kbfgs20", "kbfgsl20"])
def test_kbfgs_leaves_norm_layers_to_its_fallback(key):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmodeledParametersWarning)
        opt = so.make_optimizer(key, Net("batch"))
    assert "norm" not in opt.blocks
    assert opt.coverage()["norm.weight"].startswith("fallback")
    with pytest.raises(ValueError, match="layers"):
        so.make_optimizer(key, Net("batch"), layers=[nn.BatchNorm2d])


def test_norm_layers_without_affine_parameters_have_no_block_and_sync_bn_is_refused():
    assert so.capture.blocks.block_for(nn.LayerNorm(4, elementwise_affine=False)) is None
    assert so.capture.blocks.block_for(nn.BatchNorm2d(4, affine=False)) is None
    assert so.capture.blocks.block_for(nn.SyncBatchNorm(4)) is None
    net = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4))
    assert "synchronised across ranks" in so.capture.unmodeled_modules(net)["1"]


def test_layernorm_without_bias_is_a_scale_only_block():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, bias=False), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=F64)
    y = torch.randint(0, 2, (8,))
    opt = so.make_optimizer("kfac", net, inverse_freq=1)
    for _ in range(3):
        opt.step(so.Closure(net, x, y, nn.CrossEntropyLoss()))
    assert opt.module_state["1"]["fisher"].shape == (4, 1, 1)
    assert torch.isfinite(net[1].weight).all()


def test_reduce_refuses_the_layers_of_a_sequence_first_transformer_layer_by_name():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmodeledParametersWarning)
        with pytest.raises(ValueError, match=r"\(self_attn.out_proj, linear1, linear2, norm1, norm2\)"):
            so.KFAC(nn.TransformerEncoderLayer(8, 2, 16), weight_sharing="reduce")
        with pytest.raises(ValueError, match=r"\(self_attn.out_proj\);"):
            so.KFAC(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), weight_sharing="reduce")


@pytest.mark.parametrize("kind", ["layer", "rms", "group"])
def test_reduce_fisher_equals_per_example_gradients_from_torch_func(kind):
    """For per-example normalisations the reduce block is the exact per-example Fisher block:
    ``F_c = (1/m) sum_n g_n g_n^T`` with ``g_n`` from ``torch.func.vmap(grad)``."""
    net = Net(kind)
    x, y = data(kind)
    names = ["norm.weight"] + (["norm.bias"] if bias(net.norm) is not None else [])
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss_n(p, xn, yn):
        return F.cross_entropy(torch.func.functional_call(net, p, (xn[None],)), yn[None])

    per_example = torch.func.vmap(torch.func.grad(loss_n), in_dims=(None, 0, 0))(params, x, y)
    g = torch.stack([per_example[k] for k in names], -1)  # (M, C, k)
    fisher = torch.einsum("nci,ncj->cij", g, g) / M
    opt = so.make_optimizer("kfac-ef", net, weight_sharing="reduce", inverse_freq=1)
    opt.step(so.Closure(net, x, y, nn.CrossEntropyLoss()))
    torch.testing.assert_close(opt.module_state["norm"]["fisher"], fisher)


@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize(
    "norm,shape",
    [
        (nn.BatchNorm2d(3), (4, 3, 2, 5)),
        (nn.LayerNorm(6, bias=False), (4, 7, 6)),
        (nn.GroupNorm(1, 3), (4, 3, 5)),
    ],
)
def test_the_fast_gradient_gram_is_the_sum_of_the_row_outer_products(norm, shape, per_example):
    block = so.capture.blocks.block_for(norm.double())
    g = torch.Generator().manual_seed(0)
    a, dh = torch.randn(*shape, generator=g, dtype=F64), torch.randn(*shape, generator=g, dtype=F64)
    u = block.gradient_rows(a, dh, shape[0], per_example=per_example)
    torch.testing.assert_close(
        block.gradient_gram(a, dh, shape[0], per_example=per_example), torch.einsum("rci,rcj->cij", u, u)
    )


def test_an_overflowed_channel_fisher_is_not_stored_and_training_goes_on(caplog):
    """float32, a head whose weights are ~1e21: the LayerNorm's output gradients are ~1e20, so
    ``sum u u^T`` overflows while every captured tensor is finite; the previous block is kept."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    opt = so.make_optimizer("kfac-ef", net, lr=0.0, inverse_freq=1)
    opt.step(so.Closure(net, x, y, nn.CrossEntropyLoss()))
    before = opt.module_state["1"]["fisher"].clone()
    with torch.no_grad():
        net[2].weight.mul_(1e21)
    with caplog.at_level("WARNING", logger="secondorder"):
        opt.step(so.Closure(net, x, y, nn.CrossEntropyLoss()))
    assert torch.equal(opt.module_state["1"]["fisher"], before)
    assert opt.stats.diagnostics["skipped_statistics"] == {"0": 1, "1": 1}  # its input layer's Gamma too
    assert any("scale-and-shift Fisher" in r.getMessage() for r in caplog.records)
    assert all(
        torch.isfinite(v).all() for st in opt.module_state.values() for v in st.values() if torch.is_tensor(v)
    )
