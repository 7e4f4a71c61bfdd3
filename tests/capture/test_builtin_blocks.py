"""The built-in blocks beyond Linear / Conv2d: Conv1d and Embedding (capture.blocks).

Each is checked against a formulation the thesis's blocks already cover, in float64: a Conv1d is
a Conv2d with a ``(1, k)`` kernel on ``(m, C, 1, L)`` input, and an Embedding is a bias-free
Linear layer on one-hot inputs (with ``weight^T`` as its matrix). KFAC and the K-BFGS keys take
the same steps on both formulations, and the Embedding's KFAC factors match a dense computation
from per-example gradients (``torch.func``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so
from secondorder.capture import blocks as LB

KEYS = ["kfac", "kfac-ef", "kbfgs", "kbfgsl", "kbfgs20"]


def steps(key: str, model: nn.Module, x: Tensor, y: Tensor, n: int = 5, **hp) -> list[float]:
    torch.manual_seed(11)  # kfac's sampled targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = so.make_optimizer(key, model, **hp)
    return [float(opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))) for _ in range(n)]


# ---------------------------------------------------------------------- Conv1d
class Unsqueezed(nn.Module):
    """A Conv1d written as a Conv2d with a (1, k) kernel."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        pad = conv.padding if isinstance(conv.padding, str) else (0, conv.padding[0])
        self.conv = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            (1, conv.kernel_size[0]),
            stride=(1, conv.stride[0]),
            padding=pad,
            dilation=(1, conv.dilation[0]),
            bias=conv.bias is not None,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight.unsqueeze(2))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.unsqueeze(2)).squeeze(2)


def conv1d_net(**kw) -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv1d(3, 4, 3, **kw), nn.Tanh(), nn.Conv1d(4, 2, 2, bias=False), nn.Flatten(), nn.LazyLinear(3)
    ).double()


@pytest.mark.parametrize(
    "geometry", [dict(), dict(stride=2, padding=1), dict(padding="same", dilation=2), dict(padding="valid")]
)
def test_conv1d_rows_reproduce_the_convolution(geometry):
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, 3, **geometry).double()
    a = torch.randn(5, 3, 9, dtype=torch.float64)
    h = conv(a)
    block = LB.block_for(conv)
    assert isinstance(block, LB.Conv1dBlock)
    rows = block.input_rows(a)
    torch.testing.assert_close(rows @ block.grad_matrix(conv.weight, conv.bias).t(), block.output_rows(h))
    assert block.num_locations(h) == h.shape[2]
    torch.testing.assert_close(block.spatial_mean(h), LB.LayerBlock.spatial_mean(block, h))
    torch.testing.assert_close(block.spatial_abs_mean(h), LB.LayerBlock.spatial_abs_mean(block, h))
    assert [b.part for b in LB.block_for(nn.Conv1d(4, 4, 3, groups=2)).split()] == ["[0]", "[1]"]
    assert LB.block_for(nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect")) is None


@pytest.mark.parametrize("key", KEYS)
def test_conv1d_takes_the_steps_of_the_equivalent_conv2d(key):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(10, 3, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)
    net1 = conv1d_net(stride=2, padding=1)
    net1(x)  # materialise the lazy head
    net2 = nn.Sequential(*(Unsqueezed(m) if isinstance(m, nn.Conv1d) else copy.deepcopy(m) for m in net1))
    hp = {"lr": 0.01} if "kbfgs" in key else {}
    l1, l2 = steps(key, net1, x, y, **hp), steps(key, net2, x, y, **hp)
    assert l1 == pytest.approx(l2, rel=1e-10, abs=1e-12)
    assert l1[-1] < l1[0]
    for a, b in zip(net1.parameters(), net2.parameters(), strict=True):
        torch.testing.assert_close(a, b.reshape(a.shape), rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------- Embedding
VOCAB, DIM, LENGTH = 7, 4, 5


class EmbNet(nn.Module):
    def __init__(self, padding_idx: int | None = None):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=padding_idx).double()
        self.head = nn.Linear(DIM * LENGTH, 3).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(x)).flatten(1))


