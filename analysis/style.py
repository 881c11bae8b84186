"""One plotting style for every figure of the project (notebooks, the sweep's PNGs, the README figure).

Colours name cache policies, line styles and markers name predictors, so a curve means the same thing in every
figure. `new_figure` applies the style and returns (fig, axes); `save` writes a PNG atomically.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib.pyplot as plt

from traces.atomic import atomic_write

RC = {
    "figure.dpi": 110,
    "savefig.dpi": 130,
    "savefig.bbox": "tight",
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
    "legend.frameon": False,
    "figure.constrained_layout.use": True,
}

POLICY_COLORS = {
    "lru": "#1f77b4",
    "lfu": "#ff7f0e",
    "fifo": "#2ca02c",
    "static": "#9467bd",
    "belady": "#000000",
}
_EXTRA_COLORS = ["#d62728", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

PREDICTOR_STYLES = {
    "none": dict(linestyle="-", marker="o"),
    "oracle": dict(linestyle=":", marker="*"),
    "cross_layer": dict(linestyle="--", marker="s"),
    "previous_token": dict(linestyle="-.", marker="^"),
    "frequency": dict(linestyle=(0, (5, 1, 1, 1)), marker="v"),
    "eam": dict(linestyle=(0, (3, 1, 1, 1, 1, 1)), marker="D"),
    "learned_history": dict(linestyle=(0, (1, 1)), marker="P"),
    "learned_mlp": dict(linestyle=(0, (4, 2)), marker="X"),
    "gate_reuse": dict(linestyle=(0, (2, 2)), marker="h"),
}
_EXTRA_MARKERS = ["<", ">", "p", "d", "H", "8"]

SCHEDULE_COLORS = {"reactive": "#1f77b4", "ProMoE": "#d62728"}


def apply_style() -> None:
    """Set the project's matplotlib rcParams (idempotent)."""
    plt.rcParams.update(RC)


def policy_color(policy: str) -> str:
    if policy in POLICY_COLORS:
        return POLICY_COLORS[policy]
    return _EXTRA_COLORS[sum(map(ord, policy)) % len(_EXTRA_COLORS)]


def predictor_style(predictor: str) -> dict:
    if predictor in PREDICTOR_STYLES:
        return dict(PREDICTOR_STYLES[predictor])
    return dict(linestyle="--", marker=_EXTRA_MARKERS[sum(map(ord, predictor)) % len(_EXTRA_MARKERS)])


def series_style(policy: str, predictor: str = "none") -> dict:
    """Keyword arguments of ax.plot for a (policy, predictor) curve."""
    st = predictor_style(predictor)
    st["color"] = policy_color(policy)
    if policy == "belady":
        st["linewidth"] = 2.0
    return st


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float | None = None, height: float | None = None,
               squeeze: bool = False, **kw):
    """(fig, axes) with the project style; axes is a 2-D array unless squeeze=True."""
    apply_style()
    w = width if width is not None else 4.6 * ncols + 0.6
    h = height if height is not None else 3.4 * nrows + 0.4
    return plt.subplots(nrows, ncols, figsize=(w, h), squeeze=squeeze, **kw)


def legend_outside(fig, axes: Iterable, *, ncol: int | None = None) -> None:
    """One de-duplicated legend for all axes, below the figure."""
    handles, labels, seen = [], [], set()
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in seen and not lab.startswith("_"):
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol or min(len(labels), 4))


def save(fig, path: str | Path) -> Path:
    """Write the figure as PNG atomically (temporary name, then rename) and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    finally:
        plt.close(fig)
