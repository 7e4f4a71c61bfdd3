"""SMW-NG, SMW-NG-BD and SMW-GN: subsampled natural gradient / Gauss-Newton with SMW (Algorithm 23).

Each step, on the closure's minibatch ``S1`` (``N1`` examples) and a curvature subsample
``S2 ⊂ S1`` (``N2 = curvature_batch`` examples; :class:`~.levenberg.CurvatureSample`):

1. pass 1 on ``S1``: the loss ``f`` and the gradient ``g`` (line 4);
2. the rows of ``J`` on ``S2`` and ``D`` of (5.6)/(5.7) (line 5), with
   ``G = lam I + s J^T H J``, ``lam = lam_LM + tau``, ``s = 1/N2`` (for a batch-sum loss
   ``s = N1/N2``, so that ``s J^T H J`` estimates the curvature of the minibatch loss):

   * ``smw-ng`` -- ``J`` has the per-example gradients ``grad l_i`` as rows and ``H = I``
     (5.3): the empirical Fisher with the true targets (the thesis), or with targets drawn
     from the model's predictive distribution (``fisher="sampled"``, the published prototypes;
     docs/notes.md §11.19); ``D = lam I + s J J^T`` (Cholesky);
   * ``smw-ng-bd`` -- the same for each layer's block of ``J`` separately (block-diagonal
     ``G``, 5.8): one ``N2 x N2`` solve per layer;
   * ``smw-gn`` -- ``J`` stacks the output Jacobians ``J_i = d yhat_i / d theta`` (``m_L`` rows
     per example) and ``H = blockdiag(H_i)`` is the likelihood's output Hessian (5.2):
     ``diag(p) - p p^T`` for softmax cross-entropy, handled by (5.7) with an LU solve since it
     is singular; ``diag(s (1 - s))`` for sigmoid cross-entropy and ``c I`` for squared error,
     handled by (5.6) (Cholesky) unless an entry underflows to 0, when (5.7) is used;

3. ``d = G^-1 g = (g - J^T u) / lam`` with the SMW weights ``u`` (``p = -d``), then the LM rule
   and the update ``theta <- theta + alpha p`` (lines 6-7, :mod:`.levenberg`).

**The Gram matrix ``J J^T`` without per-example gradients.** For every ``nn.Linear`` layer
(whose parameters are trainable and not shared) the rows of its block of ``J`` are rank one,
``vec(g_ij abar_i^T)``, and ``J_l J_l^T``, ``J_l g`` and ``J_l^T u`` come from the layer inputs
``abar`` and the backpropagated pre-activation vectors ``g`` by the identity of 5.3.3 /
Algorithm 22 (:func:`secondorder.linalg.smw.kron_gram`):

* ``smw-ng`` with the empirical Fisher reuses pass 1: ``g_i = batch_factor * dL/dh_i``
  captured during the ordinary backward (no extra pass, as the thesis says);
* the sampled Fisher and ``smw-gn`` run one forward on ``S2`` and backpropagate ``K``
  vectors at once (``K = 1`` sampled loss; ``K = m_L`` unit vectors ``e_j`` of the outputs,
  Algorithm 22 lines 3-8, as one batched backward).

Every other parameter (``Conv2d``, BatchNorm, LayerNorm, embeddings, ...) gets explicit
per-example Jacobian rows from the same ``S2`` forward (``closure.functional()``) by a
vmap'd backward over the ``R = N2 K`` unit cotangents (``torch.autograd.grad`` with
``is_grads_batched``); its Gram block is ``rows rows^T`` (memory ``R`` times the number of
such parameters: fine for a CNN's conv layers with ``N2 = 32``, large for ``smw-gn`` on a wide
network with many classes). (``torch.func.vjp`` cannot be used
here: BatchNorm's in-place running-statistics update is not allowed inside a torch.func
transform.)

**BatchNorm in train mode** (or any BatchNorm that normalises with batch statistics) couples
the examples: ``l_i`` depends on every example of the batch through the batch mean and
variance. We define ``J`` in all cases as the Jacobian of the per-example losses (NG) or
outputs (GN) of ``S2`` *run as one batch*, with BatchNorm normalising by ``S2``'s statistics,
exactly as in training. ``J^T H J`` is then exactly the Gauss-Newton matrix of the ``S2``
minibatch loss (and ``J^T J`` the empirical Fisher of its per-example losses). Because the
rows of a ``Linear`` layer's block are then no longer rank one, the Kronecker identity does
not hold and, while such a layer is present, *every* parameter's rows are computed
explicitly (the vmap'd backward). Running statistics are left exactly as they were by every
extra pass. Without coupling both definitions coincide with the thesis's.

Passes counted in ``opt.stats``: pass 1 (1 forward, 1 backward), the ``S2`` forward when
run, one backward per backpropagated vector or cotangent (``K`` for the Kronecker layers,
``R`` for the explicit rows), and the trial forward of the LM rule.

Cost per step (5.7): ``O(N2 n + N2^2 sum_l m_l + N2^3)`` for SMW-NG,
``O(m_L N2 n + m_L^2 N2^2 sum_l m_l + m_L^3 N2^3)`` for SMW-GN -- keep ``N2 m_L`` small
(a classifier, not an autoencoder with 784 outputs).

**Under** ``torch.distributed`` each rank builds the blocks of ``J`` (and ``H``) for its own
``S2`` and the blocks are gathered across ranks (``N2`` rows per rank; the factored
``(g, abar)`` of the Kronecker layers, not ``J`` itself), so every rank solves the system of
the union of the ranks' ``S2`` with ``s = 1 / sum N2`` (for a batch-mean loss; ranks may
hold different ``N2``, and every example then weighs the same): with the whole batch as ``S2``
(``curvature_batch=1.0``) and the empirical Fisher or GN, N ranks with batch ``m/N`` take
the steps of one process with batch ``m``. The ``(sum N2)^2`` Gram matrix and its solve are
replicated on every rank.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..capture import Capture, Closure, layer_blocks, preserved_norm_buffers
from ..capture import hooks as C
from ..capture.blocks import LinearBlock
from ..capture.likelihood import Family, Likelihood
from ..linalg import LinAlgError
from ..linalg.smw import kron_gram, kron_jvp, kron_vjp, smw_weights, smw_weights_singular
from . import hparams as H
from .base import NonFiniteError
from .levenberg import CurvatureSample, LMOptimizer, ModelReduction, lm_hparams, subset

logger = logging.getLogger(__name__)


class Fisher(str, enum.Enum):
    """Targets of the per-example gradients of SMW-NG."""

    EMPIRICAL = "empirical"  # true targets, (5.3) (the thesis)
    SAMPLED = "sampled"  # targets drawn from the predictive distribution (the prototypes)


# ------------------------------------------------------------------ blocks of J
@dataclass
class _KronBlock:
    """A Linear layer's block of ``J``: rows ``vec(sum_t g_ijt abar_it^T)``, kept factored."""

    module: nn.Linear
    names: list[str]  # [weight name, bias name?]
    g: Tensor  # (N2, K, T, d_o)
    a: Tensor  # (N2, T, D)

    def tensors(self) -> list[Tensor]:
        return [self.g, self.a]

    def gram(self) -> Tensor:
        return kron_gram(self.g, self.a)

    def jvp(self, vec: dict[str, Tensor]) -> Tensor:
        bias = vec[self.names[1]] if len(self.names) > 1 else None
        return kron_jvp(self.g, self.a, C.grad_matrix(self.module, vec[self.names[0]], bias)).reshape(-1)

    def vjp(self, u: Tensor) -> dict[str, Tensor]:
        mat = kron_vjp(self.g, self.a, u.view(self.g.shape[0], self.g.shape[1]))
        w, b = C.split_matrix(self.module, mat)
        out = {self.names[0]: w}
        if b is not None:
            out[self.names[1]] = b
        return out


