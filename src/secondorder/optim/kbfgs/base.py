"""The K-BFGS step (Algorithm 9 lines 6-11, Algorithm 4): pass 1, the preconditioned step, pass 2,
warm start and the fallback; shared by the four K-BFGS classes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ... import distributed as D
from ...capture import Closure, preserved_norm_buffers
from ...capture import hooks as C
from ...linalg import damped_inverse
from ...linalg import lbfgs as LB
from .. import hparams as H
from ..base import MomentumStyle
from ..kronecker import KroneckerFactoredOptimizer, LayerSpec, fallback_scale
from .curvature import CurvatureUpdates
from .options import (
    AInverse,
    AStatistic,
    PairDamping,
    SkipRule,
    damping_split,
)
from .passes import _Pass1, _Pass2


class KBFGSBase(CurvatureUpdates, KroneckerFactoredOptimizer):
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
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
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
        super().__init__(
            model,
            defaults,
            layers=layers,
            exclude=exclude,
            fallback=fallback,
            loss_fn=loss_fn,
            factor_dtype=factor_dtype,
        )
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
        dtype, device = torch.promote_types(w.dtype, self.factor_dtype), w.device  # as the statistics
        gamma = self._initial_gamma(lam_g)
        if self.limited_memory:
            st.update(LB.lbfgs_empty(d_o, gamma, dtype=dtype, device=device).as_state())
        else:
            st["h_g"] = torch.eye(d_o, dtype=dtype, device=device).mul_(gamma)
        for key in ("s_g", "y_g", "y_g_bound", "y_g_scale"):  # y_g_bound, y_g_scale: b_y, r_y of
            st[key] = torch.zeros(d_o, dtype=dtype, device=device)  # the round-off rule

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
            for closure, _, recs in self._warm_start_passes(closures, backward=False):
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
            h = self._stat(rec.outputs.detach())
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
            h, dh = self._stat(h.detach()), self._stat(dh)
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
            pw, pb = block.split_matrix(self._precondition(name, self._stat(block.grad_matrix(gw, gb))))
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
