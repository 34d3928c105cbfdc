"""``curves.png``: the learning curves of a search, readable at ten trials and at ten thousand.

Why not one line per trial: at thousands of trials the lines hide each other and drawing them
took matplotlib time growing with every trial. The best ``top`` trials (ranked as the report
ranks them) are lines, labelled with their sampled parameters; every other trial's points go into
one 2-D histogram per panel (epoch x value, drawn as a grey density) with the median of those
trials per epoch, so the figure costs one pass over the histories plus a fixed drawing.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from dcanets.tune import schema
from dcanets.tune.builders import short_params
from dcanets.tune.state import TrialResult, is_finite, rank

TOP = 8  # lines drawn; the rest is a density
VALUE_BINS = 60


def plot_curves(trials: Sequence[TrialResult], spec: schema.TuneSpec, path: Path, top: int = TOP) -> None:
    """The search metric and the train loss against epoch: the best ``top`` trials as lines, the
    others as a density and their per-epoch median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = rank(trials, spec.mode)
    lines = ranked[:top] if len(trials) > top else list(trials)
    drawn = {t.trial_id for t in lines}
    rest = [t for t in trials if t.trial_id not in drawn]
    keys = (spec.metric, "train_loss")
    points = _points(rest, keys)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, keys):
        log = key.endswith("loss") and _loss_axis(ax, points[key][1] + [v for t in lines for v in _series(t, key)[1]])
        if points[key][0]:
            _density(ax, *points[key], log=log, label=f"the other {len(rest)}: density, median")
        for t in lines:
            ax.plot(*_series(t, key), marker="o", ms=3, lw=1.2, label=_label(t))
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    title = f"{spec.name}: {len(trials)} trials"
    axes[0].set_title(title + (f", the best {len(lines)} as lines" if rest else ""), fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # each line named by its id and sampled values, below the plots
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7, ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _series(t: TrialResult, key: str) -> Tuple[List[float], List[float]]:
    epochs = [float(h.get("epoch", i + 1)) for i, h in enumerate(t.history)]
    return epochs, [float(h[key]) if is_finite(h.get(key)) else float("nan") for h in t.history]


def _points(trials: Sequence[TrialResult], keys: Sequence[str]) -> Dict[str, Tuple[List[float], List[float]]]:
    """Every finite (epoch, value) of ``trials``, per key: one pass over the histories."""
    out: Dict[str, Tuple[List[float], List[float]]] = {key: ([], []) for key in keys}
    for t in trials:
        for i, h in enumerate(t.history):
            for key in keys:
                value: Any = h.get(key)
                if is_finite(value):
                    out[key][0].append(float(h.get("epoch", i + 1)))
                    out[key][1].append(float(value))
    return out


def _density(ax: Any, epochs: List[float], values: List[float], log: bool, label: str) -> None:
    """A grey 2-D histogram of the points (one column per epoch) and the median per epoch."""
    import numpy as np

    x, y = np.asarray(epochs), np.asarray(values)
    low, high = ax.get_ylim() if log else (float(y.min()), float(y.max()))
    if log:
        y = np.clip(y, low, high)
    if high <= low:
        high = low + 1.0
    ybins = np.geomspace(low, high, VALUE_BINS + 1) if log else np.linspace(low, high, VALUE_BINS + 1)
    xs = np.unique(x)
    xbins = np.concatenate([xs - 0.5, [xs[-1] + 0.5]])
    counts, _, _ = np.histogram2d(x, y, bins=[xbins, ybins])
    ax.pcolormesh(xbins, ybins, np.ma.masked_equal(counts.T, 0), cmap="Greys", alpha=0.6, shading="flat",
                  vmin=0, rasterized=True)
    medians = [float(np.median(y[x == e])) for e in xs]
    ax.plot(xs, medians, color="0.35", lw=1, ls="--", label=label)
    if log:
        ax.set_ylim(low, high)


def _label(t: TrialResult) -> str:
    return f"{t.trial_id} {short_params(t.params)}"[:90]


def _loss_axis(ax: Any, values: List[Any]) -> bool:
    """A log axis, clipped at 100x the median loss: one diverged trial (loss 1e6, or inf) stays
    visible at the top edge instead of flattening every other curve against zero. False when no
    loss is positive and finite (the axis stays linear)."""
    finite = sorted(v for v in values if is_finite(v) and v > 0)
    if not finite:
        return False
    ax.set_yscale("log")
    top = min(finite[-1] * 1.5, statistics.median(finite) * 100)
    ax.set_ylim(finite[0] / 1.5, top)
    return True


__all__ = ["TOP", "plot_curves"]
