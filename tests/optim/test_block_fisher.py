"""Block Fisher: the exact damped per-layer Fisher against dense torch.func / autograd oracles."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.optim.block_fisher import BlockFisher, parameter_blocks
from tests.helpers import (
    classification_data,
    huge_input_net,
    image_data,
    per_example_param_grads,
    tiny_conv_bn,
    tiny_mlp,
)

LR, LAM = 0.2, 0.05
ORACLE_HP = dict(lr=LR, damping=LAM, momentum=0.0, stat_decay=0.0, weight_decay=0.0)


def sampled_targets(opt, closure, model, x):
    gen = torch.Generator().manual_seed(0)
    gen.set_state(opt.generator.get_state())
    with torch.no_grad():
        return closure.sample_targets(copy.deepcopy(model)(x), gen)


def expected_step(model, grads, jac, blocks, lr, lam):
    """Per block: theta - lr (F + lam I)^-1 g with F = (1/m) sum_n J_n J_n^T, J_n = [vec(W); b] row-major."""
    params = dict(model.named_parameters())
    out = {}
    for _, names in blocks.items():
        m = jac[names[0]].shape[0]
        j = torch.cat([jac[n].reshape(m, -1) for n in names], dim=1)
        fisher = j.t() @ j / m
        g = torch.cat([grads[n].reshape(-1) for n in names])
        d = torch.linalg.solve(fisher + lam * torch.eye(len(g), dtype=g.dtype), g)
        offset = 0
        for n in names:
            k = params[n].numel()
            out[n] = params[n].detach() - lr * d[offset : offset + k].view_as(params[n])
            offset += k
    return out


@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_step_equals_the_dense_per_example_fisher_oracle(loss_name):
    """MLP: per-example gradients by torch.func.vmap(grad) (helpers), the sampled targets replayed."""
    model = tiny_mlp()
    x, y = classification_data(n=10)
    if loss_name == "ce":
        loss_fn, per_example = nn.CrossEntropyLoss(), lambda out, t: nn.functional.cross_entropy(out, t)
    else:
        y = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        loss_fn, per_example = nn.MSELoss(), lambda out, t: nn.functional.mse_loss(out, t)
    opt = so.make_optimizer("block-fisher", model, seed=4, **ORACLE_HP)
    closure = so.Closure(model, x, y, loss_fn)
    targets = sampled_targets(opt, closure, model, x)
    jac = per_example_param_grads(model, x, targets, per_example)  # d l_n / d theta
    twin = copy.deepcopy(model)
    loss_fn(twin(x), y).backward()
    grads = {n: p.grad for n, p in twin.named_parameters()}
    blocks = parameter_blocks(model)
    assert blocks == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"], "4": ["4.weight", "4.bias"]}
    expected = expected_step(model, grads, jac, blocks, LR, LAM)
    opt.step(closure)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-9, atol=1e-12, msg=n)
    assert opt.stats.forward_passes == 2 and opt.stats.backward_passes == 2


def test_batch_norm_coupled_per_example_gradients():
    """conv + BN: J_n = d l_n / d theta of the whole-batch forward (examples coupled through BN), by a loop
    of autograd calls; BN blocks are (gamma, beta); running statistics move once (pass 1 only)."""
    model = tiny_conv_bn()
    x, y = image_data(n=6)
    loss_fn = nn.CrossEntropyLoss()
    opt = so.make_optimizer("block-fisher", model, seed=2, **ORACLE_HP)
    closure = so.Closure(model, x, y, loss_fn)
    targets = sampled_targets(opt, closure, model, x)
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    out = twin(x)
    losses = nn.functional.cross_entropy(out, targets, reduction="none")
    rows = [torch.autograd.grad(losses[n], list(params.values()), retain_graph=True) for n in range(6)]
    jac = {name: torch.stack([r[i] for r in rows]) for i, name in enumerate(params)}
    grads = dict(zip(params, torch.autograd.grad(loss_fn(out, y), list(params.values())), strict=True))
    blocks = parameter_blocks(model)
    assert blocks["1"] == ["1.weight", "1.bias"] and blocks["3"] == ["3.weight"]
    expected = expected_step(model, grads, jac, blocks, LR, LAM)
    reference_buffers = {n: b.clone() for n, b in twin.named_buffers()}  # after exactly one forward
    opt.step(closure)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-8, atol=1e-11, msg=n)
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, reference_buffers[n], msg=n)


def test_moving_average_momentum_and_warm_start():
    model = tiny_mlp()
    x, y = classification_data(n=8)
    loss_fn = nn.CrossEntropyLoss()
    opt = so.make_optimizer("block-fisher", model, stat_decay=0.75, momentum=0.5)
    c = so.Closure(model, x, y, loss_fn)
    assert opt.warm_start([c, c]) == 2
    warm = opt.module_state["0"]["fisher"].clone()
    opt.step(c)
    assert torch.equal(opt.module_state["0"]["fisher"], warm)  # step 0 after a warm start uses it as is
    gen = torch.Generator().manual_seed(0)
    gen.set_state(opt.generator.get_state())
    targets = c.sample_targets(model(x).detach(), gen)
    jac = per_example_param_grads(model, x, targets, lambda out, t: nn.functional.cross_entropy(out, t))
    j = torch.cat([jac["0.weight"].reshape(8, -1), jac["0.bias"]], dim=1)
    opt.step(c)
    torch.testing.assert_close(opt.module_state["0"]["fisher"], 0.75 * warm + 0.25 * j.t() @ j / 8)
    mom = opt.state[dict(model.named_parameters())["0.bias"]]["momentum_buffer"]
    assert mom.shape == (5,)


def test_size_limit_raises_a_clear_value_error():
    with pytest.raises(ValueError, match="max_block_dim.*'0' \\(2020 parameters\\)"):
        BlockFisher(nn.Sequential(nn.Linear(100, 20)), max_block_dim=2000)
    BlockFisher(nn.Sequential(nn.Linear(256, 20)))  # the Figure 4.1 first layer (5140) fits the default
    with pytest.raises(ValueError, match="max_block_dim"):
        BlockFisher(nn.Sequential(nn.Linear(256, 40)))  # 10280 > 6000


def test_an_overflowed_block_fisher_is_not_stored_and_training_goes_on(caplog):
    """float32, first-layer inputs 1e20 (h stays O(1)): its per-example gradients are ~1e20 and
    finite, their Gram overflows; the block keeps its previous Fisher (counted, logged) and the
    run goes on; with no previous Fisher the step raises before anything changes."""
    model, x, y = huge_input_net()
    loss_fn = nn.CrossEntropyLoss()
    opt = so.make_optimizer("block-fisher", model, lr=0.0, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(so.NonFiniteError, match="no previous Fisher to keep"):
        opt.step(so.Closure(model, x, y, loss_fn))
    assert not opt.module_state and all(
        torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
    )
    opt.step(so.Closure(model, x * 1e-20, y, loss_fn))
    kept = {b: st["fisher"].clone() for b, st in opt.module_state.items()}
    with caplog.at_level("WARNING", logger="secondorder"):
        opt.step(so.Closure(model, x, y, loss_fn))
    assert torch.equal(opt.module_state["0"]["fisher"], kept["0"])
    assert not torch.equal(opt.module_state["2"]["fisher"], kept["2"])  # the finite block moves on
    assert opt.stats.diagnostics["skipped_statistics"] == {"0": 1}
    assert any("previous statistics are kept" in r.getMessage() for r in caplog.records)
    assert all(bool(torch.isfinite(st["fisher"]).all()) for st in opt.module_state.values())
