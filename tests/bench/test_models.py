"""Networks and problems: exact widths and parameter counts, the initial loss, augmentation, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from secondorder.bench import models as M
from secondorder.bench import problems as P
from secondorder.bench.dataset import Dataset


def _linear_widths(model: nn.Module) -> list[int]:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [layers[0].in_features] + [m.out_features for m in layers]


@pytest.mark.parametrize("name", ["mnist", "faces", "curves"])
def test_autoencoder_widths_and_activations(name: str) -> None:
    widths = M.AUTOENCODER_WIDTHS[name]
    model = M.autoencoder(widths)
    assert _linear_widths(model) == widths
    assert M.num_parameters(model) == sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    # ReLU after every hidden layer except the linear code layer; linear outputs (logits)
    kinds = [type(m).__name__ for m in model]
    code = widths.index(min(widths))
    expected = []
    for i in range(len(widths) - 1):
        expected.append("Linear")
        if i + 1 not in (code, len(widths) - 1):
            expected.append("ReLU")
    assert kinds == expected


def test_table_widths() -> None:
    assert M.AUTOENCODER_WIDTHS["mnist"] == [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    assert M.AUTOENCODER_WIDTHS["faces"] == [625, 2000, 1000, 500, 30, 500, 1000, 2000, 625]
    assert M.AUTOENCODER_WIDTHS["curves"] == [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]


def test_autoencoder_initial_loss_is_784_ln2() -> None:
    """docs/notes.md §12.18: summed BCE at the default init is about 784 ln 2 (logits near 0)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.as_tensor(
        (rng.uniform(size=(256, 784)) < 0.13) * rng.uniform(size=(256, 784)), dtype=torch.float32
    )
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = M.autoencoder(M.AUTOENCODER_WIDTHS["mnist"])
    with torch.no_grad():
        loss = float(P.base_loss(P.get("mnist"))(model(x), x))
    assert loss == pytest.approx(784 * math.log(2), rel=0.1)


def test_resnet32_parameter_count_and_structure() -> None:
    model = M.resnet32(10)
    assert M.num_parameters(model) == 464_154  # He et al. 2016: 0.46M
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31 and all(c.bias is None for c in convs)  # 31 conv + 1 FC = 32 layers
    assert sum(isinstance(m, M.ShortcutA) for m in model.modules()) == 2  # only where the shape changes
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    wide = M.resnet32(100, width=4)
    assert [b.conv2.out_channels for b in wide.layers][::5] == [64, 128, 256]
    assert wide(x).shape == (2, 100)


def test_option_a_shortcut_is_subsample_and_zero_pad() -> None:
    x = torch.randn(2, 4, 8, 8)
    out = M.ShortcutA(4, 8, 2)(x)
    assert out.shape == (2, 8, 4, 4)
    torch.testing.assert_close(out[:, 2:6], x[:, :, ::2, ::2])
    assert (out[:, :2] == 0).all() and (out[:, 6:] == 0).all()


