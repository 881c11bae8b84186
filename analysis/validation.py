"""Simulated against real: reading the committed validation report (`python -m executor.validate ... --out DIR`).

The report lives in results/validation/<machine>/ (committed, with the command and machine that produced it).
Nothing here invents numbers: `find_report` returns None when no report is committed, and the notebook says so.

Accepted layouts (the first that matches):
- a long table (Parquet, CSV or JSON records) with columns `metric`, `real`, and `sim` or `simulated`
  (optionally `config`/`run_id`/any config columns);
- a wide table with pairs of columns `<metric>_real` and `<metric>_sim` (or `real_<metric>`/`sim_<metric>`).
`tidy` turns either into one row per (run, metric) with `real`, `sim`, `diff` = sim - real and
`rel_error` = (sim - real) / real.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import style
from sim.config import REPO_ROOT

DEFAULT_DIR = REPO_ROOT / "results" / "validation" / "h200"
TABLE_SUFFIXES = (".parquet", ".csv", ".json")


def find_report(directory: str | Path = DEFAULT_DIR) -> Path | None:
    """The report table in `directory` (report.* or results.* first, Parquet first, then any table file; the
    executor writes results.parquet), or None if there is none."""
    d = Path(directory)
    if not d.is_dir():
        return None
    files = [f for f in sorted(d.rglob("*")) if f.is_file() and f.suffix in TABLE_SUFFIXES]
    if not files:
        return None
    files.sort(key=lambda f: (f.stem not in ("report", "results"), f.suffix != ".parquet", len(f.parts), str(f)))
    return files[0]


def read_table(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if p.suffix == ".parquet":
        return pd.read_parquet(p)
    if p.suffix == ".csv":
        return pd.read_csv(p)
    data = json.loads(p.read_text())
    if isinstance(data, dict):
        for key in ("rows", "runs", "results", "configs", "metrics"):
            if isinstance(data.get(key), list):
                return pd.json_normalize(data[key])
        return pd.json_normalize(data)
    return pd.json_normalize(data)


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, metric) with real, sim, diff and rel_error (see the module docstring).
    Raises ValueError when neither layout is recognised."""
    cols = {c.lower(): c for c in df.columns}
    sim_col = cols.get("sim") or cols.get("simulated")
    if "metric" in cols and "real" in cols and sim_col:
        out = df.rename(columns={cols["metric"]: "metric", cols["real"]: "real", sim_col: "sim"}).copy()
    else:
        pairs = {}
        for c in df.columns:
            m = re.fullmatch(r"(.+)_(real|sim|simulated)", str(c)) or re.fullmatch(r"(real|sim|simulated)_(.+)", str(c))
            if not m:
                continue
            a, b = m.groups()
            metric, side = (a, b) if b in ("real", "sim", "simulated") else (b, a)
            pairs.setdefault(metric, {})["sim" if side.startswith("sim") else "real"] = c
        pairs = {k: v for k, v in pairs.items() if {"real", "sim"} <= set(v)}
        if not pairs:
            raise ValueError("no (metric, real, sim) columns and no <metric>_real/<metric>_sim pairs")
        used = {c for v in pairs.values() for c in v.values()}
        ids = [c for c in df.columns if c not in used]
        parts = []
        for metric, v in pairs.items():
            part = df[ids].copy()
            part["metric"] = metric
            part["real"] = df[v["real"]]
            part["sim"] = df[v["sim"]]
            parts.append(part)
        out = pd.concat(parts, ignore_index=True)
    out["real"] = pd.to_numeric(out["real"], errors="coerce")
    out["sim"] = pd.to_numeric(out["sim"], errors="coerce")
    out["diff"] = out["sim"] - out["real"]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = out["diff"] / out["real"]
    out["rel_error"] = rel.where(np.isfinite(rel))  # undefined where the real value is 0
    return out


def summary(t: pd.DataFrame) -> pd.DataFrame:
    """Per metric: runs, mean |relative error|, max |relative error|, mean signed relative error."""
    g = t.dropna(subset=["rel_error"]).groupby("metric")["rel_error"]
    return pd.DataFrame({"runs": g.size(), "mean_abs_rel_error": g.apply(lambda x: x.abs().mean()),
                         "max_abs_rel_error": g.apply(lambda x: x.abs().max()), "mean_rel_error": g.mean()})


def plot_sim_vs_real(t: pd.DataFrame, *, machine: str = "h200", metrics=None):
    """Scatter of simulated against real per metric, with the y = x line."""
    metrics = list(metrics or [m for m in t["metric"].unique() if t.loc[t["metric"] == m, "real"].notna().any()])
    n = max(1, len(metrics))
    ncols = min(3, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = style.new_figure(nrows, ncols)
    for ax, m in zip(axes.ravel(), metrics):
        g = t[t["metric"] == m]
        ax.scatter(g["real"], g["sim"], s=18)
        lo = float(np.nanmin([g["real"].min(), g["sim"].min()]))
        hi = float(np.nanmax([g["real"].max(), g["sim"].max()]))
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, label="sim = real")
        unit = (" (ms)" if m.endswith("_ms") else " (bytes)" if m.startswith("bytes") else
                " (x)" if m.startswith("speedup") or m.startswith("over_") else
                " (fraction)" if m.endswith(("_rate", "_frac", "precision", "recall")) else "")
        ax.set_xlabel(f"real {m}{unit}")
        ax.set_ylabel(f"simulated {m}{unit}")
        ax.set_title(m)
    for ax in axes.ravel()[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(f"Simulated against real (executor on {machine})")
    return fig
