"""Likelihoods: inference from losses, per-example losses, output Hessians, sampled Fisher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.capture.likelihood import BatchReduction, Family

LOSSES = [
    (nn.CrossEntropyLoss(), Family.CATEGORICAL),
    (nn.CrossEntropyLoss(reduction="sum"), Family.CATEGORICAL),
    (nn.BCEWithLogitsLoss(), Family.BERNOULLI),
    (nn.BCEWithLogitsLoss(reduction="sum"), Family.BERNOULLI),
    (nn.MSELoss(), Family.GAUSSIAN),
    (nn.MSELoss(reduction="sum"), Family.GAUSSIAN),
    (so.losses.SummedBCEWithLogitsLoss(), Family.BERNOULLI),
    (so.losses.HalfSquaredErrorLoss(), Family.GAUSSIAN),
]


def outputs_and_targets(family, m=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, d, generator=g, dtype=torch.float64)
    if family is Family.CATEGORICAL:
        t = torch.randint(0, d, (m,), generator=g)
    elif family is Family.BERNOULLI:
        t = torch.rand(m, d, generator=g, dtype=torch.float64).round()
    else:
        t = torch.randn(m, d, generator=g, dtype=torch.float64)
    return z, t


@pytest.mark.parametrize("loss_fn,family", LOSSES)
def test_per_example_losses_reduce_to_the_loss(loss_fn, family):
    lik = so.infer_likelihood(loss_fn)
    assert lik.family is family
    z, t = outputs_and_targets(family)
    per = lik.per_example_loss(z, t)
    r = 1 / z.shape[0] if lik.reduction is BatchReduction.MEAN else 1.0
    torch.testing.assert_close(r * per.sum(), loss_fn(z, t))


@pytest.mark.parametrize("loss_fn,family", LOSSES)
def test_hessian_is_the_hessian_of_the_per_example_loss(loss_fn, family):
    lik = so.infer_likelihood(loss_fn)
    z, t = outputs_and_targets(family)
    hess = lik.hessian(z)
    for n in range(z.shape[0]):
        tn = t[n : n + 1]
        exact = torch.func.hessian(lambda zn, tn=tn: lik.per_example_loss(zn.unsqueeze(0), tn).sum())(z[n])
        torch.testing.assert_close(hess[n], exact)
    s = lik.sqrt_hessian(z)
    torch.testing.assert_close(s @ s.transpose(1, 2), hess)


def test_bernoulli_hessian_is_s_times_one_minus_s_not_s():
    lik = so.infer_likelihood(so.losses.SummedBCEWithLogitsLoss())
    z = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    s = torch.sigmoid(z[0])
    torch.testing.assert_close(lik.hessian(z)[0], torch.diag(s * (1 - s)))


@pytest.mark.parametrize("loss_fn,family", LOSSES)
def test_sampled_fisher_converges_to_its_expectation(loss_fn, family):
    """Monte Carlo: E_t~p[(dl/dz)(dl/dz)^T] = Likelihood.fisher (diag(p) - pp^T for softmax, ...)."""
    lik = so.infer_likelihood(loss_fn)
    z, _ = outputs_and_targets(family, m=3, d=3, seed=4)
    draws = 40000
    zz = z.repeat(draws, 1).requires_grad_(True)
    gen = torch.Generator().manual_seed(7)
    t = lik.sample(zz, gen)
    (grad,) = torch.autograd.grad(lik.per_example_loss(zz, t).sum(), zz)
    grad = grad.reshape(draws, 3, 3)
    mc = torch.einsum("kni,knj->nij", grad, grad) / draws
    exact = lik.fisher(z)
    scale = exact.abs().max()
    assert (mc - exact).abs().max() < 0.03 * scale
    if lik.scale(z) == 1.0 or family is Family.GAUSSIAN:
        torch.testing.assert_close(exact, lik.hessian(z))  # Fisher = GGN for the thesis conventions


def test_categorical_fisher_is_diag_p_minus_ppT():
    lik = so.infer_likelihood(nn.CrossEntropyLoss())
    z = torch.tensor([[0.1, 2.0, -1.0]], dtype=torch.float64)
    p = torch.softmax(z[0], 0)
    torch.testing.assert_close(lik.fisher(z)[0], torch.diag(p) - torch.outer(p, p))


def test_gaussian_sampling_matches_the_loss_scale():
    """|z - t|^2 is the NLL of N(z, I/2): standard deviation 1/sqrt(2), not the published code's 0.5."""
    lik = so.infer_likelihood(nn.MSELoss(reduction="sum"))
    z = torch.zeros(200000, 1, dtype=torch.float64)
    t = lik.sample(z, torch.Generator().manual_seed(0))
    assert abs(float(t.std()) - 2**-0.5) < 5e-3
    half = so.infer_likelihood(so.losses.HalfSquaredErrorLoss())
    assert abs(float(half.sample(z, torch.Generator().manual_seed(0)).std()) - 1.0) < 5e-3


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=torch.ones(3)),
        nn.BCEWithLogitsLoss(pos_weight=torch.ones(2)),
        nn.MSELoss(reduction="none"),
        nn.L1Loss(),
    ],
)
def test_unsupported_losses_are_named(loss_fn):
    with pytest.raises(ValueError, match="loss_fn"):
        so.infer_likelihood(loss_fn)


def test_batch_factor():
    assert so.infer_likelihood(nn.CrossEntropyLoss()).batch_factor(7) == 7
    assert so.infer_likelihood(nn.CrossEntropyLoss(reduction="sum")).batch_factor(7) == 1
