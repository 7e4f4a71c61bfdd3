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


@pytest.mark.slow
@pytest.mark.parametrize("problem,row", CASES, ids=[f"{p}-{r.name}" for p, r in CASES])
def test_thesis_values_stay_finite_for_30_steps(problem, row):
    torch.set_num_threads(1)
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
