"""K-BFGS curvature updates (Algorithm 9 lines 12-23, Algorithm 4): ``H_A`` by Hessian-action
BFGS or the exact inverse, ``H_G`` by BFGS / L-BFGS on the damped pair, and the diagnostics of
Fig. 2.1. A mixin of :class:`~secondorder.optim.kbfgs.base.KBFGSBase`."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from ... import distributed as D
from ...linalg import LinAlgError, damped_inverse
from ...linalg import bfgs as B
from ...linalg import lbfgs as LB
from ...linalg.finite import all_finite
from .options import (
    AInverse,
    AStatistic,
    PairDamping,
    SkipRule,
    damping_split,
    uninformative,
)
from .passes import _Pass1, _Pass2

logger = logging.getLogger(__name__)


class CurvatureUpdates:
    """The per-layer updates of ``H_A`` and ``H_G`` from the two passes of a curvature step."""

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
