"""Layer blocks and their registry (capture.blocks): the per-layer seam of the Kronecker methods.

The toy layer below is added through the public registry only, as a user would: no library file
knows it. Its KFAC factors are checked against a dense float64 computation, and KFAC / K-BFGS on a
model built from it take the same steps as on the same model written with the built-in
``nn.Linear`` block.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so
from secondorder.capture import blocks as LB
from secondorder.capture import hooks as C


# ---------------------------------------------------------------------- a user's layer type
class Pointwise(nn.Module):
    """A per-position linear map of a channels-first sequence: ``(m, d_i, L) -> (m, d_o, L)``."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        h = torch.einsum("oi,mil->mol", self.weight, x)
        return h if self.bias is None else h + self.bias[:, None]


class PointwiseBlock(so.LayerBlock):
    """Rows: one per example and position, channels last."""

    def input_rows(self, a: Tensor, bias: bool | None = None) -> Tensor:
        return self.homogeneous(a.transpose(1, 2).reshape(-1, a.shape[1]), bias)

    def output_rows(self, h: Tensor) -> Tensor:
        return h.transpose(1, 2).reshape(-1, h.shape[1])


class Transposed(nn.Module):
    """The same map written with ``nn.Linear`` on channels-last input (the built-in block)."""

    def __init__(self, layer: Pointwise):
        super().__init__()
        d_o, d_i = layer.weight.shape
        self.lin = nn.Linear(d_i, d_o, bias=layer.bias is not None, dtype=layer.weight.dtype)
        with torch.no_grad():
            self.lin.weight.copy_(layer.weight)
            if layer.bias is not None:
                self.lin.bias.copy_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.transpose(1, 2)).transpose(1, 2)


def pointwise_net(seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        Pointwise(3, 5, bias), nn.Tanh(), Pointwise(5, 4, bias), nn.Flatten(), nn.Linear(4 * 6, 3)
    ).double()


def as_linear(net: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*(Transposed(m) if isinstance(m, Pointwise) else copy.deepcopy(m) for m in net))


