"""Predictor accuracy by distance and by layer, from `predictors.evaluate.evaluate` (held-out data only).

`accuracy_tables(trace, predictors, distances)` returns two DataFrames:

- overall: one row per (predictor, distance): accuracy (ProMoE's definition), precision and recall at top-k,
  number of predictions, and the split used;
- per_layer: one row per (predictor, distance, target layer): accuracy, precision, recall.

Predictors that cannot run on the trace (e.g. gate_reuse without hidden states) are skipped and listed in the
third return value with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis import style
from analysis.results import trace_model

FAST_PREDICTORS = ("oracle", "cross_layer", "previous_token", "frequency", "eam")


def accuracy_tables(trace: str | Path, predictors: Sequence[str] = FAST_PREDICTORS,
                    distances: Sequence[int] = (1, 2, 3), **evaluate_kw):
    """(overall, per_layer, skipped) for every predictor at every distance (see the module docstring)."""
    from predictors.base import PredictorUnavailable
    from predictors.evaluate import evaluate

    overall, per_layer, skipped = [], [], {}
    for name in predictors:
        for dist in distances:
            try:
                r = evaluate(str(trace), name, int(dist), **evaluate_kw)
            except (PredictorUnavailable, ValueError) as exc:
                skipped[name] = str(exc)
                break
            overall.append({"trace": str(trace), "model": trace_model(trace), "predictor": name, "distance": dist,
                            "accuracy": r["accuracy"], "precision": r["precision"], "recall": r["recall"],
                            "n_predictions": r["n_predictions"], "headline": r["headline_batches"],
                            "split": r["split"]["kind"]})
            for x in r["per_layer"]:
                per_layer.append({"predictor": name, "distance": dist, **x})
    return pd.DataFrame(overall), pd.DataFrame(per_layer), skipped


def plot_accuracy_by_distance(overall: pd.DataFrame, *, ax=None, title: str | None = None):
    fig = None
    if ax is None:
        fig, axes = style.new_figure(1, 1, width=6.4, height=3.8)
        ax = axes[0][0]
    for name, g in overall.groupby("predictor", sort=True):
        g = g.sort_values("distance")
        st = style.predictor_style(name)
        ax.plot(g["distance"], 100 * g["accuracy"].astype(float), label=name, **st)
    ax.set_xlabel("prediction distance d (layers ahead)")
    ax.set_xticks(sorted(overall["distance"].unique()))
    ax.set_ylabel("accuracy (% of activated experts predicted)")
    ax.set_ylim(0, 102)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), title="predictor")
    models = ", ".join(sorted(overall["model"].unique())) if "model" in overall else ""
    ax.set_title(title or f"Predictor accuracy by distance: {models} (held-out tokens)")
    return fig or ax.figure


def plot_accuracy_by_layer(per_layer: pd.DataFrame, distance: int, *, ax=None, title: str | None = None,
                           model: str = ""):
    fig = None
    if ax is None:
        fig, axes = style.new_figure(1, 1, width=7.5, height=3.8)
        ax = axes[0][0]
    d = per_layer[per_layer["distance"] == distance]
    for name, g in d.groupby("predictor", sort=True):
        g = g.sort_values("layer")
        st = style.predictor_style(name)
        st["markersize"] = 3
        ax.plot(g["layer"], 100 * g["accuracy"].astype(float), label=name, **st)
    ax.set_xlabel("target layer (the layer predicted)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), title="predictor")
    ax.set_title(title or f"Predictor accuracy by layer, distance {distance}{': ' + model if model else ''}")
    return fig or ax.figure
