"""Figure 4.1 diagnostic end to end on a small configuration, and the synthetic digit generator."""

from __future__ import annotations

import json
import math

import torch

from secondorder.diagnostics import DiagnosticConfig, cosine_to_block_fisher
from secondorder.diagnostics_data import SOURCE, synthetic_digits

SMALL = dict(
    steps=4,
    n_train=400,
    batch_size=100,
    widths=(256, 8, 8, 8, 8, 10),
    warm_start_batches=2,
    grids={"tnt": (0.01, 0.1), "kfac": (0.1,), "shampoo": (1e-3,), "adam": (1e-4,), "sgd": (None,)},
)


def test_small_configuration_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    result = cosine_to_block_fisher(DiagnosticConfig(**SMALL), out_dir=tmp_path)
    assert torch.get_num_threads() == threads  # the run's thread setting is restored
    assert "synthetic" in result["source"] and result["source"] == SOURCE
    assert result["layers"] == ["layer 2", "layer 3", "layer 4", "layer 5"]
    assert set(result["best"]) == {"tnt", "kfac", "shampoo", "adam", "sgd"}
    assert set(result["cosine"]["tnt"]) == {"0.01", "0.1"}
    assert result["best_damping"]["sgd"] is None and result["best_damping"]["tnt"] in (0.01, 0.1)
    for method, per_layer in result["best"].items():
        for layer, series in per_layer.items():
            assert len(series) == 4 and all(-1 - 1e-6 <= v <= 1 + 1e-6 for v in series), (method, layer)
            assert math.isclose(result["mean"][method][layer], sum(series) / 4)
    assert all(math.isfinite(v) for v in result["train_loss"])
    png = tmp_path / "cosine_to_block_fisher.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "cosine_to_block_fisher.json").read_text())
    assert saved["source"] == SOURCE and saved["best"] == result["best"]


def test_directions_are_read_off_along_the_block_fisher_trajectory():
    """With a huge damping the block-Fisher direction is (F + lam I)^-1 m ~ m / lam, the momentum gradient,
    which is exactly SGD-m's direction at the same points: cosine 1 in every layer, at every iteration."""
    cfg = DiagnosticConfig(**dict(SMALL, damping=1e8, lr=1e6, grids={"sgd": (None,)}), dtype=torch.float64)
    result = cosine_to_block_fisher(cfg)
    for series in result["best"]["sgd"].values():
        assert min(series) > 1 - 1e-6


def test_synthetic_digits_are_seeded_in_range_and_learnable():
    x, y = synthetic_digits(1200, seed=3)
    x2, y2 = synthetic_digits(1200, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, synthetic_digits(1200, seed=4)[0])
    assert x.shape == (1200, 256) and x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1
    counts = torch.bincount(y, minlength=10)
    assert int(counts.min()) > 70
    # the classes are distinguishable: a nearest-class-mean classifier on held-out images does well
    train, test = slice(0, 1000), slice(1000, 1200)
    means = torch.stack([x[train][y[train] == c].mean(0) for c in range(10)])
    pred = torch.cdist(x[test], means).argmin(1)
    assert float((pred == y[test]).float().mean()) > 0.6


def test_module_runs_as_a_script_without_a_runpy_warning():
    """``python -m secondorder.diagnostics``: the package imports ``diagnostics`` lazily."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "secondorder.diagnostics", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr
    import secondorder as so

    assert so.diagnostics.cosine_to_block_fisher is cosine_to_block_fisher
    assert "diagnostics" in so.__all__
