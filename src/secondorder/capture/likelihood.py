"""Likelihoods behind the supported losses: target sampling and output Hessians.

Every supported loss is read as

    L = r * sum_n l_n,        l_n = c * nll(z_n, t_n),

where ``z_n`` is the network output of example ``n``, ``nll`` is the canonical negative
log-likelihood of the family (summed over output features), ``r`` is the batch reduction
(``1/m`` for a batch mean, ``1`` for a sum) and ``c`` the feature scale:

=============================================  ============  ========  ==================
loss                                           family        r         c
=============================================  ============  ========  ==================
``nn.CrossEntropyLoss(reduction="mean")``      categorical   1/m       1
``nn.CrossEntropyLoss(reduction="sum")``       categorical   1         1
``nn.BCEWithLogitsLoss(reduction="mean")``     bernoulli     1/m       1/d
``nn.BCEWithLogitsLoss(reduction="sum")``      bernoulli     1         1
``nn.MSELoss(reduction="mean")``               gaussian      1/m       2/d
``nn.MSELoss(reduction="sum")``                gaussian      1         2
``so.losses.SummedBCEWithLogitsLoss()``        bernoulli     1/m       1
``so.losses.HalfSquaredErrorLoss()``           gaussian      1/m       1
=============================================  ============  ========  ==================

(``d`` = number of output features per example.) The canonical NLLs are
``-log softmax(z)_t`` (categorical), ``sum_j BCE(sigmoid(z_j), t_j)`` (Bernoulli, the thesis
autoencoder loss with the minus signs of (1.5)-(1.6) restored) and ``1/2 |z - t|^2``
(Gaussian with identity covariance).

Per-example pre-activation gradients are ``g_n = dl_n/dh_n = (1/r) dL/dh_n``
(docs/notes.md §0: ``m`` times the autograd gradient of the batch-mean loss).

Sampling (the "sampled Fisher" of KFAC and TNT) draws ``t ~ p(t | z)`` from the model's
predictive distribution: ``Categorical(softmax z)``, independent ``Bernoulli(sigmoid z_j)``
and ``N(z, I / c)`` (the Gaussian whose NLL is exactly ``l_n``; for ``1/2 |z - t|^2`` that is
standard deviation 1, for ``|z - t|^2`` it is ``1/sqrt(2)``).

The Hessian of ``l_n`` w.r.t. ``z_n`` is ``c * H_unit`` with
``H_unit = diag(p) - p p^T`` (categorical), ``diag(s (1 - s))`` for ``s = sigmoid(z)``
(Bernoulli; the thesis's ``diag(s)`` is a typo, docs/notes.md §11.14) and ``I``
(Gaussian). The expectation of ``(dl_n/dz)(dl_n/dz)^T`` under sampled targets (the Fisher of
the per-example loss, :meth:`Likelihood.fisher`) is ``c^2 H_unit`` for the categorical and
Bernoulli families and ``c I`` for the Gaussian, so Fisher = GGN exactly when ``c = 1`` (all
thesis conventions) and always for the Gaussian.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import losses


class Family(str, enum.Enum):
    """Exponential family of the model's predictive distribution."""

    CATEGORICAL = "categorical"
    BERNOULLI = "bernoulli"
    GAUSSIAN = "gaussian"


class BatchReduction(str, enum.Enum):
    """How the per-example losses are combined into the minibatch loss."""

    MEAN = "mean"
    SUM = "sum"


