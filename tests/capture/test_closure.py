"""so.Closure: the torch closure contract and the richer interface."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secondorder as so
from tests.helpers import classification_data, image_data, tiny_conv_bn, tiny_mlp


@pytest.mark.parametrize(
    "opt_cls,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.Adam, dict(lr=0.01))]
)
def test_unmodified_torch_optimizers_follow_the_hand_written_loop(opt_cls, kw):
    x, y = classification_data()
    loss_fn = nn.CrossEntropyLoss()
    a = tiny_mlp()
    b = copy.deepcopy(a)
    opt_a, opt_b = opt_cls(a.parameters(), **kw), opt_cls(b.parameters(), **kw)
    for i in range(5):
        xb, yb = x[i * 4 : i * 4 + 8], y[i * 4 : i * 4 + 8]
        la = opt_a.step(so.Closure(a, xb, yb, loss_fn))
        opt_b.zero_grad()
        lb = loss_fn(b(xb), yb)
        lb.backward()
        opt_b.step()
        assert float(la) == float(lb.detach())
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_call_zeroes_grads_and_returns_detached_loss():
    x, y = classification_data()
    model = tiny_mlp()
    c = so.Closure(model, x, y, nn.CrossEntropyLoss())
    c()
    first = [p.grad.clone() for p in model.parameters()]
    loss = c()
    assert not loss.requires_grad
    for g, p in zip(first, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)  # not accumulated


def test_sampled_pass_leaves_grad_untouched():
    x, y = classification_data()
    model = tiny_mlp()
    c = so.Closure(model, x, y, nn.CrossEntropyLoss())
    c()
    before = [p.grad.clone() for p in model.parameters()]
    result = c.forward()
    sampled = c.sampled_loss(result.outputs, torch.Generator().manual_seed(0))
    grads = c.grad(sampled, [p for p in model.parameters()])
    assert all(g is not None for g in grads)
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b, p.grad)


def test_sampled_targets_come_from_the_given_generator():
    x, y = classification_data()
    model = tiny_mlp()
    c = so.Closure(model, x, y, nn.CrossEntropyLoss())
    out = c.forward().outputs
    t1 = c.sample_targets(out, torch.Generator().manual_seed(3))
    t2 = c.sample_targets(out, torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and t1.dtype == torch.long and t1.shape == y.shape


def test_functional_access_and_loss_at_match_the_model():
    x, y = classification_data()
    model = tiny_mlp()
    c = so.Closure(model, x, y, nn.CrossEntropyLoss())
    params = c.named_parameters()
    f = c.functional()
    torch.testing.assert_close(f(params, x), model(x))
    torch.testing.assert_close(c.loss_at(), nn.CrossEntropyLoss()(model(x), y))
    shifted = {n: p + 0.1 for n, p in params.items()}
    with torch.no_grad():
        ref = copy.deepcopy(model)
        for p in ref.parameters():
            p.add_(0.1)
    torch.testing.assert_close(c.loss_at(shifted), nn.CrossEntropyLoss()(ref(x), y))
    # JVP through the functional form
    tangent = {n: torch.ones_like(p) for n, p in params.items()}
    _, jvp = torch.func.jvp(lambda p: f(p, x), (params,), (tangent,))
    assert jvp.shape == (x.shape[0], 3)


def test_loss_at_leaves_batchnorm_statistics_alone():
    x, y = image_data()
    model = tiny_conv_bn()
    before = copy.deepcopy(model.state_dict())
    so.Closure(model, x, y, nn.CrossEntropyLoss()).loss_at()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batch_factor_and_likelihood():
    x, y = classification_data(n=10)
    c = so.Closure(tiny_mlp(), x, y, nn.CrossEntropyLoss())
    assert c.batch_size == 10 and c.batch_factor == 10
    c2 = so.Closure(tiny_mlp(), x, y, lambda o, t: (o - 1).pow(2).mean())
    c2()  # first-order use needs no likelihood
    with pytest.raises(ValueError, match="loss_fn"):
        _ = c2.likelihood


def test_bad_arguments():
    x, y = classification_data()
    with pytest.raises(TypeError, match="model"):
        so.Closure("not a model", x, y, nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="loss_fn"):
        so.Closure(tiny_mlp(), x, y, 3)
