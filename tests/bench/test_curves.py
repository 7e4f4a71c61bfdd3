"""The offline CURVES generator: calibration bands of docs/datasets.md §1.3, determinism, prefixes, cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from secondorder.bench import curves as CV
from secondorder.bench import data as D

SMALL = CV.CurvesParams(n_train=2000, n_test=1000)


@pytest.fixture(scope="module")
def small() -> CV.CurvesData:
    return CV.generate(SMALL)


def test_calibration_bands(small: CV.CurvesData) -> None:
    """PCA-18 test error per image in [5, 7] (the paper's 5.90) and mean pixel in [0.04, 0.07]."""
    cal = CV.calibration(small)
    assert 5.0 <= cal["pca18_test_error"] <= 7.0
    assert 0.04 <= cal["mean_pixel"] <= 0.07
    assert cal["pca6_test_error"] > cal["pca18_test_error"]
    assert 0.7 <= cal["below_1e-3_fraction"] <= 0.9  # "mostly black", very non-Gaussian pixels


def test_images_are_valid(small: CV.CurvesData) -> None:
    assert small.x_train.shape == (2000, 784) and small.x_test.shape == (1000, 784)
    assert small.x_train.dtype == np.float32
    assert small.x_train.min() >= 0 and small.x_train.max() <= 1
    assert (small.x_train.max(1) > 0.5).all()  # every image carries a visible stroke
    lo, hi = SMALL.lo, SMALL.hi
    assert small.latent_train.shape == (2000, 6)
    assert small.latent_train.min() >= lo and small.latent_train.max() <= hi


def test_pca_error_oracle() -> None:
    """Data in a k-dimensional affine subspace: PCA-k reconstructs it exactly; PCA-0 leaves the variance."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((50, 3)))[0].T
    x = rng.standard_normal((400, 3)) @ basis + 0.5
    t = rng.standard_normal((100, 3)) @ basis + 0.5
    assert CV.pca_test_error(x, t, 3) == pytest.approx(0.0, abs=1e-20)
    assert CV.pca_test_error(x, t, 0) == pytest.approx(float(((t - x.mean(0)) ** 2).sum(1).mean()))


def test_stroke_gain_is_one_for_a_long_straight_line() -> None:
    """Normalisation: an (almost) infinitely long straight stroke peaks at ``gain`` before clipping."""
    p = CV.CurvesParams(lo=0.0, hi=1.0, sigma=1.1, gain=0.5, samples=2000)
    line = np.array([[[0.0, 0.5], [0.5, 0.5], [1.0, 0.5]]])  # horizontal, through pixel row 13.5
    img = CV.render(line, p).reshape(28, 28)
    expected = 0.5 * np.exp(-(0.5**2) / (2 * 1.1**2))  # pixel centres 13 and 14 are 0.5 px away
    assert img[13, 14] == pytest.approx(expected, rel=2e-3)


def test_deterministic_and_prefix(small: CV.CurvesData) -> None:
    again = CV.generate(SMALL)
    np.testing.assert_array_equal(again.x_train, small.x_train)
    assert again.sha256 == small.sha256
    prefix = CV.generate(CV.CurvesParams(n_train=300, n_test=100))
    np.testing.assert_array_equal(prefix.x_train, small.x_train[:300])
    np.testing.assert_array_equal(prefix.x_test, small.x_test[:100])
    other = CV.generate(CV.CurvesParams(n_train=300, n_test=100, seed=1))
    assert not np.array_equal(other.x_train, prefix.x_train)


def test_parabola_family_and_min_chord() -> None:
    p = CV.CurvesParams(family="parabola", lo=0.18, hi=0.82, sigma=1.0, min_chord=0.3, n_train=200, n_test=50)
    d = CV.generate(p)
    pts = d.latent_train.reshape(-1, 3, 2)
    assert (np.linalg.norm(pts[:, 2] - pts[:, 0], axis=1) >= 0.3).all()
    assert 0 < d.x_train.mean() < 0.2


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="lo < hi"):
        CV.CurvesParams(lo=0.5, hi=0.4)
    with pytest.raises(ValueError, match="bezier|parabola|CurveFamily"):
        CV.CurvesParams(family="spline")
    with pytest.raises(ValueError, match="sigma and gain"):
        CV.CurvesParams(sigma=0)


def test_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = CV.CurvesParams(n_train=100, n_test=20)
    first = CV.load_or_generate(p, tmp_path)
    files = list(tmp_path.glob("curves-synth-v1-*.npz"))
    assert len(files) == 1 and p.key() in files[0].name

    def fail(_p: CV.CurvesParams) -> CV.CurvesData:
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(CV, "generate", fail)
    second = CV.load_or_generate(p, tmp_path)
    np.testing.assert_array_equal(second.x_train, first.x_train)
    assert second.sha256 == first.sha256
    monkeypatch.setenv("SECONDORDER_CACHE", str(tmp_path / "env"))
    assert CV.cache_dir() == tmp_path / "env"


def test_resolve_labels_curves_synth(tmp_path: Path) -> None:
    opts = D.DataOptions(cache_dir=tmp_path, curves=CV.CurvesParams(n_train=50, n_test=10))
    ds = D.resolve("curves", opts)
    assert ds.synthetic and ds.name == "curves-synth-v1" and "synthetic" in ds.label
    assert ds.info["params"]["sigma"] == 1.1 and ds.stand_in_for == "CURVES"
