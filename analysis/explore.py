"""Looking inside a trace: expert popularity, reuse distances and cross-layer transitions, as arrays and figures.

All of it reads the routing table through `traces.stats.Dense` (dense per-token arrays) and, for reuse
distances, `traces.stats.lookup_distances` (the simulator's lookup semantics), so the numbers agree with
`python -m traces.stats`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import style
from analysis.results import trace_model


def dense(trace: str | Path):
    """traces.stats.Dense of a trace directory (tokens x layers x top-k expert ids, -1 = absent)."""
    from traces.reader import Trace
    from traces.stats import Dense

    return Dense(Trace(trace))


def popularity(d) -> np.ndarray:
    """[n_layers, n_experts] share of each layer's routings that went to each expert (rows sum to 1)."""
    counts = np.zeros((d.L, d.E), dtype=np.int64)
    for layer in range(d.L):
        ids = d.experts[:, layer, :].ravel()
        counts[layer] = np.bincount(ids[ids >= 0].astype(np.int64), minlength=d.E)
    tot = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, tot, out=np.zeros(counts.shape), where=tot > 0)


def transitions(d, layer: int) -> np.ndarray:
    """[n_experts, n_experts] P(expert j is among layer+1's experts | expert i is among layer's) over tokens
    present at both layers (row i = experts of `layer`, column j = experts of `layer + 1`)."""
    if not 0 <= layer < d.L - 1:
        raise ValueError(f"layer must be in 0..{d.L - 2}, got {layer}")
    a = d.experts[:, layer, :].astype(np.int64)
    b = d.experts[:, layer + 1, :].astype(np.int64)
    ok = (a[:, 0] >= 0) & (b[:, 0] >= 0)
    a, b = a[ok], b[ok]
    m = np.zeros((d.E, d.E), dtype=np.int64)
    ii = np.repeat(a, b.shape[1], axis=1).ravel()
    jj = np.tile(b, (1, a.shape[1])).ravel()
    keep = (ii >= 0) & (jj >= 0)
    np.add.at(m, (ii[keep], jj[keep]), 1)
    rows = np.bincount(a[a >= 0].ravel(), minlength=d.E)[:, None]
    return np.divide(m, rows, out=np.zeros(m.shape), where=rows > 0)


def transition_concentration(d) -> pd.DataFrame:
    """Per layer pair (l, l+1): how predictable layer l+1 is from layer l's experts alone: the mean over routed
    experts i of the top-k largest P(j | i) summed (top_k = all mass if perfectly predictable), next to the
    same figure for independent routing (layer l+1's popularity)."""
    rows = []
    pop = popularity(d)
    for layer in range(d.L - 1):
        t = transitions(d, layer)
        used = t.sum(axis=1) > 0
        top = np.sort(t[used], axis=1)[:, ::-1][:, :d.k].sum(axis=1)
        w = pop[layer][used]
        base = np.sort(pop[layer + 1])[::-1][:d.k].sum()  # P(j) = k x share; top-k of it over k
        rows.append((layer, layer + 1, float(np.average(top, weights=w)) / d.k if w.sum() else np.nan,
                     float(base)))
    return pd.DataFrame(rows, columns=["layer", "next_layer", "top_k_transition_mass", "independent_baseline"])


def reuse_distances(d) -> pd.DataFrame:
    """One row per lookup: global and per-layer reuse (stack) distance in distinct experts (-1 = first use)."""
    from traces.stats import lookup_distances

    dg, dl, _ = lookup_distances(d)
    return pd.DataFrame({"global": dg, "per_layer": dl})


# -- figures -----------------------------------------------------------------------------------------------------
def _model(trace) -> str:
    return trace_model(trace) if trace is not None else "trace"