@dataclass
class _DenseBlock:
    """A block of ``J`` with explicit rows ``(R, n_block)`` (per-example Jacobians)."""

    names: list[str]
    shapes: list[torch.Size]
    rows: Tensor

    def tensors(self) -> list[Tensor]:
        return [self.rows]

    def gram(self) -> Tensor:
        return self.rows @ self.rows.t()

    def jvp(self, vec: dict[str, Tensor]) -> Tensor:
        return self.rows @ torch.cat([vec[n].reshape(-1) for n in self.names])

    def vjp(self, u: Tensor) -> dict[str, Tensor]:
        flat = self.rows.t() @ u
        sizes = [s.numel() for s in self.shapes]
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(sizes), self.shapes, strict=True)}


def couples_examples(model: nn.Module) -> bool:
    """Whether a BatchNorm layer normalises with batch statistics (train mode, or no running stats)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
        for m in model.modules()
    )


class _SMW(LMOptimizer):
    """Shared machinery of Algorithm 23; the subclasses fix the curvature (NG/GN) and the blocks."""

    #: "ng": per-example gradients, H = I; "gn": output Jacobians, H = output Hessian
    curvature: ClassVar[str] = "ng"
    #: one SMW solve per layer block (SMW-NG-BD) instead of one for all parameters
    block_diagonal: ClassVar[bool] = False

    def _setup(self) -> None:
        """Group the trainable parameters into per-module blocks; find the Kronecker (Linear) layers."""
        trainable = {id(p): n for n, p in self.named_params()}
        modules = list(self.module.named_modules())
        owners = Counter(id(p) for _, mod in modules for p in mod.parameters(recurse=False))
        self.blocks: dict[str, tuple[nn.Module, list[str]]] = {}
        seen: set[int] = set()
        for mname, mod in modules:
            ids = [id(p) for p in mod.parameters(recurse=False) if id(p) in trainable and id(p) not in seen]
            if ids:
                seen.update(ids)
                self.blocks[mname] = (mod, [trainable[i] for i in ids])
        # rank-one rows need every parameter of the layer trainable and used by this layer only
        # Linear layers called as modules (attention's out_proj is used through F.linear: it
        # gets per-example rows like any other tensor)
        linear = {
            n for n, b in layer_blocks(self.module).items() if isinstance(b, LinearBlock) and not b.functional
        }
        self.kron_layers: dict[str, nn.Linear] = {
            mname: mod  # type: ignore[misc]
            for mname, (mod, _) in self.blocks.items()
            if mname in linear
            and all(id(p) in trainable and owners[id(p)] == 1 for p in mod.parameters(recurse=False))
        }
        self.capture = Capture(self.kron_layers)
        self.capture.dtype = self.factor_dtype  # half-precision activations are kept in it
        logger.info(
            "%s: Kronecker Gram for %d Linear layers (%s); explicit per-example rows for %s",
            self.method,
            len(self.kron_layers),
            ", ".join(self.kron_layers) or "none",
            ", ".join(n or "<root>" for n in self.blocks if n not in self.kron_layers) or "nothing",
        )

    @property
    def _fisher(self) -> str:
        return self.param_groups[0].get("fisher", Fisher.EMPIRICAL.value)

    # --------------------------------------------------------------- Algorithm 23
    def _direction(self, closure: Closure, damping: float) -> tuple[Tensor, dict[str, Tensor], float | None]:
        coupled = couples_examples(self.module)
        kron = {} if coupled else self.kron_layers
        # smw-ng with the empirical Fisher: the Linear layers' rows come from pass 1 itself
        reuse = self.curvature == "ng" and self._fisher == Fisher.EMPIRICAL.value and bool(kron)

        record = self.capture.record(inputs=True, outputs=False, output_grads=True) if reuse else None
        result, recs = self._forward_backward(closure, record)

        n1 = closure.batch_size
        idx = self._curvature_indices(n1)
        n2 = int(idx.numel())
        scale = n1 / (closure.batch_factor * n2)  # s = 1/N2 for a batch-mean loss
        with self._curvature_timer():
            blocks: dict[str, _KronBlock | _DenseBlock] = {}
            if reuse:
                factor = closure.batch_factor  # g_i = batch_factor * dL/dh_i
                for name, module in kron.items():
                    rec = recs[name]
                    if rec.output_grads is None:
                        raise C.HookNeverFiredError(f"layer '{name}' ran but does not reach the loss")
                    a, g = _factors(module, rec.inputs, rec.output_grads, n1)
                    g = factor * g[idx].unsqueeze(1)  # (N2, 1, T, d_o)
                    blocks[name] = _KronBlock(module, self.blocks[name][1], self._stat(g), a[idx])
            hess = self._s2_blocks(closure, idx, {} if reuse else kron, blocks)
            curvature = [t for b in blocks.values() for t in b.tensors()]
            self._check_tensors("curvature", curvature + ([hess] if hess is not None else []))
            if D.is_distributed():  # J and H of the union of the ranks' S2
                blocks, hess, n2_all = _gather(blocks, hess, n2)
                scale *= n2 / n2_all  # s = 1/(sum N2) for a batch-mean loss
            try:
                direction = self._solve(blocks, hess, self._grads(), damping, scale, closure.likelihood)
            except LinAlgError as err:
                raise NonFiniteError(
                    f"{self.method}: SMW solve failed at step {self.step_count} ({err}); "
                    "parameters and optimizer state are unchanged"
                ) from err
            # every rank solved the same system; the all-reduce makes the replicas agree bit for
            # bit even where their round-off differed
            D.all_reduce_mean(list(direction.values()))
        return result.loss.detach(), direction, None

    def _s2_blocks(
        self, closure: Closure, idx: Tensor, kron: dict[str, nn.Linear], blocks: dict[str, Any]
    ) -> Tensor | None:
        """Fill ``blocks`` from one forward on ``S2``; returns ``H`` (``(N2, m_L, m_L)``) for GN."""
        dense = [m for m in self.blocks if m not in blocks and m not in kron]
        if not kron and not dense:
            return None
        likelihood = closure.likelihood
        n2 = int(idx.numel())
        x2 = subset(closure.inputs, idx)
        with preserved_norm_buffers(self.module), torch.enable_grad():
            ctx = self.capture.record(inputs=True, outputs=True) if kron else contextlib.nullcontext({})
            with ctx as recs:
                z = closure.functional()({}, x2)
            self.stats.forward_passes += 1
            hess = None
            if self.curvature == "gn":
                out = z.reshape(n2, -1)  # rows of J: d yhat_ij / d theta
                hess = self._stat(likelihood.hessian(z))
            else:
                if self._fisher == Fisher.SAMPLED.value:
                    targets = closure.sample_targets(z, self.generator)
                else:
                    targets = subset(closure.targets, idx)
                out = likelihood.per_example_loss(z, targets).reshape(n2, 1)  # rows: grad l_i
            k = out.shape[1]
            if kron:
                hs = [recs[n].outputs for n in kron]
                keep = bool(dense)
                if k == 1:  # sum_i l_i: the rows are separable, one backward gives every g_i
                    gs = torch.autograd.grad(out.sum(), hs, retain_graph=keep, allow_unused=True)
                    gs = [x.unsqueeze(0) if x is not None else None for x in gs]
                else:  # Algorithm 22 lines 3-8: e_j for every example at once, K batched backwards
                    eye = torch.eye(k, dtype=out.dtype, device=out.device)
                    cot = eye.unsqueeze(1).expand(k, n2, k).contiguous()
                    gs = torch.autograd.grad(
                        out, hs, cot, is_grads_batched=True, retain_graph=keep, allow_unused=True
                    )
                self.stats.backward_passes += k
                for (name, module), gk in zip(kron.items(), gs, strict=True):
                    if gk is None:
                        raise C.HookNeverFiredError(f"layer '{name}' ran but does not reach the loss")
                    a, _ = _factors(module, recs[name].inputs, recs[name].outputs, n2)
                    g = C.output_rows(module, gk.reshape(-1, *gk.shape[2:])).reshape(k, n2, a.shape[1], -1)
                    blocks[name] = _KronBlock(module, self.blocks[name][1], self._stat(g.transpose(0, 1)), a)
            if dense:
                r = n2 * k
                names = [n for m in dense for n in self.blocks[m][1]]
                by_name = dict(self.named_params())
                params = [by_name[n] for n in names]
                cot = torch.eye(r, dtype=out.dtype, device=out.device).view(r, n2, k)
                rows = torch.autograd.grad(out, params, cot, is_grads_batched=True, allow_unused=True)
                self.stats.backward_passes += r
                full = {
                    n: (x if x is not None else torch.zeros(r, *p.shape, dtype=p.dtype, device=p.device))
                    for n, p, x in zip(names, params, rows, strict=True)
                }
                for m in dense:
                    ns = self.blocks[m][1]
                    mat = torch.cat([full[n].reshape(r, -1) for n in ns], dim=1)
                    blocks[m] = _DenseBlock(ns, [by_name[n].shape for n in ns], self._stat(mat))
        return hess

    def _solve(
        self,
        blocks: dict[str, _KronBlock | _DenseBlock],
        hess: Tensor | None,
        grads: dict[str, Tensor],
        damping: float,
        scale: float,
        likelihood: Likelihood,
    ) -> dict[str, Tensor]:
        """``d = (g - J^T u) / lam`` for all blocks together, or per block (SMW-NG-BD)."""
        groups = [[b] for b in blocks.values()] if self.block_diagonal else [list(blocks.values())]
        direction: dict[str, Tensor] = {}
        for group in groups:
            gram = sum(b.gram() for b in group)
            jg = sum(b.jvp(grads) for b in group)
            u = self._weights(gram, jg, damping, scale, hess, likelihood)  # type: ignore[arg-type]
            for b in group:
                for n, jtu in b.vjp(u).items():
                    direction[n] = torch.sub(grads[n], jtu).div_(damping)
        return direction

    @staticmethod
    def _weights(
        gram: Tensor, jg: Tensor, damping: float, scale: float, hess: Tensor | None, likelihood: Likelihood
    ) -> Tensor:
        """SMW weights by (5.6) when ``H`` is invertible (NG: ``H = I``), by (5.7) otherwise."""
        if hess is None:
            return smw_weights(gram, jg, damping, scale)
        if likelihood.family is not Family.CATEGORICAL:  # diagonal H: diag(s(1-s)) or c I
            diag = torch.diagonal(hess, dim1=1, dim2=2)
            if bool((diag > 0).all()):
                return smw_weights(gram, jg, damping, scale, torch.diag_embed(1.0 / diag))
        return smw_weights_singular(gram, jg, damping, scale, hess)


def _gather(
    blocks: dict[str, _KronBlock | _DenseBlock], hess: Tensor | None, n2: int
) -> tuple[dict[str, _KronBlock | _DenseBlock], Tensor | None, int]:
    """The blocks of ``J`` (and ``H``) of every rank's ``S2`` stacked in rank order, and ``sum N2``.

    Every per-example tensor has the examples first (dense rows are example-major), so the
    result is what one process holding all the ranks' ``S2`` examples would build. One gather
    call; a ``(N2, 1)`` marker counts the examples (ranks may hold different ``N2``).
    """
    local = [t for b in blocks.values() for t in b.tensors()]  # in each block's tensors() order
    marker = local[0].new_ones(n2, 1)
    full = iter(D.all_gather_examples([*local, marker] + ([hess] if hess is not None else [])))
    out: dict[str, _KronBlock | _DenseBlock] = {}
    for name, b in blocks.items():
        if isinstance(b, _KronBlock):
            out[name] = _KronBlock(b.module, b.names, next(full), next(full))
        else:
            out[name] = _DenseBlock(b.names, b.shapes, next(full))
    n2_all = next(full).shape[0]
    return out, (next(full) if hess is not None else None), n2_all


def _factors(module: nn.Linear, inputs: Tensor, outputs: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``abar`` as ``(n, T, D)`` and an output-shaped tensor as ``(n, T, d_o)`` (``T`` locations)."""
    a = C.input_rows(module, inputs)
    g = C.output_rows(module, outputs)
    return a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])


