"""SMW solves (5.6)/(5.7) and the Kronecker Gram identity (5.3.3, Algorithm 22) against float64 oracles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secondorder.capture import hooks as C
from secondorder.linalg import LinAlgError
from secondorder.linalg.smw import (
    block_diagonal,
    kron_gram,
    kron_jvp,
    kron_vjp,
    smw_apply,
    smw_weights,
    smw_weights_singular,
)

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _psd_blocks(n: int, k: int, gen: torch.Generator, singular: bool) -> torch.Tensor:
    """``n`` PSD ``k x k`` blocks: softmax Hessians ``diag(p) - p p^T`` (singular) or SPD ones."""
    if singular:
        p = torch.softmax(torch.randn(n, k, generator=gen, dtype=DT), dim=1)
        return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    m = torch.randn(n, k, k, generator=gen, dtype=DT)
    return m @ m.transpose(1, 2) + 0.1 * torch.eye(k, dtype=DT)


@pytest.mark.parametrize("case", ["ng", "gn-invertible", "gn-singular"])
def test_smw_apply_equals_the_dense_solve(case):
    gen = _gen(0)
    n_rows, k, n = 6, 3, 40
    lam, s = 0.37, 1.0 / n_rows
    if case == "ng":
        jac = torch.randn(n_rows, n, generator=gen, dtype=DT)
        hess = None
        dense_h = torch.eye(n_rows, dtype=DT)
    else:
        jac = torch.randn(n_rows * k, n, generator=gen, dtype=DT)
        hess = _psd_blocks(n_rows, k, gen, singular=case == "gn-singular")
        dense_h = torch.block_diag(*hess)
    g = torch.randn(n, generator=gen, dtype=DT)
    expected = torch.linalg.solve(lam * torch.eye(n, dtype=DT) + s * jac.t() @ dense_h @ jac, g)
    got = smw_apply(jac, g, lam, s, hess, singular=case == "gn-singular")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_singular_form_57_also_solves_an_invertible_system():
    gen = _gen(1)
    jac = torch.randn(12, 25, generator=gen, dtype=DT)
    hess = _psd_blocks(4, 3, gen, singular=False)
    g = torch.randn(25, generator=gen, dtype=DT)
    a = smw_apply(jac, g, 0.2, 0.25, hess, singular=True)
    b = smw_apply(jac, g, 0.2, 0.25, hess, singular=False)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_softmax_hessian_is_singular_so_56_does_not_apply():
    """Why (5.7) exists: ``H^-1`` of (5.6) does not exist for ``diag(p) - p p^T``."""
    h = _psd_blocks(1, 4, _gen(2), singular=True)[0]
    assert torch.linalg.matrix_rank(h) == 3


def test_weights_reject_non_finite_input():
    gram = torch.eye(3, dtype=DT)
    jg = torch.tensor([1.0, float("nan"), 0.0], dtype=DT)
    with pytest.raises(LinAlgError):
        smw_weights(gram, jg, 1.0, 1.0)
    with pytest.raises(LinAlgError):
        smw_weights_singular(gram * float("inf"), jg.nan_to_num(), 1.0, 1.0, torch.ones(3, 1, 1, dtype=DT))


def test_block_diagonal():
    blocks = torch.arange(12, dtype=DT).view(3, 2, 2)
    torch.testing.assert_close(block_diagonal(blocks), torch.block_diag(*blocks))


def _explicit_rows(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Rows ``vec(sum_t g_ijt a_it^T)`` by a loop (the definition)."""
    n, k, t, _ = g.shape
    rows = []
    for i in range(n):
        for j in range(k):
            m = sum(torch.outer(g[i, j, s], a[i, s]) for s in range(t))
            rows.append(m.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("n,k,t", [(5, 1, 1), (4, 3, 1), (3, 2, 4)])
def test_kron_gram_jvp_vjp_equal_the_explicit_rows(n, k, t):
    gen = _gen(3)
    d_o, d = 4, 6
    g = torch.randn(n, k, t, d_o, generator=gen, dtype=DT)
    a = torch.randn(n, t, d, generator=gen, dtype=DT)
    rows = _explicit_rows(g, a)
    torch.testing.assert_close(kron_gram(g, a), rows @ rows.t(), rtol=1e-12, atol=1e-12)
    mat = torch.randn(d_o, d, generator=gen, dtype=DT)
    torch.testing.assert_close(kron_jvp(g, a, mat).reshape(-1), rows @ mat.reshape(-1))
    u = torch.randn(n, k, generator=gen, dtype=DT)
    torch.testing.assert_close(kron_vjp(g, a, u).reshape(-1), rows.t() @ u.reshape(-1))


def test_hadamard_identity_53_for_ng_equals_gram_of_per_example_gradients():
    """(J J^T)_ij = sum_l (g_i^T g_j)(v_i^T v_j + 1), J = per-example gradients (torch.func)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(7, 5, dtype=DT)
    y = torch.randint(0, 3, (7,))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_i(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per_ex = torch.func.vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0))(params, x, y)
    jac = torch.cat([v.reshape(7, -1) for v in per_ex.values()], dim=1)

    # the factors: layer inputs v and g = dl_i/dh (m * autograd grad of the mean loss)
    hs, vs = [], []
    a = x
    for layer in model:
        if isinstance(layer, nn.Linear):
            vs.append(a)
            a = layer(a)
            a.retain_grad()
            hs.append(a)
        else:
            a = layer(a)
    nn.functional.cross_entropy(a, y).backward()
    gram = 0
    for v, h in zip(vs, hs, strict=True):
        g = 7 * h.grad
        gram = gram + (g @ g.t()) * (v @ v.t() + 1)  # (G G^T) o (V V^T + 1), 5.3.3
        torch.testing.assert_close(
            kron_gram(g.view(7, 1, 1, -1), torch.cat([v, torch.ones(7, 1, dtype=DT)], 1).view(7, 1, -1)),
            (g @ g.t()) * (v @ v.t() + 1),
        )
    torch.testing.assert_close(gram, jac @ jac.t(), rtol=1e-10, atol=1e-12)


def test_algorithm_22_gn_gram_equals_output_jacobian_product():
    """sum_l (V^(l-1) (x) 1) o (Hhat_l^T Hhat_l) = J J^T with J the stacked output Jacobians (jacrev)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)).double()
    n, k = 4, 3
    x = torch.randn(n, 4, dtype=DT)
    names = [nm for nm, _ in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def out(flat):
        pieces = flat.split([s.numel() for s in shapes])
        ps = {nm: t.view(s) for nm, t, s in zip(names, pieces, shapes, strict=True)}
        return torch.func.functional_call(model, ps, (x,)).reshape(-1)

    jac = torch.func.jacrev(out)(flat0)  # (n k, n_params)

    vs, hs = [], []
    a = x
    for layer in model:
        if isinstance(layer, nn.Linear):
            vs.append(a)
            a = layer(a)
            hs.append(a)
        else:
            a = layer(a)
    eye = torch.eye(k, dtype=DT).unsqueeze(1).expand(k, n, k)
    gram = 0
    for layer, v, h in zip([model[0], model[2]], vs, hs, strict=True):
        hhat = torch.autograd.grad(a, h, eye, is_grads_batched=True, retain_graph=True)[0]  # (k, n, d_o)
        abar = C.input_rows(layer, v).view(n, 1, -1)
        gram = gram + kron_gram(hhat.transpose(0, 1).unsqueeze(2), abar)
    # our parameter order is (W1, b1, W2, b2); J J^T does not depend on the column order
    torch.testing.assert_close(gram, jac @ jac.t(), rtol=1e-10, atol=1e-12)


def test_gram_with_locations_equals_conv_per_example_gradients():
    """A conv layer: rows vec(sum_t g_t abar_t^T) on im2col patches equal torch.func per-example gradients."""
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(27, 2)).double()
    x = torch.randn(4, 2, 6, 6, dtype=DT)
    y = torch.randint(0, 2, (4,))

    def loss_i(p, xi, yi):
        h = torch.func.functional_call(conv, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(head(h), yi.unsqueeze(0))

    params = {n: p.detach() for n, p in conv.named_parameters()}
    per_ex = torch.func.vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0))(params, x, y)
    pairs = zip(per_ex["weight"], per_ex["bias"], strict=True)
    rows = torch.cat([C.grad_matrix(conv, w, b).reshape(1, -1) for w, b in pairs])

    h = conv(x)
    g = torch.autograd.grad(nn.functional.cross_entropy(head(h), y, reduction="sum"), h)[0]
    t = C.num_locations(conv, h)
    a = C.input_rows(conv, x).view(4, t, -1)
    gk = C.output_rows(conv, g).view(4, 1, t, -1)
    torch.testing.assert_close(kron_gram(gk, a), rows @ rows.t(), rtol=1e-10, atol=1e-12)
    mat = torch.randn(3, a.shape[-1], dtype=DT)
    torch.testing.assert_close(kron_jvp(gk, a, mat).reshape(-1), rows @ mat.reshape(-1))
