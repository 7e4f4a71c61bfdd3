"""TNT and TNT-EF: Tensor-Normal Training, Algorithm 15 (chapter 4), identification (4.10).

Every trainable parameter tensor ``W_l`` is its own block (weights and biases separate), viewed
as a ``d_1 x ... x d_k`` tensor (:func:`tensor_view`). With ``G_l`` the minibatch-mean gradient
of the loss on targets sampled from the model's predictive distribution (``tnt``, line 7) or on
the true targets (``tnt-ef``, 4.7.3), and ``G^(i) = mat_i(G) mat_i(G)^T`` its contractions:

* statistics every ``update_freq`` (T1) steps, lines 11-12: ``G^^(i) <- beta G^^(i) + (1 - beta) G^(i)``;
* every ``inverse_freq`` (T2) steps, and every T1 steps during the first T2 (docs/notes.md §5),
  lines 14-16: ``U~_i`` from ``G^^(i)`` by (4.10), then ``K_i = (U~_i + eps I)^-1``;
* lines 10, 18-20: ``m <- mu m + grad``, ``p = m x_1 K_1 x_2 ... x_k K_k`` (Proposition 1:
  ``(K_1 (x) ... (x) K_k) vec(m)``), ``W <- W - alpha (p + gamma W)``.

Conventions (docs/notes.md §5, §11.15-16):

* ``G_l`` is the contraction of the minibatch-**mean** gradient, so ``E[G^(i)]`` is about ``1/m``
  of the per-example contraction: the thesis learning rates (Table 4.3: MNIST ``1e-4``, ``eps 0.1``)
  apply unchanged. For a loss reduced by a sum the gradient is divided by ``m`` first.
* The sampled pass reuses the graph of pass 1 at ``theta_k``:
  ``closure.grad(closure.sampled_loss(outputs, generator), params)`` writes no ``.grad`` and
  triggers no DDP all-reduce (the sampled mean gradient is averaged over ranks explicitly).
  Without a closure (``tnt`` with ``loss_fn=``) it runs at the caller's loss call, on the
  caller's graph (:class:`~secondorder.capture.watch.Watch`), before the caller's backward.
* Warm start (line 2): the equal-weight average of ``G^(i)`` over the given minibatches; the
  moving-average update of step 0 is then skipped and later ones have weight ``1 - beta``. Without
  a warm start the moving average starts as a running mean, weight ``max(1/(n+1), 1 - beta)`` for
  the ``n``-th update (0-based; the reference code's start).
* Inverses are plain damped inverses (Cholesky, eigendecomposition fallback); a factor that cannot
  be inverted keeps its previous inverse with a logged warning.

Tensor views (:func:`tensor_view`), the model-agnostic part shared with Shampoo:

* a convolution weight ``(out, in, *kernel)`` is the 3-way tensor ``(out, in, prod(kernel))``
  (4.7.2, "filter flattening"); any other tensor -- Linear weights, biases, BatchNorm ``gamma`` and
  ``beta``, embeddings, ... -- keeps its own shape;
* modes of size 1 carry no structure and are dropped: a ``1 x 1`` convolution is preconditioned as
  the matrix ``(out, in)``, like a Linear weight; a scalar parameter is a 1-way tensor of size 1;
* a mode larger than ``max_factor_dim`` (default 4096) gets a *diagonal* factor, the diagonal of
  its contraction (``O(d_i)`` memory and time), so a large embedding table stays affordable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..capture import Closure, preserved_norm_buffers
from ..capture.watch import WatchedBatch
from ..linalg.finite import all_finite
from ..linalg.kron import LinAlgError
from ..linalg.roots import inverse_root
from ..linalg.tensor import add_multi_mode_product_, contractions, multi_mode_product, tensor_normal_factors
from . import hparams as H
from .base import MomentumStyle, NonFiniteError, SecondOrderOptimizer

logger = logging.getLogger(__name__)

#: modes larger than this get a diagonal factor (a dense 4096 x 4096 factor is 64 MiB in float32)
MAX_FACTOR_DIM = 4096


@dataclass(frozen=True)
class TensorView:
    """How one parameter tensor is seen by TNT and Shampoo.

    Attributes:
        shape: ``(d_1, ..., d_k)``; the gradient is ``grad.reshape(shape)`` (row-major, 4.2.1).
        diagonal: per mode, whether its factor is kept diagonal (mode larger than ``max_factor_dim``).
    """

    shape: tuple[int, ...]
    diagonal: tuple[bool, ...]

    @property
    def order(self) -> int:
        """``k``, the number of modes."""
        return len(self.shape)

    def cost(self) -> float:
        """Relative cost of the factor work (``sum_i d_i^3`` over dense modes)."""
        return float(sum(d**3 if not diag else d for d, diag in zip(self.shape, self.diagonal, strict=True)))


def tensor_view(
    shape: tuple[int, ...], *, conv_weight: bool = False, max_factor_dim: int = MAX_FACTOR_DIM
) -> TensorView:
    """The tensor view of a parameter of this shape (see the module docstring)."""
    dims = tuple(int(d) for d in shape)
    if conv_weight and len(dims) >= 3:
        dims = (dims[0], dims[1], math.prod(dims[2:]))
    dims = tuple(d for d in dims if d > 1) or (1,)
    return TensorView(dims, tuple(d > max_factor_dim for d in dims))


def parameter_views(
    module: nn.Module, names: Iterable[str], max_factor_dim: int = MAX_FACTOR_DIM
) -> dict[str, TensorView]:
    """:class:`TensorView` of every named parameter of ``module`` (conv weights detected by module type)."""
    conv_weights = {
        f"{mname}.weight" if mname else "weight"
        for mname, m in module.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd) and isinstance(getattr(m, "weight", None), Tensor)
    }
    params = dict(module.named_parameters())
    return {
        n: tensor_view(tuple(params[n].shape), conv_weight=n in conv_weights, max_factor_dim=max_factor_dim)
        for n in names
    }


class TensorFactoredOptimizer(SecondOrderOptimizer):
    """Shared step of TNT (Algorithm 15) and Shampoo (Algorithm 16): tensor views, contractions,
    moving averages, T1/T2, momentum and decoupled weight decay.

    Subclasses choose the statistics (``sampled_fisher``), the preconditioner of the factors
    (:meth:`_preconditioner`) and the inverse timing (:meth:`_inverse_due`).

    State per parameter (``self.state[p]``, saved by parameter name): ``factors`` (the moving
    averages ``G^^(i)``), ``precond`` (the ``K_i``), ``stat_count`` (updates so far),
    ``warm_started`` (set by :meth:`warm_start`) and ``momentum_buffer``.
    """

    #: sampled targets (Fisher, Algorithm 15 line 7) or the true-target gradient (EF, Shampoo)
    sampled_fisher: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        seed: int | None,
        max_factor_dim: int,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(model, defaults, seed=seed, loss_fn=loss_fn, factor_dtype=factor_dtype)
        if self.sampled_fisher:  # without a closure the sampled backward runs at the caller's loss
            self._watch_caller(None, lambda opt: None, lambda opt, batch: opt._watch_loss(batch))
        self.max_factor_dim = H.count("max_factor_dim", max_factor_dim)
        self.views = parameter_views(self.module, [n for n, _ in self.named_params()], self.max_factor_dim)
        logger.info(
            "%s: %d parameter tensors as %s",
            self.method,
            len(self.views),
            ", ".join(f"{n}{list(v.shape)}" for n, v in self.views.items()),
        )

    # --------------------------------------------------------------- statistics
    def _mean_gradients(
        self, closure: Closure, loss: Tensor, params: list[Tensor], retain: bool
    ) -> list[Tensor]:
        """Minibatch-mean gradient of ``loss`` w.r.t. ``params`` (zeros where unused), averaged over ranks."""
        grads = closure.grad(loss, params, retain_graph=retain)
        scale = closure.batch_factor / closure.batch_size  # 1 for batch-mean losses
        out = [
            torch.zeros_like(p) if g is None else (g * scale if scale != 1.0 else g)
            for p, g in zip(params, grads, strict=True)
        ]
        D.all_reduce_mean(out)
        return out

    def _watch_loss(self, batch: WatchedBatch) -> None:
        """Without a closure (``tnt``): line 7's sampled gradient while the caller's graph is alive,
        when statistics are due at the coming step."""
        if not self._stats_due():
            return
        with self._curvature_timer(), torch.enable_grad():
            batch.extra["grads"] = self._statistic_grads(batch, batch.outputs, None, retain=True)  # type: ignore[arg-type]
        self.stats.backward_passes += 1

    def _stats_due(self) -> bool:
        """Lines 6-12 run at this step: every T1 steps, except step 0 after a warm start (which
        uses the warm-start statistics as they are)."""
        k = self.step_count
        warm = k == 0 and any("factors" in self.state[p] for _, p in self.named_params())
        return k % self.param_groups[0]["update_freq"] == 0 and not warm

    def _contractions(self, grads: dict[str, Tensor]) -> dict[str, list[Tensor]]:
        """``[G^(1), ..., G^(k)]`` of each parameter's mean gradient in its tensor view (lines 7, 12)."""
        out = {}
        for name, g in grads.items():
            view = self.views[name]
            out[name] = contractions(self._stat(g).reshape(view.shape), view.diagonal)
        # a contraction that overflowed (float32) is not stored: the previous factors are kept;
        # a tensor without previous factors raises before any state changes
        bad = [n for n, cs in out.items() if not all_finite(cs)]
        if bad:
            by_name = dict(self.named_params())
            first = [n for n in bad if "factors" not in self.state[by_name[n]]]
            if first:
                raise NonFiniteError(
                    f"{self.method}: non-finite curvature statistics at step {self.step_count} for "
                    f"{', '.join(first)}, which have no previous factors to keep"
                )
            for n in bad:
                self._skip_statistics(n, "the factor contractions of the batch are not finite")
                del out[n]
        return out

    def _statistic_grads(
        self, closure: Closure | WatchedBatch, outputs: Tensor, loss: Tensor | None, retain: bool
    ) -> dict[str, Tensor]:
        """The gradients whose contractions are the statistics: sampled targets or true targets
        (``loss``, unused with sampled targets)."""
        names, params = zip(*self.named_params(), strict=True)
        target_loss = closure.sampled_loss(outputs, self.generator) if self.sampled_fisher else loss
        assert target_loss is not None
        grads = self._mean_gradients(closure, target_loss, list(params), retain)  # type: ignore[arg-type]
        self._check_tensors("sampled gradient" if self.sampled_fisher else "gradient", grads)
        return dict(zip(names, grads, strict=True))

    def warm_start(self, closures: Iterable[Closure]) -> int:
        """Line 2: ``G^^(i)`` = equal-weight average of ``G^(i)`` over the closures' minibatches.

        Sampled targets for ``tnt``, true targets for ``tnt-ef`` and ``shampoo``; batch-norm
        running statistics are left unchanged. Returns the number of minibatches used.
        """
        sums: dict[str, list[Tensor]] = {}
        count = 0
        with self._curvature_timer():
            for closure in closures:
                with preserved_norm_buffers(self.module), torch.enable_grad():
                    result = closure.forward(sync=False)
                    self._check_loss(result.loss)
                    grads = self._statistic_grads(closure, result.outputs, result.loss, retain=False)
                self.stats.warm_start_forward_passes += 1
                self.stats.warm_start_backward_passes += 1
                for name, cs in self._contractions(grads).items():
                    if name in sums:
                        for acc, c in zip(sums[name], cs, strict=True):
                            acc.add_(c)
                    else:
                        sums[name] = cs
                count += 1
            by_name = dict(self.named_params())
            for name, cs in sums.items():
                st = self.state[by_name[name]]
                st["factors"] = [c.div_(count) for c in cs]
                st["stat_count"] = count
                st["warm_started"] = True
                st.pop("precond", None)
        return count

    # --------------------------------------------------------------- step
    def _inverse_due(self, k: int, stats_due: bool) -> bool:
        """Lines 14 (TNT): every T2 steps, and every T1 steps during the first T2 (docs/notes.md §5)."""
        t2 = self.param_groups[0]["inverse_freq"]
        return k % t2 == 0 or (k < t2 and stats_due)

    def _preconditioner(self, factors: list[Tensor], view: TensorView, damping: float) -> list[Tensor]:
        raise NotImplementedError

    def _step(self, closure: Closure | None) -> Tensor | None:
        g = self.param_groups[0]
        k = self.step_count
        by_name = dict(self.named_params())
        stats_due = self._stats_due()
        sampled = stats_due and self.sampled_fisher
        with self._rng_restored_on_error():
            watched = None
            if closure is None and self.watch is not None:  # tnt: the sampled backward ran at the loss
                watched = self._watched_batch()
                result = None
            elif closure is None:  # tnt-ef / shampoo after the caller's backward (checked gradients)
                self._check_grads()
                result = None
            else:
                result, _ = self._forward_backward(closure, retain_graph=sampled)
            batch_stats: dict[str, list[Tensor]] = {}
            if stats_due:
                with self._curvature_timer(), torch.enable_grad():
                    if sampled and watched is not None:
                        grads = watched.extra["grads"]
                    elif sampled:  # line 7: another backward with y sampled from the predictive distribution
                        assert closure is not None and result is not None
                        grads = self._statistic_grads(closure, result.outputs, result.loss, retain=False)
                        self.stats.backward_passes += 1
                    else:  # tnt-ef / shampoo: the minibatch gradient itself (taken as a batch mean
                        # without a closure, as any torch optimizer takes .grad)
                        scale = 1.0 if closure is None else closure.batch_factor / closure.batch_size
                        grads = {
                            n: p.grad if scale == 1.0 else p.grad * scale
                            for n, p in by_name.items()
                            if p.grad is not None
                        }
                    batch_stats = self._contractions(grads)

        with torch.no_grad():
            with self._curvature_timer():
                if stats_due:
                    self._update_factors(batch_stats, g["stat_decay"])
                self._update_preconditioners(g["damping"], force=self._inverse_due(k, stats_due))
            self._apply_step(g)
        return None if result is None else result.loss.detach()

    def _update_factors(self, batch_stats: dict[str, list[Tensor]], beta: float) -> None:
        """Line 12: ``G^^(i) <- beta G^^(i) + (1 - beta) G^(i)`` (a running mean for the first updates)."""
        by_name = dict(self.named_params())
        for name, cs in batch_stats.items():
            st = self.state[by_name[name]]
            n = st.get("stat_count", 0)
            weight = 1.0 - beta if st.get("warm_started") else max(1.0 / (n + 1), 1.0 - beta)
            if "factors" not in st or weight == 1.0:
                st["factors"] = cs
            else:
                for f, c in zip(st["factors"], cs, strict=True):
                    f.lerp_(c, weight)  # (1 - w) f + w c in one pass
            st["stat_count"] = n + 1

    def _update_preconditioners(self, damping: float, *, force: bool) -> None:
        """Lines 15-16: recompute the ``K_i`` when due (or missing), each tensor on its owner rank."""
        todo = {
            n: p
            for n, p in self.named_params()
            if "factors" in self.state[p] and (force or "precond" not in self.state[p])
        }
        if not todo:
            return
        owners = D.assign_owners({n: self.views[n].cost() for n in todo})
        me = D.rank()
        for name, p in todo.items():
            st = self.state[p]
            view = self.views[name]
            if owners[name] != me:
                if "precond" not in st:
                    st["precond"] = [torch.empty_like(f) for f in st["factors"]]
                continue
            try:
                st["precond"] = self._preconditioner(st["factors"], view, damping)
            except LinAlgError as err:
                if "precond" not in st:
                    raise
                logger.warning("%s: keeping the previous preconditioner of '%s': %s", self.method, name, err)
        D.broadcast_from_owners({n: self.state[p]["precond"] for n, p in todo.items()}, owners)

    def _apply_step(self, g: dict[str, Any]) -> None:
        """Lines 10, 18-20: momentum, ``p = m x_1 K_1 ... x_k K_k``, ``W <- W - alpha (p + gamma W)``."""
        lr, wd, mu = g["lr"], g["weight_decay"], g["momentum"]
        for name, p in self.named_params():
            if p.grad is None:
                continue
            m = self._momentum(p, p.grad, mu, MomentumStyle.ACCUMULATE.value)
            precond = self.state[p].get("precond")
            if precond is None:  # never had statistics (a parameter unused so far): plain momentum step
                self._apply_update(p, m, lr, wd)
                continue
            shape = self.views[name].shape
            if self.writes_grad or p.dtype != precond[0].dtype:  # the preconditioner form, or a
                # half-precision parameter: the direction in the factors' dtype, then applied
                direction = multi_mode_product(self._stat(m).reshape(shape), precond).reshape(p.shape)
                self._apply_update(p, direction, lr, wd)
                continue
            self._decay_weights(p, lr, wd)
            if p.is_contiguous():  # W <- W - alpha p without forming p (one GEMM for a matrix)
                add_multi_mode_product_(p.view(shape), m.reshape(shape), precond, -lr)
            else:
                p.add_(multi_mode_product(m.reshape(shape), precond).reshape(p.shape), alpha=-lr)