def plot_popularity(d, trace=None, *, ax=None, sort: bool = True):
    """Heatmap of expert popularity per layer (each row sorted by popularity when sort=True)."""
    pop = popularity(d)
    if sort:
        pop = -np.sort(-pop, axis=1)
    fig = None
    if ax is None:
        fig, axes = style.new_figure(1, 1, width=8.5, height=4.6)
        ax = axes[0][0]
    im = ax.imshow(100 * pop, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
    ax.set_xlabel("expert rank within the layer (most popular first)" if sort else "expert id")
    ax.set_ylabel("layer")
    ax.grid(False)
    cb = ax.figure.colorbar(im, ax=ax)
    cb.set_label("share of the layer's routings (%)")
    uniform = 100.0 / d.E
    ax.set_title(f"Expert popularity: {_model(trace)} ({d.n_tokens} tokens; uniform = {uniform:.2f}% each)")
    return fig or ax.figure


def plot_reuse(dist: pd.DataFrame, d, trace=None, *, ax=None):
    """Cumulative distribution of reuse distances (global and per-layer), with the LRU hit rate it implies."""
    fig = None
    if ax is None:
        fig, axes = style.new_figure(1, 1, width=6.5, height=4.0)
        ax = axes[0][0]
    n = len(dist)
    for col, color in (("global", "#1f77b4"), ("per_layer", "#ff7f0e")):
        v = dist[col].to_numpy()
        warm = np.sort(v[v >= 0])
        if not len(warm):
            continue
        # LRU with capacity C hits exactly the warm lookups with distance < C: y = LRU hit rate at x + 1
        y = 100 * np.arange(1, len(warm) + 1) / n
        what = "distinct experts" + (" of the layer" if col != "global" else "")
        ax.step(warm + 1, y, where="post", color=color, label=f"{col.replace('_', '-')} scope (distance in {what})")
    ax.axvline(d.L * d.k, color="#d62728", linestyle=":", linewidth=1.0, label=f"one token's working set ({d.L * d.k})")
    ax.set_xscale("log")
    ax.set_xlabel("reuse distance + 1 (= LRU capacity that hits, experts; log scale)")
    ax.set_ylabel("lookups with smaller distance (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    ax.set_title(f"Reuse distances: {_model(trace)} ({n} lookups, {int((dist['global'] < 0).sum())} cold)")
    return fig or ax.figure


def plot_transitions(d, layer: int, trace=None, *, ax=None, top: int = 32):
    """Heatmap of P(expert j at layer+1 | expert i at layer) for the `top` most used experts of each layer."""
    t = transitions(d, layer)
    pop = popularity(d)
    ri = np.argsort(-pop[layer])[:top]
    cj = np.argsort(-pop[layer + 1])[:top]
    fig = None
    if ax is None:
        fig, axes = style.new_figure(1, 1, width=6.6, height=5.4)
        ax = axes[0][0]
    im = ax.imshow(100 * t[np.ix_(ri, cj)], aspect="auto", cmap="magma", interpolation="nearest", vmin=0)
    ax.set_xticks(range(len(cj)), [str(x) for x in cj], rotation=90, fontsize=6)
    ax.set_yticks(range(len(ri)), [str(x) for x in ri], fontsize=6)
    ax.set_xlabel(f"expert id at layer {layer + 1} (most used first)")
    ax.set_ylabel(f"expert id at layer {layer} (most used first)")
    ax.grid(False)
    cb = ax.figure.colorbar(im, ax=ax)
    cb.set_label("P(next-layer expert | this expert) (%)")
    ax.set_title(f"Cross-layer transitions {layer} -> {layer + 1}: {_model(trace)}")
    return fig or ax.figure


def plot_transition_concentration(table: pd.DataFrame, d, trace=None, *, ax=None):
    fig = None
    if ax is None:
        fig, axes = style.new_figure(1, 1, width=6.5, height=3.6)
        ax = axes[0][0]
    ax.plot(table["layer"], 100 * table["top_k_transition_mass"], marker="o", label="from layer l's experts")
    ax.plot(table["layer"], 100 * table["independent_baseline"], marker="s", linestyle="--", color="grey",
            label="popularity of layer l+1 alone")
    ax.set_xlabel("layer l (predicting layer l+1)")
    ax.set_ylabel(f"mass of the top-{d.k} next experts (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(f"How much layer l tells about layer l+1: {_model(trace)}")
    return fig or ax.figure
