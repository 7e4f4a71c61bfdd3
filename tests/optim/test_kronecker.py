"""Which layers KFAC and K-BFGS model: coverage(), layers= / exclude=, the fallback warning, the
construction errors, and attention's functionally used projections (optim.kronecker)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import secondorder as so
from secondorder.capture import hooks as C
from secondorder.optim.kronecker import FALLBACK_DIAGONAL, UnmodeledParametersWarning
from tests.helpers import classification_data, image_data, tiny_conv_bn, tiny_mlp

KRONECKER = ["kfac", "kfac-ef", "kbfgs", "kbfgsl", "kbfgs20", "kbfgsl20"]


def build(key, model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmodeledParametersWarning)
        return so.make_optimizer(key, model, **kw)


def ln_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()


class TinyLM(nn.Module):
    """Embedding + one causal nn.TransformerEncoderLayer + head: (m, T) tokens -> (m T, V) logits."""

    def __init__(self, vocab: int = 11, d: int = 8, length: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, x):
        return self.head(self.enc(self.emb(x), src_mask=self.mask, is_causal=True)).flatten(0, 1)


def lm_data(n: int = 16, vocab: int = 11, length: int = 6):
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, vocab, (n, length), generator=g)
    return x, torch.roll(x, -1, 1).flatten()


@pytest.mark.parametrize("key", KRONECKER)
def test_coverage_names_the_block_or_the_fallback_of_every_tensor(key):
    model = tiny_conv_bn()
    opt = build(key, model)
    cov = opt.coverage()
    assert list(cov) == [n for n, p in model.named_parameters()]
    assert cov["0.weight"] == cov["0.bias"] == "Conv2dBlock('0')"
    assert cov["3.weight"] == "Conv2dBlock('3')"
    assert cov["7.weight"] == cov["7.bias"] == "LinearBlock('7')"
    bn = ("1.weight", "1.bias", "4.weight", "4.bias")
    if key.startswith("kfac"):  # KFAC models BatchNorm's scale and shift; K-BFGS does not
        assert [cov[n] for n in bn] == ["BatchNormBlock('1')"] * 2 + ["BatchNormBlock('4')"] * 2
        assert opt.other_params == []
    else:
        assert {cov[n] for n in bn} == {FALLBACK_DIAGONAL}
        assert sorted(opt.other_params) == ["1.bias", "1.weight", "4.bias", "4.weight"]


@pytest.mark.parametrize("key", ["kfac", "kbfgs"])
def test_the_fallback_warns_with_the_share_and_the_names(key):
    with pytest.warns(
        UnmodeledParametersWarning, match=r"2 of 6 trainable tensors \(15\.7% .*1\.weight, 1\.bias"
    ) as rec:
        # K-BFGS has no block for LayerNorm; KFAC has one, excluded here
        so.make_optimizer(key, ln_mlp(), **({"exclude": [nn.LayerNorm]} if key == "kfac" else {}))
    assert rec[0].filename == __file__  # points at the caller, not into the library
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        so.make_optimizer(key, tiny_mlp())  # everything modeled: silent


@pytest.mark.parametrize("key", ["kfac", "kbfgsl20"])
def test_layers_and_exclude_by_name_pattern_and_type(key):
    model = tiny_conv_bn()
    bn = ["1", "4"] if key == "kfac" else []  # KFAC models BatchNorm too
    assert build(key, model, exclude="7").modeled_modules == sorted(["0", "3"] + bn)
    assert build(key, model, exclude=[nn.Conv2d]).modeled_modules == sorted(bn + ["7"])
    if bn:
        assert build(key, model, exclude=[nn.Conv2d, nn.BatchNorm2d]).modeled_modules == ["7"]
    assert build(key, model, layers=["[03]"]).modeled_modules == ["0", "3"]
    assert build(key, model, layers=nn.Linear).modeled_modules == ["7"]
    assert build(key, model, layers=["*"], exclude=["0"]).modeled_modules == sorted(["3", "7"] + bn)
    cov = build(key, model, exclude="7").coverage()
    assert cov["7.weight"] == cov["7.bias"] == FALLBACK_DIAGONAL


@pytest.mark.parametrize("key", ["kfac", "kbfgs"])
def test_bad_layer_choices_raise_value_errors_naming_the_argument(key):
    model = tiny_conv_bn()
    with pytest.raises(ValueError, match=r"exclude: expected module names.*got 3"):
        so.make_optimizer(key, model, exclude=[3])
    blocks = "0, 1, 3, 4, 7" if key == "kfac" else "0, 3, 7"
    with pytest.raises(
        ValueError, match=rf"layers: 'nope' matches no layer .*\(layers with a block: {blocks}\)"
    ):
        so.make_optimizer(key, model, layers=["nope"])
    with pytest.raises(ValueError, match="exclude: <class 'torch.nn.modules.rnn.LSTM'> matches no layer"):
        so.make_optimizer(key, model, exclude=nn.LSTM)
    with pytest.raises(
        ValueError, match=r"model: .* has no layer to model \(every modelable layer is excluded\)"
    ):
        so.make_optimizer(key, model, exclude="*")


@pytest.mark.parametrize("key", KRONECKER)
def test_a_model_with_nothing_to_model_is_refused_at_construction(key):
    class Pairwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.bilinear = nn.Bilinear(3, 3, 4)

        def forward(self, x):
            return self.bilinear(x, x)

    with pytest.raises(
        ValueError,
        match=r"model: .* has no layer to model; modules without a block: 'bilinear': no layer block for "
        "Bilinear",
    ):
        so.make_optimizer(key, Pairwise())


def test_unmodeled_modules_give_reasons():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
        nn.BatchNorm2d(4),
        nn.Linear(3, 3),
        nn.MultiheadAttention(4, 2),
        nn.Linear(3, 3),
    )
    model[5].weight.requires_grad_(False)
    why = C.unmodeled_modules(model)
    assert why == {
        "1": "Conv2d with padding (1, 1) with padding_mode='circular' is not supported by Conv2dBlock",
        "5": "Linear with a frozen weight",
    }
    assert list(C.layer_blocks(model)) == ["0[0]", "0[1]", "2", "3", "4", "4.out_proj"]


def test_an_excluded_layer_follows_the_momentum_gradient():
    """kfac with layer '3' excluded: its update is -lr * grad at the first step, and it has no factors."""
    model = tiny_mlp(widths=(6, 5, 3))
    x, y = classification_data()
    opt = build("kfac-ef", model, exclude="2", lr=0.1, fallback="momentum")
    before = model[2].weight.detach().clone()
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    grad = model[2].weight.grad.clone()
    opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))
    torch.testing.assert_close(model[2].weight.detach(), before - 0.1 * grad, rtol=1e-13, atol=1e-14)
    assert "2" not in opt.module_state and "0" in opt.module_state


@pytest.mark.parametrize("key", KRONECKER)
def test_a_transformer_is_modeled_but_for_its_norms(key):
    """nn.MultiheadAttention's projections are captured where they enter F.linear (they raised
    HookNeverFiredError); the embedding and the feed-forward layers have blocks too, and under
    KFAC the LayerNorms."""
    model = TinyLM().double()
    x, y = lm_data()
    opt = build(key, model, **({"lr": 0.01} if "kbfgs" in key else {}))
    norms = ["enc.norm1", "enc.norm2"]
    modeled = ["emb", "enc.self_attn", "enc.self_attn.out_proj", "enc.linear1", "enc.linear2"]
    if key.startswith("kfac"):  # KFAC models the LayerNorms' scale and shift too
        assert opt.modeled_modules == modeled + norms + ["head"]
        assert not any(what.startswith("fallback") for what in opt.coverage().values())
    else:
        assert opt.modeled_modules == modeled + ["head"]
        assert sorted(n for n, what in opt.coverage().items() if what == FALLBACK_DIAGONAL) == [
            "enc.norm1.bias",
            "enc.norm1.weight",
            "enc.norm2.bias",
            "enc.norm2.weight",
        ]
    losses = [float(opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))) for _ in range(15)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_image_model_is_unchanged_by_an_empty_exclude():
    x, y = image_data()
    runs = []
    for kw in ({}, {"exclude": []}):
        model = tiny_conv_bn()
        torch.manual_seed(3)
        opt = build("kfac", model, **kw)
        runs.append([float(opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))) for _ in range(3)])
    assert runs[0] == runs[1]


class TiedLM(nn.Module):
    """The output layer reuses the embedding's weight (tied weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x))).flatten(0, 1)


@pytest.mark.parametrize("key", KRONECKER)
def test_tied_weights_are_refused_by_name_and_train_with_one_use_excluded(key):
    with pytest.raises(
        ValueError, match=r"'emb.weight' is used by the layers 'emb', 'head' \(tied.*exclude=\['head'\]"
    ):
        so.make_optimizer(key, TiedLM())
    model = TiedLM()
    opt = build(key, model, exclude=["head"], **({"lr": 0.01} if "kbfgs" in key else {}))
    assert opt.coverage() == {"emb.weight": "EmbeddingBlock('emb')"}
    x, y = lm_data()
    losses = [float(opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))) for _ in range(10)]
    assert losses[-1] < losses[0]