def sequence_data(n: int = 12, seed: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture
def pointwise_registered():
    so.register_layer(Pointwise, PointwiseBlock)
    yield
    so.unregister_layer(Pointwise)


# ---------------------------------------------------------------------- the registry
def test_built_in_blocks_and_subclasses():
    assert isinstance(LB.block_for(nn.Linear(2, 3)), LB.LinearBlock)
    # a subclass finds its base's block (attention's out_proj is such a subclass)
    sub = nn.modules.linear.NonDynamicallyQuantizableLinear(2, 3)
    assert isinstance(LB.block_for(sub), LB.LinearBlock)
    assert isinstance(LB.block_for(nn.Conv2d(2, 3, 3)), LB.Conv2dBlock)
    assert [b.part for b in LB.block_for(nn.Conv2d(2, 4, 3, groups=2)).split()] == ["[0]", "[1]"]
    assert LB.block_for(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")) is None
    assert LB.Conv2dBlock.unsupported(nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular")) == (
        "padding (1, 1) with padding_mode='circular'"
    )
    assert isinstance(LB.block_for(nn.LSTM(2, 3)), LB.RecurrentBlock)
    assert LB.block_for(nn.Bilinear(2, 2, 3)) is None
    assert LB.block_for(Pointwise(2, 3)) is None


def test_register_and_unregister(pointwise_registered):
    assert LB.block_type_for(Pointwise(2, 3)) is PointwiseBlock
    assert LB.registered_layers()[Pointwise] is PointwiseBlock
    assert list(C.supported_modules(pointwise_net())) == ["0", "2", "4"]
    so.unregister_layer(Pointwise)
    assert LB.block_for(Pointwise(2, 3)) is None
    so.register_layer(Pointwise, PointwiseBlock)  # the fixture unregisters it again


def test_register_as_a_decorator_and_replace_a_built_in():
    @so.register_layer(nn.Linear)
    class Other(LB.LinearBlock):
        pass

    try:
        assert type(LB.block_for(nn.Linear(2, 3))) is Other
    finally:
        so.unregister_layer(nn.Linear)
    assert type(LB.block_for(nn.Linear(2, 3))) is LB.LinearBlock  # the built-in block is back


def test_bad_registrations_name_the_argument():
    with pytest.raises(ValueError, match="module_type"):
        so.register_layer(int, PointwiseBlock)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block"):
        so.register_layer(Pointwise, object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="module_type"):
        so.unregister_layer(Pointwise)
    assert LB.block_for(Pointwise(2, 3)) is None
    with pytest.raises(ValueError, match="module"):
        C.block(nn.Bilinear(2, 2, 3))


def test_a_block_without_rows_says_so():
    class Empty(so.LayerBlock):
        pass

    with pytest.raises(NotImplementedError, match="Empty must define input_rows"):
        Empty(nn.Linear(2, 3)).input_rows(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="block Empty must define input_rows and output_rows"):
        so.register_layer(Pointwise, Empty)  # refused when registered, not at the first step
    assert LB.block_for(Pointwise(2, 3)) is None


# ---------------------------------------------------------------------- default statistics
@pytest.mark.parametrize("bias", [True, False])
def test_default_statistics_equal_the_conv_fast_forms(bias):
    """The generic statistics (from the rows) and Conv2d's convolution forms agree in float64."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias).double()
    a = torch.randn(4, 2, 7, 6, dtype=torch.float64)
    h = conv(a).detach()
    block = LB.block_for(conv)
    assert isinstance(block, LB.Conv2dBlock)
    out_hw = block.output_spatial_shape(h)
    v = torch.randn(block.input_dim, dtype=torch.float64)
    generic = LB.LayerBlock
    pairs = [
        (block.spatial_mean(h), generic.spatial_mean(block, h)),
        (block.spatial_abs_mean(h), generic.spatial_abs_mean(block, h)),
        (block.input_mean(a, out_hw), generic.input_mean(block, a, out_hw)),
        (block.input_action(a, v), generic.input_action(block, a, v)),
        (block.input_gram(a, chunk_elements=1), generic.input_gram(block, a)),
    ]
    for fast, slow in pairs:
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


def test_linear_on_sequences_counts_positions_as_locations():
    lin = nn.Linear(3, 2).double()
    a = torch.randn(4, 5, 3, dtype=torch.float64)
    h = lin(a)
    block = LB.block_for(lin)
    assert block.num_locations(h) == 5
    assert block.input_rows(a).shape == (20, 4)
    torch.testing.assert_close(block.spatial_mean(h), h.detach().mean((0, 1)))
    dense = torch.einsum("mti,mtj->ij", F.pad(a, (0, 1), value=1.0), F.pad(a, (0, 1), value=1.0)) / 4
    torch.testing.assert_close(block.input_gram(a), dense)


# ---------------------------------------------------------------------- the toy layer in the methods
def test_toy_layer_kfac_factors_against_a_dense_computation(pointwise_registered):
    """Omega = E_n[sum_t abar abar^T], Gamma = E_{n,t}[g g^T] with g = m dL/dh (kfac-ef, one batch)."""
    net = pointwise_net()
    x, y = sequence_data()
    opt = so.make_optimizer("kfac-ef", net, lr=0.0, stat_decay=0.0)
    assert opt.modeled_modules == ["0", "2", "4"]
    loss_fn = nn.CrossEntropyLoss()
    opt.step(so.Closure(net, x, y, loss_fn))
    # dense: the first layer's input is x; its output gradient by autograd on the output itself
    layer = net[0]
    h = layer(x)
    h.retain_grad()
    loss_fn(net[4](net[3](net[2](net[1](h)))), y).backward()
    m, length = x.shape[0], x.shape[2]
    abar = torch.cat([x, torch.ones(m, 1, length, dtype=x.dtype)], dim=1)  # (m, D, L)
    omega = torch.einsum("mil,mjl->ij", abar, abar) / m
    g = h.grad * m  # per-example dl_n/dh_n
    gamma = torch.einsum("mil,mjl->ij", g, g) / (m * length)
    st = opt.module_state["0"]
    torch.testing.assert_close(st["omega"], omega, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st["gamma"], gamma, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key", ["kfac", "kfac-ef", "kbfgs", "kbfgsl"])
@pytest.mark.parametrize("bias", [True, False])
def test_toy_layer_takes_the_steps_of_the_built_in_linear_block(pointwise_registered, key, bias):
    x, y = sequence_data()
    nets = [pointwise_net(bias=bias)]
    nets.append(as_linear(nets[0]))
    losses = []
    for net in nets:
        torch.manual_seed(5)  # kfac's sampled targets
        opt = so.make_optimizer(key, net)
        losses.append([float(opt.step(so.Closure(net, x, y, nn.CrossEntropyLoss()))) for _ in range(6)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-10, abs=1e-12)
    assert losses[0][-1] < losses[0][0]
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


class KeywordPointwise(Pointwise):
    """Called as ``layer(scale, x=...)``: the input is a keyword argument."""

    def forward(self, scale: float, *, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x * scale)


class KeywordPointwiseBlock(PointwiseBlock):
    def layer_input(self, args, kwargs):
        return kwargs["x"] * args[0]


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.p = KeywordPointwise(3, 4).double()
        self.head = nn.Linear(4 * 6, 3).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.p(2.0, x=x).flatten(1))


def test_a_block_chooses_which_argument_is_the_input():
    so.register_layer(KeywordPointwise, KeywordPointwiseBlock)
    try:
        net = KeywordNet()
        x, y = sequence_data()
        cap = C.Capture(C.layer_blocks(net))
        with cap.record(inputs=True, outputs=False) as recs:
            net(x)
        torch.testing.assert_close(recs["p"].inputs, 2.0 * x)
        opt = so.make_optimizer("kfac-ef", net, lr=0.0, stat_decay=0.0)
        opt.step(so.Closure(net, x, y, nn.CrossEntropyLoss()))
        abar = torch.cat([2.0 * x, torch.ones(x.shape[0], 1, x.shape[2], dtype=x.dtype)], dim=1)
        omega = torch.einsum("mil,mjl->ij", abar, abar) / x.shape[0]
        torch.testing.assert_close(opt.module_state["p"]["omega"], omega, rtol=1e-12, atol=1e-12)
    finally:
        so.unregister_layer(KeywordPointwise)
