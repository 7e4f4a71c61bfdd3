"""K-BFGS and K-BFGS(L): Algorithm 9 (chapter 3) and Algorithm 4 (K-BFGS-20, chapter 2).

Per modeled layer ``l`` (each Kronecker layer block of :mod:`secondorder.capture.blocks`: Linear,
Conv1d and Conv2d (each group of a grouped one), Embedding, self-attention's projections, each
weight matrix of an LSTM / GRU / RNN) the block of the inverse
Hessian is approximated by ``H_A (x) H_G`` and the step is (3.10)/(2.4)::

    DW <- mu DW + DW_batch                   (momentum; chapter 2: mu DW + (1 - mu) DW_batch)
    p   = H_G DW H_A                         (DW in the (d_o, D) layout [W | b], D = J k^2 + 1)
    W  <- W - alpha (p + gamma W)            (decoupled weight decay, 3.7.2)

and every ``update_freq`` (T) steps (``k % T == 0``, ``k`` 0-based) a second forward-backward
pass on the same minibatch at the new parameters gives the curvature pairs:

* ``H_A`` (Alg. 9 lines 15-17): ``s_A = H_A abar``, ``y_A = A~ s_A + lambda_A s_A`` with
  ``A~ v = E_n[sum_t abar_t (abar_t^T v)]`` computed from the batch without forming ``A~``
  (3.14)-(3.15), then one BFGS update (3.11). ``abar`` is the mean over examples *and*
  locations of the patches, while ``A~`` sums over locations (docs/notes.md §2).
* ``H_G`` (lines 19-21): ``s_G <- beta s_G + (1 - beta)(hbar+ - hbar)``,
  ``y_G <- beta y_G + (1 - beta)(Dhbar+ - Dhbar)`` with the means over examples and locations
  of the pre-activations and of the per-example pre-activation gradients
  ``g_n = batch_factor * dL/dh_n`` (3.12)-(3.13); ``(s~, y~) = D_P D_LM(s_G, y_G)`` with
  ``H = H_G``, ``mu1 = 0.2``, ``mu2 = lambda_G`` (Algorithm 8); then BFGS (``kbfgs``) or
  L-BFGS in compact form (``kbfgsl``, ``history_size`` = p pairs).
* damping split (line 2): ``lambda_A = sqrt(|T|) sqrt(lam)``, ``lambda_G = sqrt(lam) / sqrt(|T|)``,
  ``|T|`` the number of output locations (1 for FC layers).
* initialisation (line 3): ``H_A = (A + lambda_A I)^-1`` from :meth:`warm_start`,
  ``H_G = I / lambda_G`` (the L-BFGS initial matrix too), ``s_G = y_G = 0``, ``DW = 0``.
* parameters of layers that are not modeled (BatchNorm, ...) follow the momentum gradient
  with learning rate ``alpha / lam`` (3.4.3) and the same decoupled weight decay.

``kbfgs20`` / ``kbfgsl20`` are Algorithm 4 (chapter 2, docs/notes.md §1): double damping DD
(Algorithm 3, ``mu2 = lambda_G = sqrt(lam)``, so ``lam <= 1``), ``A`` as a moving average
``A <- beta A + (1 - beta) A_batch`` with Hessian-action BFGS on ``A^LM = A + lambda_A I``
(2.4), ``H_g = I`` (the L-BFGS initial matrix too), the momentum ``mu DW + (1 - mu) DW_batch``,
and the other parameters with learning rate ``alpha``. Conv layers use the chapter-3 damping
split and (3.12)-(3.13) (for FC layers the split is ``sqrt(lam)`` for both, as in chapter 2).

Thesis variants are options (see :data:`VARIANTS` for the presets):

* ``pair_damping``: ``"dp-dlm"`` (Alg. 8, improvement #1 of Table 3.8), ``"dd"`` (Alg. 3),
  ``"dpi-dlm"`` (Alg. 11, used by Alg. 10).
* ``a_statistic``: ``"minibatch"`` (improvement #2: ``A~`` of the current batch, (3.14)) or
  ``"moving-average"`` (chapter 2).
* ``a_inverse``: ``"hessian-action"`` (one BFGS update per curvature step) or ``"exact"``
  (``H_A = (A + lambda_A I)^-1``: Alg. 5 line 23 with the moving average, Alg. 10 line 12
  with the minibatch ``A~``).
* ``skip_rule``: ``"positive"`` (update whenever ``s^T y > 0``), ``"dd-skip"`` (Alg. 5
  line 17), ``"code"`` (the chapter-2 code: ``s^T y <= 0``, the norm gate, an infinite ``H+``).
* ``lr_decay_power``: ``alpha_k = lr (k + 1)^-power`` (Alg. 5 / Theorem 2, Alg. 10 / Theorem 4).
* ``double_grad``: the "double-grad-minibatch" gradient of 2.8.3 (Fig. 2.7): the direction uses
  the average of this step's gradient and the parameter gradient of the previous step's second
  pass (taken at the current parameters on the previous batch).

Implementation choices (docs/notes.md §2 items marked [inferred] are marked here too):

* [inferred] the curvature work runs when ``k % T == 0`` with ``k`` 0-based, so the first step
  updates the curvature.
* [inferred] ``abar`` and ``A~`` come from the pass-1 (pre-step) inputs (docs/notes.md §11.5).
* [inferred] the second pass leaves BatchNorm running statistics unchanged and is not a
  training step; it runs outside DDP's gradient synchronisation and differentiates only
  w.r.t. the recorded pre-activations (``closure.grad``), so it writes no ``.grad``.
* [inferred] the only default skip test for ``H_G`` and ``H_A`` is ``s^T y <= 0`` (or non-finite
  values): the chapter-3 runs are named ``no-norm-gate``. With any of the dampings
  ``s~^T y~ >= mu2 |s~|^2``, so this only skips a zero pair.
* [inferred] BatchNorm parameters get the same decoupled weight decay ``(1 - alpha gamma)``.
* without :meth:`warm_start`, ``H_A`` (and the moving average ``A``) start from the first
  batch's ``A`` (the warm start on one batch).
* the chapter-2 moving average of ``A`` is updated at every curvature step including the first
  (Alg. 4 line 20); the published code skips the first update after a warm start.
* every pair goes through :func:`~secondorder.linalg.bfgs.normalize_pair` (a power-of-two
  factor, exact) before damping and BFGS, so pairs far from scale 1 neither overflow nor
  underflow float32; a BFGS, L-BFGS or exact-inverse update whose inputs or result are not finite
  leaves the previous ``H_A`` / ``H_G`` / memory / moving-average ``A`` in place, is counted
  (``*_nonfinite``) and logged (a warning per layer), and training continues.
* non-finite values in the second pass (after the parameters moved) restore the parameters,
  the momentum and the curvature state as they were before the step, then raise
  :class:`NonFiniteError`.
* under ``torch.distributed`` the means, ``A~ s_A`` and the second-pass statistics are
  averaged over ranks (every statistic is a mean over examples); the ``O(d^2)`` rank-2 BFGS
  updates are replicated on every rank, which is cheaper than broadcasting their results.

Pairs that carry no information (the round-off rule). ``y_G`` is a moving average of
differences of the mean output gradients ``Dhbar``, ``Dhbar+``. For a layer followed by BatchNorm
in training mode these means are exactly zero in every channel, and what is computed is the
rounding error of the BatchNorm backward and of the mean itself, a small multiple of ``u E|g|``
(``u = torch.finfo(dtype).eps``, ``E|g|`` the mean of ``|g_n|`` over examples and locations,
:func:`~secondorder.capture.statistics.spatial_abs_mean`). The optimizer keeps, per channel,
moving averages (same ``beta`` as ``y_G``) ``b_y`` of ``|Dhbar+| + |Dhbar|`` (``|y_G| <= b_y``)
and ``r_y`` of ``E|g+| + E|g|``, and skips the ``H_G`` update when

    ``b_y <= tau u r_y`` in every channel,

``tau =`` :data:`ROUNDOFF_FACTOR` (4096: ``4.9e-4`` in float32, ``9.1e-13`` in float64).
Counted in ``h_g_uninformative`` (and ``h_g_skipped``); the first skip of a layer is logged
(INFO). Measured ``b_y / (u r_y)`` (largest channel): BatchNorm-fed layers of ResNet32 at most
1 (contiguous) and 80 (``channels_last``, batch 128; 164 at batch 512: the reductions run in
another order); layers that are not, over 700 steps of every K-BFGS row on CURVES and the
heads of the CNNs, at least 1.6e5 -- a mean over a batch carries sampling noise far above
round-off. Without the rule Powell's damping turns the noise into ``s~ ~ H y`` and BFGS divides
by ``s~^T y~ ~ 1e-20`` (float32: NaN; float64: an ``H_G`` that depends on the memory layout).
In exact arithmetic ``y_G = 0`` leaves Algorithm 9's ``H_G`` where it starts:
``D_P D_LM(s, 0) = (s, lambda_G s)``, and BFGS with that pair maps ``I / lambda_G`` to itself,
so skipping is the exact algorithm there. (Algorithm 4's DD would set the curvature along ``s``
to ``lambda_G`` from the damping alone; the pair still says nothing about ``G`` and is skipped.)

Diagnostics (Fig. 2.1), in ``opt.stats.diagnostics["kbfgs"][layer]``: ``updates``/``skipped``
for ``H_G`` and ``H_A`` (``skipped`` includes ``h_g_uninformative`` and ``*_nonfinite``), and
for the damped pair ``ratio = y~^T H_G y~ / s~^T y~`` (``H_G`` before the update):
``ratio_count``, ``ratio_within`` (``ratio <= 2/mu1``), ``ratio_sum``, ``ratio_fraction`` and
``ratio_mean``. Counters are cumulative; clear the dict at the start of an epoch for per-epoch
values.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..capture import Closure, preserved_norm_buffers
from ..capture import hooks as C
from ..linalg import LinAlgError, damped_inverse
from ..linalg import bfgs as B
from ..linalg import lbfgs as LB
from ..linalg.finite import all_finite
from . import hparams as H
from .base import MomentumStyle, NonFiniteError
from .kronecker import Fallback, KroneckerFactoredOptimizer, LayerSpec, fallback_scale

logger = logging.getLogger(__name__)

#: tau of the round-off rule: a pair whose mean output gradients are within ``tau * eps`` of the
#: magnitudes they add up, in every channel, carries no information and is skipped (module
#: docstring). 0 switches the rule off (only exactly zero means are skipped).
ROUNDOFF_FACTOR = 4096.0


class PairDamping(str, enum.Enum):
    """How the ``(s_G, y_G)`` pair is damped before the ``H_G`` update."""

    DP_DLM = "dp-dlm"  # Algorithm 8 (chapter 3; improvement #1 of Table 3.8)
    DD = "dd"  # Algorithm 3 (chapter 2; needs mu2 = lambda_G <= 1)
    DPI_DLM = "dpi-dlm"  # Algorithm 11 (Algorithm 10, the convergent variant)


class AStatistic(str, enum.Enum):
    """Which estimate of ``A`` feeds ``H_A``."""

    MINIBATCH = "minibatch"  # A~ of the current batch (3.14); improvement #2 of Table 3.8
    MOVING_AVERAGE = "moving-average"  # A <- beta A + (1 - beta) A_batch (chapter 2)


class AInverse(str, enum.Enum):
    """How ``H_A`` follows ``A``."""

    HESSIAN_ACTION = "hessian-action"  # one BFGS update with s = H_A abar, y = (A + lambda_A I) s
    EXACT = "exact"  # H_A = (A + lambda_A I)^-1 (Alg. 5 line 23, Alg. 10 line 12)


class SkipRule(str, enum.Enum):
    """When a BFGS update is skipped."""

    POSITIVE = "positive"  # only if s^T y <= 0 or non-finite (the thesis: always update)
    DD_SKIP = "dd-skip"  # H_G: Algorithm 5 line 17, skip unless s~^T y~ >= mu1 y~^T H y~
    CODE = "code"  # the chapter-2 code: s^T y <= 0, the norm gate, an infinite H+ (docs/notes.md §1)


#: option presets for the thesis variants, e.g. ``so.make_optimizer("kbfgsl20", model, **VARIANTS["alg5"])``.
#: The decay power 0.75 is one choice in (0.5, 1) (Theorems 2 and 4 leave it free).
VARIANTS: dict[str, dict[str, Any]] = {
    # Algorithm 5 (use with kbfgsl20): DD with skipping, exact inverse of the moving-average A,
    # minibatch gradient, alpha_k proportional to k^-beta
    "alg5": dict(skip_rule="dd-skip", a_inverse="exact", momentum=0.0, lr_decay_power=0.75),
    # Algorithm 10 (use with kbfgsl): D_P(I) D_LM, exact inverse of the minibatch A, no momentum
    "alg10": dict(
        pair_damping="dpi-dlm", a_statistic="minibatch", a_inverse="exact", momentum=0.0, lr_decay_power=0.75
    ),
    # Table 3.8 ablation of kbfgs: improvement #1 (D_P D_LM) off, improvement #2 (minibatch A) off
    "improvement1-off": dict(pair_damping="dd"),
    "improvement2-off": dict(a_statistic="moving-average"),
    # 2.8.3 / Fig. 2.7
    "double-grad": dict(double_grad=True),
    # the skip rules of the chapter-2 code, for reproducing its numbers
    "chapter2-code": dict(skip_rule="code"),
}


def damping_split(damping: float, locations: int) -> tuple[float, float]:
    """Alg. 9 line 2: ``(lambda_A, lambda_G) = (sqrt(|T|) sqrt(lam), sqrt(lam) / sqrt(|T|))``."""
    root, t = math.sqrt(damping), math.sqrt(locations)
    return t * root, root / t


def uninformative(bound: Tensor, scale: Tensor, factor: float | None = None) -> bool:
    """The round-off rule (module docstring): ``bound <= factor * eps * scale`` in every channel.

    Args:
        bound: ``b_y``, the moving average of ``|Dhbar+| + |Dhbar|`` (it bounds ``|y_G|``).
        scale: ``r_y``, the moving average of ``E|g+| + E|g|``, the magnitudes the means add up.
        factor: ``tau`` (default :data:`ROUNDOFF_FACTOR`).
    """
    tau = ROUNDOFF_FACTOR if factor is None else factor
    return bool((bound <= scale * (tau * torch.finfo(bound.dtype).eps)).all())


@dataclass
class _Pass1:
    """What pass 1 gives one layer on a curvature step."""

    inputs: Tensor  # the layer input a (detached), for A~ v
    batch_size: int  # m, the examples behind ``inputs``
    out_hw: tuple[int, ...]  # spatial shape of h (conv) or () (FC)
    locations: int  # |T|
    h_mean: Tensor  # hbar, (d_o,)
    g_mean: Tensor  # Dhbar = mean of g_n, (d_o,)
    a_mean: Tensor  # abar, (D,)
    g_abs: Tensor  # E|g_n|, the round-off scale of Dhbar, (d_o,)


@dataclass
class _Pass2:
    """What the second pass (at theta_{k+1}) gives one layer."""

    h_mean: Tensor  # hbar+
    g_mean: Tensor  # Dhbar+
    g_abs: Tensor  # E|g+|

    def tensors(self) -> list[Tensor]:
        return [self.h_mean, self.g_mean, self.g_abs]


# ------------------------------------------------------------------------------ optimizer
def _arguments(frame_locals: dict[str, Any]) -> dict[str, Any]:
    """A constructor's arguments from its ``locals()`` (the four public constructors keep their own
    signatures and defaults, Tables 2.5 / 3.5, and hand everything to ``_setup``)."""
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


class _KBFGSBase(KroneckerFactoredOptimizer):
    """Shared machinery of the four K-BFGS classes (see the module docstring)."""

    #: L-BFGS (True) or dense BFGS (False) for H_G
    limited_memory: bool = False
    #: chapter 2 (Algorithm 4) or 3 (Algorithm 9): H_G init I vs I/lambda_G, other params lr vs lr/lam
    chapter: int = 3

    def _setup(
        self,
        model: nn.Module,
        *,
        lr: float,
        damping: float,
        momentum: float,
        stat_decay: float,
        weight_decay: float,
        update_freq: int,
        mu1: float,
        pair_damping: str,
        a_statistic: str,
        a_inverse: str,
        skip_rule: str,
        double_grad: bool,
        lr_decay_power: float,
        momentum_style: str,
        layers: LayerSpec | Iterable[LayerSpec] | None,
        exclude: LayerSpec | Iterable[LayerSpec] | None,
        fallback: str,
        history_size: int | None = None,
    ) -> None:
        mu1 = H.fraction("mu1", mu1)
        if mu1 == 0:
            raise ValueError("mu1 must be in (0, 1), got 0")
        if not isinstance(double_grad, bool):
            raise ValueError(f"double_grad must be a bool, got {double_grad!r}")
        defaults = dict(
            **H.shared(
                lr=lr,
                damping=damping,
                momentum=momentum,
                stat_decay=stat_decay,
                weight_decay=weight_decay,
                update_freq=update_freq,
            ),
            mu1=mu1,
            pair_damping=H.choice("pair_damping", pair_damping, PairDamping),
            a_statistic=H.choice("a_statistic", a_statistic, AStatistic),
            a_inverse=H.choice("a_inverse", a_inverse, AInverse),
            skip_rule=H.choice("skip_rule", skip_rule, SkipRule),
            double_grad=double_grad,
            lr_decay_power=H.fraction("lr_decay_power", lr_decay_power),
            momentum_style=H.choice("momentum_style", momentum_style, MomentumStyle),
        )
        if history_size is not None:
            defaults["history_size"] = H.count("history_size", history_size)
        self._check_dd_damping(defaults)
        super().__init__(model, defaults, layers=layers, exclude=exclude, fallback=fallback)
        self._logged: set[tuple[str, str]] = set()  # (layer, event) already logged once
        self._pending_diagonals: dict[Tensor, Tensor] = {}  # fallback diagonals of the step

    @staticmethod
    def _check_dd_damping(g: dict[str, Any]) -> None:
        # DD step 2 is a convex combination only for mu2 = lambda_G = sqrt(lam) <= 1 (docs/notes.md §11.3)
        if g["pair_damping"] == PairDamping.DD.value and g["damping"] > 1:
            raise ValueError(
                f"damping must be <= 1 with pair_damping='dd' (DD, Algorithm 3, needs "
                f"mu2 = lambda_G = sqrt(damping) <= 1), got {g['damping']!r}; use pair_damping='dp-dlm'"
            )

    # --------------------------------------------------------------- layer state
    def _init_layer(self, name: str, a_batch: Tensor, locations: int) -> None:
        """Alg. 9 line 3 / Alg. 4 line 3: ``H_A = (A + lambda_A I)^-1``, ``H_G``, ``s_G = y_G = 0``."""
        g = self.param_groups[0]
        lam_a, lam_g = damping_split(g["damping"], locations)
        st = self.module_state.setdefault(name, {})
        st["locations"] = int(locations)
        st["h_a"] = damped_inverse(a_batch, lam_a)
        if g["a_statistic"] == AStatistic.MOVING_AVERAGE.value:
            st["a_avg"] = a_batch
        if "s_g" in st:  # a later warm start re-initialises the A side only
            return
        block = self.blocks[name]
        d_o = block.output_dim
        w = block.weight
        gamma = self._initial_gamma(lam_g)
        if self.limited_memory:
            st.update(LB.lbfgs_empty(d_o, gamma, dtype=w.dtype, device=w.device).as_state())
        else:
            st["h_g"] = torch.eye(d_o, dtype=w.dtype, device=w.device).mul_(gamma)
        st["s_g"] = w.new_zeros(d_o)
        st["y_g"] = w.new_zeros(d_o)
        st["y_g_bound"] = w.new_zeros(d_o)  # b_y of the round-off rule
        st["y_g_scale"] = w.new_zeros(d_o)  # r_y

    def _initial_gamma(self, lam_g: float) -> float:
        """``H_G`` starts at ``gamma I``: ``1/lambda_G`` (Alg. 9 line 3) or 1 (Alg. 4 line 3)."""
        return 1.0 / lam_g if self.chapter == 3 else 1.0

    def warm_start(self, closures: Iterable[Closure]) -> int:
        """Alg. 9 / Alg. 4 line 3: ``A`` = average over the closures, ``H_A = (A + lambda_A I)^-1``.

        Forward passes only; batch-norm running statistics are left unchanged. Returns the number
        of minibatches used.
        """
        sums: dict[str, Tensor] = {}
        locations: dict[str, int] = {}
        count = 0
        with self._curvature_timer():
            for closure in closures:
                with preserved_norm_buffers(self.module), torch.no_grad():
                    with self.capture.record(inputs=True, outputs=True) as recs:
                        result = closure.forward(sync=False)
                    self._check_loss(result.loss)
                self.stats.warm_start_forward_passes += 1
                for name, block in self.blocks.items():
                    rec = recs[name]
                    a = block.input_gram(rec.inputs, batch_size=closure.batch_size)  # type: ignore[arg-type]
                    locations[name] = block.num_locations(rec.outputs, closure.batch_size)  # type: ignore[arg-type]
                    if name in sums:
                        sums[name].add_(a)
                    else:
                        sums[name] = a
                count += 1
            if count:
                D.all_reduce_mean(list(sums.values()))
                self._check_tensors("warm-start statistics", sums.values())
                for name, a in sums.items():
                    self._init_layer(name, a.div_(count), locations[name])
        return count

    # --------------------------------------------------------------------- step
    def _step(self, closure: Closure) -> Tensor:
        g = self.param_groups[0]
        self._check_dd_damping(g)
        k = self.step_count
        fresh = [n for n in self.layers if "h_a" not in self.module_state.get(n, {})]
        curvature = k % g["update_freq"] == 0 or bool(fresh)
        lr = g["lr"] * (k + 1) ** (-g["lr_decay_power"]) if g["lr_decay_power"] else g["lr"]

        # pass 1 at theta_k (Alg. 9 line 6)
        record = self.capture.record(inputs=True, outputs=True, output_grads=True) if curvature else None
        result, recs = self._forward_backward(closure, record)
        loss = result.loss.detach()
        del result

        first: dict[str, _Pass1] = {}
        if curvature:
            with self._curvature_timer():
                first = self._pass1_statistics(closure, recs)
                for name in fresh:  # no warm start: A of the first batch
                    p1 = first[name]
                    a_batch = self.blocks[name].input_gram(p1.inputs, batch_size=p1.batch_size)
                    D.all_reduce_mean([a_batch])
                    self._init_layer(name, a_batch, p1.locations)
        del recs

        # the step (lines 7-11)
        with torch.no_grad():
            changed = [p for _, p in self.named_params() if p.grad is not None] if curvature else []
            backup = [(p, p.detach().clone()) for p in changed]
            momenta = self._apply_step(g, lr, fallback_scale(closure))
        if not curvature:
            self._commit(momenta, None)
            return loss

        # pass 2 at theta_{k+1} on the same batch, then the curvature updates (lines 12-23)
        try:
            with self._curvature_timer():
                second, pass2_grads = self._second_pass(closure, g["double_grad"])
        except FloatingPointError:
            with torch.no_grad():
                for p, saved in backup:
                    p.copy_(saved)
            for name in fresh:
                self.module_state.pop(name, None)
            raise
        with torch.no_grad(), self._curvature_timer():
            self._update_curvature(g, first, second)
        self._commit(momenta, pass2_grads)
        return loss

    def _pass1_statistics(self, closure: Closure, recs: dict[str, C.LayerRecord]) -> dict[str, _Pass1]:
        factor = closure.batch_factor  # g_n = factor * dL/dh_n
        out: dict[str, _Pass1] = {}
        for name, block in self.blocks.items():
            rec = recs[name]
            if rec.output_grads is None or rec.inputs is None or rec.outputs is None:
                raise C.HookNeverFiredError(f"layer '{name}' ran but its output does not reach the loss")
            h = rec.outputs.detach()
            out_hw = block.output_spatial_shape(h)
            out[name] = _Pass1(
                inputs=rec.inputs,
                batch_size=closure.batch_size,
                out_hw=out_hw,
                locations=block.num_locations(h, closure.batch_size),
                h_mean=block.spatial_mean(h),
                g_mean=block.spatial_mean(rec.output_grads).mul_(factor),
                a_mean=block.input_mean(rec.inputs, out_hw),
                g_abs=block.spatial_abs_mean(rec.output_grads).mul_(abs(factor)),
            )
        vecs = [v for p1 in out.values() for v in (p1.h_mean, p1.g_mean, p1.a_mean, p1.g_abs)]
        D.all_reduce_mean(vecs)
        self._check_tensors("pass-1 statistics", vecs)
        return out

    def _second_pass(
        self, closure: Closure, with_param_grads: bool
    ) -> tuple[dict[str, _Pass2], dict[Tensor, Tensor] | None]:
        """Alg. 9 line 13: ``(hbar+, Dhbar+)`` (and their round-off scales) per layer at the new
        parameters, same batch.

        BatchNorm running statistics are restored afterwards, DDP does not synchronise, and only
        the pre-activations are differentiated (plus the parameters for ``double_grad``).
        """
        params = [p for _, p in self.named_params()] if with_param_grads else []
        with preserved_norm_buffers(self.module), torch.enable_grad():
            with self.capture.record(inputs=False, outputs=True) as recs:
                result = closure.forward(sync=False)
            self.stats.forward_passes += 1
            self._check_loss(result.loss)
            hs = [recs[n].outputs for n in self.layers]
            grads = closure.grad(result.loss, hs + params)  # type: ignore[operator]
            self.stats.backward_passes += 1
        factor = closure.batch_factor
        out: dict[str, _Pass2] = {}
        for (name, block), h, dh in zip(self.blocks.items(), hs, grads, strict=False):
            if dh is None:
                raise C.HookNeverFiredError(f"layer '{name}' ran but its output does not reach the loss")
            h = h.detach()
            out[name] = _Pass2(
                h_mean=block.spatial_mean(h),
                g_mean=block.spatial_mean(dh).mul_(factor),
                g_abs=block.spatial_abs_mean(dh).mul_(abs(factor)),
            )
        vecs = [v for p2 in out.values() for v in p2.tensors()]
        D.all_reduce_mean(vecs)
        self._check_tensors("second-pass statistics", vecs)
        pass2 = None
        if with_param_grads:
            pg = grads[len(hs) :]
            pass2 = {p: torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, pg, strict=True)}
            D.all_reduce_mean(list(pass2.values()))
            self._check_tensors("second-pass gradient", pass2.values())
        return out, pass2

    # --------------------------------------------------------------- direction
    def _gradient(self, p: Tensor) -> Tensor:
        """The minibatch gradient, averaged with the previous second-pass gradient for ``double_grad``."""
        prev = self.state[p].get("pass2_grad") if self.param_groups[0]["double_grad"] else None
        return p.grad if prev is None else torch.add(p.grad, prev).mul_(0.5)  # type: ignore[arg-type]

    def _new_momentum(self, p: Tensor, grad: Tensor, mu: float, style: str) -> Tensor:
        """``mu m + g`` (or ``mu m + (1 - mu) g``), returned without storing it (committed later)."""
        if mu == 0:
            return grad
        buf = self.state[p].get("momentum_buffer")
        average = style == MomentumStyle.AVERAGE.value
        if buf is None:
            return grad * (1.0 - mu) if average else grad.clone()
        return torch.lerp(grad, buf, mu) if average else torch.add(grad, buf, alpha=mu)

    def _precondition(self, name: str, grad: Tensor) -> Tensor:
        """``p = H_G DW H_A`` (Alg. 9 line 9); compact L-BFGS for ``H_G`` in ``kbfgsl``.

        Computed as the transpose ``p^T = H_A^T DW^T H_G^T`` and returned as a transposed view:
        the same products, in GEMM layouts that run about 20% faster on CPU.
        """
        st = self.module_state[name]
        xt = torch.mm(st["h_a"].t(), grad.t())  # (DW H_A)^T, (D, d_o)
        if self.limited_memory:
            return LB.lbfgs_apply_t(LB.CompactLBFGS.from_state(st), xt).t()
        return torch.mm(xt, st["h_g"].t()).t()

    def _apply_step(self, g: dict[str, Any], lr: float, diag_scale: float) -> dict[Tensor, Tensor]:
        mu, style, wd = g["momentum"], g["momentum_style"], g["weight_decay"]
        momenta: dict[Tensor, Tensor] = {}
        for name, block in self.blocks.items():
            w, b = (block.parameters() + [None])[:2]
            if w.grad is None:
                continue
            if w not in momenta:  # once per parameter (blocks may cover parts of one)
                momenta[w] = self._new_momentum(w, self._gradient(w), mu, style)
            gw, gb = momenta[w], None
            if b is not None:
                if b not in momenta:
                    grad_b = self._gradient(b) if b.grad is not None else torch.zeros_like(b)
                    momenta[b] = self._new_momentum(b, grad_b, mu, style)
                gb = momenta[b]
            pw, pb = block.split_matrix(self._precondition(name, block.grad_matrix(gw, gb)))
            tw, tb = block.update_targets()
            self._apply_update(tw, pw, lr, wd)
            if tb is not None and pb is not None:
                self._apply_update(tb, pb, lr, wd)
        # other parameters: the fallback; the thesis's rule is the momentum gradient with lr/lam
        # (3.4.3) or lr (chapter 2). The new diagonals are committed with the momenta.
        scale = 1.0 / g["damping"] if self.chapter == 3 else 1.0
        by_name = dict(self.named_params())
        self._pending_diagonals = {}
        for pname in self.other_params:
            p = by_name[pname]
            if p.grad is None:
                continue
            grad = self._gradient(p)
            v = self._fallback_diagonal(p, grad, diag_scale, g)
            if v is not None:
                self._pending_diagonals[p] = v
            m = momenta[p] = self._new_momentum(p, grad, mu, style)
            self._apply_update(p, self._fallback_direction(m, v, g["damping"], scale), lr, wd)
        return momenta

    def _commit(self, momenta: dict[Tensor, Tensor], pass2_grads: dict[Tensor, Tensor] | None) -> None:
        for p, v in self._pending_diagonals.items():
            self.state[p]["fallback_diagonal"] = v
        self._pending_diagonals = {}
        if self.param_groups[0]["momentum"] != 0:
            for p, m in momenta.items():
                self.state[p]["momentum_buffer"] = m
        if self.param_groups[0]["double_grad"]:
            for _, p in self.named_params():
                if pass2_grads is not None and p in pass2_grads:
                    self.state[p]["pass2_grad"] = pass2_grads[p]
                else:  # no second pass at this step: the stored gradient would be stale
                    self.state[p].pop("pass2_grad", None)

    # ---------------------------------------------------------------- curvature
    def _update_curvature(
        self, g: dict[str, Any], first: dict[str, _Pass1], second: dict[str, _Pass2]
    ) -> None:
        products = self._a_side_products(g, first)
        for name in self.layers:
            self._update_h_a(g, name, first[name], *products[name])
            self._update_h_g(g, name, first[name], second[name])

    def _a_side_products(
        self, g: dict[str, Any], first: dict[str, _Pass1]
    ) -> dict[str, tuple[Tensor | None, Tensor]]:
        """Per layer ``(s_A, A~ s_A)`` for the minibatched Hessian action (3.14)-(3.15), or
        ``(None, A_batch)`` (dense) for the moving average and the exact inverse.

        Both products are means over examples, so they are averaged over ranks in one all-reduce.
        """
        dense = g["a_statistic"] == AStatistic.MOVING_AVERAGE.value or g["a_inverse"] == AInverse.EXACT.value
        out: dict[str, tuple[Tensor | None, Tensor]] = {}
        for name, block in self.blocks.items():
            p1 = first[name]
            if dense:
                out[name] = (None, block.input_gram(p1.inputs, batch_size=p1.batch_size))
            else:
                s_a = torch.mv(self.module_state[name]["h_a"], p1.a_mean)  # s_A = H_A abar
                out[name] = (s_a, block.input_action(p1.inputs, s_a, p1.batch_size))  # A~ s_A by (3.15)
        D.all_reduce_mean([prod for _, prod in out.values()])
        return out

    def _update_h_a(
        self, g: dict[str, Any], name: str, p1: _Pass1, s_a: Tensor | None, batch: Tensor
    ) -> None:
        """``H_A``: Alg. 9 lines 15-17, Alg. 4 lines 20-23, Alg. 5 line 23, Alg. 10 line 12.

        ``batch`` is ``A~ s_A`` (given ``s_a``) or the dense ``A_batch``.
        """
        st = self.module_state[name]
        lam_a, _ = damping_split(g["damping"], st["locations"])
        if g["a_statistic"] == AStatistic.MOVING_AVERAGE.value:
            beta = g["stat_decay"]
            a_est = st["a_avg"].mul(beta).add_(batch, alpha=1.0 - beta)
            if not all_finite([a_est]):  # a float32 Gram that overflowed: keep A and H_A
                self._nonfinite(name, "h_a", "the moving average of A is not finite")
                return
            st["a_avg"] = a_est
        else:
            a_est = batch
        if g["a_inverse"] == AInverse.EXACT.value:
            try:
                st["h_a"] = damped_inverse(a_est, lam_a)
            except LinAlgError as err:
                self._nonfinite(name, "h_a", str(err))
                return
            self._count(name, "h_a_updates")
            return
        h_a = st["h_a"]
        if s_a is None:  # A^LM s_a with the moving average (2.4)
            s_a, y_a = B.hessian_action_pair(h_a, p1.a_mean, lambda v: torch.mv(a_est, v), lam_a)
        else:  # (3.14): s_A = H_A abar, y_A = A~ s_A + lambda_A s_A (A~ s_A computed above)
            y_a = batch.add(s_a, alpha=lam_a)
        if not all_finite([s_a, y_a]):  # e.g. A~ s_A overflowed float32
            self._nonfinite(name, "h_a", "the Hessian-action pair (s_A, y_A) is not finite")
            return
        s_a, y_a = B.normalize_pair(s_a, y_a)
        if g["skip_rule"] == SkipRule.CODE.value:
            reason = B.code_skip_reason(s_a, y_a, p1.a_mean.norm())
        else:
            reason = None if B.positive_curvature(s_a, y_a) else "s^T y <= 0"
        self._bfgs_dense(name, "h_a", s_a, y_a, None, reason)

    def _update_h_g(self, g: dict[str, Any], name: str, p1: _Pass1, p2: _Pass2) -> None:
        """Alg. 9 lines 19-21 / Alg. 4 lines 16-18 / Alg. 5 lines 15-19 / Alg. 10 lines 14-16."""
        st = self.module_state[name]
        _, lam_g = damping_split(g["damping"], st["locations"])
        beta, mu1 = g["stat_decay"], g["mu1"]
        # (3.12)-(3.13) with moving averages: s_G <- beta s_G + (1 - beta)(hbar+ - hbar), same for y_G
        s = st["s_g"].mul(beta).add_(p2.h_mean - p1.h_mean, alpha=1.0 - beta)
        y = st["y_g"].mul(beta).add_(p2.g_mean - p1.g_mean, alpha=1.0 - beta)
        # the round-off rule's b_y and r_y (checkpoints from before the rule lack them: start at 0)
        b_y = p2.g_mean.abs().add_(p1.g_mean.abs()).mul_(1.0 - beta)
        r_y = torch.add(p2.g_abs, p1.g_abs).mul_(1.0 - beta)
        if "y_g_bound" in st:  # checkpoints from before the rule lack b_y, r_y: they start at 0
            b_y.add_(st["y_g_bound"], alpha=beta)
            r_y.add_(st["y_g_scale"], alpha=beta)
        st["s_g"], st["y_g"], st["y_g_bound"], st["y_g_scale"] = s, y, b_y, r_y
        if uninformative(b_y, r_y):
            self._count(name, "h_g_uninformative")
            self._count(name, "h_g_skipped")
            if (name, "uninformative") not in self._logged:
                self._logged.add((name, "uninformative"))
                logger.info(
                    "%s: layer '%s': its mean output gradient is at the round-off level (the layer feeds "
                    "BatchNorm?), so y_G carries no information; its H_G pairs are skipped",
                    self.method,
                    name,
                )
            return
        s, y = B.normalize_pair(s, y)  # exact; keeps s^T y, y^T H y and rho^2 in range
        h_of = self._h_g_operator(g, st, lam_g)
        rule = g["pair_damping"]
        if rule == PairDamping.DP_DLM.value:
            s_t, y_t = B.dp_dlm(s, y, h_of(y), mu1, lam_g)
        elif rule == PairDamping.DD.value:
            s_t, y_t = B.double_damping(s, y, h_of(y), mu1, lam_g)
        else:
            s_t, y_t = B.dpi_dlm(s, y, mu1, lam_g)
        hy_t = h_of(y_t)
        positive = B.positive_curvature(s_t, y_t)
        if positive:
            self._record_ratio(name, float(B.curvature_ratio(s_t, y_t, hy_t)), mu1)
        skip = g["skip_rule"]
        if skip == SkipRule.CODE.value:
            reason = B.code_skip_reason(s_t, y_t, p1.g_mean.norm())
        elif not positive:
            reason = "s^T y <= 0"
        elif skip == SkipRule.DD_SKIP.value and B.dd_skip(s_t, y_t, hy_t, mu1):
            reason = "dd-skip"
        else:
            reason = None
        if self.limited_memory:
            self._lbfgs_append(name, s_t, y_t, hy_t, reason, g["history_size"])
        else:
            self._bfgs_dense(name, "h_g", s_t, y_t, hy_t, reason)

    def _h_g_operator(self, g: dict[str, Any], st: dict[str, Any], lam_g: float):
        """``v -> H_G v`` with the current ``H_G`` (the L-BFGS ``gamma`` follows ``damping``)."""
        if not self.limited_memory:
            h = st["h_g"]
            return lambda v: torch.mv(h, v)
        mem = LB.CompactLBFGS.from_state(st)
        gamma = self._initial_gamma(lam_g)
        if mem.gamma != gamma:  # the damping hyper-parameter changed
            mem = LB.lbfgs_factors(mem, gamma)
            st.update(mem.as_state())
        return lambda v: LB.lbfgs_apply(mem, v)

    def _bfgs_dense(
        self, name: str, key: str, s: Tensor, y: Tensor, hy: Tensor | None, reason: str | None
    ) -> None:
        """BFGS (3.11) on ``module_state[name][key]`` unless skipped; a non-finite result is not stored.

        (The chapter-2 code's "keep the old H if H+ has an inf" is this rule for every skip rule.)
        """
        if reason is not None:
            self._count(name, f"{key}_skipped")
            return
        st = self.module_state[name]
        h = st[key]
        if hy is None:
            hy = torch.mv(h, y)
        if all_finite([s, y, hy]):
            new = B.bfgs_update(h, s, y, hy)
            if all_finite([new]):
                st[key] = new
                self._count(name, f"{key}_updates")
                return
        self._nonfinite(name, key, "the BFGS update is not finite")

    def _lbfgs_append(
        self, name: str, s: Tensor, y: Tensor, hy: Tensor, reason: str | None, history_size: int
    ) -> None:
        """K-BFGS(L): append ``(s~, y~)`` to the L-BFGS memory of ``H_G`` unless skipped; a memory
        whose compact factors are not finite is not stored (as :meth:`_bfgs_dense`)."""
        if reason is not None:
            self._count(name, "h_g_skipped")
            return
        st = self.module_state[name]
        if all_finite([s, y, hy]):
            mem = LB.lbfgs_append(LB.CompactLBFGS.from_state(st), s, y, history_size)
            if all_finite([mem.left, mem.right]):
                st.update(mem.as_state())
                self._count(name, "h_g_updates")
                return
        self._nonfinite(name, "h_g", "the L-BFGS memory update is not finite")

    def _nonfinite(self, name: str, key: str, why: str) -> None:
        """A failed ``H_A`` / ``H_G`` update: the previous state stays; counted and logged."""
        self._count(name, f"{key}_nonfinite")
        self._count(name, f"{key}_skipped")
        if (name, key) not in self._logged:
            self._logged.add((name, key))
            logger.warning(
                "%s: layer '%s': %s at step %d; the previous %s is kept (counted in "
                "opt.stats.diagnostics['kbfgs'][%r]['%s_nonfinite'])",
                self.method,
                name,
                why,
                self.step_count,
                key.upper(),
                name,
                key,
            )

    # ------------------------------------------------------------- diagnostics
    def _diag(self, name: str) -> dict[str, Any]:
        return self.stats.diagnostics.setdefault("kbfgs", {}).setdefault(
            name,
            dict(
                h_g_updates=0,
                h_g_skipped=0,
                h_g_uninformative=0,
                h_g_nonfinite=0,
                h_a_updates=0,
                h_a_skipped=0,
                h_a_nonfinite=0,
                ratio_count=0,
                ratio_within=0,
                ratio_sum=0.0,
                ratio_fraction=0.0,
                ratio_mean=0.0,
            ),
        )

    def _count(self, name: str, key: str) -> None:
        self._diag(name)[key] += 1

    def _record_ratio(self, name: str, ratio: float, mu1: float) -> None:
        """Fig. 2.1: how often ``y~^T H y~ / s~^T y~ <= 2/mu1``, and the mean ratio."""
        if not math.isfinite(ratio):
            return
        d = self._diag(name)
        d["ratio_count"] += 1
        d["ratio_within"] += int(ratio <= 2.0 / mu1)
        d["ratio_sum"] += ratio
        d["ratio_fraction"] = d["ratio_within"] / d["ratio_count"]
        d["ratio_mean"] = d["ratio_sum"] / d["ratio_count"]


class KBFGS(_KBFGSBase):
    """K-BFGS, Algorithm 9 (chapter 3): dense BFGS for ``H_G``.

    Args:
        model: the network (DDP-wrapped or not).
        lr: learning rate alpha (Table 3.5, MNIST: 0.03).
        damping: lambda (Table 3.5, MNIST: 0.3), split as ``lambda_A = sqrt(|T| lam)``,
            ``lambda_G = sqrt(lam/|T|)``.
        momentum: mu of ``DW <- mu DW + DW`` (0.9; 0 turns momentum off).
        stat_decay: beta of the ``(s_G, y_G)`` moving averages (and of ``A`` with
            ``a_statistic="moving-average"``) (0.9).
        weight_decay: decoupled weight decay gamma (0).
        update_freq: T, curvature updates (second pass) every T steps (1; 20 for K-BFGS† and CNNs).
        mu1: Powell's parameter (0.2).
        pair_damping, a_statistic, a_inverse, skip_rule, double_grad, lr_decay_power: thesis
            variants (module docstring, :data:`VARIANTS`).
        momentum_style: ``"accumulate"`` (ch. 3) or ``"average"`` (ch. 2).
        layers, exclude: which layers get Kronecker factors (module names, ``fnmatch`` patterns or
            types; default every layer a block models); see
            :class:`~secondorder.optim.kronecker.KroneckerFactoredOptimizer`.
        fallback: what preconditions the tensors no block models: ``"momentum"`` (the thesis's
            rule: the momentum gradient with ``lr/lam``; ``lr`` in chapter 2) or ``"diagonal"``
            (``m / (v + lam)`` with the naive diagonal ``v``; :mod:`secondorder.optim.kronecker`).
    """

    method = "kbfgs"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.03,
        damping: float = 0.3,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        mu1: float = 0.2,
        pair_damping: str = PairDamping.DP_DLM.value,
        a_statistic: str = AStatistic.MINIBATCH.value,
        a_inverse: str = AInverse.HESSIAN_ACTION.value,
        skip_rule: str = SkipRule.POSITIVE.value,
        double_grad: bool = False,
        lr_decay_power: float = 0.0,
        momentum_style: str = MomentumStyle.ACCUMULATE.value,
        layers: LayerSpec | Iterable[LayerSpec] | None = None,
        exclude: LayerSpec | Iterable[LayerSpec] | None = None,
        fallback: str = Fallback.DIAGONAL.value,
    ):
        self._setup(**_arguments(locals()))


class KBFGSL(_KBFGSBase):
    """K-BFGS(L), Algorithm 9 (chapter 3) with compact L-BFGS for ``H_G`` (initial matrix ``I/lambda_G``).

    Args: as :class:`KBFGS` (Table 3.5, MNIST: lr 0.03, damping 0.3), plus
        history_size: p, the number of ``(s, y)`` pairs kept (100).
    """

    method = "kbfgsl"
    limited_memory = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.03,
        damping: float = 0.3,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        history_size: int = 100,
        mu1: float = 0.2,
        pair_damping: str = PairDamping.DP_DLM.value,
        a_statistic: str = AStatistic.MINIBATCH.value,
        a_inverse: str = AInverse.HESSIAN_ACTION.value,
        skip_rule: str = SkipRule.POSITIVE.value,
        double_grad: bool = False,
        lr_decay_power: float = 0.0,
        momentum_style: str = MomentumStyle.ACCUMULATE.value,
        layers: LayerSpec | Iterable[LayerSpec] | None = None,
        exclude: LayerSpec | Iterable[LayerSpec] | None = None,
        fallback: str = Fallback.DIAGONAL.value,
    ):
        self._setup(**_arguments(locals()))


class KBFGS20(_KBFGSBase):
    """K-BFGS-20, Algorithm 4 (chapter 2): DD, moving-average ``A`` with Hessian action, ``H_g = I``.

    Args: as :class:`KBFGS` with the chapter-2 defaults (Table 2.5, MNIST: lr 0.3, damping 0.3;
        ``pair_damping="dd"`` so ``damping <= 1``, ``a_statistic="moving-average"``,
        ``momentum_style="average"``). Other parameters (BatchNorm) use the learning rate ``lr``.
    """

    method = "kbfgs20"
    chapter = 2

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.3,
        damping: float = 0.3,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        mu1: float = 0.2,
        pair_damping: str = PairDamping.DD.value,
        a_statistic: str = AStatistic.MOVING_AVERAGE.value,
        a_inverse: str = AInverse.HESSIAN_ACTION.value,
        skip_rule: str = SkipRule.POSITIVE.value,
        double_grad: bool = False,
        lr_decay_power: float = 0.0,
        momentum_style: str = MomentumStyle.AVERAGE.value,
        layers: LayerSpec | Iterable[LayerSpec] | None = None,
        exclude: LayerSpec | Iterable[LayerSpec] | None = None,
        fallback: str = Fallback.DIAGONAL.value,
    ):
        self._setup(**_arguments(locals()))


class KBFGSL20(_KBFGSBase):
    """K-BFGS(L)-20, Algorithm 4 (chapter 2) with compact L-BFGS for ``H_g`` (initial matrix ``I``).

    Args: as :class:`KBFGS20` (Table 2.5, MNIST: lr 0.3, damping 0.3), plus
        history_size: p (100).
    """

    method = "kbfgsl20"
    chapter = 2
    limited_memory = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.3,
        damping: float = 0.3,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        history_size: int = 100,
        mu1: float = 0.2,
        pair_damping: str = PairDamping.DD.value,
        a_statistic: str = AStatistic.MOVING_AVERAGE.value,
        a_inverse: str = AInverse.HESSIAN_ACTION.value,
        skip_rule: str = SkipRule.POSITIVE.value,
        double_grad: bool = False,
        lr_decay_power: float = 0.0,
        momentum_style: str = MomentumStyle.AVERAGE.value,
        layers: LayerSpec | Iterable[LayerSpec] | None = None,
        exclude: LayerSpec | Iterable[LayerSpec] | None = None,
        fallback: str = Fallback.DIAGONAL.value,
    ):
        self._setup(**_arguments(locals()))


__all__ = [
    "VARIANTS",
    "AInverse",
    "AStatistic",
    "KBFGS",
    "KBFGS20",
    "KBFGSL",
    "KBFGSL20",
    "NonFiniteError",
    "PairDamping",
    "SkipRule",
    "damping_split",
    "uninformative",
    "ROUNDOFF_FACTOR",
]
