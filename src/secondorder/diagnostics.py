"""Figure 4.1: how close each method's direction is to the block-Fisher direction (4.3.4).

:func:`cosine_to_block_fisher` follows the trajectory of :class:`~secondorder.optim.block_fisher.BlockFisher`
(the exact damped per-layer Fisher, moving averages with decay 0.9) on 16x16 digits with the
256-20-20-20-20-10 tanh network of Martens and Grosse, and at every iteration computes the
direction each other method would take **at the same point, on the same minibatch**, then the
cosine similarity to the block-Fisher direction, per layer ``(W, b)``, for the middle four layers
(the 20-input layers 2-5; the first layer's 5140-parameter block is only needed for the trajectory).

How a method's "direction" is computed (the choices the thesis leaves open):

* every method is the library's own optimizer, run on a *shadow copy* of the network whose
  parameters are reset to the block-Fisher iterate before each step, with ``lr = 1`` and no weight
  decay, so its direction is exactly ``theta_before - theta_after``. The layers that are not
  compared are frozen in the shadow copies: every method here is block-diagonal per layer (or per
  tensor), so this changes no compared direction and skips the large first-layer factors.
  A direction is thus the method's momentum gradient (mu = 0.9; Adam's first moment) preconditioned
  by its own statistics, all of them moving averages (decay 0.9; Adam: 0.9/0.999)
  accumulated along the block-Fisher trajectory ("based on values computed at points generated
  by the block-Fisher method"); the statistics and inverses are refreshed at every step
  (``update_freq = inverse_freq = 1``), after a warm start over the training set (4.7.2) for
  the methods that have one (block Fisher, KFAC, TNT, Shampoo);
* damping: each method runs over the damping grid of its autoencoder grid search in 4.7.2 (TNT
  ``eps`` 1e-3..0.3, KFAC ``lambda`` 0.01..10, Shampoo ``eps`` 1e-4..0.01, Adam ``eps`` 1e-8..1e-2;
  SGD-m has none), all members of a grid following the same trajectory, and the plot and the
  summary report, per method, the grid value with the highest mean cosine over the compared
  layers and iterations (every method at its best, as after a grid search); every grid value's
  numbers are returned too;
* the block Fisher itself uses ``lr``/``damping`` of :class:`DiagnosticConfig` (the thesis does not
  give them): ``lambda = 1e-3`` keeps its direction close to the undamped natural gradient and
  ``lr = 0.003`` (with momentum 0.9) trains stably for the 100 iterations (5 epochs of 5000 images,
  batch 250) of the default run; the synthetic digits are easy, and far longer runs reach a near-zero
  loss where every direction degenerates towards the gradient.

The data are :func:`secondorder.diagnostics_data.synthetic_digits` (no download is possible here),
labelled "synthetic" in every output. Run it with ``python -m secondorder.diagnostics --out DIR``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .capture import Closure
from .diagnostics_data import SOURCE, synthetic_digits
from .optim.block_fisher import BlockFisher
from .optim.registry import make_optimizer

logger = logging.getLogger(__name__)

#: the autoencoder damping grids of 4.7.2 (``None``: the method has no damping)
DAMPING_GRIDS: dict[str, tuple[float | None, ...]] = {
    "tnt": (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3),
    "kfac": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    "shampoo": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "adam": (1e-8, 1e-4, 1e-2),
    "sgd": (None,),
}
LABELS = {"tnt": "TNT", "kfac": "KFAC", "shampoo": "Shampoo", "adam": "Adam", "sgd": "SGD-m"}
#: methods whose statistics and inverses are refreshed every step in the comparison
_CURVATURE = {"tnt", "kfac", "shampoo"}


@dataclass
class DiagnosticConfig:
    """Settings of :func:`cosine_to_block_fisher` (defaults: the full Figure 4.1 configuration).

    Attributes:
        steps: block-Fisher iterations (the cosines are recorded at each).
        batch_size: minibatch size ``m``.
        n_train: number of synthetic training images.
        widths: layer widths of the tanh network.
        lr: block-Fisher learning rate.
        damping: block-Fisher damping ``lambda``.
        momentum: ``mu`` of every method (Adam: ``beta1``).
        stat_decay: ``beta`` of the moving averages (Adam keeps its ``beta2 = 0.999``).
        compare_layers: indices of the Linear layers compared (0-based; the middle four).
        grids: damping grid per method (a subset of the methods may be given).
        warm_start: warm-start the statistics over the training set (4.7.2).
        seed: seed of the data, the initialisation, the batches and the sampled targets.
        dtype: dtype of the networks and statistics.
        threads: torch intra-op threads during the run (restored afterwards; ``None`` leaves them):
            one thread avoids the synchronisation overhead that dominates the many tiny operations
            of the small network on a shared CPU (measured: 100x per optimizer step under load).
        warm_start_batches: minibatches of the warm start (``None``: the whole training set).
    """

    steps: int = 100
    batch_size: int = 250
    n_train: int = 5000
    widths: tuple[int, ...] = (256, 20, 20, 20, 20, 10)
    lr: float = 0.003
    damping: float = 1e-3
    momentum: float = 0.9
    stat_decay: float = 0.9
    compare_layers: tuple[int, ...] = (1, 2, 3, 4)
    grids: dict[str, tuple[float | None, ...]] = field(default_factory=lambda: dict(DAMPING_GRIDS))
    warm_start: bool = True
    seed: int = 0
    dtype: torch.dtype = torch.float32
    threads: int | None = 1
    warm_start_batches: int | None = None


def tanh_mlp(widths: tuple[int, ...], seed: int, dtype: torch.dtype) -> nn.Sequential:
    """Linear layers of the given widths with tanh between them (PyTorch default initialisation)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def _layer_vectors(model: nn.Sequential, indices: tuple[int, ...]) -> list[Tensor]:
    """``[vec(W_l); b_l]`` of the chosen Linear layers (detached copies)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return [
        torch.cat([linears[i].weight.detach().reshape(-1), linears[i].bias.detach()]).clone() for i in indices
    ]


def _freeze_uncompared(model: nn.Sequential, indices: tuple[int, ...]) -> None:
    """Freeze the Linear layers that are not compared (every method here is block-diagonal per layer)."""
    for i, m in enumerate(mod for mod in model if isinstance(mod, nn.Linear)):
        if i not in indices:
            m.requires_grad_(False)


def _cosine(a: Tensor, b: Tensor) -> float:
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else float("nan")


def _hp(method: str, damping: float | None, cfg: DiagnosticConfig) -> dict[str, Any]:
    hp: dict[str, Any] = dict(lr=1.0, momentum=cfg.momentum, weight_decay=0.0)
    if damping is not None:
        hp["damping"] = damping
    if method in _CURVATURE:
        hp.update(stat_decay=cfg.stat_decay, update_freq=1, inverse_freq=1)
    if method in ("tnt", "kfac"):
        hp["seed"] = cfg.seed + 1
    return hp


def cosine_to_block_fisher(
    config: DiagnosticConfig | None = None, out_dir: str | Path | None = None
) -> dict[str, Any]:
    """Reproduce Figure 4.1 on synthetic digits: return the numbers, write a PNG (and JSON) to ``out_dir``.

    Args:
        config: the settings (default: the full configuration, a few minutes on a CPU).
        out_dir: where to write ``cosine_to_block_fisher.png`` and ``cosine_to_block_fisher.json``;
            nothing is written when ``None``.

    Returns:
        A dict with ``source`` (the synthetic-data label), ``layers`` (names of the compared layers),
        ``iterations``, ``train_loss`` (minibatch loss of the block-Fisher run), ``cosine``
        (``method -> damping -> layer -> [cosine per iteration]``), ``best_damping`` (per method),
        ``best`` (``method -> layer -> [cosines]`` at that damping), ``mean`` (``method -> layer ->``
        mean cosine at that damping), ``seconds`` and, when written, ``png`` and ``json`` paths.
    """
    cfg = config or DiagnosticConfig()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out_dir)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DiagnosticConfig, out_dir: str | Path | None) -> dict[str, Any]:
    start = time.perf_counter()
    x, y = synthetic_digits(cfg.n_train, seed=cfg.seed, dtype=cfg.dtype)
    if x.shape[1] != cfg.widths[0]:
        raise ValueError(f"widths: the first width must be {x.shape[1]} (16x16 images), got {cfg.widths[0]}")
    loss_fn = nn.CrossEntropyLoss()
    model = tanh_mlp(cfg.widths, cfg.seed, cfg.dtype)
    reference = BlockFisher(
        model,
        lr=cfg.lr,
        damping=cfg.damping,
        momentum=cfg.momentum,
        stat_decay=cfg.stat_decay,
        seed=cfg.seed + 1,
    )
    shadows: dict[tuple[str, float | None], tuple[nn.Sequential, Any]] = {}
    for method, grid in cfg.grids.items():
        for damping in grid:
            twin = copy.deepcopy(model)
            _freeze_uncompared(twin, cfg.compare_layers)
            shadows[(method, damping)] = (twin, make_optimizer(method, twin, **_hp(method, damping, cfg)))

    m = cfg.batch_size
    n_batches = cfg.n_train // m
    if cfg.warm_start:
        n_warm = n_batches if cfg.warm_start_batches is None else min(n_batches, cfg.warm_start_batches)
        for net, opt in [(model, reference), *shadows.values()]:
            opt.warm_start(
                Closure(net, x[i * m : (i + 1) * m], y[i * m : (i + 1) * m], loss_fn) for i in range(n_warm)
            )

    layer_names = [f"layer {i + 1}" for i in cfg.compare_layers]
    cos: dict[str, dict[str, dict[str, list[float]]]] = {
        method: {str(d): {name: [] for name in layer_names} for d in grid}
        for method, grid in cfg.grids.items()
    }
    losses: list[float] = []
    order = torch.randperm(cfg.n_train, generator=torch.Generator().manual_seed(cfg.seed + 2))
    for t in range(cfg.steps):
        if t and t % n_batches == 0:
            order = torch.randperm(cfg.n_train, generator=torch.Generator().manual_seed(cfg.seed + 2 + t))
        idx = order[(t % n_batches) * m : (t % n_batches + 1) * m]
        xb, yb = x[idx], y[idx]
        theta = dict(model.named_parameters())
        directions: dict[tuple[str, float | None], list[Tensor]] = {}
        for key, (twin, opt) in shadows.items():
            with torch.no_grad():
                for name, p in twin.named_parameters():
                    p.copy_(theta[name])  # frozen layers too: they shape the inputs of the compared ones
            before = _layer_vectors(twin, cfg.compare_layers)
            opt.step(Closure(twin, xb, yb, loss_fn))  # lr = 1: theta_after = theta_before - direction
            directions[key] = [
                b - a for b, a in zip(before, _layer_vectors(twin, cfg.compare_layers), strict=True)
            ]
        before = _layer_vectors(model, cfg.compare_layers)
        losses.append(float(reference.step(Closure(model, xb, yb, loss_fn))))
        ref = [
            (b - a) / cfg.lr for b, a in zip(before, _layer_vectors(model, cfg.compare_layers), strict=True)
        ]
        for (method, damping), dirs in directions.items():
            for name, d, r in zip(layer_names, dirs, ref, strict=True):
                cos[method][str(damping)][name].append(_cosine(d, r))

    def mean_over(series: dict[str, list[float]]) -> float:
        vals = [v for s in series.values() for v in s if math.isfinite(v)]
        return sum(vals) / len(vals) if vals else float("nan")

    best_damping = {
        method: max(cos[method], key=lambda d, method=method: mean_over(cos[method][d])) for method in cos
    }
    best = {method: cos[method][best_damping[method]] for method in cos}
    result: dict[str, Any] = {
        "source": SOURCE,
        "network": "-".join(str(w) for w in cfg.widths) + " (tanh), softmax cross-entropy",
        "config": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(cfg).items()},
        "layers": layer_names,
        "iterations": list(range(cfg.steps)),
        "train_loss": losses,
        "cosine": cos,
        "best_damping": {k: (None if v == "None" else float(v)) for k, v in best_damping.items()},
        "best": best,
        "mean": {method: {name: sum(s) / len(s) for name, s in best[method].items()} for method in best},
        "seconds": time.perf_counter() - start,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["png"] = str(out / "cosine_to_block_fisher.png")
        result["json"] = str(out / "cosine_to_block_fisher.json")
        plot_cosines(result, result["png"])
        with open(result["json"], "w") as fh:
            json.dump(result, fh, indent=1)
    logger.info("cosine to block Fisher (%s): %s", SOURCE, _summary(result))
    return result


def _summary(result: dict[str, Any]) -> str:
    return "; ".join(
        f"{LABELS.get(m, m)} (damping {result['best_damping'][m]}): "
        + ", ".join(f"{v:.2f}" for v in result["mean"][m].values())
        for m in result["mean"]
    )


def plot_cosines(result: dict[str, Any], path: str | Path) -> None:
    """One panel per compared layer: cosine to the block-Fisher direction per iteration, best damping."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    layers = result["layers"]
    cols = 2 if len(layers) > 1 else 1
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, layers, strict=False):
        for method, series in result["best"].items():
            label = f"{LABELS.get(method, method)}"
            if result["best_damping"][method] is not None:
                label += f" ({result['best_damping'][method]:g})"
            ax.plot(result["iterations"], series[name], label=label, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("cosine similarity")
        ax.set_ylim(-0.2, 1.0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(
        f"Cosine to the block-Fisher direction, {result['network']}\ndata: {result['source']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m secondorder.diagnostics --out DIR [--steps N]``: the full Figure 4.1 run."""
    parser = argparse.ArgumentParser(
        description="Figure 4.1 on synthetic 16x16 digits: cosine to block Fisher"
    )
    parser.add_argument("--out", required=True, help="directory for cosine_to_block_fisher.png and .json")
    parser.add_argument("--steps", type=int, default=DiagnosticConfig.steps)
    parser.add_argument("--seed", type=int, default=DiagnosticConfig.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("secondorder.optim", "secondorder.capture"):  # per-optimizer layer listings
        logging.getLogger(name).setLevel(logging.WARNING)
    result = cosine_to_block_fisher(DiagnosticConfig(steps=args.steps, seed=args.seed), out_dir=args.out)
    logger.info("wrote %s and %s in %.0f s", result["png"], result["json"], result["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
