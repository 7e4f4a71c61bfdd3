"""The Levenberg-Marquardt damping rule of 5.2.3, shared by SMW-GN/NG (Algorithm 23) and Hessian-free.

With ``B`` the subsampled curvature (Gauss-Newton or Fisher), the step is ``p = -G^-1 g`` with
``G = B + lam I`` and ``lam = lam_LM + tau``. After each step the quality of the quadratic
model ``m(p) = f + g^T p + 1/2 p^T B p`` is measured by (5.5),

    rho = (f_S1(theta) - f_S1(theta + p)) / (m(0) - m(p)),

on the step's minibatch ``S1`` and at the *unscaled* step ``p`` (not ``alpha p``; docs/notes.md
§9), and ``lam_LM`` moves by

    rho < eps:        lam_LM <- boost lam_LM
    rho > 1 - eps:    lam_LM <- drop lam_LM
    otherwise:        unchanged,

thesis constants ``lam_LM^0 = 1``, ``boost = 1.01``, ``drop = 0.99``, ``eps = 1/4``, ``tau = 1e-3``
(5.8, after Kiros). Since ``lam_LM > 0`` always, ``lam >= tau`` always.

**Which model reduction** (docs/notes.md §9, §11.18) is the ``model_reduction`` option:

* ``"damped"`` (default): the reduction of the *damped* model
  ``m_lam(p) = f + g^T p + 1/2 p^T (B + lam I) p``, i.e. ``-g^T p - 1/2 p^T (B + lam I) p``.
  For the exact LM step of SMW this equals ``-1/2 g^T p``, the published prototypes' formula;
  for the truncated CG step of Hessian-free it is the quadratic CG minimises (Martens 2010).
  We follow the code here because the published constants were tuned with it.
* ``"undamped"``: (5.5) as printed, ``m(0) - m(p) = -g^T p - 1/2 p^T B p``, which is larger by
  ``1/2 lam |p|^2``; on an exactly quadratic ``f`` with the true Hessian as ``B`` it gives
  ``rho = 1``.

Conventions: a loss increase (or a non-finite trial loss) sets ``rho = -inf`` (the code's
rule), so ``lam_LM`` is boosted; a model reduction that is not positive (``g = 0``) gives
``rho = nan`` and leaves ``lam_LM`` unchanged.

**Semi-stochastic variant (Theorem 6).** ``accept_threshold = eta`` (``0 < eta < eps``) takes
the step only when ``rho >= eta``; a rejected step leaves the parameters unchanged (and the
LM rule boosts ``lam_LM``). Theorem 6 needs the full gradient and loss (``N1 = N``) and
``alpha = 1``: pass a closure over the whole training set to every ``step`` with ``lr=1`` and
``curvature_batch = N2`` examples drawn at random from it (``curvature_sample="random"``)::

    opt = so.make_optimizer("smw-gn", model, lr=1.0, accept_threshold=0.1,
                            curvature_batch=30, curvature_sample="random")
    full = so.Closure(model, x_train, y_train, loss_fn)
    for t in range(steps):
        opt.step(full)

:class:`LMOptimizer` is the step skeleton of these methods: pass 1 and the direction come from
the subclass; the trial loss (one forward at ``theta + p`` on ``S1`` through
``closure.loss_at``, batch-norm statistics untouched), ``rho``, the damping update, the accept
test and the update ``theta <- theta + alpha p`` (with decoupled weight decay) live here.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..capture import Closure
from . import hparams as H
from .base import SecondOrderOptimizer

logger = logging.getLogger(__name__)


class ModelReduction(str, enum.Enum):
    """Denominator of ``rho``: reduction of the damped model (code) or of ``m_t`` of (5.5)."""

    DAMPED = "damped"
    UNDAMPED = "undamped"


class CurvatureSample(str, enum.Enum):
    """How ``S2`` is taken from the step's minibatch ``S1``.

    ``FIRST``: the first ``N2`` examples (a uniform subset when the loader shuffles; no
    randomness spent). ``RANDOM``: ``N2`` examples without replacement, drawn with the
    optimizer's seeded generator (checkpointed with the optimizer).
    """

    FIRST = "first"
    RANDOM = "random"


@dataclass(frozen=True)
class LMRule:
    """The LM rule of 5.2.3 (constants as attributes; pure functions of floats)."""

    boost: float = 1.01
    drop: float = 0.99
    epsilon: float = 0.25
    tau: float = 1e-3
    reduction: ModelReduction = ModelReduction.DAMPED

    def damping(self, lam_lm: float) -> float:
        """``lam = lam_LM + tau``."""
        return lam_lm + self.tau

    def predicted_reduction(
        self, g_dot_p: float, p_norm_sq: float, damping: float, curvature: float | None = None
    ) -> float:
        """``m(0) - m(p)`` for the step ``p`` (see the module docstring for the two models).

        Args:
            g_dot_p: ``g^T p`` (negative for a descent step).
            p_norm_sq: ``|p|^2``.
            damping: the ``lam`` the step was computed with.
            curvature: ``p^T (B + lam I) p``; ``None`` means ``p`` is the exact solution of
                ``(B + lam I) p = -g``, where it equals ``-g^T p``.
        """
        p_g_p = -g_dot_p if curvature is None else curvature
        damped = -g_dot_p - 0.5 * p_g_p
        if self.reduction is ModelReduction.UNDAMPED:
            return damped + 0.5 * damping * p_norm_sq
        return damped

    @staticmethod
    def ratio(loss: float, trial_loss: float, predicted: float) -> float:
        """``rho`` of (5.5).

        ``-inf`` on a loss increase or a non-finite trial loss; ``nan`` when ``predicted <= 0``.
        """
        actual = loss - trial_loss
        if not math.isfinite(trial_loss) or actual < 0:
            return -math.inf
        if not (predicted > 0 and math.isfinite(predicted)):
            return math.nan
        return actual / predicted

    def update(self, lam_lm: float, rho: float) -> float:
        """The new ``lam_LM`` after a step with ratio ``rho`` (unchanged for ``rho = nan``)."""
        if rho < self.epsilon:
            return lam_lm * self.boost
        if rho > 1.0 - self.epsilon:
            return lam_lm * self.drop
        return lam_lm


def lm_hparams(
    *,
    lr: float,
    damping: float,
    tau: float,
    curvature_batch: int | float | None,
    curvature_sample: str,
    weight_decay: float,
    lm_boost: float,
    lm_drop: float,
    lm_epsilon: float,
    model_reduction: str,
    accept_threshold: float | None,
) -> dict[str, Any]:
    """Validated hyper-parameters shared by the LM methods (``ValueError`` naming the argument)."""
    epsilon = H.positive("lm_epsilon", lm_epsilon)
    if epsilon >= 0.5:
        raise ValueError(f"lm_epsilon must be in (0, 1/2), got {lm_epsilon!r}")
    boost = H.positive("lm_boost", lm_boost)
    if boost < 1:
        raise ValueError(f"lm_boost must be a finite number >= 1, got {lm_boost!r}")
    drop = H.closed_fraction("lm_drop", lm_drop)
    if accept_threshold is not None:
        eta = H.positive("accept_threshold", accept_threshold)
        if eta >= epsilon:
            raise ValueError(
                f"accept_threshold must satisfy 0 < accept_threshold < lm_epsilon ({epsilon}), got {eta!r}"
            )
        accept_threshold = eta
    return dict(
        lr=H.positive("lr", lr, allow_zero=True),
        damping=H.positive("damping", damping),
        tau=H.positive("tau", tau),
        curvature_batch=validate_curvature_batch(curvature_batch),
        curvature_sample=H.choice("curvature_sample", curvature_sample, CurvatureSample),
        weight_decay=H.positive("weight_decay", weight_decay, allow_zero=True),
        lm_boost=boost,
        lm_drop=drop,
        lm_epsilon=epsilon,
        model_reduction=H.choice("model_reduction", model_reduction, ModelReduction),
        accept_threshold=accept_threshold,
    )


def validate_curvature_batch(value: int | float | None) -> int | float | None:
    """``N2``: ``None`` (half the batch, as in 5.8), an int ``>= 1`` or a float fraction in ``(0, 1]``."""
    if value is None:
        return None
    if isinstance(value, float):
        return H.closed_fraction("curvature_batch", value)
    return H.count("curvature_batch", value)


def curvature_size(value: int | float | None, n1: int) -> int:
    """``N2`` for a step on ``N1 = n1`` examples: a count (at most ``N1``), ``max(1, floor(f N1))``
    for a fraction ``f``, half the batch by default."""
    if value is None:
        return max(1, n1 // 2)
    if isinstance(value, float):
        return max(1, min(n1, int(value * n1)))
    return min(int(value), n1)


def subset(x: Any, idx: Tensor) -> Any:
    """Rows ``idx`` of a tensor (or of each tensor of a tuple/list of inputs)."""
    if isinstance(x, tuple | list):
        return type(x)(subset(t, idx) for t in x)
    return x.index_select(0, idx.to(x.device))


class LMOptimizer(SecondOrderOptimizer):
    """Step skeleton of the LM-damped methods (Algorithm 23 lines 3, 6, 7; Theorem 6 variant).

    Subclasses implement :meth:`_direction`, returning the minibatch loss and
    ``d = G^-1 g`` (the step is ``p = -d``) for every parameter, after pass 1.
    The current ``lam_LM`` is :attr:`lm_damping` (initially the ``damping`` hyper-parameter);
    it is part of :meth:`state_dict`.
    """

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        seed: int | None = None,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(model, defaults, seed=seed, loss_fn=loss_fn, factor_dtype=factor_dtype)
        self.lm_damping = float(defaults["damping"])  # lam_LM^(t)

    # ----------------------------------------------------------- hooks for subclasses
    def _direction(self, closure: Closure, damping: float) -> tuple[Tensor, dict[str, Tensor], float | None]:
        """Pass 1 and ``d = (B + lam I)^-1 g``.

        Returns:
            the minibatch loss (detached), ``d`` by parameter name, and ``p^T (B + lam I) p``
            for ``p = -d`` (``None`` when ``d`` solves the system exactly).
        """
        raise NotImplementedError

    def _commit(self, direction: dict[str, Tensor]) -> None:
        """Keep what the next step needs from ``d`` (called once every check has passed)."""

    # ----------------------------------------------------------- shared pieces
    @property
    def rule(self) -> LMRule:
        g = self.param_groups[0]
        reduction = ModelReduction(g["model_reduction"])
        return LMRule(g["lm_boost"], g["lm_drop"], g["lm_epsilon"], g["tau"], reduction)

    @property
    def current_damping(self) -> float:
        """``lam = lam_LM + tau`` for the next step."""
        return self.rule.damping(self.lm_damping)

    def _curvature_indices(self, n1: int) -> Tensor:
        """Indices of ``S2`` in ``S1`` (Algorithm 23 line 3)."""
        g = self.param_groups[0]
        n2 = curvature_size(g["curvature_batch"], n1)
        device = self.generator.device
        if g["curvature_sample"] == CurvatureSample.FIRST.value or n2 == n1:
            return torch.arange(n2, device=device)
        return torch.randperm(n1, generator=self.generator, device=device)[:n2].sort().values

    def _grads(self) -> dict[str, Tensor]:
        """The minibatch gradient ``g`` by name (zeros for parameters the loss does not reach), in at
        least ``factor_dtype``."""
        return {
            n: self._stat(p.grad) if p.grad is not None else torch.zeros_like(self._stat(p))
            for n, p in self.named_params()
        }

    def _step(self, closure: Closure) -> Tensor:
        group = self.param_groups[0]
        rule = self.rule
        lam = rule.damping(self.lm_damping)
        with self._rng_restored_on_error():
            loss, direction, curvature = self._direction(closure, lam)
            self._check_tensors("direction", direction.values())

        with torch.no_grad():
            params = dict(self.named_params())
            grads = self._grads()
            g_dot_d = float(sum((grads[n] * direction[n]).sum() for n in params))
            d_sq = float(sum(direction[n].pow(2).sum() for n in params))
            # p = -d: g^T p = -g^T d
            predicted = rule.predicted_reduction(-g_dot_d, d_sq, lam, curvature)
            trial = {n: p - direction[n].to(p.dtype) for n, p in params.items()}
            trial_loss = closure.loss_at(trial).detach()
            self.stats.forward_passes += 1
            pair = torch.stack([loss.reshape(()).to(trial_loss.dtype), trial_loss.reshape(())])
            D.all_reduce_mean([pair])
            rho = rule.ratio(float(pair[0]), float(pair[1]), predicted)
            threshold = group["accept_threshold"]
            accepted = threshold is None or rho >= threshold
            if accepted:
                for n, p in params.items():
                    self._apply_update(p, direction[n], group["lr"], group["weight_decay"])
            self.lm_damping = rule.update(self.lm_damping, rho)
            self._commit(direction)
        self.stats.diagnostics.update(
            rho=rho,
            damping=lam,
            lm_damping=self.lm_damping,
            predicted_reduction=predicted,
            trial_loss=float(pair[1]),
            accepted=accepted,
        )
        return loss

    def _extra_state(self) -> dict[str, Any]:
        return {"lm_damping": self.lm_damping}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.lm_damping = float(extra["lm_damping"])
