"""SMW-NG, SMW-NG-BD, SMW-GN (Algorithm 23) against dense float64 solves built with torch.func.jacrev.

With ``lr = 1`` one step must be ``theta <- theta - (lam I + s sum_{i in S2} J_i^T H_i J_i)^-1 g``,
``lam = damping + tau``, ``s = 1/N2`` (``N1/N2`` for a batch-sum loss), ``g`` the gradient on
``S1``; ``J_i`` the per-example gradient (NG, ``H_i = 1``) or the output Jacobian (GN,
``H_i`` the likelihood's output Hessian). The dense oracles here are also used by the HF and
LM tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.capture import infer_likelihood, preserved_norm_buffers
from secondorder.optim.smw import couples_examples
from tests.helpers import tiny_conv_bn, tiny_mlp

DT = torch.float64
LAM, TAU = 0.3, 1e-3


# ----------------------------------------------------------------------- problems
def mlp_problem(likelihood: str, n: int = 8, seed: int = 0):
    """A 3-layer tanh MLP (6-5-4-3) with a loss of each family."""
    model = tiny_mlp(seed=seed)
    gen = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(n, 6, generator=gen, dtype=DT)
    if likelihood == "categorical":
        return model, x, torch.randint(0, 3, (n,), generator=gen), nn.CrossEntropyLoss()
    if likelihood == "categorical-sum":
        return model, x, torch.randint(0, 3, (n,), generator=gen), nn.CrossEntropyLoss(reduction="sum")
    if likelihood == "bernoulli":
        y = torch.randint(0, 2, (n, 3), generator=gen).to(DT)
        return model, x, y, so.losses.SummedBCEWithLogitsLoss()
    if likelihood == "gaussian":
        return model, x, torch.randn(n, 3, generator=gen, dtype=DT), so.losses.HalfSquaredErrorLoss()
    if likelihood == "gaussian-mse":
        return model, x, torch.randn(n, 3, generator=gen, dtype=DT), nn.MSELoss()
    raise ValueError(likelihood)


def conv_problem(n: int = 6):
    """Conv2d (explicit rows) + Linear (Kronecker), no BatchNorm."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)
    ).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 2, 6, 6, generator=gen, dtype=DT)
    return model, x, torch.randint(0, 3, (n,), generator=gen), nn.CrossEntropyLoss()


