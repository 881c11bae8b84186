"""Figures of sweep results, and `python -m analysis.plots RESULTS_DIR` that writes them as PNGs.

    python -m analysis.plots results/default            # -> results/default/plots/*.png, paths printed
    python -m analysis.plots results/default --out DIR  # elsewhere

One figure set per (trace, hardware, and any other setting the sweep varied besides policy, predictor, ProMoE
switches, cache size and phase):

- `hit_rate__<trace>.png`   hit rate against cache size, one curve per (policy, predictor), a panel per phase
- `latency__<trace>.png`    TPOT (decode runs) and TTFT (prefill runs) against cache size, one curve per
                            (policy, predictor), a panel per (metric, schedule: reactive / ProMoE)
- `speedup__<trace>.png`    the same latencies as a speedup over reactive LRU (LRU, no predictor, no switch)

Curves: colour = cache policy, line style and marker = predictor (analysis.style). Every title names the trace's
model and the hardware profile. The sweep can call `write_sweep_plots(results_dir)` directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import style
from analysis.results import load_results, varying, with_speedup

PHASE_METRIC = {"decode": ("tpot_ms", "TPOT (ms per token)"), "prefill": ("ttft_ms", "TTFT (ms)"),
                "both": ("total_ms", "total time (ms)")}


def _x_label(df: pd.DataFrame) -> str:
    units = [u for u in df["capacity_unit"].dropna().unique() if u]
    return units[0] if len(units) == 1 else "cache size"


def _title(df: pd.DataFrame, what: str, extra: str = "") -> str:
    models = ", ".join(sorted(df["model"].astype(str).unique())) if "model" in df else ""
    names = ", ".join(sorted(df["trace_name"].astype(str).unique())) if "trace_name" in df else ""
    hw = ", ".join(sorted(df["hardware"].astype(str).unique())) if "hardware" in df else ""
    t = f"{what}: {models} (trace {names}) on {hw}" if names and names != models else f"{what}: {models} on {hw}"
    return t + (f" ({extra})" if extra else "")


def _series(df: pd.DataFrame, keys=("cache.policy", "prefetch.predictor")):
    for key, g in df.groupby(list(keys), sort=True):
        yield key, g.sort_values("capacity")


def plot_metric_vs_capacity(ax, df: pd.DataFrame, metric: str, *, ylabel: str, title: str | None = None,
                            percent: bool = False, label_schedule: bool = False) -> None:
    """One curve per (policy, predictor[, schedule]) of `metric` against the cache size column `capacity`."""
    keys = ["cache.policy", "prefetch.predictor"] + (["schedule"] if label_schedule else [])
    for key, g in _series(df, keys):
        policy, predictor = key[0], key[1]
        y = g[metric].to_numpy(dtype=float) * (100.0 if percent else 1.0)
        if np.all(np.isnan(y)):
            continue
        label = f"{policy} + {predictor} predictor" if predictor != "none" else f"{policy}, no prefetch"
        if label_schedule:
            label += f", {key[2]}"
        ax.plot(g["capacity"], y, label=label, **style.series_style(policy, predictor))
    ax.set_xlabel(_x_label(df))
    ax.set_ylabel(ylabel)
    if percent:
        ax.set_ylim(-2, 102)
    if title:
        ax.set_title(title)


def plot_hit_rate(df: pd.DataFrame, *, schedule: str = "reactive"):
    """Hit rate against cache size, a panel per phase, for one trace and hardware (df already filtered)."""
    d = df[df["schedule"] == schedule] if schedule in set(df["schedule"]) else df
    phases = [p for p in ("prefill", "decode", "both") if p in set(d["phase"])]
    fig, axes = style.new_figure(1, len(phases))
    for ax, ph in zip(axes[0], phases):
        plot_metric_vs_capacity(ax, d[d["phase"] == ph], "hit_rate", ylabel="hit rate (%)", percent=True,
                                title=f"{ph} ({schedule} schedule)")
    fig.suptitle(_title(d, "Expert-cache hit rate"))
    style.legend_outside(fig, axes.ravel())
    return fig


def _latency_panels(df: pd.DataFrame):
    panels = []
    for ph in ("prefill", "decode", "both"):
        sub = df[df["phase"] == ph]
        if sub.empty:
            continue
        metric, label = PHASE_METRIC[ph]
        for sched in sorted(sub["schedule"].unique(), key=lambda s: (s != "reactive", s)):
            panels.append((ph, metric, label, sched, sub[sub["schedule"] == sched]))
    return panels


def plot_latency(df: pd.DataFrame):
    """TTFT (prefill runs) and TPOT (decode runs) against cache size, a panel per (phase, schedule)."""
    panels = _latency_panels(df)
    ncols = max(1, len({p[3] for p in panels}))
    nrows = max(1, len({p[0] for p in panels}))
    fig, axes = style.new_figure(nrows, ncols, sharey="row")
    rows = sorted({p[0] for p in panels}, key=["prefill", "decode", "both"].index)
    cols = sorted({p[3] for p in panels}, key=lambda s: (s != "reactive", s))
    for ph, metric, label, sched, sub in panels:
        ax = axes[rows.index(ph)][cols.index(sched)]
        plot_metric_vs_capacity(ax, sub, metric, ylabel=label, title=f"{ph}, {sched} schedule")
        ax.set_ylim(bottom=0)
    for ax in axes.ravel():
        if not ax.has_data():
            ax.set_visible(False)
    fig.suptitle(_title(df, "Simulated latency"))
    style.legend_outside(fig, axes.ravel())
    return fig


def plot_speedup(df: pd.DataFrame):
    """Speedup over reactive LRU of TTFT (prefill) and TPOT (decode), a panel per (phase, schedule)."""
    df = with_speedup(df)
    panels = _latency_panels(df)
    rows = sorted({p[0] for p in panels}, key=["prefill", "decode", "both"].index)
    cols = sorted({p[3] for p in panels}, key=lambda s: (s != "reactive", s))
    fig, axes = style.new_figure(max(1, len(rows)), max(1, len(cols)), sharey="row")
    for ph, metric, label, sched, sub in panels:
        ax = axes[rows.index(ph)][cols.index(sched)]
        short = label.split(" (")[0]
        plot_metric_vs_capacity(ax, sub, f"speedup_{metric}",
                                ylabel=f"{short} speedup over reactive LRU (x)", title=f"{ph}, {sched} schedule")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="-", zorder=0)
    for ax in axes.ravel():
        if not ax.has_data():
            ax.set_visible(False)
    fig.suptitle(_title(df, "Speedup over reactive LRU"))
    style.legend_outside(fig, axes.ravel())
    return fig


def figure_groups(df: pd.DataFrame):
    """(name, extra title, rows) per figure set: by trace, hardware and anything else that varies."""
    split = [c for c in varying(df, exclude=("cache.policy", "prefetch.predictor", "schedule", "phase",
                                             "cpu_experts", "trace", "hardware"))]
    keys = ["trace_name", "hardware"] + split
    several_hw = df["hardware"].astype(str).nunique() > 1
    for key, g in df.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        name = _slug(str(key[0])) + (f"__{_slug(str(key[1]))}" if several_hw else "")
        extra = ", ".join(f"{k}={v}" for k, v in zip(split, key[2:]))
        if extra:
            name += "__" + _slug(extra)
        yield name, extra, g


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in s).strip("_")


def write_sweep_plots(results_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the hit-rate, latency and speedup PNGs of a sweep; returns their paths (also the hook for sim.sweep)."""
    df = load_results(results_dir)
    base = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else (base.parent if base.suffix == ".parquet" else base) / "plots"
    paths: list[Path] = []
    for name, extra, g in figure_groups(df):
        for kind, fn in (("hit_rate", plot_hit_rate), ("latency", plot_latency), ("speedup", plot_speedup)):
            fig = fn(g)
            if extra:
                fig.suptitle(fig._suptitle.get_text() + f"\n{extra}")
            paths.append(style.save(fig, out / f"{kind}__{name}.png"))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.plots",
                                 description="Write PNG figures of a sweep's results (hit rate, latency, speedup).")
    ap.add_argument("results", help="a sim.sweep output directory (with results.parquet) or a results Parquet file")
    ap.add_argument("--out", default=None, help="where to write the PNGs (default: RESULTS/plots)")
    args = ap.parse_args(argv)
    try:
        paths = write_sweep_plots(args.results, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