def test_vgg16_bn() -> None:
    model = M.vgg16_bn(10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 13 and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert len(fcs) == 1 and (fcs[0].in_features, fcs[0].out_features) == (512, 10)
    assert M.num_parameters(model) == 14_728_266
    assert all((c.bias == 0).all() for c in convs)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    narrow = M.vgg16_bn(100, width=1 / 8)
    convs = [m for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    assert narrow(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="width"):
        M.vgg16_bn(10, width=0)


def test_classifiers() -> None:
    assert _linear_widths(P.get("mnist-mlp").build(10)) == [784, 500, 10]
    assert _linear_widths(P.get("cifar10-mlp").build(10)) == [3072, 400, 400, 10]
    webspam = P.get("webspam").build(2)
    assert _linear_widths(webspam) == [254, 400, 400, 1]
    assert sum(isinstance(m, nn.Sigmoid) for m in webspam) == 2


def test_augment_crop_and_flip() -> None:
    """Each output is a 32x32 window of the zero-padded image, possibly mirrored."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    pad = torch.tensor([-1.0, -2.0, -3.0]).view(1, 3, 1, 1)
    out = P.augment(x, pad, g)
    padded = pad.expand(64, 3, 40, 40).clone()
    padded[:, :, 4:36, 4:36] = x
    flips = 0
    for n in range(64):
        windows = [padded[n, :, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        direct = any(torch.equal(out[n], w) for w in windows)
        mirrored = any(torch.equal(out[n].flip(2), w) for w in windows)
        assert direct or mirrored
        flips += int(mirrored and not direct)
    assert 10 < flips < 54


def test_prepare_cifar_normalisation_and_pad_value() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(8, 3, 32, 32)).astype(np.float32)
    ds = Dataset("cifar10", x, x[:4], rng.integers(0, 10, 8), rng.integers(0, 10, 4), num_classes=10)
    prep = P.prepare(P.get("cifar10-resnet32"), ds)
    mean, std = (np.array(v) for v in P.CIFAR_NORMALISATION["cifar10"])
    np.testing.assert_allclose(prep.x_train.numpy()[:, 1], (x[:, 1] - mean[1]) / std[1], rtol=1e-5, atol=1e-6)
    # a black pixel in pixel space
    torch.testing.assert_close(prep.pad_value.view(3), torch.tensor(-mean / std, dtype=torch.float32))
    assert prep.augment and prep.t_train.dtype == torch.long


def test_prepare_standardises_classifier_inputs() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(50, 254)).astype(np.float32)
    x[:, 0] = 0.25  # a constant feature: std floored at 1/sqrt(254), centred to 0
    ds = Dataset("webspam", x, x[:10], rng.integers(0, 2, 50), rng.integers(0, 2, 10), num_classes=2)
    prep = P.prepare(P.get("webspam"), ds)
    np.testing.assert_allclose(prep.x_train.numpy()[:, 1:].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(prep.x_train.numpy()[:, 1:].std(0), 1, atol=1e-4)
    assert (prep.x_train[:, 0] == 0).all()
    assert prep.t_train.shape == (50, 1) and prep.t_train.dtype == torch.float32


def test_metrics_oracles() -> None:
    """Training loss = mean of per-batch means over full batches; test error = per-pixel MSE of sigmoid(z)."""
    torch.manual_seed(0)
    prob = P.get("curves")
    x = torch.rand(250, 784)
    data = P.Prepared(x, x, x[:130], x[:130], 0, False, None, {})
    model = M.autoencoder(M.AUTOENCODER_WIDTHS["curves"])
    loss_fn = P.base_loss(prob)
    with torch.no_grad():
        z = model(x)
        per_example = nn.functional.binary_cross_entropy_with_logits(z, x, reduction="none").sum(1)
        expected_loss = per_example[:200].view(2, 100).mean(1).mean()  # 2 full batches of 100, 50 dropped
        expected_err = ((torch.sigmoid(z[:100]) - x[:100]) ** 2).mean()  # 1 full test batch of 100
    assert P.train_loss(prob, model, loss_fn, data, 100) == pytest.approx(float(expected_loss), rel=1e-5)
    assert P.test_error(prob, model, data, 100) == pytest.approx(float(expected_err), rel=1e-5)


def test_l2_term_is_in_the_loss_not_in_the_output_gradients() -> None:
    torch.manual_seed(0)
    model = M.autoencoder([6, 4, 2, 4, 6])
    loss_fn, lik = P.make_loss(P.get("curves"), model, 1e-2)
    x = torch.rand(5, 6)
    z = model(x)
    base = P.base_loss(P.get("curves"))(z, x)
    penalty = sum(float(p.detach().pow(2).sum()) for p in model.parameters())
    assert float(loss_fn(z, x).detach()) == pytest.approx(float(base.detach()) + 0.5e-2 * penalty, rel=1e-6)
    g_reg = torch.autograd.grad(loss_fn(z, x), z, retain_graph=True)[0]
    g_base = torch.autograd.grad(base, z)[0]
    torch.testing.assert_close(g_reg, g_base)
    assert lik.family.value == "bernoulli"