class OneHotNet(nn.Module):
    """The same map as ``EmbNet`` with a bias-free nn.Linear on one-hot inputs."""

    def __init__(self, net: EmbNet):
        super().__init__()
        self.lin = nn.Linear(VOCAB, DIM, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.copy_(net.emb.weight.t())
        self.head = copy.deepcopy(net.head)
        self.padding_idx = net.emb.padding_idx

    def forward(self, x: Tensor) -> Tensor:
        onehot = F.one_hot(x, VOCAB).double()
        if self.padding_idx is not None:
            onehot = onehot * (x != self.padding_idx).unsqueeze(-1)
        return self.head(torch.tanh(self.lin(onehot)).flatten(1))


def tokens(n: int = 12):
    g = torch.Generator().manual_seed(8)
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    return x, (x[:, 0] + x[:, 1]).remainder(3)


def test_embedding_statistics_are_the_one_hot_ones_and_diagonal():
    x, _ = tokens()
    emb = nn.Embedding(VOCAB, DIM, padding_idx=2).double()
    block = LB.block_for(emb)
    assert isinstance(block, LB.EmbeddingBlock)
    rows = block.input_rows(x)
    assert rows.shape == (x.numel(), VOCAB) and bool((rows[x.reshape(-1) == 2] == 0).all())
    v = torch.randn(VOCAB, dtype=torch.float64)
    torch.testing.assert_close(block.input_gram(x), rows.t() @ rows / x.shape[0])
    assert torch.count_nonzero(block.input_gram(x) - torch.diag(torch.diagonal(block.input_gram(x)))) == 0
    torch.testing.assert_close(block.input_mean(x, ()), rows.mean(0))
    torch.testing.assert_close(block.input_action(x, v), rows.t() @ (rows @ v) / x.shape[0])
    h = emb(x)
    torch.testing.assert_close(block.output_rows(h), h.reshape(-1, DIM))
    assert block.num_locations(h) == LENGTH
    assert block.input_dim == VOCAB and block.output_dim == DIM and block.parameters() == [emb.weight]
    assert LB.block_for(nn.Embedding(VOCAB, DIM, sparse=True)) is None


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_takes_the_steps_of_a_linear_layer_on_one_hot_inputs(key, padding_idx):
    x, y = tokens()
    net1 = EmbNet(padding_idx)
    net2 = OneHotNet(net1)
    hp = {"lr": 0.01} if "kbfgs" in key else {}
    l1, l2 = steps(key, net1, x, y, **hp), steps(key, net2, x, y, **hp)
    assert l1 == pytest.approx(l2, rel=1e-10, abs=1e-12)
    assert l1[-1] < l1[0]
    torch.testing.assert_close(net1.emb.weight, net2.lin.weight.t(), rtol=1e-9, atol=1e-11)
    if padding_idx is not None:  # the padding row never moves
        torch.testing.assert_close(net1.emb.weight[padding_idx], EmbNet(padding_idx).emb.weight[padding_idx])


def test_embedding_kfac_factors_and_step_against_per_example_gradients():
    """Omega = diag(token counts)/m; Gamma = E_{n,t}[g g^T] with g_{n,t} = dl_n/dh_{n,t} by torch.func;
    the step is (Gamma + r/pi I)^-1 DW^T (Omega + pi r I)^-1 (Algorithm 12 with a one-hot input)."""
    x, y = tokens()
    net = EmbNet()
    lam, lr = 0.5, 0.1
    m = x.shape[0]
    h = net.emb(x).detach()

    def loss_n(hn, n):
        return F.cross_entropy(net.head(torch.tanh(hn).flatten().unsqueeze(0)), y[n : n + 1])

    g = torch.stack([torch.func.grad(loss_n)(h[n], n) for n in range(m)])  # (m, T, d)
    onehot = F.one_hot(x, VOCAB).double()
    omega = torch.einsum("mti,mtj->ij", onehot, onehot) / m
    gamma = torch.einsum("mti,mtj->ij", g, g) / (m * LENGTH)
    ref = copy.deepcopy(net)
    F.cross_entropy(ref(x), y).backward()
    dw = ref.emb.weight.grad.t()  # (d, V)
    pi = ((torch.trace(omega) / VOCAB) / (torch.trace(gamma) / DIM)).sqrt()
    r = lam**0.5
    step = torch.linalg.solve(gamma + r / pi * torch.eye(DIM, dtype=torch.float64), dw) @ torch.linalg.inv(
        omega + pi * r * torch.eye(VOCAB, dtype=torch.float64)
    )
    before = net.emb.weight.detach().clone()
    opt = so.make_optimizer(
        "kfac-ef", net, lr=lr, damping=lam, momentum=0.0, stat_decay=0.0, inverse_freq=1, exclude="head"
    )
    opt.step(so.Closure(net, x, y, nn.CrossEntropyLoss()))
    st = opt.module_state["emb"]
    torch.testing.assert_close(st["omega"], omega, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(st["gamma"], gamma, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(net.emb.weight.detach() - before, -lr * step.t(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- grouped Conv2d
class Grouped(nn.Module):
    """A grouped conv written as one nn.Conv2d per group on its channels, outputs concatenated."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d):
        super().__init__()
        groups = conv.groups
        c_in, c_out = conv.in_channels // groups, conv.out_channels // groups
        self.convs = nn.ModuleList()
        for g in range(groups):
            part = type(conv)(
                c_in,
                c_out,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                bias=conv.bias is not None,
                dtype=conv.weight.dtype,
            )
            with torch.no_grad():
                part.weight.copy_(conv.weight[g * c_out : (g + 1) * c_out])
                if conv.bias is not None:
                    part.bias.copy_(conv.bias[g * c_out : (g + 1) * c_out])
            self.convs.append(part)
        self.c_in = c_in

    def forward(self, x: Tensor) -> Tensor:
        chunks = x.split(self.c_in, dim=1)
        return torch.cat([conv(c) for conv, c in zip(self.convs, chunks, strict=True)], dim=1)


def grouped_net() -> nn.Sequential:
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(6, 6, 3, stride=2, groups=6, bias=False),  # depthwise
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 3),
    ).double()


def grouped_data():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(8, 4, 6, 6, generator=g, dtype=torch.float64)
    return x, (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 3, 0, 0] > 0.5).long()


@pytest.mark.parametrize("key", KEYS)
def test_grouped_and_depthwise_convs_take_the_steps_of_one_conv_per_group(key):
    """Each group is a convolution of its own with its own factors (block-diagonal over groups)."""
    x, y = grouped_data()
    net1 = grouped_net()
    net2 = nn.Sequential(*(Grouped(m) if isinstance(m, nn.Conv2d) else copy.deepcopy(m) for m in net1))
    torch.testing.assert_close(net1(x), net2(x))
    hp = {"lr": 0.01} if "kbfgs" in key else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = so.make_optimizer(key, net1).modeled_modules
    assert names == ["0[0]", "0[1]", *(f"2[{g}]" for g in range(6)), "4"]
    l1, l2 = steps(key, net1, x, y, **hp), steps(key, net2, x, y, **hp)
    assert l1 == pytest.approx(l2, rel=1e-10, abs=1e-12)
    assert l1[-1] < l1[0]
    for g, part in enumerate(net2[0].convs):
        torch.testing.assert_close(net1[0].weight[3 * g : 3 * g + 3], part.weight, rtol=1e-9, atol=1e-11)
    for g, part in enumerate(net2[2].convs):
        torch.testing.assert_close(net1[2].weight[g : g + 1], part.weight, rtol=1e-9, atol=1e-11)


def test_a_grouped_conv_is_chosen_and_reported_as_one_module():
    net = grouped_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert so.make_optimizer("kfac", net, exclude="0").modeled_modules[0] == "2[0]"
        assert so.make_optimizer("kfac", net, layers=["0"]).modeled_modules == ["0[0]", "0[1]"]
        cov = so.make_optimizer("kbfgs", net).coverage()
    assert cov["0.weight"] == cov["0.bias"] == "Conv2dGroupBlock('0[0]', '0[1]')"
    assert "0" not in so.capture.unmodeled_modules(net)


@pytest.mark.parametrize("key", KEYS)
def test_grouped_and_depthwise_conv1d_take_the_steps_of_one_conv1d_per_group(key):
    torch.manual_seed(7)
    net1 = nn.Sequential(
        nn.Conv1d(4, 6, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv1d(6, 6, 3, stride=2, groups=6, bias=False),  # depthwise
        nn.Flatten(),
        nn.Linear(6 * 2, 3),
    ).double()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(8, 4, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0].mean(1) > 0).long() + (x[:, 3, 0] > 0.5).long()
    net2 = nn.Sequential(*(Grouped(m) if isinstance(m, nn.Conv1d) else copy.deepcopy(m) for m in net1))
    torch.testing.assert_close(net1(x), net2(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = so.make_optimizer(key, net1)
    assert opt.modeled_modules == ["0[0]", "0[1]", *(f"2[{g}]" for g in range(6)), "4"]
    assert opt.coverage()["0.weight"] == "Conv1dGroupBlock('0[0]', '0[1]')"
    hp = {"lr": 0.01} if "kbfgs" in key else {}
    l1, l2 = steps(key, net1, x, y, **hp), steps(key, net2, x, y, **hp)
    assert l1 == pytest.approx(l2, rel=1e-10, abs=1e-12)
    assert l1[-1] < l1[0]
