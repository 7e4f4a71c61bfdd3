"""Chapter-5 methods and the block Fisher on attention models: Gauss-Newton products by double
backward need a ``scaled_dot_product_attention`` kernel that has one (capture.twice_differentiable),
and the SMW methods must not wait for attention's functionally used ``out_proj``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import secondorder as so
from secondorder.capture.closure import twice_differentiable


class AttentionClassifier(nn.Module):
    """Tokens -> embedding -> one nn.TransformerEncoderLayer -> mean over positions -> classes."""

    def __init__(self, vocab: int = 9, d: int = 8, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def data(n: int = 24, vocab: int = 9, length: int = 5):
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, vocab, (n, length), generator=g)
    return x, (x[:, 0] + x[:, -1]).remainder(3)


def test_twice_differentiable_attention_gives_the_same_values_and_a_double_backward():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, 3, generator=g, requires_grad=True) for _ in range(3))
    plain = F.scaled_dot_product_attention(q, k, v)
    with twice_differentiable():
        out = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, plain)
    w = torch.ones_like(out, requires_grad=True)
    (gq,) = torch.autograd.grad(out, q, w, create_graph=True)
    (jv,) = torch.autograd.grad(gq, w, torch.ones_like(gq))  # the R-op of hf
    # against the explicit softmax(q k^T / sqrt(d)) v
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    ref = torch.softmax(q2 @ k2.transpose(-1, -2) / 3**0.5, -1) @ v2
    (rq,) = torch.autograd.grad(ref, q2, w, create_graph=True)
    (rjv,) = torch.autograd.grad(rq, w, torch.ones_like(rq))
    torch.testing.assert_close(jv, rjv)


@pytest.mark.parametrize("key", ["hf", "smw-gn", "smw-ng", "smw-ng-bd", "block-fisher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_second_order_methods_train_an_attention_classifier(key, dtype):
    model = AttentionClassifier().to(dtype)
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's vmap fallback notice for the fused kernel
        opt = so.make_optimizer(key, model)
        losses = [float(opt.step(so.Closure(model, x, y, nn.CrossEntropyLoss()))) for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