@dataclass(frozen=True)
class Likelihood:
    """The likelihood behind a loss (see the module docstring for the conventions).

    Attributes:
        family: categorical, Bernoulli or Gaussian.
        reduction: batch mean or batch sum.
        feature_mean: whether the per-example loss is averaged (not summed) over the
            output features; then ``c`` carries a ``1/d`` factor.
        feature_scale: ``c`` up to that ``1/d`` factor.
    """

    family: Family
    reduction: BatchReduction
    feature_mean: bool = False
    feature_scale: float = 1.0

    # ------------------------------------------------------------------ scales
    def scale(self, outputs: Tensor) -> float:
        """``c``: per-example loss = ``c`` * canonical NLL, for outputs of this shape."""
        c = self.feature_scale
        if self.feature_mean:
            c = c / _features(outputs)
        return c

    def batch_factor(self, batch_size: int) -> float:
        """``1/r``: multiply ``dL/dh_n`` by this to get the per-example ``g_n = dl_n/dh_n``."""
        return float(batch_size) if self.reduction is BatchReduction.MEAN else 1.0

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw targets from the predictive distribution at ``outputs`` (detached).

        Returns class indices (``long``) for the categorical family and float targets of the
        outputs' shape otherwise.
        """
        z = outputs.detach()
        if self.family is Family.CATEGORICAL:
            _require_2d(z)
            probs = torch.softmax(z.float(), dim=1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)
        if self.family is Family.BERNOULLI:
            # t_j = [u_j < sigmoid(z_j)], u ~ U(0, 1): Bernoulli(sigmoid z), faster than torch.bernoulli
            u = torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            return (u < torch.sigmoid(z)).to(z.dtype)
        std = (1.0 / self.scale(z)) ** 0.5
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return z + std * noise

    # ----------------------------------------------------------------- Hessian
    def hessian(self, outputs: Tensor) -> Tensor:
        """Per-example Hessian of ``l_n`` w.r.t. ``z_n``, shape ``(m, d, d)``."""
        z = _flat(outputs.detach())
        c = self.scale(outputs)
        if self.family is Family.CATEGORICAL:
            p = torch.softmax(z, dim=1)
            return c * (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1))
        if self.family is Family.BERNOULLI:
            s = torch.sigmoid(z)
            return c * torch.diag_embed(s * (1 - s))
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        return c * eye.expand(z.shape[0], -1, -1).clone()

    def sqrt_hessian(self, outputs: Tensor) -> Tensor:
        """A per-example square root ``S_n`` with ``S_n S_n^T`` = :meth:`hessian`, ``(m, d, d)``.

        Categorical: ``sqrt(c) (diag(sqrt p) - p sqrt(p)^T)``, which satisfies
        ``S S^T = c (diag p - p p^T)`` because ``sum_j p_j = 1``.
        """
        z = _flat(outputs.detach())
        rc = self.scale(outputs) ** 0.5
        if self.family is Family.CATEGORICAL:
            p = torch.softmax(z, dim=1)
            q = p.sqrt()
            return rc * (torch.diag_embed(q) - p.unsqueeze(2) * q.unsqueeze(1))
        if self.family is Family.BERNOULLI:
            s = torch.sigmoid(z)
            return rc * torch.diag_embed((s * (1 - s)).sqrt())
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        return rc * eye.expand(z.shape[0], -1, -1).clone()

    def fisher(self, outputs: Tensor) -> Tensor:
        """``E_t[(dl_n/dz)(dl_n/dz)^T]`` under sampled targets, shape ``(m, d, d)``.

        Equals :meth:`hessian` when ``c = 1`` and always for the Gaussian family.
        """
        if self.family is Family.GAUSSIAN:
            return self.hessian(outputs)
        return self.scale(outputs) * self.hessian(outputs)

    def per_example_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``l_n`` for every example, shape ``(m,)`` (differentiable)."""
        c = self.scale(outputs)
        if self.family is Family.CATEGORICAL:
            _require_2d(outputs)
            nll = nn.functional.cross_entropy(outputs, targets, reduction="none")
        elif self.family is Family.BERNOULLI:
            nll = nn.functional.binary_cross_entropy_with_logits(
                outputs, targets.to(outputs.dtype), reduction="none"
            )
            nll = nll.reshape(nll.shape[0], -1).sum(1)
        else:
            diff = outputs - targets.to(outputs.dtype)
            nll = 0.5 * diff.reshape(diff.shape[0], -1).pow(2).sum(1)
        return c * nll


def infer_likelihood(loss_fn: nn.Module) -> Likelihood:
    """Read the likelihood and reduction conventions off a loss module.

    Raises:
        ValueError: for an unsupported loss or option (class weights, label smoothing,
            ``reduction="none"``, ...), naming it.
    """
    if isinstance(loss_fn, losses.SummedBCEWithLogitsLoss):
        return Likelihood(Family.BERNOULLI, BatchReduction.MEAN)
    if isinstance(loss_fn, losses.HalfSquaredErrorLoss):
        return Likelihood(Family.GAUSSIAN, BatchReduction.MEAN)
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"loss_fn: reduction={reduction!r} is not supported; use 'mean' or 'sum' "
            "(or so.losses.SummedBCEWithLogitsLoss / HalfSquaredErrorLoss for the thesis "
            "'sum over features, mean over batch' convention)"
        )
    red = BatchReduction(reduction)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0 or loss_fn.ignore_index != -100:
            raise ValueError(
                "loss_fn: CrossEntropyLoss with class weights, label smoothing or ignore_index "
                "has no categorical likelihood; remove those options"
            )
        return Likelihood(Family.CATEGORICAL, red)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError("loss_fn: BCEWithLogitsLoss with weight/pos_weight is not supported")
        return Likelihood(Family.BERNOULLI, red, feature_mean=red is BatchReduction.MEAN)
    if isinstance(loss_fn, nn.MSELoss):
        return Likelihood(Family.GAUSSIAN, red, feature_mean=red is BatchReduction.MEAN, feature_scale=2.0)
    raise ValueError(
        f"loss_fn: {type(loss_fn).__name__} has no known likelihood; supported are "
        "nn.CrossEntropyLoss, nn.BCEWithLogitsLoss, nn.MSELoss, "
        "so.losses.SummedBCEWithLogitsLoss and so.losses.HalfSquaredErrorLoss"
    )


def _features(outputs: Tensor) -> int:
    return max(1, outputs[0].numel()) if outputs.dim() > 1 else 1


def _flat(outputs: Tensor) -> Tensor:
    return outputs.reshape(outputs.shape[0], -1)


def _require_2d(z: Tensor) -> None:
    if z.dim() != 2:
        raise ValueError(
            f"categorical likelihood expects outputs of shape (m, classes), got {tuple(z.shape)}"
        )
