"""The base of the Kronecker-factored methods (KFAC, K-BFGS): which layers get a block.

A Kronecker-factored optimizer preconditions the parameters of each layer that a
:class:`~secondorder.capture.blocks.LayerBlock` models (built in: Linear, Conv1d, Conv2d,
Embedding, self-attention; more through :func:`~secondorder.capture.blocks.register_layer`) and
applies a fallback to every other trainable tensor (``fallback=``):

* ``"momentum"``: the thesis's rule (3.4.3, 3.7.2): the momentum gradient ``m`` with the same
  learning rate (K-BFGS, chapter 3: ``lr/lambda``);
* ``"diagonal"``: a per-tensor diagonal curvature, the "naive diagonal" of kfac-jax:
  ``v <- beta v + (1 - beta) (sum_n g_n)^2 / M`` from the batch gradient (``M`` examples in the
  global batch, ``g_n`` the per-example gradients; ``beta`` = ``stat_decay``; the first batch
  initialises ``v``), and the direction ``m / (v + lambda)`` with the method's damping ``lambda``.
  Where ``v`` is 0 this is K-BFGS's chapter-3 rule ``m / lambda``.

This base finds the blocks, applies the user's choice of layers (``layers=`` / ``exclude=``), holds
the capture over their modules and the list of the other tensors, computes the fallback and reports
the split (:meth:`KroneckerFactoredOptimizer.coverage`, :class:`UnmodeledParametersWarning`); each
method module holds only its algorithm box.
"""

from __future__ import annotations

import enum
import fnmatch
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..capture import Capture, Closure, LayerBlock, layer_blocks, preserved_norm_buffers, unmodeled_modules
from ..capture.closure import ForwardResult
from ..capture.hooks import LayerRecord
from ..linalg import LinAlgError
from . import hparams as H
from .base import SecondOrderOptimizer

logger = logging.getLogger(__name__)

#: a module name or ``fnmatch`` pattern of names (``"encoder.*"``), or an ``nn.Module`` type
LayerSpec = str | type[nn.Module]


class Fallback(str, enum.Enum):
    """What preconditions a trainable tensor that no block models (module docstring)."""

    MOMENTUM = "momentum"  # the thesis's rule, 3.4.3 / 3.7.2
    DIAGONAL = "diagonal"  # m / (v + lambda), v the moving average of the naive diagonal


#: what :meth:`KroneckerFactoredOptimizer.coverage` reports for a tensor without a block
FALLBACK = "fallback: momentum gradient"
FALLBACK_DIAGONAL = "fallback: diagonal"
_COVERAGE = {Fallback.MOMENTUM.value: FALLBACK, Fallback.DIAGONAL.value: FALLBACK_DIAGONAL}


class UnmodeledParametersWarning(UserWarning):
    """Some trainable tensors have no layer block and follow the fallback (``fallback=``)."""


#: one layer's inverse refresh: (cost, {state key: a tensor of its shape}, compute -> {key: value})
InverseJob = tuple[float, dict[str, Tensor], Callable[[], dict[str, Any]]]


def fallback_scale(closure: Closure) -> float:
    """``c`` with ``(sum_n g_n)^2 / M = c * grad^2`` for the averaged batch gradient ``grad``:
    ``sum_n g_n = batch_factor * W * grad`` over ``W`` ranks of ``m`` examples, ``M = W m``."""
    return closure.batch_factor**2 * D.world_size() / closure.batch_size


def _specs(arg: str, value: LayerSpec | Iterable[LayerSpec] | None) -> tuple[LayerSpec, ...] | None:
    if value is None:
        return None
    specs = (value,) if isinstance(value, str | type) else tuple(value)
    for s in specs:
        if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise ValueError(f"{arg}: expected module names, name patterns or nn.Module types, got {s!r}")
    return specs


def _matches(name: str, module: nn.Module, spec: LayerSpec) -> bool:
    if isinstance(spec, str):
        return fnmatch.fnmatchcase(name, spec)
    return isinstance(module, spec)


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package (where the user built the optimizer)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


