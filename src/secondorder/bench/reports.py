"""Reports: ``summary.json``, ``summary.md`` (thesis-style tables), and the plots.

* ``summary.md``: per row, the mean (and standard deviation) over seeds of the final and best
  training loss, the final test error (CNNs: the best test accuracy, as Tables 3.4 / 4.2),
  epochs, steps, training seconds and passes per step, beside the thesis's value where it
  reports one (marked "not comparable" on synthetic or stand-in data); the grid (``--hp grid``);
  the Table 3.8 layout for ``--suite ablation``.
* ``loss_vs_epoch.png`` / ``loss_vs_time.png``: training loss (upper) and test error (lower)
  against epochs / training seconds, the mean over seeds with a +-1 standard deviation band when
  there are several (as Figs 2.2, 3.1-3.3, 4.2); a colour and a line style per row, the y range
  fitted to the curves after their first evaluation.
* ``summary.md`` ends with a time-to-target table: the training time each row needed to reach
  loss levels just above the best final loss.
* ``report.html`` (``--report html``): ``summary.md`` and every figure in one self-contained
  page (figures as data URIs; no scripts, no links) to share.
* ``landscape.png`` (Fig. 2.3): final training loss over the (lr, damping) grid of each row.
* ``dd_statistics.png`` (Fig. 2.1): per layer and epoch, the fraction of curvature updates with
  ``y^T H y / s^T y <= 2 / mu1`` and the mean ratio, from ``opt.stats.diagnostics["kbfgs"]``.

Plots use matplotlib's Agg canvas directly (no global backend switch).
"""

from __future__ import annotations

import base64
import html
import json
import math
import platform
import re
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from . import presets as PR
from .grid import Outcome, RunRecord, criterion


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def run_entry(rec: RunRecord) -> dict[str, Any]:
    r = rec.result
    return {
        "optimizer": rec.spec.label,
        "method": rec.spec.method,
        "seed": rec.spec.seed,
        "hp": rec.spec.hp,
        "final_train_loss": _finite(r["final_train_loss"]),
        "best_train_loss": _finite(r["best_train_loss"]),
        "final_test_error": _finite(r["final_test_error"]),
        "epochs": r["epochs"],
        "steps": r["steps"],
        "train_seconds": r["train_seconds"],
        "forward_passes": r["forward_passes"],
        "backward_passes": r["backward_passes"],
        "status": rec.status,
        "error": rec.error,
        "best_test_error": _finite(r["best_test_error"]),
        "warm_start_seconds": r["warm_start_seconds"],
        "warm_start_forward_passes": r["warm_start_forward_passes"],
        "warm_start_backward_passes": r["warm_start_backward_passes"],
        "curvature_seconds": r["curvature_seconds"],
    }


def summary(outcome: Outcome) -> dict[str, Any]:
    """The ``summary.json`` document."""
    c = outcome.config
    doc: dict[str, Any] = {
        "problem": c.problem,
        "dataset": outcome.dataset.label,
        "runs": [run_entry(r) for r in outcome.finals],
        "dataset_info": outcome.dataset.summary(),
        "suite": c.suite_name,
        "hp_mode": c.hp_mode,
        "budget": outcome.budgets,
        "clock": outcome.clock,
        "device": c.device,
        "torch_threads": torch.get_num_threads(),
        "seeds": [c.base_seed + i for i in range(c.seeds)],
        "batch_size": outcome.finals[0].spec.batch_size if outcome.finals else None,
        "l2": PR.SUITES[c.suite_name].l2,
        "skipped": outcome.skipped,
        "best_hp": outcome.best,
        "versions": {"secondorder": __version__, "python": platform.python_version()},
    }
    if outcome.grid:
        doc["grid"] = {
            label: [
                {
                    "hp": r.spec.hp,
                    "status": r.status,
                    "criterion": _finite(criterion(r, outcome.problem.kind == "cnn")),
                }
                for r in recs
            ]
            for label, recs in outcome.grid.items()
        }
    return doc


