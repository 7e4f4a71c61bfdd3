"""KFAC on a Linear layer applied at every position of a sequence: the expand and reduce factors
of Eschenhagen et al. (2023) against dense float64 computations from per-example gradients
(``torch.func``), and reduce's exactness for one example whose positions share their input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so

M, T, D_IN, D_OUT, CLASSES = 6, 4, 3, 5, 3
LR, LAM = 0.1, 0.5


class SeqNet(nn.Module):
    """(m, T, d_in) -> per-position Linear -> tanh -> mean over positions -> head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(D_IN, D_OUT).double()
        self.head = nn.Linear(D_OUT, CLASSES).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(x)).mean(1))


def data(m: int = M, shared: bool = False):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, 1 if shared else T, D_IN, generator=g, dtype=torch.float64).expand(m, T, D_IN)
    return x.contiguous(), torch.randint(0, CLASSES, (m,), generator=g)


def dense_factors(net: SeqNet, x: Tensor, y: Tensor, sharing: str) -> tuple[Tensor, Tensor]:
    m = x.shape[0]
    h = net.lin(x).detach()  # (m, T, d_out)

    def loss_n(hn, n):
        return F.cross_entropy(net.head(torch.tanh(hn).mean(0)).unsqueeze(0), y[n : n + 1])

    g = torch.stack([torch.func.grad(loss_n)(h[n], n) for n in range(m)])  # dl_n/dh_{n,t}
    abar = torch.cat([x, torch.ones(m, T, 1, dtype=x.dtype)], dim=2)
    if sharing == "expand":
        omega = torch.einsum("mti,mtj->ij", abar, abar) / m
        gamma = torch.einsum("mti,mtj->ij", g, g) / (m * T)
    else:
        a_n, g_n = abar.mean(1), g.sum(1)
        omega, gamma = a_n.t() @ a_n / m, g_n.t() @ g_n / m
    return omega, gamma


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_factors_and_one_step_against_per_example_gradients(sharing):
    net = SeqNet()
    x, y = data()
    omega, gamma = dense_factors(net, x, y, sharing)
    ref = copy.deepcopy(net)
    F.cross_entropy(ref(x), y).backward()
    dw = torch.cat([ref.lin.weight.grad, ref.lin.bias.grad[:, None]], 1)
    pi = ((torch.trace(omega) / omega.shape[0]) / (torch.trace(gamma) / gamma.shape[0])).sqrt()
    r = LAM**0.5
    eye = lambda d: torch.eye(d, dtype=torch.float64)  # noqa: E731
    # vec(H_Gamma DW H_Omega) = (H_Omega ⊗ H_Gamma) vec(DW) (column-major vec), explicitly
    h_omega = torch.linalg.inv(omega + pi * r * eye(D_IN + 1))
    h_gamma = torch.linalg.inv(gamma + r / pi * eye(D_OUT))
    vec = torch.kron(h_omega, h_gamma) @ dw.t().reshape(-1)
    step = -LR * vec.reshape(D_IN + 1, D_OUT).t()

    before = torch.cat([net.lin.weight, net.lin.bias[:, None]], 1).detach().clone()
    opt = so.make_optimizer(
        "kfac-ef",
        net,
        lr=LR,
        damping=LAM,
        momentum=0.0,
        stat_decay=0.0,
        inverse_freq=1,
        weight_sharing=sharing,
        exclude="head",
    )
    opt.step(so.Closure(net, x, y, nn.CrossEntropyLoss()))
    st = opt.module_state["lin"]
    torch.testing.assert_close(st["omega"], omega, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(st["gamma"], gamma, rtol=1e-12, atol=1e-13)
    after = torch.cat([net.lin.weight, net.lin.bias[:, None]], 1).detach()
    torch.testing.assert_close(after - before, step, rtol=1e-10, atol=1e-12)


def test_reduce_is_the_exact_fisher_of_one_example_whose_positions_share_the_input():
    """With one example and a_{t} = a for every t, the weight gradient is (sum_t g_t) abar^T, so its
    outer product is exactly Omega_reduce ⊗ Gamma_reduce; expand differs (it sums g_t g_t^T)."""
    net = SeqNet()
    x, y = data(m=1, shared=True)
    omega, gamma = dense_factors(net, x, y, "reduce")

    def loss(w, b):
        return F.cross_entropy(net.head(torch.tanh(F.linear(x, w, b)).mean(1)), y)

    gw, gb = torch.func.grad(loss, argnums=(0, 1))(net.lin.weight.detach(), net.lin.bias.detach())
    vec = torch.cat([gw, gb[:, None]], 1).t().reshape(-1)  # column-major vec of [dW | db]
    torch.testing.assert_close(torch.kron(omega, gamma), torch.outer(vec, vec), rtol=1e-12, atol=1e-14)
    e_omega, e_gamma = dense_factors(net, x, y, "expand")
    assert not torch.allclose(torch.kron(e_omega, e_gamma), torch.outer(vec, vec), rtol=1e-3)


def test_weight_sharing_is_validated_and_reduce_leaves_fc_layers_alone():
    with pytest.raises(ValueError, match="weight_sharing must be one of"):
        so.make_optimizer("kfac", SeqNet(), weight_sharing="mean")
    # the head sees one location per example: its factors are the same under both rules
    x, y = data()
    states = []
    for sharing in ("expand", "reduce"):
        net = SeqNet()
        opt = so.make_optimizer("kfac-ef", net, weight_sharing=sharing, stat_decay=0.0)
        opt.step(so.Closure(net, x, y, nn.CrossEntropyLoss()))
        states.append(opt.module_state)
    assert torch.equal(states[0]["head"]["omega"], states[1]["head"]["omega"])
    assert torch.equal(states[0]["head"]["gamma"], states[1]["head"]["gamma"])
    assert not torch.allclose(states[0]["lin"]["gamma"], states[1]["lin"]["gamma"])
