"""TNT / TNT-EF (Algorithm 15) against dense float64 Kronecker oracles and exact Fisher expectations."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.linalg.kron import LinAlgError
from secondorder.optim import tnt as tnt_module
from secondorder.optim.tnt import TNT, parameter_views, tensor_view
from tests.helpers import classification_data, huge_input_net, image_data, tiny_mlp

LR, EPS = 0.1, 0.05
ORACLE_HP = dict(
    lr=LR, damping=EPS, momentum=0.0, stat_decay=0.0, weight_decay=0.0, update_freq=1, inverse_freq=1
)


# ------------------------------------------------------------------ dense oracles (numpy, float64)
def np_view(name: str, shape: tuple[int, ...], conv: bool) -> tuple[int, ...]:
    """4.7.2: conv weights (out, in, kh * kw); size-1 modes dropped."""
    dims = (shape[0], shape[1], int(np.prod(shape[2:]))) if conv and name.endswith("weight") else shape
    return tuple(d for d in dims if d > 1) or (1,)


def np_contraction(g: np.ndarray, i: int) -> np.ndarray:
    """G^(i)_{ab} = sum over every other index of G[.., a, ..] G[.., b, ..] (explicit einsum subscripts)."""
    letters = "abcdefgh"[: g.ndim]
    other = letters[:i] + "z" + letters[i + 1 :]
    return np.einsum(f"{letters},{other}->{letters[i]}z", g, g)


def np_identify(stats: list[np.ndarray], shape: tuple[int, ...]) -> list[np.ndarray]:
    """(4.10) written out: c0 = (tr G^(1) / D)^(1/k), U~_i = G^(i) / (c0^(k-1) prod_{j != i} d_j)."""
    k = len(shape)
    if k == 1:
        return stats
    total = float(np.prod(shape))
    c0 = (np.trace(stats[0]) / total) ** (1.0 / k)
    return [s / (c0 ** (k - 1) * total / d) for s, d in zip(stats, shape, strict=True)]


def np_power(u: np.ndarray, power: float, eps: float) -> np.ndarray:
    w, v = np.linalg.eigh(u + eps * np.eye(u.shape[0]))
    return (v * w**power) @ v.T


def kron_all(mats: list[np.ndarray]) -> np.ndarray:
    out = np.ones((1, 1))
    for m in mats:
        out = np.kron(out, m)
    return out


def dense_step(
    model: nn.Module,
    grads: dict[str, torch.Tensor],
    stat_grads: dict[str, torch.Tensor],
    method: str,
    lr: float,
    eps: float,
) -> dict[str, torch.Tensor]:
    """theta - lr (K_1 (x) ... (x) K_k) vec(grad) per parameter, K_i from the contractions of ``stat_grads``:
    TNT: (U~_i + eps I)^-1 with U~ by (4.10); Shampoo: (G^(i) + eps I)^(-1/(2k))."""
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    out = {}
    for name, p in model.named_parameters():
        shape = np_view(name, tuple(p.shape), name in convs)
        g = stat_grads[name].detach().double().numpy().reshape(shape)
        stats = [np_contraction(g, i) for i in range(len(shape))]
        if method == "shampoo":
            ks = [np_power(s, -1.0 / (2 * len(shape)), eps) for s in stats]
        else:
            ks = [np_power(u, -1.0, eps) for u in np_identify(stats, shape)]
        direction = kron_all(ks) @ grads[name].detach().double().numpy().reshape(-1)  # row-major vec
        out[name] = p.detach() - lr * torch.from_numpy(direction).reshape(p.shape)
    return out


def fc_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def conv_model():
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)
    ).double()


def problem(kind: str):
    if kind == "fc":
        x, y = classification_data(n=8, d=5)
        return fc_model(), x, y
    x, y = image_data(n=8)
    return conv_model(), x, y


def true_and_sampled_grads(model, x, y, loss_fn, closure=None, generator=None):
    """Minibatch-mean gradient on the true targets and, when a generator is given, on sampled targets."""
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    out = twin(x)
    m = x.shape[0]
    scale = m if getattr(loss_fn, "reduction", "mean") == "sum" else 1
    true = dict(
        zip(
            params,
            torch.autograd.grad(loss_fn(out, y), list(params.values()), retain_graph=True),
            strict=True,
        )
    )
    sampled = None
    if generator is not None:
        t = closure.sample_targets(out, generator)
        sampled = dict(zip(params, torch.autograd.grad(loss_fn(out, t), list(params.values())), strict=True))
        sampled = {n: g / scale for n, g in sampled.items()}
    return true, {n: g / scale for n, g in true.items()}, sampled


# ------------------------------------------------------------------ views
def test_tensor_views_are_model_agnostic():
    assert tensor_view((4, 2, 3, 3), conv_weight=True).shape == (4, 2, 9)  # 4.7.2: 3-way conv kernel
    assert tensor_view((4, 2, 3, 3)).shape == (4, 2, 3, 3)  # a 4-way tensor that is not a conv weight
    assert tensor_view((8, 4, 1, 1), conv_weight=True).shape == (8, 4)  # 1x1 conv: size-1 mode dropped
    assert tensor_view((3, 5)).shape == (3, 5)
    assert tensor_view((7,)).shape == (7,)
    assert tensor_view(()).shape == (1,) and tensor_view((1, 1)).shape == (1,)
    emb = tensor_view((10000, 8), max_factor_dim=4096)
    assert emb.shape == (10000, 8) and emb.diagonal == (True, False)
    model = nn.Sequential(nn.Embedding(20, 4), nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6))
    views = parameter_views(model, [n for n, _ in model.named_parameters()], max_factor_dim=16)
    assert views["0.weight"].shape == (20, 4) and views["0.weight"].diagonal == (True, False)
    assert views["1.weight"].shape == (6, 4, 3) and views["1.bias"].shape == (6,)
    assert views["2.weight"].shape == (6,) and views["2.bias"].shape == (6,)


# ------------------------------------------------------------------ step oracles
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_tnt_ef_step_equals_the_dense_kronecker_formula(kind, reduction):
    model, x, y = problem(kind)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    grads, mean_grads, _ = true_and_sampled_grads(model, x, y, loss_fn)
    expected = dense_step(model, grads, mean_grads, "tnt", LR, EPS)
    opt = so.make_optimizer("tnt-ef", model, **ORACLE_HP)
    opt.step(so.Closure(model, x, y, loss_fn))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_tnt_step_equals_the_dense_formula_on_the_sampled_gradient(kind):
    model, x, y = problem(kind)
    loss_fn = nn.CrossEntropyLoss()
    opt = so.make_optimizer("tnt", model, seed=5, **ORACLE_HP)
    closure = so.Closure(model, x, y, loss_fn)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(opt.generator.get_state())
    grads, _, sampled = true_and_sampled_grads(model, x, y, loss_fn, closure, gen)
    expected = dense_step(model, grads, sampled, "tnt", LR, EPS)
    opt.step(closure)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-9, atol=1e-12, msg=name)


def test_momentum_and_weight_decay_follow_lines_10_and_19():
    model, x, y = problem("fc")
    loss_fn = nn.CrossEntropyLoss()
    hp = dict(ORACLE_HP, momentum=0.9, weight_decay=0.3)
    opt = so.make_optimizer("tnt-ef", model, **hp)
    c = so.Closure(model, x, y, loss_fn)
    g0, mg0, _ = true_and_sampled_grads(model, x, y, loss_fn)
    opt.step(c)
    theta1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g1, mg1, _ = true_and_sampled_grads(model, x, y, loss_fn)
    mom = {n: 0.9 * g0[n] + g1[n] for n in g1}  # m <- mu m + grad
    expected = dense_step(model, mom, mg1, "tnt", LR, EPS)  # stat_decay = 0: statistics of step 1 only
    opt.step(c)
    for name, p in model.named_parameters():
        # W <- W - alpha (p + gamma W): dense_step gives W - alpha p with W = theta1
        want = expected[name] - LR * 0.3 * theta1[name]
        torch.testing.assert_close(p.detach(), want, rtol=1e-9, atol=1e-12, msg=name)


def test_moving_averages_warm_start_and_running_mean_start():
    model, x, y = problem("fc")
    loss_fn = nn.CrossEntropyLoss()
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    contr = tnt_module.contractions

    def stats_of(m, xb, yb):
        _, mean, _ = true_and_sampled_grads(m, xb, yb, loss_fn)
        views = parameter_views(m, list(mean))
        return {n: contr(g.reshape(views[n].shape)) for n, g in mean.items()}

    # warm start: equal-weight average; step 0 uses it as is; step 1 mixes with weight 1 - beta
    opt = so.make_optimizer("tnt-ef", model, **dict(ORACLE_HP, stat_decay=0.8))
    cs = [so.Closure(model, xb, yb, loss_fn) for xb, yb in halves]
    s_a, s_b = stats_of(model, *halves[0]), stats_of(model, *halves[1])
    assert opt.warm_start(cs) == 2
    by_name = dict(model.named_parameters())
    opt.step(cs[0])
    for n, p in by_name.items():
        for f, a, b in zip(opt.state[p]["factors"], s_a[n], s_b[n], strict=True):
            torch.testing.assert_close(f, (a + b) / 2)
    s_1 = stats_of(model, *halves[1])
    opt.step(cs[1])
    for n, p in by_name.items():
        for f, a, b, c in zip(opt.state[p]["factors"], s_a[n], s_b[n], s_1[n], strict=True):
            torch.testing.assert_close(f, 0.8 * (a + b) / 2 + 0.2 * c)
    # no warm start: the first update initialises, the second has weight max(1/2, 1 - beta) = 1/2
    model2, _, _ = problem("fc")
    opt2 = so.make_optimizer("tnt-ef", model2, **dict(ORACLE_HP, stat_decay=0.8))
    c2 = so.Closure(model2, *halves[0], loss_fn)
    s_0 = stats_of(model2, *halves[0])
    opt2.step(c2)
    s_1 = stats_of(model2, *halves[0])
    opt2.step(c2)
    for n, p in dict(model2.named_parameters()).items():
        for f, a, b in zip(opt2.state[p]["factors"], s_0[n], s_1[n], strict=True):
            torch.testing.assert_close(f, (a + b) / 2)


# ------------------------------------------------------------------ the sampled pass
def test_sampled_statistics_converge_to_their_expectation():
    """E[G^(i)] of the minibatch-mean sampled gradient, by enumerating the classes of every example:
    E[G^(i)] = (1/m^2) sum_n sum_c p_nc (grad l_n(c))^(i) (cross terms vanish: E_c[grad l_n(c)] = 0),
    i.e. 1/m of the per-example contraction (docs/notes.md §5). The warm start averages K draws."""
    model = tiny_mlp(widths=(4, 3, 3))
    x, _ = classification_data(n=3, d=4)
    m = x.shape[0]
    names = [n for n, _ in model.named_parameters()]
    views = parameter_views(model, names)
    probs = torch.softmax(model(x), dim=1).detach()
    expected = {n: [torch.zeros(d, d, dtype=torch.float64) for d in views[n].shape] for n in names}
    for n_ex in range(m):
        for c in range(probs.shape[1]):
            loss = nn.functional.cross_entropy(model(x[n_ex : n_ex + 1]), torch.tensor([c]))
            grads = torch.autograd.grad(loss, list(model.parameters()))
            for name, g in zip(names, grads, strict=True):
                for i, acc in enumerate(expected[name]):
                    acc += (
                        probs[n_ex, c]
                        * torch.from_numpy(np_contraction(g.reshape(views[name].shape).numpy(), i))
                        / m**2
                    )
    y = torch.zeros(m, dtype=torch.long)  # the true labels play no role in the sampled statistics
    opt = TNT(model, seed=0)
    closure = so.Closure(model, x, y, nn.CrossEntropyLoss())
    k = 1500
    assert opt.warm_start([closure] * k) == k
    for name, p in model.named_parameters():
        for est, exp in zip(opt.state[p]["factors"], expected[name], strict=True):
            err = float(torch.linalg.norm(est - exp) / torch.linalg.norm(exp))
            assert err < 0.1, (name, err)
    # the empirical-Fisher statistics of tnt-ef (true labels) have a different expectation
    ef = so.make_optimizer("tnt-ef", model)
    ef.warm_start([closure])
    w = dict(model.named_parameters())["0.weight"]
    gap = torch.linalg.norm(ef.state[w]["factors"][0] - expected["0.weight"][0]) / torch.linalg.norm(
        expected["0.weight"][0]
    )
    assert float(gap) > 0.1


def test_sampled_pass_leaves_grad_untouched_and_counts_passes():
    model, x, y = problem("fc")
    loss_fn = nn.CrossEntropyLoss()
    true, _, _ = true_and_sampled_grads(model, x, y, loss_fn)
    opt = so.make_optimizer("tnt", model, seed=1, **ORACLE_HP)
    opt.step(so.Closure(model, x, y, loss_fn))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, true[name], rtol=1e-12, atol=1e-14)  # .grad = true-label gradient
    assert opt.stats.forward_passes == 1 and opt.stats.backward_passes == 2
    ef = so.make_optimizer("tnt-ef", problem("fc")[0], **ORACLE_HP)
    ef.step(so.Closure(ef.model, x, y, loss_fn))
    assert ef.stats.forward_passes == 1 and ef.stats.backward_passes == 1


# ------------------------------------------------------------------ timing and failure path
def test_inverse_timing_t1_t2(monkeypatch):
    calls: list[int] = []
    original = TNT._preconditioner

    def counting(self, factors, view, damping):
        calls.append(self.step_count)
        return original(self, factors, view, damping)

    monkeypatch.setattr(TNT, "_preconditioner", counting)
    model, x, y = problem("fc")
    opt = so.make_optimizer("tnt", model, update_freq=2, inverse_freq=6)
    c = so.Closure(model, x, y, nn.CrossEntropyLoss())
    for _ in range(14):
        opt.step(c)
    n_params = len(list(model.parameters()))
    steps = sorted(set(calls))
    assert steps == [0, 2, 4, 6, 12]  # every T1 during the first T2, then every T2
    assert len(calls) == n_params * len(steps)
    assert opt.stats.backward_passes == 14 + 7  # the sampled pass runs every T1 steps only


def test_failed_inverse_keeps_the_previous_preconditioner(monkeypatch, caplog):
    model, x, y = problem("fc")
    opt = so.make_optimizer("tnt", model, inverse_freq=1)
    c = so.Closure(model, x, y, nn.CrossEntropyLoss())
    opt.step(c)
    before = {n: [k.clone() for k in opt.state[p]["precond"]] for n, p in model.named_parameters()}

    def failing(*args, **kwargs):
        raise LinAlgError("factor has non-finite entries")

    monkeypatch.setattr(tnt_module, "inverse_root", failing)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="secondorder.optim.tnt"):
        opt.step(c)
    assert "keeping the previous preconditioner" in caplog.text
    for n, p in model.named_parameters():
        assert all(torch.equal(a, b) for a, b in zip(opt.state[p]["precond"], before[n], strict=True))
        assert not torch.equal(p.detach(), theta[n])  # the step still happened
    fresh = so.make_optimizer("tnt", problem("fc")[0])
    with pytest.raises(LinAlgError):  # nothing to fall back on at the first inverse
        fresh.step(so.Closure(fresh.model, x, y, nn.CrossEntropyLoss()))


def test_diagonal_factors_for_large_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    loss_fn = nn.CrossEntropyLoss()
    opt = so.make_optimizer("tnt-ef", model, max_factor_dim=10, **ORACLE_HP)
    assert opt.views["0.weight"].diagonal == (True, False) and opt.views["0.bias"].diagonal == (True,)
    grads, mean, _ = true_and_sampled_grads(model, x, y, loss_fn)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(so.Closure(model, x, y, loss_fn))
    g = mean["0.weight"].numpy()
    stats = [np.diag(np.diag(np_contraction(g, 0))), np_contraction(g, 1)]  # diag of the 12x12 contraction
    ks = [np_power(u, -1.0, EPS) for u in np_identify(stats, (12, 3))]
    want = theta["0.weight"] - LR * torch.from_numpy(
        kron_all(ks) @ grads["0.weight"].numpy().reshape(-1)
    ).reshape(12, 3)
    torch.testing.assert_close(
        dict(model.named_parameters())["0.weight"].detach(), want, rtol=1e-9, atol=1e-12
    )
    assert opt.state[dict(model.named_parameters())["0.weight"]]["factors"][0].shape == (12,)


def test_thesis_defaults():
    opt = TNT(tiny_mlp())
    hp = opt.hp
    assert (hp["lr"], hp["damping"], hp["momentum"], hp["stat_decay"]) == (1e-4, 0.1, 0.9, 0.9)
    assert (hp["update_freq"], hp["inverse_freq"], hp["weight_decay"]) == (1, 20, 0.0)
    ef = so.make_optimizer("tnt-ef", tiny_mlp())
    assert (ef.hp["lr"], ef.hp["damping"]) == (3e-6, 0.01)
    with pytest.raises(ValueError, match="max_factor_dim"):
        TNT(tiny_mlp(), max_factor_dim=0)
    assert math.isclose(TNT(tiny_mlp(), lr=0.5).param_groups[0]["lr"], 0.5)


@pytest.mark.parametrize("key", ["tnt", "tnt-ef", "shampoo"])
def test_an_overflowed_contraction_is_not_stored_and_training_goes_on(key, caplog):
    """float32, first-layer inputs 1e20 (h stays O(1)): its weight gradient is ~1e20 and its
    contractions overflow; the previous factors are kept, counted, logged, and the run goes on."""
    model, x, y = huge_input_net()
    loss_fn = nn.CrossEntropyLoss()
    opt = so.make_optimizer(key, model, lr=0.0)
    opt.step(so.Closure(model, x * 1e-20, y, loss_fn))
    w = model[0].weight
    before = [f.clone() for f in opt.state[w]["factors"]]
    with caplog.at_level("WARNING", logger="secondorder"):
        opt.step(so.Closure(model, x, y, loss_fn))
    assert all(torch.equal(a, b) for a, b in zip(opt.state[w]["factors"], before, strict=True))
    assert opt.stats.diagnostics["skipped_statistics"] == {"0.weight": 1}
    assert any("previous statistics are kept" in r.getMessage() for r in caplog.records)
    for p in model.parameters():
        assert all(bool(torch.isfinite(f).all()) for f in opt.state[p].get("factors", []))
    opt.param_groups[0]["lr"] = 0.01
    opt.step(so.Closure(model, x * 1e-20, y, loss_fn))
    assert all(torch.isfinite(p).all() for p in model.parameters())