class TNT(TensorFactoredOptimizer):
    """Tensor-Normal Training with the sampled-label Fisher (Algorithm 15).

    Args:
        model: the network (DDP-wrapped or not).
        lr: learning rate alpha (Table 4.3, MNIST: 1e-4).
        damping: epsilon of ``(U~_i + eps I)^-1`` (Table 4.3, MNIST: 0.1).
        momentum: mu of ``m <- mu m + grad`` (0.9; 0 turns momentum off).
        stat_decay: beta of the moving averages of the contractions (0.9; 0 = current batch only).
        weight_decay: decoupled weight decay gamma (0; the CNN runs use 10).
        update_freq: T1, statistics every T1 steps (1 for autoencoders, 10 for CNNs).
        inverse_freq: T2, inverses every T2 steps (20 for autoencoders, 100 for CNNs).
        max_factor_dim: modes larger than this get a diagonal factor (4096).
        seed: seed of the optimizer's generator for sampled targets (default ``torch.initial_seed()``).
        loss_fn: the loss module instance a plain torch closure calls (``nn.CrossEntropyLoss()``, ...);
            it lets ``step`` take such a closure (see ``SecondOrderOptimizer.step``).
        factor_dtype: the least precision of the curvature statistics, their inverses and the
            directions (``torch.float32``; ``torch.float64`` allowed): half-precision activations
            and gradients (autocast, bf16 parameters) are read in it, and each update is
            returned in its parameter's dtype.
    """

    method = "tnt"
    sampled_fisher = True
    steps_watched = True  # with loss_fn=: the sampled backward runs at the caller's loss

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-4,
        damping: float = 0.1,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        inverse_freq: int = 20,
        max_factor_dim: int = MAX_FACTOR_DIM,
        seed: int | None = None,
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
        )
        super().__init__(
            model,
            defaults,
            seed=seed,
            max_factor_dim=max_factor_dim,
            loss_fn=loss_fn,
            factor_dtype=factor_dtype,
        )

    def _preconditioner(self, factors: list[Tensor], view: TensorView, damping: float) -> list[Tensor]:
        """Lines 15-16: ``U~_i`` by (4.10), then ``(U~_i + eps I)^-1``."""
        return [inverse_root(u, 1, damping) for u in tensor_normal_factors(factors, view.shape)]


class TNTEF(TNT):
    """TNT with the empirical Fisher (4.7.3): statistics from the true-label gradient, no extra pass.

    Defaults from Table 4.5 (MNIST): ``lr = 3e-6``, ``damping = 0.01``.
    """

    method = "tnt-ef"
    sampled_fisher = False
    steps_without_closure = True  # its statistics are the minibatch gradient's contractions
    steps_watched = False  # it needs no watch

    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-6,
        damping: float = 0.01,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        update_freq: int = 1,
        inverse_freq: int = 20,
        max_factor_dim: int = MAX_FACTOR_DIM,
        seed: int | None = None,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(
            model,
            lr=lr,
            damping=damping,
            momentum=momentum,
            stat_decay=stat_decay,
            weight_decay=weight_decay,
            update_freq=update_freq,
            inverse_freq=inverse_freq,
            max_factor_dim=max_factor_dim,
            seed=seed,
            loss_fn=loss_fn,
            factor_dtype=factor_dtype,
        )
