"""Damped BFGS (linalg/bfgs.py): the identities and bounds of chapters 2-3, as float64 property tests.

Oracles: the product form of (2.6)/(3.11) written out densely, Sherman-Morrison (Theorem 1),
spectral norms (Lemma 5), and the inequalities the thesis proves for Powell, DD, D_P D_LM and
D_P(I) D_LM.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secondorder.linalg import bfgs as B

F64 = torch.float64
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def bfgs_product_form(h, s, y):
    """(2.6): ``(I - rho s y^T) H (I - rho y s^T) + rho s s^T``, written out."""
    rho = 1.0 / (s @ y)
    eye = torch.eye(len(s), dtype=h.dtype)
    left = eye - rho * torch.outer(s, y)
    return left @ h @ left.t() + rho * torch.outer(s, s)


def spd(d, gen, scale=1.0):
    m = torch.randn(d, d, generator=gen, dtype=F64)
    return scale * (m @ m.t() / d + 0.2 * torch.eye(d, dtype=F64))


@st.composite
def problems(draw):
    """A pair ``(s, y)`` of any sign of curvature and an SPD ``H``, in float64."""
    d = draw(st.integers(1, 7))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mode = draw(st.sampled_from(["random", "negative", "positive", "small-y", "parallel"]))
    ss = 10 ** draw(st.floats(-1.5, 1.5))
    sy = 10 ** draw(st.floats(-1.5, 1.5))
    s = torch.randn(d, generator=gen, dtype=F64) * ss
    y = torch.randn(d, generator=gen, dtype=F64) * sy
    if mode == "negative":  # s^T y < 0: negative curvature along s
        y = -sy * s / s.norm() + 0.1 * y
        if s @ y >= 0:
            y = -y
    elif mode == "positive":
        y = spd(d, gen, sy) @ s
    elif mode == "small-y":
        y = 1e-6 * y
    elif mode == "parallel":
        y = sy * s
    h = spd(d, gen, 10 ** draw(st.floats(-1.0, 1.0)))
    return s, y, h


def is_spd(h):
    sym = 0.5 * (h + h.t())
    _, info = torch.linalg.cholesky_ex(sym)
    return int(info) == 0 and bool(torch.allclose(h, h.t(), rtol=1e-9, atol=1e-12 * float(h.abs().max())))


def close(a, b, rtol=1e-8):
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) <= rtol * scale


# ------------------------------------------------------------------------------ BFGS
@SETTINGS
@given(problems())
def test_bfgs_is_the_product_form_and_satisfies_the_secant_equation(p):
    s, y, h = p
    if not float(s @ y) > 1e-3 * float(s.norm() * y.norm()):  # (2.6) needs s^T y > 0
        y = y + (2e-3 * float(s.norm() * y.norm()) - float(s @ y)) / float(s @ s) * s + 1e-3 * s
    hp = B.bfgs_update(h, s, y)
    assert close(hp, bfgs_product_form(h, s, y))
    assert close(hp @ y, s, rtol=1e-7)  # secant: H+ y = s
    assert is_spd(hp)
    h2 = h.clone()
    assert B.bfgs_update_(h2, s, y, h @ y) is h2 and close(h2, hp, rtol=1e-12)


# --------------------------------------------------------------------------- dampings
@SETTINGS
@given(problems(), st.floats(0.05, 0.95))
def test_powell_on_h_gives_mu1_curvature(p, mu1):
    s, y, h = p
    hy = h @ y
    s_t, theta = B.powell_damping(s, y, hy, mu1)
    yhy = float(y @ hy)
    assert float(s_t @ y) >= mu1 * yhy - 1e-9 * abs(yhy)
    if float(theta) < 1:  # damped: equality
        assert math.isclose(float(s_t @ y), mu1 * yhy, rel_tol=1e-8)
    else:
        assert torch.equal(s_t, s)


@SETTINGS
@given(problems(), st.floats(0.05, 0.95), st.floats(1e-3, 1.0))
def test_dd_keeps_h_positive_definite_and_bounds_s_over_y(p, mu1, mu2):
    s, y, h = p
    s_t, y_t = B.double_damping(s, y, h @ y, mu1, mu2)
    sts = float(s_t @ s_t)
    assert float(s_t @ y_t) >= mu2 * sts * (1 - 1e-9)  # Powell with B = I, 0 < mu2 <= 1
    assert float(s_t @ y_t) > 0
    assert is_spd(B.bfgs_update(h, s_t, y_t))


@SETTINGS
@given(problems(), st.floats(0.05, 0.95), st.floats(-3.0, 3.0))
def test_dp_dlm_gives_mu2_times_s_squared_for_any_mu2(p, mu1, log_mu2):
    s, y, h = p
    mu2 = 10**log_mu2  # any mu2 > 0 (Algorithm 8), not only (0, 1]
    s_t, y_t = B.dp_dlm(s, y, h @ y, mu1, mu2)
    assert float(s_t @ y_t) >= mu2 * float(s_t @ s_t) * (1 - 1e-9)
    assert torch.allclose(y_t, y + mu2 * s_t)
    assert is_spd(B.bfgs_update(h, s_t, y_t))


@SETTINGS
@given(problems(), st.floats(0.05, 0.95), st.floats(-2.0, 2.0))
def test_lemma4_bounds_of_dpi_dlm(p, mu1, log_mu2):
    s, y, _ = p
    mu2 = 10**log_mu2
    s_t, y_t = B.dpi_dlm(s, y, mu1, mu2)
    sty = float(s_t @ y_t)
    assert sty > 0
    assert float(s_t @ s_t) / sty <= (1 / mu2) * (1 + 1e-9)
    assert float(y_t @ y_t) / sty <= mu2 * (1 / mu1 + 2) * (1 + 1e-9)  # 1/mu3
    # D_P(I) D_LM is D_P D_LM with H = I/mu2
    s2, y2 = B.dp_dlm(s, y, y / mu2, mu1, mu2)
    assert torch.equal(s_t, s2) and torch.equal(y_t, y2)


@SETTINGS
@given(problems(), st.floats(0.05, 0.95), st.floats(-2.0, 2.0))
def test_lemma5_bounds_on_b_and_h(p, mu1, log_mu2):
    s, y, h = p
    mu2 = 10**log_mu2
    mu3 = mu1 / (mu2 * (1 + 2 * mu1))
    s_t, y_t = B.dpi_dlm(s, y, mu1, mu2)  # satisfies Lemma 4, the hypothesis of Lemma 5
    hp = B.bfgs_update(h, s_t, y_t)
    norm = lambda m: float(torch.linalg.eigvalsh(0.5 * (m + m.t())).abs().max())  # noqa: E731
    b, bp = torch.linalg.inv(h), torch.linalg.inv(hp)
    assert norm(bp) <= (norm(b) + 1 / mu3) * (1 + 1e-7)
    assert norm(hp) <= ((1 + 1 / math.sqrt(mu2 * mu3)) ** 2 * norm(h) + 1 / mu2) * (1 + 1e-7)


@SETTINGS
@given(problems(), st.floats(0.05, 0.95), st.floats(0.01, 1.0), st.floats(-2.0, 2.0), st.booleans())
def test_dampings_and_bfgs_are_invariant_to_scaling_the_pair(p, mu1, mu2, log_c, negative):
    s, y, h = p
    c = (-1 if negative else 1) * 10**log_c
    for damp in (
        lambda s_, y_: B.double_damping(s_, y_, h @ y_, mu1, mu2),
        lambda s_, y_: B.dp_dlm(s_, y_, h @ y_, mu1, mu2),
        lambda s_, y_: B.dpi_dlm(s_, y_, mu1, mu2),
    ):
        s1, y1 = damp(s, y)
        s2, y2 = damp(c * s, c * y)
        assert close(s2, c * s1) and close(y2, c * y1)
        assert close(B.bfgs_update(h, s2, y2), B.bfgs_update(h, s1, y1), rtol=1e-7)


# ---------------------------------------------------------------------------- skip rules
def test_dd_skip_is_algorithm5_line17():
    h = torch.diag(torch.tensor([1.0, 4.0], dtype=F64))
    mu1 = 0.2
    y = torch.tensor([0.0, 1.0], dtype=F64)  # y^T H y = 4
    keep = torch.tensor([0.0, 0.81], dtype=F64)  # s^T y = 0.81 >= 0.2 * 4
    drop = torch.tensor([0.0, 0.79], dtype=F64)
    assert not B.dd_skip(keep, y, h @ y, mu1)
    assert B.dd_skip(drop, y, h @ y, mu1)
    assert float(B.curvature_ratio(keep, y, h @ y)) == pytest.approx(4 / 0.81)
    # after Powell damping (and no second step) the test holds with equality: not a skip
    s = torch.tensor([0.3, -0.1], dtype=F64)
    s_t, theta = B.powell_damping(s, y, h @ y, mu1)
    assert float(theta) < 1 and not B.dd_skip(s_t, y, h @ y, mu1)
    assert B.dd_skip(s_t, y, h @ y, mu1 * (1 + 1e-9))


def test_code_skip_rules_of_chapter_2():
    s = torch.tensor([1.0, 0.0], dtype=F64)
    assert B.code_skip_reason(s, -s, 1.0) == "s^T y <= 0"
    assert B.code_skip_reason(s, torch.zeros(2, dtype=F64), 1.0) == "s^T y <= 0"
    y = torch.tensor([1e-3, 5.0], dtype=F64)  # s^T y = 1e-3, s^T s = 1
    assert B.code_skip_reason(s, y, 1.0) is None
    assert B.code_skip_reason(s, y, 100.0) == "norm gate"  # 1e-3 <= 1e-4 * 1 * 100
    big = torch.tensor([1e200, 0.0], dtype=F64)  # s^T s overflows, s^T y = 1e50 > 0
    assert B.code_skip_reason(big, torch.tensor([1e-150, 0.0], dtype=F64), 1.0) == "s^T s is not finite"
    assert B.positive_curvature(s, y) and not B.positive_curvature(s, -y)


@SETTINGS
@given(problems(), st.floats(-2.0, 2.0))
def test_norm_gate_is_invariant_to_the_pair_scale_but_not_to_the_gradient_scale(p, log_c):
    # Joint scaling (c s, c y) scales both sides of s^T y <= 1e-4 s^T s |g| by c^2; the gate
    # does depend on |g| itself, which no other rule does.
    s, y, _ = p
    c = 10**log_c
    sy, ss = float(s @ y), float(s @ s)
    if sy <= 0:
        return
    g_gate = sy / (1e-4 * ss)  # the gradient norm at which the gate switches
    assert B.code_skip_reason(s, y, 0.5 * g_gate) is None
    assert B.code_skip_reason(s, y, 2.0 * g_gate) == "norm gate"
    assert B.code_skip_reason(c * s, c * y, 0.5 * g_gate) is None
    assert B.code_skip_reason(c * s, c * y, 2.0 * g_gate) == "norm gate"


# ------------------------------------------------------------------ Theorem 1 (2.4)
@SETTINGS
@given(st.integers(1, 7), st.integers(0, 2**31 - 1), st.floats(0.01, 10.0))
def test_theorem1_hessian_action_equals_sherman_morrison(d, seed, c):
    gen = torch.Generator().manual_seed(seed)
    a_mat = spd(d, gen)
    a = torch.randn(d, generator=gen, dtype=F64)
    h = torch.linalg.inv(a_mat)
    a_plus = a_mat + c * torch.outer(a, a)
    s, y = B.hessian_action_pair(h, a, lambda v: a_plus @ v, 0.0)  # s = H a, y = A+ s
    target = torch.linalg.inv(a_plus)
    sherman_morrison = h - torch.outer(h @ a, h @ a) / (1 / c + a @ h @ a)
    assert close(target, sherman_morrison, rtol=1e-8)
    for phi in (0.0, 0.3, 1.0):  # DFP, a Broyden member, BFGS
        assert close(B.broyden_update(h, s, y, phi), target, rtol=1e-7)
    assert close(B.bfgs_update(h, s, y), target, rtol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem1_moving_average_needs_h_over_beta_and_the_unscaled_form_is_not_exact(seed):
    gen = torch.Generator().manual_seed(seed)
    d, beta = 5, 0.9
    a_mat = spd(d, gen)
    a = torch.randn(d, generator=gen, dtype=F64)
    h = torch.linalg.inv(a_mat)
    a_plus = beta * a_mat + (1 - beta) * torch.outer(a, a)  # A+ = beta A + (1 - beta) a a^T
    target = torch.linalg.inv(a_plus)
    # scaled: H/beta = (beta A)^-1, then the rank-one update (1 - beta) a a^T is Theorem 1
    s, y = B.hessian_action_pair(h / beta, a, lambda v: a_plus @ v, 0.0)
    assert close(B.bfgs_update(h / beta, s, y), target, rtol=1e-8)
    # unscaled (what chapter 2 uses, 2.4): NOT the inverse of A+
    s, y = B.hessian_action_pair(h, a, lambda v: a_plus @ v, 0.0)
    gap = float((B.bfgs_update(h, s, y) - target).abs().max()) / float(target.abs().max())
    assert gap > 1e-3, gap


@pytest.mark.parametrize("homogeneous", [True, False])
def test_gram_action_is_the_dense_product(homogeneous):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(11, 4, generator=gen, dtype=F64)
    rows = torch.cat([x, torch.ones(11, 1, dtype=F64)], 1) if homogeneous else x
    v = torch.randn(rows.shape[1], generator=gen, dtype=F64)
    dense = rows.t() @ rows / 3.0
    assert torch.allclose(B.gram_action(x, v, 1 / 3.0, homogeneous), dense @ v, rtol=1e-12)
    s, y = B.hessian_action_pair(torch.eye(rows.shape[1], dtype=F64), v, lambda u: dense @ u, 0.5)
    assert torch.equal(s, v) and torch.allclose(y, dense @ v + 0.5 * v)


# ------------------------------------------------------------------- pair normalisation
DAMPINGS = {
    "dp-dlm": lambda s, y, h, mu1, mu2: B.dp_dlm(s, y, h @ y, mu1, mu2),
    "dd": lambda s, y, h, mu1, mu2: B.double_damping(s, y, h @ y, mu1, mu2),
    "dpi-dlm": lambda s, y, h, mu1, mu2: B.dpi_dlm(s, y, mu1, mu2),
}


def _pair(kind):
    gen = torch.Generator().manual_seed(11)
    s = torch.randn(6, generator=gen, dtype=F64)
    noise = torch.randn(6, generator=gen, dtype=F64)
    y = spd(6, gen) @ s if kind == "positive" else -0.3 * s + 0.2 * noise  # s^T y < 0: Powell damps
    return s, y, spd(6, gen, 2.0)


def _damped_bfgs(s, y, h, rule, normalize):
    if normalize:
        s, y = B.normalize_pair(s, y)
    s_t, y_t = DAMPINGS[rule](s, y, h, 0.2, 0.5)
    return B.bfgs_update(h, s_t, y_t)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("exponent", [-20, -12, -6, 0, 6, 12, 20])
@pytest.mark.parametrize("rule", sorted(DAMPINGS))
@pytest.mark.parametrize("kind", ["positive", "negative"])
def test_damped_bfgs_of_a_normalised_pair_at_any_scale_equals_scale_one(dtype, exponent, rule, kind):
    s, y, h = _pair(kind)
    reference = _damped_bfgs(s, y, h, rule, normalize=False)  # float64, scale 1
    c = 10.0**exponent
    got = _damped_bfgs((c * s).to(dtype), (c * y).to(dtype), h.to(dtype), rule, normalize=True)
    assert bool(torch.isfinite(got).all())
    rtol = 2e-5 if dtype == torch.float32 else 1e-12
    assert close(got.double(), reference, rtol=rtol)


@pytest.mark.parametrize("exponent", [-20, 20])
def test_without_normalisation_float32_pairs_far_from_scale_one_break_bfgs(exponent):
    """What the normalisation is for: rho^2 or s^T y leaves float32's range (the ResNet32 NaN)."""
    s, y, h = _pair("positive")
    c = 10.0**exponent
    raw = _damped_bfgs((c * s).float(), (c * y).float(), h.float(), "dp-dlm", normalize=False)
    assert not bool(torch.isfinite(raw).all())


def test_normalisation_changes_no_digit_of_the_update():
    """A power-of-two factor is exact: the normalised update is bit-for-bit the plain one at scale 1."""
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, F64):
        for _ in range(20):
            s = torch.randn(9, generator=gen, dtype=F64).to(dtype)
            y = (torch.randn(9, generator=gen, dtype=F64) * 3 + s).to(dtype)
            h = spd(9, gen).to(dtype)
            plain = _damped_bfgs(s, y, h, "dp-dlm", normalize=False)
            c = B.pair_scale(s, y)
            assert float(c) == 2.0 ** round(math.log2(float(c)))
            assert torch.equal(_damped_bfgs(s, y, h, "dp-dlm", normalize=True), plain)
            sn, yn = B.normalize_pair(s, y)
            assert 0.25 <= float(sn.abs().max() * yn.abs().max()) < 2.0


def test_pair_scale_of_zero_and_extreme_vectors_is_finite():
    zero = torch.zeros(3)
    assert float(B.pair_scale(zero, zero)) == 1.0
    tiny = torch.full((3,), 1e-44)  # float32 subnormals
    c = B.pair_scale(tiny, tiny)
    assert bool(torch.isfinite(c)) and float(c) > 1e30