class KroneckerFactoredOptimizer(SecondOrderOptimizer):
    """A :class:`SecondOrderOptimizer` with one layer block per modeled layer.

    Args (beyond the method's hyper-parameters):
        layers: model only these layers: module names, ``fnmatch`` patterns of names
            (``"blocks.*.mlp.*"``) or ``nn.Module`` types. Default: every layer a block models.
        exclude: leave these layers (same forms) to the fallback.
        fallback: ``"momentum"`` (the thesis's rule) or ``"diagonal"`` for the tensors no block
            models (module docstring).

    Class attributes:
        block_kinds: the :attr:`~secondorder.capture.blocks.LayerBlock.curvature` forms the method
            uses (``{"kronecker"}``; KFAC adds ``"channel"``, the scale-and-shift blocks of
            normalisation layers). Blocks of other forms leave their tensors to the fallback.

    Attributes:
        blocks: module name -> its layer block.
        layers: module name -> the module (the keys of ``module_state``).
        capture: the hooks over ``layers``.
        other_params: names of the trainable tensors no block models (they take the fallback).

    Raises:
        ValueError: ``layers`` / ``exclude`` hold something else, or a name, pattern or type that
            matches no layer a block models; ``model`` has no layer left to model; a parameter is
            used by two modeled layers (tied weights).
    """

    block_kinds: frozenset[str] = frozenset({"kronecker"})

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        seed: int | None = None,
        layers: LayerSpec | Iterable[LayerSpec] | None = None,
        exclude: LayerSpec | Iterable[LayerSpec] | None = None,
        fallback: str = Fallback.DIAGONAL.value,
        loss_fn: nn.Module | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        defaults = dict(defaults, fallback=H.choice("fallback", fallback, Fallback))
        super().__init__(model, defaults, seed=seed, loss_fn=loss_fn, factor_dtype=factor_dtype)
        usable = {n: b for n, b in layer_blocks(self.module).items() if b.curvature in self.block_kinds}
        self.blocks = self._choose_blocks(usable, _specs("layers", layers), _specs("exclude", exclude))
        self._refuse_tied_weights()
        self.layers = {name: b.module for name, b in self.blocks.items()}
        self.capture = Capture(self.blocks)
        self.capture.dtype = self.factor_dtype  # half-precision activations are kept in it
        modeled = {id(p) for b in self.blocks.values() for p in b.parameters()}
        self.other_params = [n for n, p in self.named_params() if id(p) not in modeled]
        logger.info(
            "%s models %d layers (%s); %d other parameter tensors take the %s fallback",
            self.method,
            len(self.layers),
            ", ".join(self.layers),
            len(self.other_params),
            defaults["fallback"],
        )
        if self.other_params:
            self._warn_unmodeled()

    def _choose_blocks(
        self,
        found: dict[str, LayerBlock],
        include: tuple[LayerSpec, ...] | None,
        exclude: tuple[LayerSpec, ...] | None,
    ) -> dict[str, LayerBlock]:
        def module_name(name: str, block: LayerBlock) -> str:  # "conv[2]" (a group) -> "conv"
            return name[: len(name) - len(block.part)] if block.part else name

        for arg, specs in (("layers", include), ("exclude", exclude)):
            for spec in specs or ():
                if not any(_matches(module_name(n, b), b.module, spec) for n, b in found.items()):
                    raise ValueError(
                        f"{arg}: {spec!r} matches no layer that {self.method} can model "
                        f"(layers with a block: {', '.join(found) or 'none'})"
                    )
        chosen = {
            n: b
            for n, b in found.items()
            if (include is None or any(_matches(module_name(n, b), b.module, s) for s in include))
            and not any(_matches(module_name(n, b), b.module, s) for s in exclude or ())
        }
        if not chosen:
            why = unmodeled_modules(self.module)
            detail = "; ".join(f"'{n}': {r}" for n, r in why.items())
            raise ValueError(
                f"model: {self.method} has no layer to model"
                + (" (every modelable layer is excluded)" if found else "")
                + (f"; modules without a block: {detail}" if detail else "")
                + ". Register a block for your layer type (so.register_layer) or use a method that "
                "preconditions any tensor (tnt, shampoo, adam)"
            )
        return chosen

    def _refuse_tied_weights(self) -> None:
        """A parameter used by two modeled layers (tied weights: an embedding and the output
        layer) would get two preconditioned updates per step: refused, naming the layers."""
        names = {id(p): n for n, p in self.named_params()}
        users: dict[int, dict[int, str]] = {}  # parameter -> module -> a layer name of it
        for lname, b in self.blocks.items():
            for p in b.parameters():
                users.setdefault(id(p), {}).setdefault(id(b.module), lname[: len(lname) - len(b.part)])
        for pid, mods in users.items():
            if len(mods) > 1:
                layers = ", ".join(f"'{n}'" for n in mods.values())
                raise ValueError(
                    f"model: the parameter '{names.get(pid, '?')}' is used by the layers {layers} "
                    f"(tied weights); {self.method} models one layer's use of a weight: exclude all "
                    f"but one of them (exclude=[{', '.join(repr(n) for n in list(mods.values())[1:])}]), "
                    "and its factors precondition the whole gradient"
                )

    def _warn_unmodeled(self) -> None:
        by_name = dict(self.named_params())
        total = sum(p.numel() for p in by_name.values())
        left = sum(by_name[n].numel() for n in self.other_params)
        shown = ", ".join(self.other_params[:6]) + (", ..." if len(self.other_params) > 6 else "")
        warnings.warn(
            f"{self.method}: {len(self.other_params)} of {len(by_name)} trainable tensors "
            f"({left / total:.1%} of the parameters) get no Kronecker factors (no layer block, or "
            f"excluded) and take the {self.param_groups[0]['fallback']!r} fallback ({shown}); "
            "opt.coverage() lists every tensor, so.register_layer adds a block",
            UnmodeledParametersWarning,
            stacklevel=_caller_level(),
        )

    @property
    def modeled_modules(self) -> list[str]:
        """Names of the layers with Kronecker factors."""
        return list(self.layers)

    def coverage(self) -> dict[str, str]:
        """Per trainable tensor (by name), what preconditions it: ``"<Block>('<module>')"``, or
        :data:`FALLBACK` / :data:`FALLBACK_DIAGONAL` (both start with ``"fallback"``)."""
        names = {id(p): n for n, p in self.named_params()}
        out = {n: _COVERAGE[self.param_groups[0]["fallback"]] for n in names.values()}
        parts: dict[str, list[str]] = {}
        for mname, b in self.blocks.items():
            for p in b.parameters():
                if id(p) in names:
                    parts.setdefault(names[id(p)], []).append(mname)
                    block_names = ", ".join(f"'{n}'" for n in parts[names[id(p)]])
                    out[names[id(p)]] = f"{type(b).__name__}({block_names})"
        return out

    # ------------------------------------------------------------------ warm start, inverses
    def _warm_start_passes(
        self, closures: Iterable[Closure], *, backward: bool
    ) -> Iterator[tuple[Closure, ForwardResult, dict[str, LayerRecord]]]:
        """The warm-start loop (Algorithm 12 line 2, Algorithm 9 line 3): per closure one forward
        pass recorded over the modeled layers, yielded with its records while its graph is alive
        (``backward``: grad mode on, for a backward pass by the caller; else no graph). Batch-norm
        running statistics are left unchanged; a non-finite loss raises before any state changes."""
        for closure in closures:
            with preserved_norm_buffers(self.module), torch.enable_grad() if backward else torch.no_grad():
                with self.capture.record(inputs=True, outputs=True) as recs:
                    result = closure.forward(sync=False)
                self._check_loss(result.loss)
                self.stats.warm_start_forward_passes += 1
                yield closure, result, recs

    def _refresh_on_owners(self, jobs: dict[str, InverseJob]) -> None:
        """Refresh each layer's inverses on one rank and broadcast them (``distributed.assign_owners``
        balances the ranks by each job's cost; one process owns every layer).

        ``jobs``: layer -> ``(cost, templates, compute)``; ``compute()`` returns the new entries of
        the layer's ``module_state`` (the tensors named in ``templates`` are broadcast). When it
        raises :class:`~secondorder.linalg.LinAlgError` the layer keeps its previous inverses (a
        warning is logged), or the error propagates when it has none yet.
        """
        owners = D.assign_owners({n: cost for n, (cost, _, _) in jobs.items()})
        me = D.rank()
        for name, (_, templates, compute) in jobs.items():
            st = self.module_state[name]
            if owners[name] != me:
                for key, like in templates.items():
                    st.setdefault(key, torch.empty_like(like))
                continue
            try:
                st.update(compute())
            except LinAlgError as err:
                if any(key not in st for key in templates):
                    raise
                logger.warning("%s: keeping the previous inverses of layer '%s': %s", self.method, name, err)
        D.broadcast_from_owners(
            {n: [self.module_state[n][k] for k in t] for n, (_, t, _) in jobs.items()}, owners
        )

    # ------------------------------------------------------------------ the fallback
    def _fallback_diagonal(self, p: Tensor, grad: Tensor, scale: float, g: dict[str, Any]) -> Tensor | None:
        """The new naive diagonal ``v`` of ``p`` (not stored: the caller commits it to
        ``state[p]["fallback_diagonal"]``), or ``None`` under the momentum rule."""
        if g["fallback"] != Fallback.DIAGONAL.value:
            return None
        batch = grad.square().mul_(scale)
        old = self.state[p].get("fallback_diagonal")
        return batch if old is None else old * g["stat_decay"] + batch * (1.0 - g["stat_decay"])

    @staticmethod
    def _fallback_direction(m: Tensor, v: Tensor | None, damping: float, momentum_scale: float) -> Tensor:
        """``m / (v + lambda)`` (diagonal) or ``momentum_scale * m`` (the thesis's rule)."""
        if v is None:
            return m * momentum_scale if momentum_scale != 1.0 else m
        return m / (v + damping)
