"""Every thesis row at the thesis's values on every thesis problem: 30 steps, every value finite.

The oracles prove the formulas on tiny networks; this proves the values the thesis trains with
do not produce a NaN on the thesis's networks (the K-BFGS ResNet32 failure passed every oracle).
Each row runs with the pieces of the benchmark (network, loss, closures, warm start,
augmentation) on generated data of the problem's shape (``secondorder.bench.smoke``), at a reduced batch, with
1/8 of VGG16-BN's channels and 1/4 of the FACES autoencoder's hidden units, so that the whole
matrix fits in CI. ``benchmarks/thesis_smoke.py``
runs the full sizes.
"""

from __future__ import annotations

import pytest
import torch

from secondorder.bench import smoke

#: batch and VGG width used here (the full sizes are in benchmarks/thesis_smoke.py)
BATCH = {"autoencoder": 100, "cnn": 16, "classifier": None}
VGG_WIDTH = 1 / 8
#: hidden widths of the FACES autoencoder (2000-1000-500 -> 500-250-125): the full one costs 0.5 s
#: per KFAC step on one thread; the others run at full width
AE_WIDTH = {"faces": 1 / 4}
STEPS = 30
#: the K-BFGS keys on the CNNs run 60 steps (three curvature updates at T = 20)
KBFGS = ("kbfgs", "kbfgsl", "kbfgs20", "kbfgsl20")

#: rows whose thesis values diverge on the generated data at the sizes used here; a listed
#: ``(problem, row)`` must diverge, so the list cannot go stale silently. At the thesis's size
#: (batch 1000, full width) all three stay finite for 30 steps (`benchmarks/thesis_smoke.py
#: --problems faces`, README "Thesis values on every problem").
KNOWN_DIVERGENT: dict[tuple[str, str], str] = {
    ("faces", "kbfgs"): "lr 0.03, lam 1 (Table 3.5): inf loss at step 21 with batch 100",
    ("faces", "kbfgsl"): "lr 0.03, lam 1 (Table 3.5): inf loss at step 21 with batch 100",
    ("faces", "tnt"): "lr 1e-6, eps 0.003 (Table 4.3): NaN loss at step 28 with batch 100",
}

CASES = [(p, r) for p in smoke.PROBLEMS for r in smoke.method_rows(p)]


@pytest.fixture
def one_thread():
    """One torch thread for the run (as ``secondorder bench``), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("problem,row", CASES, ids=[f"{p}-{r.name}" for p, r in CASES])
def test_thesis_values_stay_finite_for_30_steps(problem, row, one_thread):
    kind = smoke.P.get(problem).kind
    steps = 60 if kind == "cnn" and row.method in KBFGS else STEPS
    result = smoke.run(
        problem, row, steps=steps, batch=BATCH[kind], vgg_width=VGG_WIDTH, ae_width=AE_WIDTH.get(problem, 1.0)
    )
    if (problem, row.name) in KNOWN_DIVERGENT:
        assert not smoke.finite_result(result), f"{problem} {row.name} no longer diverges: update the list"
        return
    assert result.status == "done", result.error
    assert result.steps == steps
    assert smoke.nonfinite_updates(result) == 0, result.diagnostics
    assert result.state_finite and smoke.finite_result(result), result.losses
    if kind == "cnn" and row.method in KBFGS:  # the convs feed BatchNorm: the rule kept H_G finite
        diag = result.diagnostics["kbfgs"]
        *convs, head = list(diag)  # every modeled layer but the classifier head is a conv
        assert len(convs) in (13, 31)
        assert all(diag[n]["h_g_uninformative"] == 3 for n in convs)
        assert diag[head]["h_g_uninformative"] == 0 and diag[head]["h_g_updates"] == 3


# ------------------------------------------------------------------ the smoke helpers themselves
@pytest.mark.parametrize("problem", smoke.PROBLEMS)
def test_rows_are_distinct_and_method_rows_cover_every_method(problem):
    everything = smoke.rows(problem)
    keys = [(r.method, sorted(r.hp.items()), r.l2) for r in everything]
    assert len(keys) == len({repr(k) for k in keys}) and len({r.label for r in everything}) == len(everything)
    per_method = smoke.method_rows(problem)
    assert {r.method for r in per_method} == {r.method for r in everything}
    default = smoke.PR.default_suite(problem)
    defaults = [r.label for r in smoke.PR.rows_for(default, problem)]
    assert [r.label for r in per_method[: len(defaults)]] == defaults


@pytest.mark.parametrize("problem", ["mnist", "faces", "curves", "cifar100-resnet32", "mnist-mlp", "webspam"])
def test_stand_in_has_the_problem_shape_and_is_labelled_synthetic(problem):
    data = smoke.stand_in(problem, 40, n_test=8)
    assert data.synthetic and len(data.x_train) == 40 and len(data.x_test) == 8
    prob = smoke.problem_at(problem)
    prepared = smoke.P.prepare(prob, data)  # raises on a wrong shape
    out = prob.build(prepared.num_classes)(prepared.x_train[:4])
    assert out.shape[0] == 4 and bool(torch.isfinite(out).all())
    if problem == "faces":  # standardised per image, as FACES
        x = torch.as_tensor(data.x_train)
        torch.testing.assert_close(x.mean(1), torch.zeros(40), atol=1e-5, rtol=0)
        torch.testing.assert_close(x.std(1), torch.ones(40), atol=1e-4, rtol=0)


def test_narrow_networks_keep_inputs_outputs_and_the_code_layer():
    faces = smoke.problem_at("faces", ae_width=0.25).build(0)
    widths = [m.out_features for m in faces if isinstance(m, torch.nn.Linear)]
    assert widths == [500, 250, 125, 30, 125, 250, 500, 625] and faces[0].in_features == 625
    vgg = smoke.problem_at("cifar10-vgg16", vgg_width=1 / 8).build(10)
    assert max(m.out_channels for m in vgg.modules() if isinstance(m, torch.nn.Conv2d)) == 64


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="unknown problem 'resnet99'"):
        smoke.rows("resnet99")
    row = smoke.method_rows("curves")[0]
    for kwargs, name in [({"steps": 0}, "steps"), ({"steps": 2, "batch": 0}, "batch")]:
        with pytest.raises(ValueError, match=name):
            smoke.run("curves", row, **kwargs)
    with pytest.raises(ValueError, match="ae_width"):
        smoke.problem_at("faces", ae_width=0)


def test_finite_result_sees_a_refused_update():
    result = smoke.SmokeResult("done", [1.0, 0.5], True, {"kbfgs": {"0": {"h_a_nonfinite": 1}}}, 0.0)
    assert smoke.nonfinite_updates(result) == 1 and not smoke.finite_result(result)
    assert smoke.finite_result(smoke.SmokeResult("done", [1.0], True, {}, 0.0))
    assert not smoke.finite_result(smoke.SmokeResult("done", [1.0], False, {}, 0.0))
    assert not smoke.finite_result(smoke.SmokeResult("diverged", [1.0], True, {}, 0.0, "nan"))