def sequence_problem(n: int = 6):
    """A Linear layer applied at 3 locations (rows vec(sum_t g_t abar_t^T)), then a Linear head."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)).double()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(n, 3, 4, generator=gen, dtype=DT)
    return model, x, torch.randint(0, 3, (n,), generator=gen), nn.CrossEntropyLoss()


def bn_problem(n: int = 8):
    model = tiny_conv_bn()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(n, 2, 6, 6, generator=gen, dtype=DT)
    return model, x, torch.randint(0, 3, (n,), generator=gen), nn.CrossEntropyLoss()


# ----------------------------------------------------------------------- oracles
def flat_grad(model, x, y, loss_fn) -> torch.Tensor:
    """``g`` of the minibatch loss (on a copy: BatchNorm running statistics are not touched)."""
    m = copy.deepcopy(model)
    m.zero_grad()
    loss_fn(m(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in m.parameters()])


def dense_jacobian(model, x, y, loss_fn, kind: str, targets=None):
    """``J`` (``(R, n)``) and ``H`` (``(R, R)``) of ``x`` run as one batch.

    Without BatchNorm: ``torch.func.jacrev`` of the per-example losses (NG) or outputs (GN) as
    functions of the flat parameter vector. With BatchNorm in train mode (examples coupled):
    one ``autograd.grad`` per row on an ordinary forward (jacrev cannot run BatchNorm's
    in-place running-statistics update).
    """
    like = infer_likelihood(loss_fn)
    n = x.shape[0]
    names = [nm for nm, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    t = y if targets is None else targets

    def rows_of(z):
        return like.per_example_loss(z, t) if kind == "ng" else z.reshape(n, -1)

    if not couples_examples(model):
        flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        def f(flat):
            pieces = flat.split([s.numel() for s in shapes])
            ps = {nm: v.view(s) for nm, v, s in zip(names, pieces, shapes, strict=True)}
            return rows_of(torch.func.functional_call(model, ps, (x,))).reshape(-1)

        jac = torch.func.jacrev(f)(flat0)
        with torch.no_grad():
            z = model(x)
    else:
        params = list(model.parameters())
        with preserved_norm_buffers(model):
            z = model(x)
            out = rows_of(z).reshape(-1)
            rows = []
            for r in range(out.numel()):
                gs = torch.autograd.grad(out[r], params, retain_graph=True, allow_unused=True)
                rows.append(
                    torch.cat(
                        [
                            (g if g is not None else torch.zeros_like(p)).reshape(-1)
                            for g, p in zip(gs, params, strict=True)
                        ]
                    )
                )
            jac = torch.stack(rows)
        z = z.detach()
    hess = torch.eye(jac.shape[0], dtype=DT) if kind == "ng" else torch.block_diag(*like.hessian(z))
    return jac, hess


def block_mask(model) -> torch.Tensor:
    """1 on the diagonal blocks of the parameters of each module (SMW-NG-BD), 0 elsewhere."""
    ids = []
    for k, (_, mod) in enumerate(m for m in model.named_modules() if list(m[1].parameters(recurse=False))):
        for p in mod.parameters(recurse=False):
            ids += [k] * p.numel()
    ids = torch.tensor(ids)
    return (ids[:, None] == ids[None, :]).to(DT)


def dense_direction(
    model,
    x,
    y,
    loss_fn,
    kind: str,
    n2: int | None = None,
    lam: float = LAM + TAU,
    block: bool = False,
    targets=None,
    idx=None,
) -> torch.Tensor:
    """``(lam I + s J^T H J)^-1 g`` with ``J`` on the examples ``idx`` (default the first ``n2``)."""
    n1 = x.shape[0]
    idx = torch.arange(n2 or n1) if idx is None else idx
    n2 = len(idx)
    jac, hess = dense_jacobian(model, x[idx], y[idx], loss_fn, kind, targets)
    like = infer_likelihood(loss_fn)
    s = n1 / (like.batch_factor(n1) * n2)
    b = s * jac.t() @ hess @ jac
    if block:
        b = b * block_mask(model)
    g = flat_grad(model, x, y, loss_fn)
    return torch.linalg.solve(lam * torch.eye(len(g), dtype=DT) + b, g)


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def one_step(name, model, x, y, loss_fn, **hp):
    opt = so.make_optimizer(name, model, lr=1.0, damping=LAM, tau=TAU, **hp)
    before = flat_params(model)
    opt.step(so.Closure(model, x, y, loss_fn))
    return opt, before - flat_params(model)


METHOD_KIND = {"smw-ng": ("ng", False), "smw-ng-bd": ("ng", True), "smw-gn": ("gn", False)}
LIKELIHOODS = ["categorical", "bernoulli", "gaussian"]


# ----------------------------------------------------------------------- the step
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("name", list(METHOD_KIND))
def test_one_step_equals_the_dense_damped_solve(name, likelihood):
    model, x, y, loss_fn = mlp_problem(likelihood)
    kind, block = METHOD_KIND[name]
    expected = dense_direction(model, x, y, loss_fn, kind, block=block)
    _, step = one_step(name, model, x, y, loss_fn, curvature_batch=1.0)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("likelihood", ["categorical-sum", "gaussian-mse"])
@pytest.mark.parametrize("name", ["smw-ng", "smw-gn"])
def test_other_reductions_and_feature_scales(name, likelihood):
    """Batch-sum loss: s = N1/N2; nn.MSELoss(mean): H = (2/d) I and a 1/d per-example loss."""
    model, x, y, loss_fn = mlp_problem(likelihood)
    kind, _ = METHOD_KIND[name]
    expected = dense_direction(model, x, y, loss_fn, kind, n2=4)
    _, step = one_step(name, model, x, y, loss_fn, curvature_batch=4)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", list(METHOD_KIND))
def test_default_curvature_batch_is_the_first_half(name):
    model, x, y, loss_fn = mlp_problem("categorical", n=10)
    kind, block = METHOD_KIND[name]
    expected = dense_direction(model, x, y, loss_fn, kind, n2=5, block=block)
    _, step = one_step(name, model, x, y, loss_fn)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-11)
    # a fraction gives the same N2
    model2, *_ = mlp_problem("categorical", n=10)
    _, step2 = one_step(name, model2, x, y, loss_fn, curvature_batch=0.5)
    torch.testing.assert_close(step2, step, rtol=0, atol=0)


def test_random_curvature_subsample_comes_from_the_optimizer_generator():
    model, x, y, loss_fn = mlp_problem("categorical", n=10)
    idx = torch.randperm(10, generator=torch.Generator().manual_seed(7))[:4].sort().values
    assert not torch.equal(idx, torch.arange(4))
    expected = dense_direction(model, x, y, loss_fn, "ng", idx=idx)
    _, step = one_step("smw-ng", model, x, y, loss_fn, curvature_batch=4, curvature_sample="random", seed=7)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["smw-ng", "smw-ng-bd"])
def test_sampled_fisher_uses_targets_drawn_with_the_optimizer_generator(name):
    model, x, y, loss_fn = mlp_problem("categorical")
    like = infer_likelihood(loss_fn)
    with torch.no_grad():
        z = model(x[:4])
    targets = like.sample(z, torch.Generator().manual_seed(11))
    assert not torch.equal(targets, y[:4])
    expected = dense_direction(model, x, y, loss_fn, "ng", n2=4, block=name.endswith("bd"), targets=targets)
    _, step = one_step(name, model, x, y, loss_fn, curvature_batch=4, fisher="sampled", seed=11)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", list(METHOD_KIND))
def test_conv_layers_through_explicit_rows_and_linear_through_kronecker(name):
    model, x, y, loss_fn = conv_problem()
    opt = so.make_optimizer(name, model)
    assert list(opt.kron_layers) == ["3"]  # the Linear head; the conv goes through explicit rows
    kind, block = METHOD_KIND[name]
    expected = dense_direction(model, x, y, loss_fn, kind, n2=3, block=block)
    _, step = one_step(name, model, x, y, loss_fn, curvature_batch=3)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", list(METHOD_KIND))
def test_linear_layer_on_a_sequence_sums_over_locations(name):
    model, x, y, loss_fn = sequence_problem()
    opt = so.make_optimizer(name, model)
    assert list(opt.kron_layers) == ["0", "3"]
    kind, block = METHOD_KIND[name]
    expected = dense_direction(model, x, y, loss_fn, kind, n2=3, block=block)
    _, step = one_step(name, model, x, y, loss_fn, curvature_batch=3)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", list(METHOD_KIND))
def test_batchnorm_in_train_mode_uses_the_jacobian_of_s2_as_one_batch(name):
    model, x, y, loss_fn = bn_problem()
    assert couples_examples(model)
    kind, block = METHOD_KIND[name]
    expected = dense_direction(model, x, y, loss_fn, kind, n2=4, block=block)
    # running statistics after the step = after exactly one training forward on S1 (pass 1)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)
    _, step = one_step(name, model, x, y, loss_fn, curvature_batch=4)
    torch.testing.assert_close(step, expected, rtol=1e-8, atol=1e-10)
    for (n, b), (_, b_ref) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(b, b_ref), n


def test_batchnorm_in_eval_mode_does_not_couple_and_linear_layers_use_kronecker():
    model, x, y, loss_fn = bn_problem()
    model.eval()
    assert not couples_examples(model)
    expected = dense_direction(model, x, y, loss_fn, "gn", n2=4)
    _, step = one_step("smw-gn", model, x, y, loss_fn, curvature_batch=4)
    torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------- bookkeeping
def test_pass_counts():
    model, x, y, loss_fn = mlp_problem("categorical")
    opt = so.make_optimizer("smw-ng", model)
    opt.step(so.Closure(model, x, y, loss_fn))
    # the empirical-Fisher rows of Linear layers come from pass 1: pass 1 + the trial forward
    assert (opt.stats.forward_passes, opt.stats.backward_passes) == (2, 1)
    opt = so.make_optimizer("smw-gn", model)
    opt.step(so.Closure(model, x, y, loss_fn))
    # pass 1, the S2 forward, the trial forward; pass 1 and m_L = 3 backpropagated unit vectors
    assert (opt.stats.forward_passes, opt.stats.backward_passes) == (3, 4)
    assert opt.stats.diagnostics["damping"] == pytest.approx(1.0 + 1e-3)


def test_step_does_not_touch_grad_beyond_pass_one():
    model, x, y, loss_fn = mlp_problem("categorical")
    g = flat_grad(model, x, y, loss_fn)
    opt = so.make_optimizer("smw-gn", model)
    opt.step(so.Closure(model, x, y, loss_fn))
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), g)


@pytest.mark.parametrize(
    "arg,value",
    [
        ("curvature_batch", 1.5),
        ("curvature_batch", True),
        ("curvature_batch", 0.0),
        ("fisher", "true"),
        ("curvature_sample", "last"),
        ("lm_epsilon", 0.5),
        ("lm_boost", 0.9),
        ("lm_drop", 1.5),
        ("accept_threshold", 0.3),
        ("accept_threshold", 0.0),
        ("model_reduction", "exact"),
        ("tau", 0.0),
    ],
)
def test_invalid_values_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=arg):
        so.make_optimizer("smw-ng", tiny_mlp(), **{arg: value})


def test_smw_gn_has_no_fisher_option():
    with pytest.raises(ValueError, match="fisher"):
        so.make_optimizer("smw-gn", tiny_mlp(), fisher="sampled")
