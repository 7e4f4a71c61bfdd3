"""The thesis networks: three MLP autoencoders, VGG16-BN, ResNet32 (and ResNet32-4), chapter-5 classifiers.

* Autoencoders (Tables 2.4 / 3.6): ReLU hidden units, a linear code layer (the narrowest),
  linear outputs (logits for the BCE problems, docs/notes.md §11.13), PyTorch default
  ``nn.Linear`` init (docs/notes.md §10).
* VGG16-BN (3.7.2): "model D" with BatchNorm after every conv and one FC layer
  ``512 -> classes``; conv ``W ~ N(0, 2 / (k^2 C_out))``, conv bias 0; FC and BN default.
* ResNet32 (He et al. 2016, Table 6): 3 stages x 5 basic blocks, 16/32/64 channels, convs
  without bias, option-A shortcuts (subsample + zero-pad channels, only where the shape
  changes), ``kaiming_normal_`` (fan-in, ReLU gain) for conv and FC weights. ResNet32-4
  widens every stage by 4 (64/128/256; the stem keeps 16 channels, as wide ResNets do).
* Chapter-5 classifiers (5.8): logistic (sigmoid) hidden units, default init.
* Not from the thesis: :class:`CharTransformer`, the decoder-only character model of ``charlm``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

AUTOENCODER_WIDTHS: dict[str, list[int]] = {
    "mnist": [784, 1000, 500, 250, 30, 250, 500, 1000, 784],
    "faces": [625, 2000, 1000, 500, 30, 500, 1000, 2000, 625],
    "curves": [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784],
}

VGG16_CFG: list[int | str] = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
]


def autoencoder(widths: list[int]) -> nn.Sequential:
    """``Linear`` layers of the given widths; ReLU after each except the code layer and the output."""
    code = widths.index(min(widths))
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i + 1 != code and i + 1 != len(widths) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mlp_classifier(widths: list[int]) -> nn.Sequential:
    """``Linear`` layers with logistic hidden units and a linear output (logits)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def vgg16_bn(num_classes: int = 10, width: float = 1.0) -> nn.Sequential:
    """VGG16 ("model D") with BatchNorm after each conv and a single FC layer (3.7.2).

    ``width`` scales every conv's channel count (``round(v * width)``, at least 1): 1 is the
    thesis network; the tests use a narrow copy (1/8) to run the thesis's values quickly.
    """
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        out = max(1, round(int(v) * width))
        conv = nn.Conv2d(channels, out, 3, padding=1)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (9 * out)))
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    layers += [nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU (convs without bias)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = (
            ShortcutA(in_channels, out_channels, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, Table 6); ``width`` multiplies the stage widths."""

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 5, width: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages: list[nn.Module] = []
        channels = 16
        for i, base in enumerate((16, 32, 64)):
            out = base * width
            for j in range(blocks_per_stage):
                stages.append(BasicBlock(channels, out, 2 if (i > 0 and j == 0) else 1))
                channels = out
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet32(num_classes: int = 10, width: int = 1) -> ResNetCifar:
    return ResNetCifar(num_classes, blocks_per_stage=5, width=width)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class CharTransformer(nn.Module):
    """A decoder-only character model: token embedding + learned positions, ``layers`` causal
    pre-norm ``nn.TransformerEncoderLayer`` blocks (GELU, feed-forward ``4 width``), a final
    LayerNorm and a linear head. ``(m, T)`` tokens -> ``(m T, V)`` next-token logits."""

    def __init__(self, vocab: int, context: int = 64, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.emb(x) + self.pos[:t]
        mask = self.mask[:t, :t]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h)).flatten(0, 1)