def _clean(obj: Any) -> Any:
    """JSON without NaN/Infinity: non-finite floats become ``null``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_json(outcome: Outcome, path: Path) -> None:
    path.write_text(json.dumps(_clean(summary(outcome)), indent=2, default=str, allow_nan=False))


# ------------------------------------------------------------------------------------ markdown
def _stat(values: list[float | None], fmt: str) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "—"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(statistics.fmean(vals), fmt)} ± {format(statistics.stdev(vals), fmt)}"


def _by_label(outcome: Outcome) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for rec in outcome.finals:
        groups[rec.spec.label].append(rec)
    return groups


def _accuracy(rec: RunRecord) -> float | None:
    e = _finite(rec.result["best_test_error"])
    return None if e is None else 100.0 * (1.0 - e)


def markdown(outcome: Outcome) -> str:
    """``summary.md``: the header and the thesis-style table(s)."""
    c, ds, prob = outcome.config, outcome.dataset, outcome.problem
    comparable = not ds.synthetic and ds.stand_in_for is None and ds.verified
    suite = PR.SUITES[c.suite_name]
    lines = [
        f"# secondorder bench: {prob.name} on {ds.label}",
        "",
        f"- problem: {prob.description}",
        f"- data: {ds.description} ({len(ds.x_train)} train / {len(ds.x_test)} test)",
    ]
    if not comparable:
        lines.append(
            "- **not the thesis's data**: absolute numbers are not comparable with the thesis's tables"
        )
    lines += [
        f"- suite: {suite.name} ({suite.description}); hyper-parameters: {c.hp_mode}",
        f"- budget per run: {', '.join(sorted(set(outcome.budgets.values())))}; clock: {outcome.clock}; "
        f"device: {c.device} ({torch.get_num_threads()} torch thread(s)); "
        f"seeds: {', '.join(str(c.base_seed + i) for i in range(c.seeds))}",
        f"- batch size: {outcome.finals[0].spec.batch_size if outcome.finals else '-'}"
        + (f"; L2 term eta = {suite.l2:g}" if suite.l2 else ""),
    ]
    if outcome.skipped:
        lines.append("- skipped: " + ", ".join(f"{k} ({v})" for k, v in outcome.skipped.items()))
    lines += [
        "",
        "Mean ± standard deviation over the seeds whose run finished normally (diverged runs are counted in "
        "the last column, not averaged); test error = " + prob.test_metric + ".",
        "",
    ]
    thesis_col = "thesis" + ("" if comparable else " (real data; not comparable)")
    cnn = prob.kind == "cnn"
    head = [
        "optimizer",
        "final train loss",
        "best train loss",
        "best test acc. %" if cnn else "final test error",
        "epochs",
        "steps",
        "train s",
        "fwd/bwd per step",
        thesis_col,
        "runs",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = _by_label(outcome)
    for row in outcome.rows:
        every = groups.get(row.label, [])
        recs = [x for x in every if x.status == "done"]  # diverged / failed runs: counted, not averaged
        r = [x.result for x in recs]
        steps = [x["steps"] or 0 for x in r]
        fwd = sum(x["forward_passes"] or 0 for x in r) / max(1, sum(steps))
        bwd = sum(x["backward_passes"] or 0 for x in r) / max(1, sum(steps))
        status = defaultdict(int)
        for x in every:
            status[x.status] += 1
        thesis = PR.thesis_value(c.suite_name, prob.name, row.label)
        cells = [
            row.label,
            _stat([_finite(x["final_train_loss"]) for x in r], ".3f"),
            _stat([_finite(x["best_train_loss"]) for x in r], ".3f"),
            _stat([_accuracy(x) for x in recs], ".2f")
            if cnn
            else _stat([_finite(x["final_test_error"]) for x in r], ".5f"),
            _stat([x["epochs"] for x in r], ".1f"),
            _stat([float(s) for s in steps], ".0f"),
            _stat([x["train_seconds"] for x in r], ".1f"),
            f"{fwd:.2f}/{bwd:.2f}",
            "—" if thesis is None else f"{thesis:g}",
            ", ".join(f"{n} {s}" for s, n in status.items()),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Hyper-parameters:", ""]
    for row in outcome.rows:
        hp = outcome.best.get(row.label, row.hp)
        lines.append(
            f"- `{row.label}` ({row.thesis_name}; `{row.method}`; {row.source}): "
            + ", ".join(f"{k}={v}" for k, v in hp.items())
        )
    errors = [(x.spec.label, x.spec.seed, x.error) for x in outcome.finals if x.error]
    if errors:
        lines += ["", "Runs that did not finish normally:", ""]
        lines += [f"- {label} seed {seed}: {err}" for label, seed, err in errors]
    if outcome.grid:
        lines += [
            "",
            "## Grid search",
            "",
            f"Criterion: {'max test accuracy' if cnn else 'min training loss'} over epochs (seed "
            f"{c.base_seed}).",
            "",
        ]
        for label, recs in outcome.grid.items():
            lines += [f"### {label}", "", "| hyper-parameters | status | criterion |", "|---|---|---|"]
            for rec in sorted(recs, key=lambda x: criterion(x, cnn)):
                crit = criterion(rec, cnn)
                shown = (
                    "—"
                    if not math.isfinite(crit)
                    else (f"{100 * (1 - crit):.2f} %" if cnn else f"{crit:.4f}")
                )
                varying = {
                    k: v
                    for k, v in rec.spec.hp.items()
                    if k in next((r.grid for r in outcome.rows if r.label == label), {})
                }
                lines.append(
                    f"| {', '.join(f'{k}={v}' for k, v in varying.items())} | {rec.status} | {shown} |"
                )
            lines.append("")
    if c.suite_name == "ablation":
        lines += ["", ablation_table(outcome)]
    orderings = thesis_orderings(outcome)
    if orderings:
        lines += ["", orderings]
    lines += ["", time_to_target_table(outcome)]
    return "\n".join(lines) + "\n"


def thesis_orderings(outcome: Outcome) -> str:
    """``## The thesis's orderings``: each ordering the thesis states for this problem
    (:data:`presets.THESIS_ORDERINGS`) whose two rows ran, with our mean final training losses
    and whether it holds here; "" when none applies (another suite or problem, or rows missing).
    A row with no finished run (all diverged or failed) counts as the worse one."""
    if outcome.config.suite_name != "ch3":
        return ""
    groups = _by_label(outcome)
    labels = {row.label for row in outcome.rows}

    def final(label: str) -> float | None:
        done = [_finite(x.result["final_train_loss"]) for x in groups.get(label, []) if x.status == "done"]
        done = [v for v in done if v is not None]
        return statistics.fmean(done) if done else None

    rows, broken = [], []
    for o in PR.THESIS_ORDERINGS:
        if outcome.problem.name not in o.problems or not {o.better, o.worse} <= labels:
            continue
        b, w = final(o.better), final(o.worse)
        holds = b is not None and (w is None or b < w)
        shown = " vs ".join("no finished run" if v is None else f"{v:.4g}" for v in (b, w))
        rows.append(f"| {o.better} < {o.worse} | {o.source} | {shown} | {'yes' if holds else '**no**'} |")
        if not holds:
            broken.append(f"{o.better} < {o.worse}")
    if not rows:
        return ""
    ds = outcome.dataset
    lines = [
        "## The thesis's orderings",
        "",
        f"The orderings the thesis states for {outcome.problem.name} (its runs: the real data set, "
        "5 seeds, the thesis budget), checked on this run's mean final training losses "
        f"({ds.label}; {', '.join(sorted(set(outcome.budgets.values())))}): "
        f"{len(rows) - len(broken)} of {len(rows)} hold here.",
    ]
    if broken:
        lines.append(
            "Where the thesis's ordering does not hold here: "
            + ", ".join(broken)
            + ". A shorter budget, other data or a single seed can reorder close methods; "
            "rerun with the thesis budget and seeds "
            f"(--time-budget {outcome.problem.time_budget or 500:g} --seeds 5) before drawing conclusions."
        )
    head = "| thesis ordering | source | ours (mean final train loss) | holds here |"
    lines += ["", head, "|---|---|---|---|"]
    return "\n".join(lines + rows) + "\n"


#: the targets of :func:`time_to_target_table`: the best final training loss of any row, plus
#: these fractions of it
TARGET_MARGINS = (0.5, 0.2, 0.1, 0.05, 0.02)


def time_to_target(rec: RunRecord, target: float) -> float | None:
    """Training seconds at the first evaluation whose training loss is <= ``target`` (``None``:
    never reached)."""
    for e in rec.epochs:
        loss = e.get("train_loss")
        if loss is not None and math.isfinite(loss) and loss <= target:
            return float(e["train_seconds"])
    return None


def time_to_target_table(outcome: Outcome) -> str:
    """``## Time to target``: per row, the mean training time its runs needed to reach each
    target training loss (the best final loss of any row times 1 + margin), and how many runs
    reached it; "—" where none did. Times are on the run's clock, evaluations outside it."""
    finals = [
        x.result["final_train_loss"]
        for x in outcome.finals
        if x.status == "done" and _finite(x.result.get("final_train_loss")) is not None
    ]
    if not finals:
        return "## Time to target\n\nNo run finished normally.\n"
    best = min(finals)
    targets = [best * (1 + m) if best > 0 else best + m for m in TARGET_MARGINS]
    lines = [
        "## Time to target",
        "",
        f"Training time ({outcome.clock} clock, s; mean over the runs that got there, and how many "
        f"did) until the training loss first reaches each target: the best final loss ({best:.4g}) "
        f"plus {', '.join(f'{100 * m:g}%' for m in TARGET_MARGINS)}.",
        "",
        "| optimizer | " + " | ".join(f"≤ {t:.4g}" for t in targets) + " |",
        "|" + "---|" * (len(targets) + 1),
    ]
    groups = _by_label(outcome)
    for row in outcome.rows:
        recs = groups.get(row.label, [])
        cells = []
        for t in targets:
            times = [s for s in (time_to_target(r, t) for r in recs) if s is not None]
            cells.append("—" if not times else f"{statistics.fmean(times):.1f} ({len(times)}/{len(recs)})")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_table(outcome: Outcome) -> str:
    """Table 3.8: training loss of K-BFGS with the two improvements on or off (ours beside the thesis's)."""
    flags = {
        "kbfgs": ("yes", "yes"),
        "kbfgs-no-dpdlm": ("no", "yes"),
        "kbfgs-no-minibatch-ha": ("yes", "no"),
        "kbfgs20": ("no", "no"),
    }
    groups = _by_label(outcome)
    lines = [
        "## Table 3.8 (ablation)",
        "",
        "| name | improvement #1 (D_P D_LM) | improvement #2 (minibatched Hessian action) | "
        "final train loss (ours) | runs | thesis |",
        "|---|---|---|---|---|---|",
    ]
    for label, (one, two) in flags.items():
        every = groups.get(label, [])
        ours = _stat([_finite(x.result["final_train_loss"]) for x in every if x.status == "done"], ".3f")
        diverged = sum(x.status != "done" for x in every)
        runs = f"{len(every)}" + (f" ({diverged} diverged)" if diverged else "")
        thesis = PR.THESIS_TABLE_3_8.get(label, {}).get(outcome.problem.name)
        lines.append(f"| {label} | {one} | {two} | {ours} | {runs} | {'—' if thesis is None else thesis} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ plots
def _figure(rows: int, cols: int, size: tuple[float, float]):  # noqa: ANN202
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


Curve = tuple[np.ndarray, np.ndarray]


def _mean_band(curves: list[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and std over seeds, evaluation by evaluation (up to the shortest run); x is the mean x.

    Aligning by evaluation index (rather than interpolating on x) keeps a slow seed from cutting the
    time axis of the others short; the x of a point is the seeds' mean epoch or training time there.
    """
    curves = [(x, y) for x, y in curves if len(x) >= 1]
    if not curves:
        return None
    n = min(len(x) for x, _ in curves)
    xs = np.stack([x[:n] for x, _ in curves]).mean(0)
    ys = np.stack([y[:n] for _, y in curves])
    keep = np.isfinite(ys).any(0)
    if not keep.any():
        return None
    with np.errstate(invalid="ignore"):
        mean, std = np.nanmean(ys[:, keep], 0), np.nanstd(ys[:, keep], 0)
    return xs[keep], mean, std


#: line styles cycled beside the ten default colours: (colour, style) pairs differ for 20 rows
LINE_STYLES = ("-", "--", "-.", ":")


def fit_axis(values: list[np.ndarray]) -> tuple[str, float, float] | None:
    """``(scale, low, high)`` that keeps close curves apart: each curve counts from a quarter of
    its evaluations on (at least the second: the untrained start would squash the rest); the range
    runs from the lowest such value of any curve to the highest of the competitive curves (final
    value within a factor 2 of the best; a curve that stays far above them leaves the plot at the
    top, its numbers are in the tables); a linear axis when that spans less than a factor 5, else
    a log axis; ``None`` without finite values."""
    later = [v[max(1, len(v) // 4) :] if len(v) > 1 else v for v in values]
    finite = [v[np.isfinite(v)] for v in later]
    finite = [v for v in finite if v.size]
    if not finite:
        return None
    lo = float(min(v.min() for v in finite))
    best = min(float(v[-1]) for v in finite)
    close = [v for v in finite if (v[-1] <= 2 * best if best > 0 else v[-1] <= best + 1.0)]
    hi = float(max(v.max() for v in close))
    if lo > 0 and hi / lo >= 5:
        return "log", lo / 1.15, hi * 1.15
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 1.0
    return "linear", lo - pad, hi + pad


def plot_curves(outcome: Outcome, path: Path, axis: str) -> None:
    """Training loss and test error against ``axis`` (``"epoch"`` or ``"train_seconds"``): a colour
    and a line style per row, the mean over seeds with a +-1 std band when there are several, and
    the y range fitted to the curves after their first evaluation (:func:`fit_axis`)."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

    fig, axes = _figure(2, 1, (7.5, 7.5))
    groups = _by_label(outcome)
    plotted: list[list[np.ndarray]] = [[], []]
    for i, row in enumerate(outcome.rows):
        color, style = f"C{i % 10}", LINE_STYLES[i % len(LINE_STYLES)]
        for j, metric in enumerate(("train_loss", "test_error")):
            curves = [
                (
                    np.array([e[axis] for e in rec.epochs], dtype=float),
                    np.array([np.nan if e[metric] is None else e[metric] for e in rec.epochs], dtype=float),
                )
                for rec in groups.get(row.label, [])
                if rec.epochs
            ]
            band = _mean_band(curves)
            if band is None:
                continue
            xs, mean, std = band
            ax = axes[j, 0]
            ax.plot(xs, mean, color=color, linestyle=style, label=row.label if j == 0 else None)
            plotted[j].append(mean)
            if len(curves) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    xlabel = "epoch" if axis == "epoch" else f"training time (s, {outcome.clock} clock)"
    test_label = {"autoencoder": "test error (per-pixel MSE)", "lm": "test loss (nats per character)"}.get(
        outcome.problem.kind, "test error"
    )
    for j, ylabel in enumerate(("training loss", test_label)):
        ax = axes[j, 0]
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fitted = fit_axis(plotted[j])
        if fitted is not None:
            scale, lo, hi = fitted
            ax.set_yscale(scale)
            ax.set_ylim(lo, hi)
            if scale == "log":
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(NullFormatter())
            else:
                ax.yaxis.set_major_locator(MaxNLocator(nbins=10))
            for line in ax.get_lines():  # a curve that ends above the range says so in the legend
                y = np.asarray(line.get_ydata(), dtype=float)
                if j == 0 and y.size and np.isfinite(y[-1]) and y[-1] > hi:
                    line.set_label(f"{line.get_label()} (above the range)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=2)
    seeds = outcome.config.seeds
    spread = "one seed" if seeds == 1 else f"mean ± std over {seeds} seeds"
    title = f"{outcome.problem.name} on {outcome.dataset.label}; {spread}"
    axes[0, 0].set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_landscape(outcome: Outcome, path: Path) -> bool:
    """Fig. 2.3: contour of the final training loss over log10 lr x log10 damping (rows with such a grid)."""
    panels = []
    for label, recs in outcome.grid.items():
        lrs = sorted({r.spec.hp.get("lr") for r in recs if "lr" in r.spec.hp})
        damps = sorted({r.spec.hp.get("damping") for r in recs if "damping" in r.spec.hp})
        if len(lrs) < 2 or len(damps) < 2:
            continue
        z = np.full((len(damps), len(lrs)), np.nan)
        for r in recs:
            v = _finite(r.result["final_train_loss"])
            if v is not None and r.status == "done":
                z[damps.index(r.spec.hp["damping"]), lrs.index(r.spec.hp["lr"])] = v
        panels.append((label, np.log10(lrs), np.log10(damps), z))
    if not panels:
        return False
    fig, axes = _figure(1, len(panels), (5.0 * len(panels), 4.2))
    for ax, (label, x, y, z) in zip(axes[0], panels, strict=True):
        masked = np.ma.masked_invalid(z)
        if masked.count() >= 4:
            cs = ax.contourf(x, y, masked, levels=12, cmap="viridis")
            fig.colorbar(cs, ax=ax, label="final training loss")
        gx, gy = np.meshgrid(x, y)
        colors = ["w" if ok else "r" for ok in np.isfinite(z).ravel()]
        ax.scatter(gx.ravel(), gy.ravel(), c=colors, s=8, edgecolors="k", linewidths=0.3)
        ax.set_xlabel("log10 learning rate")
        ax.set_ylabel("log10 damping")
        ax.set_title(f"{label} (red: diverged)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def dd_series(records: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per layer, per epoch: fraction of updates with ratio <= 2/mu1 and the mean ratio (cumulative counters
    of ``diagnostics["kbfgs"][layer]`` differenced between evaluations)."""
    out: dict[str, dict[str, list[float]]] = {}
    prev: dict[str, tuple[float, float, float]] = {}
    for rec in records:
        layers = (rec.get("diagnostics") or {}).get("kbfgs", {})
        for layer, d in layers.items():
            cur = (
                float(d.get("ratio_count", 0)),
                float(d.get("ratio_within", 0)),
                float(d.get("ratio_sum", 0.0)),
            )
            p = prev.get(layer, (0.0, 0.0, 0.0))
            n = cur[0] - p[0]
            if n > 0:
                s = out.setdefault(layer, {"epoch": [], "fraction": [], "mean": []})
                s["epoch"].append(rec["epoch"])
                s["fraction"].append((cur[1] - p[1]) / n)
                s["mean"].append((cur[2] - p[2]) / n)
            prev[layer] = cur
    return out


def plot_dd(outcome: Outcome, path: Path) -> bool:
    """Fig. 2.1 for every row whose optimizer reports K-BFGS diagnostics (first seed)."""
    panels = []
    for label, recs in _by_label(outcome).items():
        series = dd_series(recs[0].epochs) if recs else {}
        if series:
            panels.append((label, series))
    if not panels:
        return False
    fig, axes = _figure(2, len(panels), (5.0 * len(panels), 7.0))
    for col, (label, series) in enumerate(panels):
        for layer, s in sorted(series.items(), key=lambda kv: (len(kv[0]), kv[0])):
            axes[0, col].plot(s["epoch"], s["fraction"], label=layer)
            axes[1, col].plot(s["epoch"], s["mean"], label=layer)
        axes[0, col].set_title(f"{label}: fraction with y'Hy/s'y <= 2/mu1", fontsize=9)
        axes[1, col].set_title(f"{label}: mean of y'Hy/s'y", fontsize=9)
        axes[1, col].set_xlabel("epoch")
        axes[0, col].set_ylim(0, 1.05)
        axes[0, col].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write_all(outcome: Outcome, out: Path, extras: tuple[str, ...] = ()) -> dict[str, Path]:
    """Write every report into ``out``; returns name -> path of what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "summary.json": out / "summary.json",
        "summary.md": out / "summary.md",
        "loss_vs_epoch.png": out / "loss_vs_epoch.png",
        "loss_vs_time.png": out / "loss_vs_time.png",
    }
    write_json(outcome, written["summary.json"])
    written["summary.md"].write_text(markdown(outcome))
    plot_curves(outcome, written["loss_vs_epoch.png"], "epoch")
    plot_curves(outcome, written["loss_vs_time.png"], "train_seconds")
    if "landscape" in extras and plot_landscape(outcome, out / "landscape.png"):
        written["landscape.png"] = out / "landscape.png"
    if "dd" in extras and plot_dd(outcome, out / "dd_statistics.png"):
        written["dd_statistics.png"] = out / "dd_statistics.png"
    if "html" in extras:
        written["report.html"] = out / "report.html"
        images = [written[k] for k in written if k.endswith(".png")]
        written["report.html"].write_text(html_page(written["summary.md"].read_text(), images))
    return written


def html_page(summary_md: str, images: list[Path]) -> str:
    """``report.html``: ``summary.md`` (its headings, lists, paragraphs and tables) and the
    figures, embedded as data URIs, in one self-contained page to share (no scripts, no links)."""
    body: list[str] = []
    table: list[list[str]] = []

    def flush_table() -> None:
        if not table:
            return
        head, *rows = table
        body.append("<table>")
        body.append("<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
        body.extend("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
        body.append("</table>")
        table.clear()

    in_list = False
    for line in summary_md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):  # skip the |---| separator
                table.append(cells)
            continue
        flush_table()
        if line.startswith("- ") != in_list:
            body.append("<ul>" if not in_list else "</ul>")
            in_list = not in_list
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 4)
            body.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush_table()
    if in_list:
        body.append("</ul>")
    for path in images:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body.append(f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">')
        body.append(f"<figcaption>{html.escape(path.name)}</figcaption></figure>")
    title = next((ln.lstrip("#").strip() for ln in summary_md.splitlines() if ln.startswith("# ")), "report")
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.2em .5em}"
        "th{background:#eee}img{max-width:100%}code{background:#f4f4f4}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _inline(text: str) -> str:
    """Markdown's inline code and bold in escaped text."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