_LM_DOC = """
        lr: learning rate alpha (5.8, MNIST and CIFAR-10: 0.1 / 0.01; Theorem 6: 1).
        damping: the initial lam_LM (1, 5.8); the LM rule adapts it (``opt.lm_damping``).
        tau: the floor of ``lam = lam_LM + tau`` (1e-3).
        curvature_batch: N2, a count or a fraction of the batch in (0, 1] (default half the batch).
        curvature_sample: ``"first"`` N2 examples of the batch, or ``"random"`` (optimizer's generator).
        weight_decay: decoupled weight decay gamma (0).
        lm_boost, lm_drop, lm_epsilon: boost, drop and eps of the LM rule (1.01, 0.99, 1/4).
        model_reduction: denominator of rho, ``"damped"`` (default, the code) or ``"undamped"`` (5.5).
        accept_threshold: eta of Theorem 6: take the step only if rho >= eta (None: always, Alg. 23).
        seed: seed of the optimizer's generator (random S2, sampled targets).
        loss_fn: the loss module instance a plain torch closure calls (``nn.CrossEntropyLoss()``, ...);
            it lets ``step`` take such a closure (see ``SecondOrderOptimizer.step``).
        factor_dtype: the least precision of the curvature statistics, their inverses and the
            directions (``torch.float32``; ``torch.float64`` allowed): half-precision activations
            and gradients (autocast, bf16 parameters) are read in it, and each update is
            returned in its parameter's dtype."""


