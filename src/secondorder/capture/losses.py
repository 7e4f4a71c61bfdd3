"""Losses with the thesis autoencoder convention: summed over features, averaged over the batch.

``nn.BCEWithLogitsLoss(reduction="mean")`` averages over *all* elements, which divides the
thesis loss by the number of pixels; ``reduction="sum"`` does not average over the batch.
The thesis (Tables 2.4/3.6, docs/notes.md §10) reports

* MNIST, CURVES: ``(1/m) sum_n sum_j BCE(sigmoid(z_nj), t_nj)`` (about 543 = 784 ln 2 at
  initialization, about 52-56 after training);
* FACES: ``(1/m) sum_n 1/2 sum_j (z_nj - t_nj)^2``.

These two modules compute exactly that, and :func:`secondorder.capture.likelihood.infer_likelihood`
reads them as Bernoulli and Gaussian likelihoods with feature scale 1. :class:`TokenCrossEntropyLoss`
is the language-model loss of the ``charlm`` benchmark problem.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class SummedBCEWithLogitsLoss(nn.Module):
    """Binary cross-entropy on logits, summed over output features and averaged over the batch."""

    reduction = "sum-over-features-mean-over-batch"

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        per_element = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
        return per_element.sum() / logits.shape[0]


class HalfSquaredErrorLoss(nn.Module):
    """``1/2 |z - t|^2`` summed over output features and averaged over the batch (FACES)."""

    reduction = "sum-over-features-mean-over-batch"

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        diff = outputs - targets.to(outputs.dtype)
        return 0.5 * diff.pow(2).sum() / outputs.shape[0]


class TokenCrossEntropyLoss(nn.CrossEntropyLoss):
    """Cross-entropy of next-token logits ``(m T, V)`` against tokens ``(m, T)``, averaged over
    every token.

    A sequence is one example: its loss is the mean over its tokens and the batch loss the mean
    over sequences, so :func:`~secondorder.capture.likelihood.infer_likelihood` reads it as the
    categorical likelihood with ``g_n = m dL/dh`` (sampled targets: one per token).
    """

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return super().forward(logits, targets.reshape(-1))
