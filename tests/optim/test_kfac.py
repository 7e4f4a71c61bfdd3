"""KFAC / KFAC-EF against dense float64 oracles built from per-example quantities (Algorithm 12)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import secondorder as so
from tests.helpers import classification_data, huge_input_net, image_data, tiny_conv_bn

LR, LAM = 0.1, 0.5
ORACLE_HP = dict(
    lr=LR, damping=LAM, momentum=0.0, stat_decay=0.0, weight_decay=0.0, update_freq=1, inverse_freq=1
)


def fc_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def conv_model():
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)
    ).double()


def brute_patches(conv: nn.Conv2d, a: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Patch vectors of example n, one per output location, by explicit slicing (no unfold)."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    padded = F.pad(a[n], (p, p, p, p))
    out_h = (a.shape[2] + 2 * p - k) // s + 1
    out_w = (a.shape[3] + 2 * p - k) // s + 1
    rows = []
    for i in range(out_h):
        for j in range(out_w):
            patch = padded[:, i * s : i * s + k, j * s : j * s + k].reshape(-1)
            rows.append(torch.cat([patch, torch.ones(1, dtype=a.dtype)]))
    return rows


def layer_oracles(model, x, targets, loss_fn):
    """Per modeled layer: (Omega, Gamma) by loops over examples and locations, and grad(Wbar)."""
    m = x.shape[0]
    layers = [i for i, mod in enumerate(model) if isinstance(mod, nn.Linear | nn.Conv2d)]
    out = {}
    for li in layers:
        layer = model[li]
        with torch.no_grad():
            a = model[:li](x)
            h = layer(a)
        rest = model[li + 1 :]

        def loss_n(hn, n, rest=rest):
            return loss_fn(rest(hn.unsqueeze(0)), targets[n : n + 1])

        omega = 0
        gamma = 0
        for n in range(m):
            gn = torch.func.grad(loss_n)(h[n], n).detach()  # dl_n/dh_n
            if isinstance(layer, nn.Conv2d):
                locs = brute_patches(layer, a, n)
                gts = [gn[:, i, j] for i in range(gn.shape[1]) for j in range(gn.shape[2])]
            else:
                locs = [torch.cat([a[n], torch.ones(1, dtype=a.dtype)])]
                gts = [gn]
            t = len(locs)
            omega = omega + sum(torch.outer(v, v) for v in locs) / m
            gamma = gamma + sum(torch.outer(v, v) for v in gts) / (m * t)
        out[str(li)] = (omega, gamma)
    return out


def expected_step(model, x, targets_for_stats, y, loss_fn, pi_mode="trace"):
    stats = layer_oracles(model, x, targets_for_stats, loss_fn)
    model_g = copy.deepcopy(model)
    model_g.zero_grad()
    loss_fn(model_g(x), y).backward()
    deltas = {}
    for name, (omega, gamma) in stats.items():
        layer = model_g[int(name)]
        gbar = torch.cat([layer.weight.grad.reshape(layer.weight.shape[0], -1), layer.bias.grad[:, None]], 1)
        if pi_mode == "trace":
            pi = math.sqrt(
                float(torch.trace(omega) / omega.shape[0]) / float(torch.trace(gamma) / gamma.shape[0])
            )
        else:
            pi = 1.0
        r = math.sqrt(LAM)
        eye = lambda d: torch.eye(d, dtype=torch.float64)  # noqa: E731
        p = torch.linalg.solve(gamma + r / pi * eye(gamma.shape[0]), gbar) @ torch.linalg.inv(
            omega + pi * r * eye(omega.shape[0])
        )
        deltas[name] = -LR * p
    return deltas, stats


def actual_step(model, opt, closure):
    before = copy.deepcopy(model)
    opt.step(closure)
    out = {}
    for name in opt.modeled_modules:
        new, old = model[int(name)], before[int(name)]
        dw = (new.weight - old.weight).reshape(new.weight.shape[0], -1)
        out[name] = torch.cat([dw, (new.bias - old.bias)[:, None]], 1).detach()
    return out


@pytest.mark.parametrize("pi_mode", ["trace", "none"])
@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_kfac_ef_step_equals_the_dense_formula(kind, pi_mode):
    if kind == "fc":
        model = fc_model()
        x, y = classification_data(n=7, d=5)
    else:
        model = conv_model()
        x, y = image_data(n=5)
    loss_fn = nn.CrossEntropyLoss()
    expected, stats = expected_step(model, x, y, y, loss_fn, pi_mode)
    opt = so.make_optimizer("kfac-ef", model, pi=pi_mode, **ORACLE_HP)
    actual = actual_step(model, opt, so.Closure(model, x, y, loss_fn))
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(opt.module_state[name]["omega"], stats[name][0])
        torch.testing.assert_close(opt.module_state[name]["gamma"], stats[name][1])
        torch.testing.assert_close(actual[name], expected[name])


@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_kfac_sampled_step_equals_the_dense_formula_with_the_same_samples(kind):
    """kfac draws targets at theta_k from its own seeded generator; Gamma uses only those (no true labels)."""
    if kind == "fc":
        model = fc_model()
        x, y = classification_data(n=7, d=5)
    else:
        model = conv_model()
        x, y = image_data(n=5)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        sampled = so.infer_likelihood(loss_fn).sample(model(x), torch.Generator().manual_seed(11))
    expected, _ = expected_step(model, x, sampled, y, loss_fn)
    opt = so.make_optimizer("kfac", model, seed=11, **ORACLE_HP)
    actual = actual_step(model, opt, so.Closure(model, x, y, loss_fn))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name])
    assert opt.stats.backward_passes == 2 and opt.stats.forward_passes == 1


def test_retain_grad_accumulation_would_contaminate_gamma_but_ours_does_not():
    """docs/notes.md §7: .grad of a retained non-leaf accumulates across backward calls."""
    model = fc_model()
    x, y = classification_data(n=7, d=5)
    loss_fn = nn.CrossEntropyLoss()
    h_clean = model[0](x)
    out_clean = model[2](model[1](h_clean))
    t = so.infer_likelihood(loss_fn).sample(out_clean, torch.Generator().manual_seed(11))
    (g_true,) = torch.autograd.grad(loss_fn(out_clean, y), h_clean, retain_graph=True)
    (g_sampled,) = torch.autograd.grad(loss_fn(out_clean, t), h_clean)
    h = model[0](x)
    h.retain_grad()
    out = model[2](model[1](h))
    loss_fn(out, y).backward(retain_graph=True)
    loss_fn(out, t).backward()
    torch.testing.assert_close(h.grad, g_true + g_sampled)  # what the published code's Gamma was built from
    model.zero_grad()
    opt = so.make_optimizer("kfac", model, seed=11, **ORACLE_HP)
    opt.step(so.Closure(model, x, y, loss_fn))
    gs = g_sampled * x.shape[0]
    gamma_clean = gs.t() @ gs / x.shape[0]
    torch.testing.assert_close(opt.module_state["0"]["gamma"], gamma_clean)


def test_moving_averages_momentum_and_frequencies():
    model = fc_model()
    x, y = classification_data(n=12, d=5)
    loss_fn = nn.CrossEntropyLoss()
    batches = [so.Closure(model, x[i : i + 4], y[i : i + 4], loss_fn) for i in (0, 4, 8)]
    beta = 0.7
    opt = so.make_optimizer(
        "kfac-ef", model, lr=0.05, damping=LAM, momentum=0.0, stat_decay=beta, update_freq=2, inverse_freq=4
    )
    seen = []
    for k in range(9):
        c = batches[k % 3]
        if k % 2 == 0:
            stats = layer_oracles(model, c.inputs, c.targets, loss_fn)
            seen.append(stats["0"][0])
        inv_before = opt.module_state.get("0", {}).get("omega_inv")
        inv_before = None if inv_before is None else inv_before.clone()
        opt.step(c)
        inv_after = opt.module_state["0"]["omega_inv"]
        recomputed = inv_before is None or not torch.equal(inv_before, inv_after)
        # statistics at k % T1 == 0; inverses at k % T2 == 0 and every T1 step while k <= T2
        assert recomputed == (k % 4 == 0 or (k <= 4 and k % 2 == 0)), k
    expected = seen[0]
    for s in seen[1:]:
        expected = beta * expected + (1 - beta) * s
    torch.testing.assert_close(opt.module_state["0"]["omega"], expected)


def test_warm_start_averages_the_minibatch_statistics():
    model = fc_model()
    x, y = classification_data(n=12, d=5)
    loss_fn = nn.CrossEntropyLoss()
    closures = [so.Closure(model, x[i : i + 4], y[i : i + 4], loss_fn) for i in (0, 4, 8)]
    opt = so.make_optimizer("kfac-ef", model)
    assert opt.warm_start(closures) == 3
    per = [layer_oracles(model, c.inputs, c.targets, loss_fn) for c in closures]
    for name in ("0", "2"):
        torch.testing.assert_close(opt.module_state[name]["omega"], sum(p[name][0] for p in per) / 3)
        torch.testing.assert_close(opt.module_state[name]["gamma"], sum(p[name][1] for p in per) / 3)
    assert opt.stats.steps == 0 and opt.stats.warm_start_forward_passes == 3


def test_heavy_ball_momentum_and_decoupled_weight_decay():
    """Two steps with mu and gamma: W <- W - lr (H_G (mu g1 + g2) H_A + gamma W)."""
    model = fc_model()
    x, y = classification_data(n=8, d=5)
    loss_fn = nn.CrossEntropyLoss()
    mu, wd = 0.9, 0.01
    opt = so.make_optimizer(
        "kfac-ef", model, lr=LR, damping=LAM, momentum=mu, stat_decay=0.0, weight_decay=wd, inverse_freq=1
    )
    c = so.Closure(model, x, y, loss_fn)
    opt.step(c)
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    w_before = model[0].weight.detach().clone()
    b_before = model[0].bias.detach().clone()
    stats = layer_oracles(model, x, y, loss_fn)
    omega, gamma = stats["0"]
    model_g = copy.deepcopy(model)
    loss_fn(model_g(x), y).backward()
    gw = mu * g1["0.weight"] + model_g[0].weight.grad
    gb = mu * g1["0.bias"] + model_g[0].bias.grad
    pi = math.sqrt(float(torch.trace(omega) / 6) / float(torch.trace(gamma) / 4))
    r = math.sqrt(LAM)
    p = torch.linalg.inv(gamma + r / pi * torch.eye(4, dtype=torch.float64)) @ torch.cat([gw, gb[:, None]], 1)
    p = p @ torch.linalg.inv(omega + pi * r * torch.eye(6, dtype=torch.float64))
    opt.step(c)
    torch.testing.assert_close(model[0].weight.detach(), w_before - LR * (p[:, :-1] + wd * w_before))
    torch.testing.assert_close(model[0].bias.detach(), b_before - LR * (p[:, -1] + wd * b_before))


def test_batchnorm_parameters_follow_the_momentum_gradient_with_the_same_lr():
    """The thesis's rule (3.7.2), as the benchmark's presets run it: BatchNorm excluded, momentum fallback."""
    model = tiny_conv_bn()
    x, y = image_data(n=8)
    loss_fn = nn.CrossEntropyLoss()
    opt = so.make_optimizer("kfac", model, **ORACLE_HP, exclude=[nn.BatchNorm2d], fallback="momentum")
    assert opt.modeled_modules == ["0", "3", "7"]
    assert sorted(opt.other_params) == ["1.bias", "1.weight", "4.bias", "4.weight"]
    ref = copy.deepcopy(model)
    loss_fn(ref(x), y).backward()
    before = model[1].weight.detach().clone()
    opt.step(so.Closure(model, x, y, loss_fn))
    torch.testing.assert_close(model[1].weight.detach(), before - LR * ref[1].weight.grad)


def test_conv_without_bias_has_no_homogeneous_coordinate():
    model = tiny_conv_bn()
    x, y = image_data(n=8)
    opt = so.make_optimizer("kfac", model)
    opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))
    assert opt.module_state["3"]["omega"].shape == (4 * 9, 4 * 9)
    assert opt.module_state["0"]["omega"].shape == (2 * 9 + 1, 2 * 9 + 1)


def test_kfac_needs_a_secondorder_closure():
    model = fc_model()
    opt = so.make_optimizer("kfac", model)
    with pytest.raises(TypeError, match="plain closure needs loss_fn=.*or pass a so.Closure"):
        opt.step(lambda: torch.tensor(0.0))
    with pytest.raises(TypeError, match=r"without a closure needs loss_fn= at construction"):
        opt.step()
    with pytest.raises(ValueError, match="pi"):
        so.make_optimizer("kfac", model, pi="sqrt")


# ------------------------------------------------------ a statistic that overflows is not stored
@pytest.mark.parametrize("key", ["kfac", "kfac-ef"])
def test_an_overflowed_factor_is_not_stored_and_training_goes_on(key, caplog):
    model, x, y = huge_input_net()
    loss_fn = nn.CrossEntropyLoss()
    opt = so.make_optimizer(key, model, lr=0.0, inverse_freq=1)
    opt.warm_start([so.Closure(model, x * 1e-20, y, loss_fn)])
    opt.step(so.Closure(model, x * 1e-20, y, loss_fn))
    before = {
        n: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for n, st in opt.module_state.items()
    }
    with caplog.at_level("WARNING", logger="secondorder"):
        opt.step(so.Closure(model, x, y, loss_fn))  # the Gram of layer 0's inputs is 1e40 > float32 max
    assert all(torch.equal(opt.module_state["0"][k], v) for k, v in before["0"].items())
    assert not torch.equal(opt.module_state["2"]["omega"], before["2"]["omega"])  # the others moved on
    for st in opt.module_state.values():
        assert all(bool(torch.isfinite(v).all()) for v in st.values() if torch.is_tensor(v))
    assert opt.stats.diagnostics["skipped_statistics"] == {"0": 1}
    assert any(
        "'0'" in r.getMessage() and "previous statistics are kept" in r.getMessage() for r in caplog.records
    )
    opt.param_groups[0]["lr"] = 0.05
    opt.step(so.Closure(model, x * 1e-20, y, loss_fn))  # training continues
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_overflow_with_no_previous_factors_raises_before_any_change():
    model, x, y = huge_input_net()
    opt = so.make_optimizer("kfac-ef", model, lr=0.1)
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(so.NonFiniteError, match="no previous factors"):
        opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))
    assert opt.module_state == {}
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