class SMWNG(_SMW):
    """SMW-NG: subsampled natural gradient with SMW (Algorithm 23, (5.3), (5.6)).

    Args:
        model: the network.
        fisher: ``"empirical"`` (true targets, the thesis) or ``"sampled"`` (model targets).
    """

    __doc__ = (__doc__ or "") + _LM_DOC
    method = "smw-ng"
    curvature = "ng"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 1.0,
        tau: float = 1e-3,
        curvature_batch: int | float | None = None,
        curvature_sample: str = CurvatureSample.FIRST.value,
        fisher: str = Fisher.EMPIRICAL.value,
        weight_decay: float = 0.0,
        lm_boost: float = 1.01,
        lm_drop: float = 0.99,
        lm_epsilon: float = 0.25,
        model_reduction: str = ModelReduction.DAMPED.value,
        accept_threshold: float | None = None,
        seed: int | None = None,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        defaults = lm_hparams(
            lr=lr,
            damping=damping,
            tau=tau,
            curvature_batch=curvature_batch,
            curvature_sample=curvature_sample,
            weight_decay=weight_decay,
            lm_boost=lm_boost,
            lm_drop=lm_drop,
            lm_epsilon=lm_epsilon,
            model_reduction=model_reduction,
            accept_threshold=accept_threshold,
        )
        defaults["fisher"] = H.choice("fisher", fisher, Fisher)
        super().__init__(model, defaults, seed=seed, loss_fn=loss_fn, factor_dtype=factor_dtype)
        self._setup()


