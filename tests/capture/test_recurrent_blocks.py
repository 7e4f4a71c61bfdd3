"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN): the unrolled forward equals the fused one, and
KFAC's factors and step for each weight matrix (every time step a location, ``expand``) against a
hand-written recurrence in float64 whose gate pre-activations keep their gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import secondorder as so
from secondorder.capture import blocks as LB
from secondorder.capture import hooks as C

F64 = torch.float64
M, T, D_IN, H, CLASSES = 6, 5, 3, 4, 3
LR, LAM = 0.1, 0.5


def flat(out) -> list[Tensor]:
    state = out[1]
    return [out[0], *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: nn.LSTM(D_IN, H, **kw),
        lambda **kw: nn.GRU(D_IN, H, **kw),
        lambda **kw: nn.RNN(D_IN, H, **kw),
        lambda **kw: nn.RNN(D_IN, H, nonlinearity="relu", bias=False, **kw),
    ],
    ids=["lstm", "gru", "rnn-tanh", "rnn-relu-nobias"],
)
def test_the_unrolled_forward_equals_the_fused_kernel(make, bidirectional, batch_first):
    torch.manual_seed(0)
    rnn = make(num_layers=2, bidirectional=bidirectional, batch_first=batch_first).double()
    x = torch.randn(M, T, D_IN, dtype=F64) if batch_first else torch.randn(T, M, D_IN, dtype=F64)
    h0 = torch.randn(2 * (1 + bidirectional), M, H, dtype=F64)
    hx = (h0, torch.randn_like(h0)) if isinstance(rnn, nn.LSTM) else h0
    unrolled = LB.unrolled_rnn(rnn, {})
    for args in ((x,), (x, hx), (x[0],)):  # no state, a given state, one unbatched sequence
        want, got = flat(rnn(*args)), flat(unrolled(*args))
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)
    grads = [
        torch.autograd.grad(sum(t.sum() for t in flat(f(x))), list(rnn.parameters())) for f in (rnn, unrolled)
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-12)


class Classifier(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(D_IN, H, batch_first=True)
        self.head = nn.Linear(H, CLASSES)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def by_hand(net: Classifier, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Per matrix: ``abar`` rows (m, T, D+1), ``dL/dz`` (m, T, G) of the batch-mean loss,
    and ``[dW | db]``."""
    r = net.rnn
    h = x.new_zeros(M, H)
    c = x.new_zeros(M, H)
    z_ih = F.linear(x, r.weight_ih_l0, r.bias_ih_l0).detach().requires_grad_()
    prev, z_hh = [], []
    for t in range(T):
        prev.append(h.detach())
        zh = F.linear(h, r.weight_hh_l0, r.bias_hh_l0)
        zh.retain_grad()
        z_hh.append(zh)
        zi = z_ih[:, t]
        if isinstance(r, nn.LSTM):
            i, f, g, o = (zi + zh).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            ri, ui, ni = zi.chunk(3, 1)
            rh, uh, nh = zh.chunk(3, 1)
            rr, u = torch.sigmoid(ri + rh), torch.sigmoid(ui + uh)
            h = (1 - u) * torch.tanh(ni + rr * nh) + u * h
    F.cross_entropy(net.head(h), y).backward()
    ones = x.new_ones(M, T, 1)
    g_ih, g_hh = z_ih.grad, torch.stack([z.grad for z in z_hh], 1)
    abar_ih, abar_hh = torch.cat([x, ones], 2), torch.cat([torch.stack(prev, 1), ones], 2)
    grad = lambda g, a: torch.einsum("mti,mtj->ij", g, a)  # noqa: E731
    return {"ih_l0": (abar_ih, g_ih, grad(g_ih, abar_ih)), "hh_l0": (abar_hh, g_hh, grad(g_hh, abar_hh))}


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_kfac_factors_and_one_step_of_each_matrix_against_a_hand_written_recurrence(kind):
    net = Classifier(kind)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(M, T, D_IN, generator=g, dtype=F64), torch.randint(0, CLASSES, (M,), generator=g)
    dense = by_hand(copy.deepcopy(net), x, y)
    ref = copy.deepcopy(net)
    F.cross_entropy(ref(x), y).backward()
    before = {
        k: torch.cat([getattr(net.rnn, "weight_" + k), getattr(net.rnn, "bias_" + k)[:, None]], 1)
        .detach()
        .clone()
        for k in dense
    }
    opt = so.make_optimizer("kfac-ef", net, lr=LR, damping=LAM, momentum=0.0, inverse_freq=1)
    assert opt.modeled_modules == ["rnn[ih_l0]", "rnn[hh_l0]", "head"]
    assert opt.coverage()["rnn.weight_hh_l0"] == "RecurrentPartBlock('rnn[hh_l0]')"
    opt.step(so.Closure(net, x, y, nn.CrossEntropyLoss()))
    assert "forward" not in net.rnn.__dict__  # the fused forward is back
    eye = lambda d: torch.eye(d, dtype=F64)  # noqa: E731
    for key, (abar, dz, dw) in dense.items():
        omega = torch.einsum("mti,mtj->ij", abar, abar) / M
        gz = M * dz  # per-example output gradients of the mean loss
        gamma = torch.einsum("mti,mtj->ij", gz, gz) / (M * T)
        st = opt.module_state[f"rnn[{key}]"]
        torch.testing.assert_close(st["omega"], omega)
        torch.testing.assert_close(st["gamma"], gamma)
        pi = ((torch.trace(omega) / omega.shape[0]) / (torch.trace(gamma) / gamma.shape[0])).sqrt()
        r = LAM**0.5
        step = (
            -LR
            * torch.linalg.inv(gamma + r / pi * eye(gamma.shape[0]))
            @ dw
            @ torch.linalg.inv(omega + pi * r * eye(omega.shape[0]))
        )
        after = torch.cat(
            [getattr(net.rnn, "weight_" + key), getattr(net.rnn, "bias_" + key)[:, None]], 1
        ).detach()
        torch.testing.assert_close(after - before[key], step)
        wgrad = getattr(ref.rnn, "weight_" + key).grad
        torch.testing.assert_close(dw[:, :-1], wgrad)  # the hand-written recurrence is the model's


def test_a_packed_sequence_is_refused_and_the_forward_is_restored():
    net = nn.LSTM(D_IN, H)
    cap = C.Capture(C.layer_blocks(net))
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(T, 2, D_IN), [T, 3])
    with pytest.raises(ValueError, match="PackedSequence.*exclude"):
        with cap.record():
            net(packed)
    assert "forward" not in net.__dict__
    net(packed)  # the fused kernel takes it


def test_projected_lstm_is_not_modeled_and_says_why():
    assert LB.block_for(nn.LSTM(D_IN, H, proj_size=2)) is None
    assert C.unmodeled_modules(nn.Sequential(nn.LSTM(D_IN, H, proj_size=2))) == {
        "0": "LSTM with proj_size=2 is not supported by RecurrentBlock"
    }
    assert list(C.layer_blocks(nn.GRU(D_IN, H, num_layers=2, bidirectional=True))) == [
        f"[{k}_l{layer}{d}]" for layer in (0, 1) for d in ("", "_reverse") for k in ("ih", "hh")
    ]
