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

from ..base import NonFiniteError
from .base import KBFGSBase
from .methods import KBFGS, KBFGS20, KBFGSL, KBFGSL20
from .options import (
    ROUNDOFF_FACTOR,
    VARIANTS,
    AInverse,
    AStatistic,
    PairDamping,
    SkipRule,
    damping_split,
    uninformative,
)

__all__ = [
    "KBFGSBase",
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