class SMWNGBD(SMWNG):
    """SMW-NG-BD: SMW-NG with one SMW solve per layer block (block-diagonal Fisher, 5.8)."""

    method = "smw-ng-bd"
    block_diagonal = True


class SMWGN(_SMW):
    """SMW-GN: subsampled generalized Gauss-Newton with SMW (Algorithm 23, (5.2), (5.6)/(5.7)).

    Args:
        model: the network.
    """

    __doc__ = (__doc__ or "") + _LM_DOC
    method = "smw-gn"
    curvature = "gn"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 1.0,
        tau: float = 1e-3,
        curvature_batch: int | float | None = None,
        curvature_sample: str = CurvatureSample.FIRST.value,
        weight_decay: float = 0.0,
        lm_boost: float = 1.01,
        lm_drop: float = 0.99,
        lm_epsilon: float = 0.25,
        model_reduction: str = ModelReduction.DAMPED.value,
        accept_threshold: float | None = None,
        seed: int | None = None,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        defaults = lm_hparams(
            lr=lr,
            damping=damping,
            tau=tau,
            curvature_batch=curvature_batch,
            curvature_sample=curvature_sample,
            weight_decay=weight_decay,
            lm_boost=lm_boost,
            lm_drop=lm_drop,
            lm_epsilon=lm_epsilon,
            model_reduction=model_reduction,
            accept_threshold=accept_threshold,
        )
        super().__init__(model, defaults, seed=seed, loss_fn=loss_fn, factor_dtype=factor_dtype)
        self._setup()
