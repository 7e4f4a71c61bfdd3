"""Block Fisher: the exact damped per-layer Fisher, the reference direction of Figure 4.1 (4.3.4).

One block per module that owns trainable parameters (a Linear or conv layer: ``(W, b)``
together; a BatchNorm layer: ``(gamma, beta)``; ...), with the block vector
``theta_l = [vec(W); b]`` (row-major ``vec``, the parameters in registration order). With
``J_n = d l_n / d theta_l`` the per-example gradient of the loss on targets sampled from the
model's predictive distribution (``torch.func.jacrev`` of the per-example losses, so examples
coupled through batch norm are handled exactly):

* ``F_l <- beta F_l + (1 - beta) (1/m) sum_n J_n J_n^T`` (``stat_decay`` = beta; the scale of the
  per-example Fisher, like KFAC's factors; a running mean for the first updates, and the average
  over the minibatches of :meth:`BlockFisher.warm_start` when one is given, after which step 0
  uses it as is);
* ``m <- mu m + grad`` (``momentum`` = mu), ``p_l = (F_l + lambda I)^-1 m_l`` by a Cholesky solve
  (eigendecomposition fallback), ``theta <- theta - alpha (p + gamma theta)``.

4.3.4: "both the gradient and the block-Fisher matrices were estimated with a moving-average
scheme, with the decay factors being 0.9". The thesis gives no learning rate or damping; the
defaults mirror KFAC's (Table 4.3, MNIST: ``lr = 0.03``, ``damping = 1``).

For small models only: every block is a dense ``d x d`` matrix refactorised at every step
(``O(d^2)`` memory, ``O(d^3)`` time). A block with more than ``max_block_dim`` parameters
(default 6000: the 5140-parameter first layer of the Figure 4.1 network fits; 6000^2 float64 is
288 MB) raises ``ValueError`` when the optimizer is built.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..capture import Closure, preserved_norm_buffers, unwrap
from ..capture.hooks import at_least
from ..linalg.finite import all_finite
from . import hparams as H
from .base import MomentumStyle, NonFiniteError, SecondOrderOptimizer

logger = logging.getLogger(__name__)

#: largest block (number of parameters of one module) the dense Fisher accepts
MAX_BLOCK_DIM = 6000
_ROOT = "<root>"


def parameter_blocks(module: nn.Module) -> dict[str, list[str]]:
    """Module name -> names of its own trainable parameters (registration order), where there are any."""
    blocks: dict[str, list[str]] = {}
    for mname, m in module.named_modules():
        names = [
            f"{mname}.{pn}" if mname else pn for pn, p in m.named_parameters(recurse=False) if p.requires_grad
        ]
        if names:
            blocks[mname] = names
    return blocks


def per_example_gradients(closure: Closure, targets: Tensor, names: list[str]) -> dict[str, Tensor]:
    """``d l_n / d theta`` for every example ``n`` and named parameter: ``{name: (m, *shape)}``.

    ``l_n`` is the closure's per-example loss (:meth:`Likelihood.per_example_loss`) on ``targets``.
    One ``torch.func.jacrev`` of the vector of per-example losses over a functional forward of the
    whole batch; buffers are passed as (copied) inputs, so batch-norm running statistics and the
    user's module are left unchanged.
    """
    module = unwrap(closure.model)
    params = {n: p.detach() for n, p in module.named_parameters() if n in set(names)}
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    inputs = tuple(closure.inputs) if isinstance(closure.inputs, tuple | list) else (closure.inputs,)
    likelihood = closure.likelihood

    def losses(ps: dict[str, Tensor], bs: dict[str, Tensor]) -> Tensor:
        out = torch.func.functional_call(module, (ps, bs), inputs, strict=False)
        return likelihood.per_example_loss(at_least(out, torch.float32), targets)  # as autocast would

    try:
        return torch.func.jacrev(losses)(params, buffers)
    except RuntimeError as err:
        # torch's batched backward of a normalisation layer under autocast mixes dtypes
        # (pytorch/pytorch#184890): the same rows, one backward per example
        if "expected scalar type" not in str(err):
            raise
    with torch.enable_grad():
        ps = {n: p.requires_grad_() for n, p in params.items()}
        per_example = losses(ps, buffers)
        rows = [
            torch.autograd.grad(l_n, list(ps.values()), retain_graph=True, allow_unused=True)
            for l_n in per_example
        ]
    return {
        n: torch.stack([r[i] if r[i] is not None else torch.zeros_like(p) for r in rows])
        for i, (n, p) in enumerate(ps.items())
    }


class BlockFisher(SecondOrderOptimizer):
    """Exact damped block-diagonal Fisher (one dense block per module), sampled labels.

    Args:
        model: the network (small: see ``max_block_dim``).
        lr: learning rate alpha (0.03).
        damping: lambda of ``(F_l + lambda I)^-1`` (1.0).
        momentum: mu of ``m <- mu m + grad`` (0.9; 0 turns momentum off).
        stat_decay: beta of the moving average of the blocks (0.9; 0 = current batch only).
        weight_decay: decoupled weight decay gamma (0).
        max_block_dim: the largest block accepted (6000 parameters); larger ones raise ``ValueError``.
        seed: seed of the optimizer's generator for sampled targets (default ``torch.initial_seed()``).

    Raises:
        ValueError: an invalid hyper-parameter, or a module with more than ``max_block_dim`` parameters.
        loss_fn: the loss module instance a plain torch closure calls (``nn.CrossEntropyLoss()``, ...);
            it lets ``step`` take such a closure (see ``SecondOrderOptimizer.step``).
        factor_dtype: the least precision of the curvature statistics, their inverses and the
            directions (``torch.float32``; ``torch.float64`` allowed): half-precision activations
            and gradients (autocast, bf16 parameters) are read in it, and each update is
            returned in its parameter's dtype.
    """

    method = "block-fisher"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.03,
        damping: float = 1.0,
        momentum: float = 0.9,
        stat_decay: float = 0.9,
        weight_decay: float = 0.0,
        max_block_dim: int = MAX_BLOCK_DIM,
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
            ),
        )
        self.max_block_dim = H.count("max_block_dim", max_block_dim)
        super().__init__(model, defaults, seed=seed, loss_fn=loss_fn, factor_dtype=factor_dtype)
        trainable = {n for n, _ in self.named_params()}
        self.blocks = {
            b: [n for n in names if n in trainable] for b, names in parameter_blocks(self.module).items()
        }
        by_name = dict(self.named_params())
        self.block_dims = {b: sum(by_name[n].numel() for n in names) for b, names in self.blocks.items()}
        too_big = {b: d for b, d in self.block_dims.items() if d > self.max_block_dim}
        if too_big:
            raise ValueError(
                f"max_block_dim: block-fisher is an exact reference for small models; blocks "
                f"{', '.join(f'{b or _ROOT!r} ({d} parameters)' for b, d in too_big.items())} "
                f"exceed max_block_dim={self.max_block_dim} (a dense d x d Fisher per block)"
            )
        logger.info(
            "%s: %d blocks (%s)",
            self.method,
            len(self.blocks),
            ", ".join(f"{b or _ROOT}: {d}" for b, d in self.block_dims.items()),
        )

    # --------------------------------------------------------------- statistics
    def _batch_fisher(self, closure: Closure, outputs: Tensor) -> dict[str, Tensor]:
        """``(1/m) sum_n J_n J_n^T`` per block, sampled targets drawn from the optimizer's generator."""
        targets = closure.sample_targets(outputs.detach(), self.generator)
        names = [n for names in self.blocks.values() for n in names]
        jac = per_example_gradients(closure, targets, names)
        self._check_tensors("per-example gradients", jac.values())
        m = closure.batch_size
        out = {}
        for b, pnames in self.blocks.items():
            j = self._stat(torch.cat([jac[n].reshape(m, -1) for n in pnames], dim=1))  # (m, d_l)
            out[b] = torch.mm(j.t(), j).div_(m)
        D.all_reduce_mean(list(out.values()))
        return out

    def warm_start(self, closures: Iterable[Closure]) -> int:
        """``F_l`` = the equal-weight average of the minibatch block Fishers over the closures."""
        sums: dict[str, Tensor] = {}
        count = 0
        with self._curvature_timer():
            for closure in closures:
                with preserved_norm_buffers(self.module), torch.no_grad():
                    result = closure.forward(sync=False)
                self._check_loss(result.loss)
                self.stats.warm_start_forward_passes += 2  # the outputs, then the jacrev forward
                self.stats.warm_start_backward_passes += 1
                for b, f in self._batch_fisher(closure, result.outputs).items():
                    sums[b] = sums[b].add_(f) if b in sums else f
                count += 1
            for b, total in sums.items():
                self.module_state[b] = {
                    "fisher": total.div_(count),
                    "stat_count": count,
                    "warm_started": True,
                }
        return count

    # --------------------------------------------------------------- step
    def _step(self, closure: Closure) -> Tensor:
        g = self.param_groups[0]
        warm = self.step_count == 0 and bool(self.module_state)  # step 0 after a warm start uses it as is
        with self._rng_restored_on_error():
            result, _ = self._forward_backward(closure)
            batch: dict[str, Tensor] = {}
            if not warm:
                with self._curvature_timer():
                    batch = self._finite_fishers(self._batch_fisher(closure, result.outputs))
                self.stats.forward_passes += 1
                self.stats.backward_passes += 1

        with torch.no_grad():
            with self._curvature_timer():
                self._update_fisher(batch, g["stat_decay"])
            self._apply_step(g)
        return result.loss.detach()

    def _finite_fishers(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's block Fishers that are finite: a product of finite per-example gradients
        that overflowed (float32) is not stored, the block keeps its previous Fisher
        (:meth:`_skip_statistics`); a block without one raises :class:`NonFiniteError` before any
        state changes."""
        bad = [b for b, f in batch.items() if not all_finite([f])]
        first = [b for b in bad if "fisher" not in self.module_state.get(b, {})]
        if first:
            raise NonFiniteError(
                f"{self.method}: non-finite curvature statistics at step {self.step_count} for "
                f"{', '.join(first)}, which have no previous Fisher to keep"
            )
        for b in bad:
            self._skip_statistics(b, "the block Fisher of the batch is not finite")
        return {b: f for b, f in batch.items() if b not in bad}

    def _update_fisher(self, batch: dict[str, Tensor], beta: float) -> None:
        """``F_l <- beta F_l + (1 - beta) F_batch`` (weight ``max(1/(n+1), 1 - beta)`` without warm start)."""
        for b, f in batch.items():
            st = self.module_state.setdefault(b, {})
            n = st.get("stat_count", 0)
            weight = 1.0 - beta if st.get("warm_started") else max(1.0 / (n + 1), 1.0 - beta)
            if "fisher" not in st or weight == 1.0:
                st["fisher"] = f
            else:
                st["fisher"].mul_(1.0 - weight).add_(f, alpha=weight)
            st["stat_count"] = n + 1

    def _apply_step(self, g: dict[str, Any]) -> None:
        """``m <- mu m + grad``, ``p_l = (F_l + lambda I)^-1 m_l``, then decoupled weight decay."""
        lr, wd, mu, lam = g["lr"], g["weight_decay"], g["momentum"], g["damping"]
        by_name = dict(self.named_params())
        for b, names in self.blocks.items():
            params = [by_name[n] for n in names]
            if all(p.grad is None for p in params):
                continue
            moms = [
                torch.zeros_like(p)
                if p.grad is None
                else self._momentum(p, p.grad, mu, MomentumStyle.ACCUMULATE.value)
                for p in params
            ]
            vec = self._stat(torch.cat([m.reshape(-1) for m in moms]))
            direction = damped_solve(self.module_state[b]["fisher"], vec, lam)
            offset = 0
            for p in params:
                n = p.numel()
                if p.grad is not None:
                    self._apply_update(p, direction[offset : offset + n].view_as(p), lr, wd)
                offset += n


def damped_solve(fisher: Tensor, rhs: Tensor, damping: float) -> Tensor:
    """``(F + damping I)^-1 rhs`` by Cholesky; the symmetrised eigendecomposition if that fails."""
    d = fisher.shape[0]
    damped = fisher + damping * torch.eye(d, dtype=fisher.dtype, device=fisher.device)
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.unsqueeze(1), chol).squeeze(1)
    evals, evecs = torch.linalg.eigh(0.5 * (fisher + fisher.t()))
    return evecs @ ((evecs.t() @ rhs) / (evals.clamp_min(0) + damping))
