"""Hessian-free (Martens 2010), the baseline of chapter 5: damped CG on Gauss-Newton-vector products.

Each step, on the closure's minibatch ``S1`` and the curvature subsample ``S2 ⊂ S1`` (as for
SMW, :mod:`.levenberg`):

1. pass 1 on ``S1``: loss ``f`` and gradient ``g``;
2. ``d ~= (B + lam I)^-1 g`` by damped linear conjugate gradient
   (:func:`secondorder.linalg.cg.conjugate_gradient`) with the subsampled generalized
   Gauss-Newton matrix ``B = s sum_{i in S2} J_i^T H_i J_i`` (``s = 1/N2``; ``H_i`` the
   likelihood's output Hessian) applied matrix-free: ``B v = s J^T (H (J v))``;
3. the LM rule (``lam = lam_LM + tau``, :mod:`.levenberg`) and ``theta <- theta - alpha d``.

The products use one forward of ``S2`` through ``closure.functional()`` whose graph is kept
for the whole CG run: ``J^T w`` is a backward (VJP) and ``J v`` the "double-backward" trick,
the derivative of the linear map ``w -> J^T w`` (built once with ``create_graph``) in the
direction ``v`` -- equivalent to a forward-mode JVP (R-op), and unlike ``torch.func.jvp`` it
works with BatchNorm in train mode, whose running statistics are restored after the pass.
With BatchNorm in train mode, ``B`` is the Gauss-Newton matrix of the ``S2`` minibatch loss
run as one batch (the same definition as SMW-GN; see :mod:`.smw`).

The thesis does not give the CG budget ``n_HF``, the stopping rule or the warm start
(docs/notes.md §9). They are parameters here, with short Kiros-style runs by default
**[inferred]**: at most ``cg_max_iters = 10`` iterations, stopping early when the relative
residual ``|g - (B + lam I) d| / |g|`` falls below ``cg_tol = 1e-4``; CG starts from the
previous step's solution times ``cg_decay = 0.95`` (Martens's decayed warm start; 0 starts from
zero). The model reduction of the LM rule uses the actual ``d^T (B + lam I) d`` of the
(truncated) solution, read off the CG residual without another product.

Passes counted in ``opt.stats``: pass 1, the ``S2`` forward, and per product one forward
(the R-op) and one backward; the trial forward of the LM rule. Under ``torch.distributed``
every product ``B v`` is averaged across ranks, so ``B`` is the Gauss-Newton matrix of the
union of the ranks' ``S2``'s, as one process would compute it.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..capture import Closure, preserved_norm_buffers
from ..capture.closure import twice_differentiable
from ..linalg.cg import conjugate_gradient
from . import hparams as H
from .levenberg import CurvatureSample, LMOptimizer, ModelReduction, lm_hparams, subset

logger = logging.getLogger(__name__)


class HessianFree(LMOptimizer):
    """Hessian-free: damped CG on subsampled Gauss-Newton products, LM damping (Martens 2010; ch. 5).

    Args:
        model: the network.
        lr: learning rate alpha (5.8: 0.1 for MNIST, 0.05 for webspam).
        damping: the initial lam_LM (1, 5.8); the LM rule adapts it (``opt.lm_damping``).
        tau: the floor of ``lam = lam_LM + tau`` (1e-3).
        curvature_batch: N2, a count or a fraction of the batch in (0, 1] (default half the batch).
        curvature_sample: ``"first"`` N2 examples of the batch, or ``"random"`` (optimizer's generator).
        cg_max_iters: at most this many CG iterations per step (10).
        cg_tol: stop CG when the relative residual is below this (1e-4; 0 runs ``cg_max_iters``).
        cg_decay: CG starts from ``cg_decay`` times the previous solution (0.95; 0: from zero).
        weight_decay: decoupled weight decay gamma (0).
        lm_boost, lm_drop, lm_epsilon: boost, drop and eps of the LM rule (1.01, 0.99, 1/4).
        model_reduction: denominator of rho, ``"damped"`` (default: the CG quadratic) or ``"undamped"`` (5.5).
        accept_threshold: eta of Theorem 6: take the step only if rho >= eta (None: always).
        seed: seed of the optimizer's generator (random S2).
        loss_fn: the loss module instance a plain torch closure calls (``nn.CrossEntropyLoss()``, ...);
            it lets ``step`` take such a closure (see ``SecondOrderOptimizer.step``).
        factor_dtype: the least precision of the curvature statistics, their inverses and the
            directions (``torch.float32``; ``torch.float64`` allowed): half-precision activations
            and gradients (autocast, bf16 parameters) are read in it, and each update is
            returned in its parameter's dtype.
    """

    method = "hf"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 1.0,
        tau: float = 1e-3,
        curvature_batch: int | float | None = None,
        curvature_sample: str = CurvatureSample.FIRST.value,
        cg_max_iters: int = 10,
        cg_tol: float = 1e-4,
        cg_decay: float = 0.95,
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
        defaults["cg_max_iters"] = H.count("cg_max_iters", cg_max_iters)
        defaults["cg_tol"] = H.positive("cg_tol", cg_tol, allow_zero=True)
        defaults["cg_decay"] = H.positive("cg_decay", cg_decay, allow_zero=True)
        if defaults["cg_decay"] > 1:
            raise ValueError(f"cg_decay must be in [0, 1], got {cg_decay!r}")
        super().__init__(model, defaults, seed=seed, loss_fn=loss_fn, factor_dtype=factor_dtype)

    def _direction(self, closure: Closure, damping: float) -> tuple[Tensor, dict[str, Tensor], float | None]:
        group = self.param_groups[0]
        loss = self._gradient_pass(closure)
        n1 = closure.batch_size
        idx = self._curvature_indices(n1)
        n2 = int(idx.numel())
        scale = n1 / (closure.batch_factor * n2)  # s = 1/N2 for a batch-mean loss
        names, params = zip(*self.named_params(), strict=True)
        grads = self._grads()
        g_flat = torch.cat([grads[n].reshape(-1) for n in names])
        x0 = None
        if group["cg_decay"] > 0 and all("cg_solution" in self.state[p] for p in params):
            x0 = group["cg_decay"] * torch.cat([self.state[p]["cg_solution"].reshape(-1) for p in params])

        with self._curvature_timer(), preserved_norm_buffers(self.module), torch.enable_grad():
            with twice_differentiable():  # attention: a kernel with a double backward
                z = closure.functional()({}, subset(closure.inputs, idx))
            self.stats.forward_passes += 1
            hess = scale * closure.likelihood.hessian(z)  # s H_i, (N2, m_L, m_L)
            self._check_tensors("curvature", [hess])
            matvec = self._gauss_newton_product(z, list(params), hess)
            result = conjugate_gradient(
                matvec, g_flat, damping=damping, x0=x0, max_iters=group["cg_max_iters"], tol=group["cg_tol"]
            )
        d = result.x
        # (B + lam I) d = g - r, so d^T (B + lam I) d = d^T g - d^T r; for p = -d the same value
        curvature = float(d @ g_flat - d @ result.residual)
        self.stats.diagnostics.update(cg_iterations=result.iterations, cg_converged=result.converged)
        sizes = [p.numel() for p in params]
        direction = {n: t.view_as(p) for n, t, p in zip(names, d.split(sizes), params, strict=True)}
        return loss, direction, curvature

    def _gauss_newton_product(self, z: Tensor, params: list[Tensor], hess: Tensor):
        """``v -> B v = J^T (s H) J v`` on flat vectors, over the graph of ``z`` (kept alive)."""
        n2 = z.shape[0]
        w = torch.zeros_like(z, requires_grad=True)
        jt_w = torch.autograd.grad(z, params, w, create_graph=True, allow_unused=True)  # J^T w, linear in w
        used = [i for i, t in enumerate(jt_w) if t is not None]
        sizes = [p.numel() for p in params]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]

        def matvec(v: Tensor) -> Tensor:
            vs = v.split(sizes)
            jv = torch.autograd.grad(
                [jt_w[i] for i in used],
                w,
                [vs[i].view_as(params[i]) for i in used],
                retain_graph=True,
                allow_unused=True,
            )[0]  # J v (the R-op by double backward)
            if jv is None:
                jv = torch.zeros_like(z)
            hjv = torch.bmm(hess, jv.reshape(n2, -1, 1)).reshape(z.shape)
            jt = torch.autograd.grad(z, [params[i] for i in used], hjv, retain_graph=True)
            self.stats.forward_passes += 1
            self.stats.backward_passes += 1
            if len(used) == len(params):
                flat = torch.cat([t.reshape(-1) for t in jt])
            else:
                flat = torch.zeros_like(v)
                for i, t in zip(used, jt, strict=True):
                    flat[offsets[i] : offsets[i] + sizes[i]] = t.reshape(-1)
            D.all_reduce_mean([flat])
            self._check_tensors("Gauss-Newton product", [flat])
            return flat

        return matvec

    def _commit(self, direction: dict[str, Tensor]) -> None:
        """Keep ``d`` for the decayed warm start of the next CG run."""
        for n, p in self.named_params():
            self.state[p]["cg_solution"] = direction[n].detach().clone()
