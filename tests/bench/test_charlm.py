"""The charlm problem (not from the thesis): character windows of an offline corpus, the token loss,
the character transformer, and ``secondorder bench --problem charlm`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import secondorder as so
from secondorder import cli
from secondorder.bench import data as D
from secondorder.bench import presets as PR
from secondorder.bench import problems as P
from secondorder.bench import text as TX
from secondorder.bench.dataset import DatasetError
from secondorder.capture.likelihood import BatchReduction, Family


def test_python_docs_windows_are_the_text_shifted_by_one():
    ds = TX.python_docs()
    text = TX.python_docs_text()
    vocab = ds.info["vocabulary"]
    assert ds.num_classes == len(vocab) == len(set(text)) and list(vocab) == sorted(vocab)
    assert ds.x_train.shape[1] == ds.y_train.shape[1] == TX.CONTEXT and ds.x_train.dtype == np.int64
    np.testing.assert_array_equal(ds.x_train[:, 1:], ds.y_train[:, :-1])
    np.testing.assert_array_equal(ds.x_train[1:, 0], ds.y_train[:-1, -1])  # consecutive windows
    decoded = "".join(vocab[i] for i in ds.x_train[0])
    assert decoded == text[: TX.CONTEXT]
    split = int(TX.TRAIN_FRACTION * len(text))
    assert "".join(vocab[i] for i in ds.x_test[0]) == text[split : split + TX.CONTEXT]
    assert ds.info["characters"] == len(text) and len(ds.info["sha256"]) == 64
    assert D.resolve("text", D.DataOptions()).name == "python-docs"  # the offline default


def test_a_text_file_in_the_data_dir_and_its_errors(tmp_path: Path):
    (tmp_path / "input.txt").write_text("abcab" * 200, encoding="utf-8")
    ds = D.resolve("text", D.DataOptions(data_dir=tmp_path))
    assert ds.name == "text" and ds.num_classes == 3 and ds.info["vocabulary"] == "abc"
    with pytest.raises(DatasetError, match=r"input.txt not found(.|\n)*directory searched: .*empty"):
        TX.text_file(tmp_path / "empty")
    (tmp_path / "input.txt").write_bytes(b"\xff\xfe" * 100)
    with pytest.raises(DatasetError, match="not UTF-8"):
        TX.text_file(tmp_path)
    with pytest.raises(DatasetError, match="too little text"):
        TX.from_text("abc", "tiny", "")


def test_the_token_loss_is_the_categorical_likelihood_of_sequences():
    loss = so.losses.TokenCrossEntropyLoss()
    like = so.infer_likelihood(loss)
    assert like.family is Family.CATEGORICAL and like.reduction is BatchReduction.MEAN
    logits, targets = torch.randn(2 * 5, 7), torch.randint(0, 7, (2, 5))
    torch.testing.assert_close(
        loss(logits, targets), nn.functional.cross_entropy(logits, targets.reshape(-1))
    )


def test_the_model_is_causal_and_modeled_but_for_its_positions():
    torch.manual_seed(0)
    model = P.get("charlm").build(11)
    x = torch.randint(0, 11, (2, 64))
    y = model(x).reshape(2, 64, 11)
    x2 = x.clone()
    x2[:, 40:] = (x2[:, 40:] + 1) % 11  # the future does not change the past
    torch.testing.assert_close(model(x2).reshape(2, 64, 11)[:, :40], y[:, :40])
    with pytest.warns(so.optim.kronecker.UnmodeledParametersWarning, match="pos"):
        opt = so.make_optimizer("kfac", model)
    assert [n for n, what in opt.coverage().items() if what.startswith("fallback")] == ["pos"]
    norms = ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"]
    assert all(opt.coverage()[f"{n}.weight"] == f"LayerNormBlock('{n}')" for n in norms)
    with pytest.warns(so.optim.kronecker.UnmodeledParametersWarning, match="norm"):
        opt = so.make_optimizer("kbfgs", model)  # no LayerNorm block in K-BFGS
    fallback = sorted(n for n, what in opt.coverage().items() if what.startswith("fallback"))
    assert fallback == sorted([f"{n}.{p}" for n in norms for p in ("weight", "bias")] + ["pos"])


def test_the_default_suite_has_no_per_example_method():
    methods = {r.method for r in PR.rows_for(PR.default_suite("charlm"), "charlm")}
    assert methods == {"sgd", "adam", "kfac", "kfac-ef", "kbfgs", "kbfgsl", "tnt", "tnt-ef", "shampoo"}
    assert not methods & P.PER_EXAMPLE_METHODS
    assert "one output row per example" in P.unsupported(P.get("charlm"), "smw-ng")


def test_bench_charlm_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    args = ["bench", "--problem", "charlm", "--time-budget", "1", "--train-size", "96", "--test-size", "32"]
    out = tmp_path / "out"
    assert cli.main([*args, "--optimizers", "adamw,kfac,kbfgs", "--out", str(out)]) == 0
    doc = json.loads((out / "summary.json").read_text())
    assert {r["optimizer"] for r in doc["runs"]} == {"adamw", "kfac", "kbfgs"}
    assert all(r["status"] == "done" and np.isfinite(r["final_train_loss"]) for r in doc["runs"])
    assert "cross-entropy per character" in (out / "summary.md").read_text()
    capsys.readouterr()
    assert cli.main([*args, "--optimizers", "smw-ng", "--out", str(tmp_path / "o2")]) == 2
    assert "smw-ng needs one output row per example" in capsys.readouterr().err
