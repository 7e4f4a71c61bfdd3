"""KFAC and KFAC-EF: Algorithm 12 (conv and FC layers), Algorithm 7 (the chapter-2 FC form).

Per modeled layer ``l`` (each Kronecker layer block of :mod:`secondorder.capture.blocks`: Linear,
Conv1d and Conv2d (each group of a grouped one), Embedding, self-attention's projections, each
weight matrix of an LSTM / GRU / RNN), with ``abar`` the layer
input with the homogeneous 1 (im2col patches for conv) and ``g = dl_n/dh`` the per-example
pre-activation gradient (docs/notes.md §0):

* ``Omega_l = E_n[sum_t abar_t abar_t^T]``  (mean over examples, sum over locations ``t``);
* ``Gamma_l = E_n[(1/|T|) sum_t g_t g_t^T]`` (mean over examples and locations), with targets
  sampled from the model's predictive distribution (``kfac``, the Fisher) or the true
  targets (``kfac-ef``, the empirical Fisher);
* moving averages ``X <- beta X + (1 - beta) X_batch`` (``stat_decay`` = beta), statistics every
  ``update_freq`` (T1) steps, inverses every ``inverse_freq`` (T2) steps and every T1 steps
  during the first T2 (docs/notes.md §7);
* inverses (line 19): ``H_Omega = (Omega + pi sqrt(lam) I)^-1``,
  ``H_Gamma = (Gamma + sqrt(lam)/pi I)^-1`` with ``pi = sqrt((tr Omega/d_Omega) / (tr Gamma/d_Gamma))``;
  ``pi="none"`` fixes ``pi = 1`` (Algorithm 7 and the published code);
* step (lines 7-9): ``DW <- mu DW + DW_batch``, ``p = H_Gamma DW H_Omega``,
  ``W <- W - alpha (p + gamma W)`` (decoupled weight decay, 3.7.2).

The scale and shift of normalisation layers (``ScaleShiftBlock``) get a dense per-channel block
``(F_c + lam I)^-1`` of the Fisher instead (``F_c`` from the exact per-row gradients, ``expand``
or ``reduce``). Parameters of layers KFAC does not model take the fallback (``fallback=``): the
diagonal preconditioner of :mod:`secondorder.optim.kronecker` (default) or the momentum gradient
with the same ``lr`` and weight decay (3.7.2, the thesis's rule).

Implementation choices:

* The sampled-label pass reuses the graph of pass 1 at ``theta_k`` and its statistics are used
  in the same step, as in both published codebases (docs/notes.md §11.6). Without a closure
  (``loss.backward(); opt.step()``, with ``loss_fn=``) pass 1 is the caller's: the layers are
  recorded by :class:`~secondorder.capture.watch.Watch` and the sampled pass runs at the caller's
  loss call, on the same graph, so the step is the same. It
  differentiates w.r.t. the pre-activations only (``torch.autograd.grad``), so it writes no
  ``.grad``, triggers no DDP all-reduce, and the true-label gradients never mix into the
  sampled ones (docs/notes.md §7, §11.8).
* When there is no warm start, the first statistics initialise the factors directly (the
  bias-corrected start of the moving average).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..capture import Closure
from ..capture import hooks as C
from ..capture.watch import WatchedBatch
from ..linalg import (
    damped_inverse,
    damped_inverses,
    ema_gram_,
    gram,
    gram_,
    gram_fits,
    kron_apply,
    pi_split,
)
from ..linalg.finite import all_finite
from . import hparams as H
from .base import MomentumStyle, NonFiniteError
from .kronecker import Fallback, InverseJob, KroneckerFactoredOptimizer, LayerSpec, fallback_scale


class WeightSharing(str, enum.Enum):
    """How the locations of a layer (sequence positions, conv positions) enter the factors
    (Eschenhagen et al., NeurIPS 2023, "Kronecker-Factored Approximate Curvature for Modern
    Neural Network Architectures")."""

    EXPAND = "expand"  # every location is an example of the layer (Algorithm 12 for conv)
    REDUCE = "reduce"  # per example: the mean input over locations, the summed output gradient


class PiSplit(str, enum.Enum):
    """How the damping ``lam`` is split between the two factors."""

    TRACE = "trace"  # Algorithm 12 line 19
    NONE = "none"  # pi = 1: Algorithm 7 and the published chapter-2/4 code


class KFAC(KroneckerFactoredOptimizer):
    """KFAC with the sampled-label Fisher (Algorithm 12; Algorithm 7 for FC layers).

    Args:
        model: the network (DDP-wrapped or not).
        lr: learning rate alpha (Table 3.5, MNIST: 0.03).
        damping: lambda (Table 3.5, MNIST: 1).
        momentum: mu of ``DW <- mu DW + DW`` (0.9; 0 turns momentum off).
        stat_decay: beta of the factor moving averages (0.9; 0 = current batch only).
        weight_decay: decoupled weight decay gamma (0).
        update_freq: T1, statistics every T1 steps (1 for autoencoders, 10 for CNNs).
        inverse_freq: T2, inverses every T2 steps (20 for autoencoders, 100 for CNNs).
        pi: ``"trace"`` (thesis) or ``"none"`` (pi = 1, published code).
        momentum_style: ``"accumulate"`` (ch. 3-4) or ``"average"`` (ch. 2).
        seed: seed of the optimizer's generator for sampled targets (default ``torch.initial_seed()``).
        weight_sharing: ``"expand"`` (default; Algorithm 12: every location of a layer -- a
            sequence position, a conv position -- is one more row of both factors) or ``"reduce"``
            (per example, the mean input over locations and the summed output gradient:
            ``Omega = E_n[abar_n abar_n^T]``, ``Gamma = E_n[g_n g_n^T]``), as in Eschenhagen et al.
            (2023); reduce suits models that pool over the locations before the loss.
        layers, exclude: which layers get Kronecker factors (module names, ``fnmatch`` patterns or
            types; default every layer a block models); see
            :class:`~secondorder.optim.kronecker.KroneckerFactoredOptimizer`.
        fallback: what preconditions the tensors no block models: ``"momentum"`` (the thesis's
            rule, the momentum gradient) or ``"diagonal"`` (``m / (v + lam)`` with the naive
            diagonal ``v``; :mod:`secondorder.optim.kronecker`).
        loss_fn: the loss module instance a plain torch closure calls (``nn.CrossEntropyLoss()``, ...);
            it lets ``step`` take such a closure (see ``SecondOrderOptimizer.step``).
        factor_dtype: the least precision of the curvature statistics, their inverses and the
            directions (``torch.float32``; ``torch.float64`` allowed): half-precision activations
            and gradients (autocast, bf16 parameters) are read in it, and each update is
            returned in its parameter's dtype.
    """

    method = "kfac"
    steps_watched = True  # with loss_fn=: the sampled backward runs at the caller's loss
    #: sampled targets (Fisher) or true targets (empirical Fisher)
    sampled_fisher = True
    #: Kronecker blocks, and the per-channel blocks of normalisation layers' scale and shift
    block_kinds = frozenset({"kronecker", "channel"})

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.03,
        damping: float = 1.0,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        inverse_freq: int = 20,
        pi: str = PiSplit.TRACE.value,
        momentum_style: str = MomentumStyle.ACCUMULATE.value,
        seed: int | None = None,
        weight_sharing: str = WeightSharing.EXPAND.value,
        layers: LayerSpec | Iterable[LayerSpec] | None = None,
        exclude: LayerSpec | Iterable[LayerSpec] | None = None,
        fallback: str = Fallback.DIAGONAL.value,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        defaults = dict(
            **H.shared(
                lr=lr,
                damping=damping,
                momentum=momentum,
                stat_decay=stat_decay,
                weight_decay=weight_decay,
                update_freq=update_freq,
                inverse_freq=inverse_freq,
            ),
            pi=H.choice("pi", pi, PiSplit),
            weight_sharing=H.choice("weight_sharing", weight_sharing, WeightSharing),
            momentum_style=H.choice("momentum_style", momentum_style, MomentumStyle),
        )
        super().__init__(
            model,
            defaults,
            seed=seed,
            layers=layers,
            exclude=exclude,
            fallback=fallback,
            loss_fn=loss_fn,
            factor_dtype=factor_dtype,
        )
        self.kron_blocks = {n: b for n, b in self.blocks.items() if b.curvature == "kronecker"}
        self.channel_blocks = {n: b for n, b in self.blocks.items() if b.curvature == "channel"}
        self._watch_caller(self.capture, lambda opt: opt._record_spec(), lambda opt, b: opt._watch_loss(b))
        mixed = [n for n, b in self.blocks.items() if not b.example_major]
        if defaults["weight_sharing"] == WeightSharing.REDUCE.value and mixed:
            raise ValueError(
                "weight_sharing='reduce' groups each layer's rows by example, which these layers' "
                f"captured rows are not ({', '.join(mixed)}); exclude them or use 'expand'"
            )

    # --------------------------------------------------------------- statistics
    def _factor_rows(
        self, closure: Closure, recs: dict[str, C.LayerRecord], grads: dict[str, Tensor | None]
    ) -> dict[str, tuple[Tensor, float, Tensor, float]]:
        """Per layer ``(abar rows, s_a, dL/dh rows, s_g)`` with ``Omega = s_a A^T A``, ``Gamma = s_g G^T G``.

        ``s_a = 1/m`` and ``s_g = factor^2/(m|T|)``.

        ``Omega = E_n[sum_t abar abar^T]`` and ``Gamma = E_{n,t}[g g^T]`` with ``g = factor * dL/dh``
        (Algorithm 12, line 14). The rows are checked for non-finite values here, before any state changes.
        """
        m = closure.batch_size
        factor = closure.batch_factor  # g_n = factor * dL/dh_n
        reduce = self.param_groups[0]["weight_sharing"] == WeightSharing.REDUCE.value
        out: dict[str, tuple[Tensor, float, Tensor, float]] = {}
        for name, block in self.kron_blocks.items():
            rec, dh = recs[name], grads[name]
            if dh is None or rec.inputs is None:
                raise C.HookNeverFiredError(f"layer '{name}' ran but its output does not reach the loss")
            a = block.input_rows(rec.inputs)  # (m|T|, D)
            g = self._stat(block.output_rows(dh))  # (m|T|, d_o), unscaled dL/dh
            t = block.num_locations(dh, m)
            if reduce and t > 1:  # rows are example-major: (m, |T|, .) -> one row per example
                a = a.view(m, t, -1).mean(1)  # abar_n (the homogeneous 1 stays 1)
                g = g.view(m, t, -1).sum(1)  # g_n = sum_t g_{n,t}
                t = 1
            out[name] = (a, 1.0 / m, g, factor * factor / (m * t))
        self._check_tensors("curvature statistics", [x for rows in out.values() for x in (rows[0], rows[2])])
        return out

    def _channel_fishers(
        self, closure: Closure, recs: dict[str, C.LayerRecord], grads: dict[str, Tensor | None]
    ) -> dict[str, Tensor]:
        """Per scale-and-shift block, ``F_c = (1/m) sum_r u_{r,c} u_{r,c}^T`` (``(C, k, k)``) with
        ``u = factor * dL/d(gamma_c, beta_c)`` of each row ``r``: each example and location
        (``expand``), or each example (``reduce``: its exact per-example Fisher block). This
        block's form of Algorithm 12 line 14. The captured tensors are checked here (a non-finite
        one raises before any state changes); a product that overflows is left to
        :meth:`_accumulate_factors`, which keeps the previous block."""
        m = closure.batch_size
        factor = closure.batch_factor
        reduce = self.param_groups[0]["weight_sharing"] == WeightSharing.REDUCE.value
        out: dict[str, Tensor] = {}
        for name, block in self.channel_blocks.items():
            rec, dh = recs[name], grads[name]
            if dh is None or rec.inputs is None:
                raise C.HookNeverFiredError(f"layer '{name}' ran but its output does not reach the loss")
            self._check_tensors("curvature statistics", [rec.inputs, dh])
            gram = block.gradient_gram(rec.inputs, self._stat(dh), m, per_example=reduce)  # type: ignore[attr-defined]
            out[name] = gram.mul_(factor * factor / m)
        return out

    def _accumulate_factors(
        self, rows: dict[str, tuple[Tensor, float, Tensor, float]], fishers: dict[str, Tensor], beta: float
    ) -> None:
        """``X <- beta X + (1 - beta) X_batch`` in place (one GEMM per factor); first use initialises.

        A layer whose batch factors are not finite (a float32 Gram that overflowed) keeps its
        previous factors (:meth:`_skip_statistics`): where the rows could overflow the product
        (:func:`~secondorder.linalg.gram_fits`), the batch factors are formed apart and checked
        first. A layer with no previous factors raises :class:`NonFiniteError` instead, before
        any factor changes.
        """
        checked: dict[str, tuple[Tensor, Tensor] | None] = {}  # formed apart; None: not finite
        for name, (a, sa, g, sg) in rows.items():
            if not (gram_fits(a, sa) and gram_fits(g, sg)):
                batch = (gram(a, sa), gram(g, sg))
                checked[name] = batch if all_finite(list(batch)) else None
        bad = [n for n, b in checked.items() if b is None] + [
            n for n, f in fishers.items() if not all_finite([f])
        ]
        first = [n for n in bad if not self.module_state.get(n)]
        if first:
            raise NonFiniteError(
                f"{self.method}: non-finite curvature statistics at step {self.step_count} for "
                f"{', '.join(first)}, which have no previous factors to keep"
            )
        for name, (a, sa, g, sg) in rows.items():
            if name in bad:
                self._skip_statistics(name, "the Kronecker factors of the batch are not finite")
                continue
            st = self.module_state.setdefault(name, {})
            batch = checked.get(name)
            if batch is not None:
                for key, x in zip(("omega", "gamma"), batch, strict=True):
                    st[key] = x if key not in st else st[key].mul_(beta).add_(x, alpha=1.0 - beta)
            elif "omega" not in st:
                st["omega"] = gram(a, sa)
                st["gamma"] = gram(g, sg)
            else:
                ema_gram_(st["omega"], a, beta, sa)
                ema_gram_(st["gamma"], g, beta, sg)
        for name, f in fishers.items():
            if name in bad:
                self._skip_statistics(name, "the scale-and-shift Fisher of the batch is not finite")
                continue
            st = self.module_state.setdefault(name, {})
            if "fisher" not in st:
                st["fisher"] = f
            else:
                st["fisher"].mul_(beta).add_(f, alpha=1.0 - beta)
        # EMA is linear and the old factors agree across ranks: averaging after the update is exact
        D.all_reduce_mean(
            [st[k] for n in rows for st in (self.module_state[n],) for k in ("omega", "gamma")]
            + [self.module_state[n]["fisher"] for n in fishers]
        )

    def _sampled_or_true_grads(
        self,
        closure: Closure | WatchedBatch,
        outputs: Tensor,
        loss: Tensor | None,
        recs: dict[str, C.LayerRecord],
        retain: bool,
    ) -> dict[str, Tensor | None]:
        """``dL/dh`` per layer for the sampled-target loss (``kfac``) or the true loss ``loss``
        (``kfac-ef``)."""
        target_loss = closure.sampled_loss(outputs, self.generator) if self.sampled_fisher else loss
        hs = [recs[n].outputs for n in self.layers]
        grads = closure.grad(target_loss, hs, retain_graph=retain)  # type: ignore[arg-type]
        return dict(zip(self.layers, grads, strict=True))

    def warm_start(self, closures: Iterable[Closure]) -> int:
        """Algorithm 12 line 2: ``Omega``, ``Gamma`` = equal-weight averages over the closures.

        Uses sampled targets for ``kfac`` and true targets for ``kfac-ef``; batch-norm running
        statistics are left unchanged. Returns the number of minibatches used.
        """
        sums: dict[str, list[Tensor]] = {}
        count = 0
        with self._curvature_timer():
            for closure, result, recs in self._warm_start_passes(closures, backward=True):
                grads = self._sampled_or_true_grads(closure, result.outputs, result.loss, recs, False)
                self.stats.warm_start_backward_passes += 1
                for name, (a, sa, g, sg) in self._factor_rows(closure, recs, grads).items():
                    if name in sums:
                        gram_(sums[name][0], a, 1.0, sa)
                        gram_(sums[name][1], g, 1.0, sg)
                    else:
                        sums[name] = [gram(a, sa), gram(g, sg)]
                for name, f in self._channel_fishers(closure, recs, grads).items():
                    if name in sums:
                        sums[name][0].add_(f)
                    else:
                        sums[name] = [f]
                count += 1
            if count:
                D.all_reduce_mean([x for factors in sums.values() for x in factors])
                self._check_tensors(
                    "warm-start statistics", [x for factors in sums.values() for x in factors]
                )
                for name, factors in sums.items():
                    st = self.module_state.setdefault(name, {})
                    keys = ("omega", "gamma") if name in self.kron_blocks else ("fisher",)
                    for key, x in zip(keys, factors, strict=True):
                        st[key] = x.div_(count)
        return count

    # --------------------------------------------------------------- step
    def _record_spec(self) -> dict[str, bool] | None:
        """What pass 1 records at this step: ``None`` when no statistics are due."""
        if self.step_count % self.param_groups[0]["update_freq"] != 0:
            return None
        sampled = self.sampled_fisher
        return dict(inputs=True, outputs=sampled, output_grads=not sampled)

    def _watch_loss(self, batch: WatchedBatch) -> None:
        """Without a closure: the sampled backward (``kfac``) while the caller's graph is alive."""
        if not self.sampled_fisher or not batch.records:
            return
        recs = batch.records
        if any(recs[n].outputs is None for n in self.layers):
            return  # a layer did not run: step() reports it
        with self._curvature_timer(), torch.enable_grad():  # the caller's backward still needs the graph
            batch.extra["grads"] = self._sampled_or_true_grads(batch, batch.outputs, None, recs, retain=True)  # type: ignore[arg-type]
        self.stats.backward_passes += 1
        for rec in recs.values():
            rec.outputs = None  # the activations are not needed any longer

    def _step(self, closure: Closure | None) -> Tensor | None:
        g = self.param_groups[0]
        k = self.step_count
        t2 = g["inverse_freq"]
        spec = self._record_spec()
        stats_due = spec is not None
        inverse_due = k % t2 == 0 or (k <= t2 and stats_due)
        sampled = stats_due and self.sampled_fisher
        with self._rng_restored_on_error():
            batch_stats, fishers = {}, {}
            if closure is None:  # the caller ran forward and backward; the watch recorded them
                batch = self._watched_batch()
                closure, recs, loss = batch, batch.records, None  # type: ignore[assignment]
                if stats_due:
                    if sampled:  # from the unscaled sampled loss
                        grads = batch.extra.get("grads")
                    else:  # the caller's backward, perhaps of a loss scaled by a GradScaler
                        s = batch.grad_scale
                        grads = {n: r.output_grads for n, r in recs.items()}
                        if s != 1.0:
                            grads = {n: g / s if g is not None else None for n, g in grads.items()}
                    if grads is None or any(n not in recs for n in self.layers):
                        raise C.HookNeverFiredError(
                            f"{self.method}: the forward before step() recorded no statistics (it ran "
                            "outside the optimizer's watch, or a modeled layer did not run)"
                        )
            else:
                record = self.capture.record(**spec) if spec is not None else None
                result, recs = self._forward_backward(closure, record, retain_graph=sampled)
                loss = result.loss.detach()
                if sampled:
                    with self._curvature_timer(), torch.enable_grad():
                        grads = self._sampled_or_true_grads(closure, result.outputs, result.loss, recs, False)
                    self.stats.backward_passes += 1
                elif stats_due:  # kfac-ef: dL/dh of the true loss, captured during the backward above
                    grads = {n: r.output_grads for n, r in recs.items()}
            if stats_due:
                with self._curvature_timer(), torch.enable_grad():
                    batch_stats = self._factor_rows(closure, recs, grads)
                    fishers = self._channel_fishers(closure, recs, grads)

        with torch.no_grad():
            with self._curvature_timer():
                if stats_due:
                    self._accumulate_factors(batch_stats, fishers, g["stat_decay"])
                if inverse_due:
                    self._update_inverses(g["damping"], g["pi"])
            self._apply_step(g, fallback_scale(closure))  # type: ignore[arg-type]
        return loss

    def _update_inverses(self, damping: float, pi_mode: str) -> None:
        """Algorithm 12 line 19 per layer (``(F_c + lam I)^-1`` per channel for a scale-and-shift
        block), each on its owner rank, then broadcast; a failed inverse keeps the previous one."""
        root = math.sqrt(damping)

        def kron(st: dict[str, Any]) -> dict[str, Any]:
            pi = pi_split(st["omega"], st["gamma"]) if pi_mode == PiSplit.TRACE.value else 1.0
            return {
                "omega_inv": damped_inverse(st["omega"], pi * root),
                "gamma_inv": damped_inverse(st["gamma"], root / pi),
                "pi": pi,
            }

        def channel(st: dict[str, Any]) -> dict[str, Any]:
            return {"fisher_inv": damped_inverses(st["fisher"], damping)}

        jobs: dict[str, InverseJob] = {}
        for name, st in self.module_state.items():
            if "fisher" in st:
                f = st["fisher"]
                jobs[name] = (float(f.numel() * f.shape[-1]), {"fisher_inv": f}, lambda st=st: channel(st))
            else:
                cost = float(st["omega"].shape[0] ** 3 + st["gamma"].shape[0] ** 3)
                templates = {"omega_inv": st["omega"], "gamma_inv": st["gamma"]}
                jobs[name] = (cost, templates, lambda st=st: kron(st))
        self._refresh_on_owners(jobs)

    def _apply_step(self, g: dict[str, Any], diag_scale: float) -> None:
        """Lines 7-9: momentum, ``p = H_Gamma DW H_Omega``, decoupled weight decay.

        Parameters of layers without factors take the fallback (momentum gradient or diagonal).
        """
        lr, wd, mu, style = g["lr"], g["weight_decay"], g["momentum"], g["momentum_style"]
        momenta: dict[Tensor, Tensor] = {}  # once per parameter (blocks may cover parts of one)

        def momentum(p: Tensor) -> Tensor:
            if p not in momenta:
                momenta[p] = self._momentum(p, p.grad, mu, style)  # type: ignore[arg-type]
            return momenta[p]

        for name, block in self.blocks.items():
            w, b = (block.parameters() + [None])[:2]
            if w.grad is None:
                continue
            gw = momentum(w)
            gb = momentum(b) if b is not None and b.grad is not None else None
            st = self.module_state[name]
            if block.curvature == "channel":  # (F_c + lam I)^-1 [dgamma_c, dbeta_c] per channel
                direction = torch.einsum(
                    "cij,cj->ci", st["fisher_inv"], self._stat(block.grad_matrix(gw, gb))
                )
            else:
                direction = kron_apply(
                    st["gamma_inv"], self._stat(block.grad_matrix(gw, gb)), st["omega_inv"]
                )
            pw, pb = block.split_matrix(direction)
            tw, tb = block.update_targets()
            self._apply_update(tw, pw, lr, wd)
            if tb is not None and pb is not None:
                self._apply_update(tb, pb, lr, wd)
        by_name = dict(self.named_params())
        for pname in self.other_params:
            p = by_name[pname]
            if p.grad is not None:
                v = self._fallback_diagonal(p, p.grad, diag_scale, g)
                if v is not None:
                    self.state[p]["fallback_diagonal"] = v
                m = self._momentum(p, p.grad, mu, style)
                self._apply_update(p, self._fallback_direction(m, v, g["damping"], 1.0), lr, wd)


class KFACEF(KFAC):
    """KFAC with the empirical Fisher: ``Gamma`` from the true-target gradients, no extra backward."""

    method = "kfac-ef"
    sampled_fisher = False
