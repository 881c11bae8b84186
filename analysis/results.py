"""Loading sweep results (sim.sweep's Parquet) and naming what they are about.

`load_results(DIR)` reads DIR/results.parquet (or, when a sweep was interrupted before consolidating, every
DIR/runs/*.parquet) and adds a few derived columns used by the plots:

- `trace_name`   the trace directory's name (data/traces/qwen3-30b-a3b -> qwen3-30b-a3b)
- `model`        the model named in the trace's meta.json, shortened ("Qwen3-30B-A3B"); the trace name if unreadable
- `schedule`     "reactive" (no ProMoE switch), "ProMoE" (chunked prefetch + early preemption + reordered
                 inference), or the switches that are on joined by "+"
- `capacity`     the cache size on the x axis, in the unit of `capacity_unit` ("cache rate (%)", "MiB" or
                 "experts"), from whichever of cache.cache_rate / capacity_mib / capacity_experts the run used
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from sim.config import REPO_ROOT
from sim.engine.metrics import COUNT_NAMES

SWITCHES = ("chunked_prefetch", "early_preemption", "reordered_inference")
SWITCH_SHORT = {"chunked_prefetch": "chunked", "early_preemption": "preempt", "reordered_inference": "reorder",
                "cpu_experts": "cpu-experts"}
# config columns that identify one curve / panel / figure (anything else that varies also splits figures)
SERIES_KEYS = ("cache.policy", "prefetch.predictor", "schedule")
IGNORED_KEYS = {"sweep", "run_id", "sim_version", "seed", "trace_name", "model", "capacity", "capacity_unit",
                "cache.capacity_mib", "cache.capacity_experts", "cache.cache_rate", *SWITCHES}
METRICS = ("hit_rate", "ttft_ms", "tpot_ms", "total_ms", "stall_ms", "bytes_h2d", "pcie_busy_frac",
           "prefetch_precision", "prefetch_recall", "prefetch_late", "prefetch_unused")
CAPACITY_UNITS = {"cache.cache_rate": "cache rate (% of all experts)", "cache.capacity_mib": "cache size (MiB)",
                  "cache.capacity_experts": "cache size (experts)"}


def embedded_traces(root: str | Path | None = None) -> list[Path]:
    """The trace directories under data/traces/ (each with a meta.json), in name order."""
    base = Path(root) if root is not None else REPO_ROOT / "data" / "traces"
    return sorted(p for p in base.iterdir() if (p / "meta.json").is_file()) if base.is_dir() else []


def results_file(results_dir: str | Path) -> Path:
    p = Path(results_dir)
    return p if p.suffix == ".parquet" else p / "results.parquet"


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """Read a sweep's results (see the module docstring). Raises FileNotFoundError naming the path."""
    p = Path(results_dir)
    f = results_file(p)
    if f.exists():
        df = pd.read_parquet(f)
    elif (p / "runs").is_dir() and any((p / "runs").glob("*.parquet")):
        df = pd.concat([pd.read_parquet(x) for x in sorted((p / "runs").glob("*.parquet"))], ignore_index=True)
    else:
        raise FileNotFoundError(f"{p}: no results.parquet and no runs/*.parquet (run `python -m sim.sweep` first)")
    return annotate(df)


def annotate(df: pd.DataFrame) -> pd.DataFrame:
    """Add trace_name, model, schedule, capacity and capacity_unit (see the module docstring)."""
    df = df.copy()
    if "trace" in df:
        df["trace_name"] = df["trace"].map(lambda t: Path(str(t)).name)
        df["model"] = df["trace"].map(trace_model)
    df["schedule"] = df.apply(schedule_label, axis=1) if len(df) else pd.Series(dtype=str)
    cap = pd.Series(np.nan, index=df.index)
    unit = pd.Series("", index=df.index, dtype=object)
    for col, label in CAPACITY_UNITS.items():
        if col in df:
            v = pd.to_numeric(df[col], errors="coerce")
            take = cap.isna() & v.notna()
            cap[take] = v[take] * (100.0 if col == "cache.cache_rate" else 1.0)
            unit[take] = label
    df["capacity"] = cap
    df["capacity_unit"] = unit
    return df


def schedule_label(row) -> str:
    on = [s for s in SWITCHES if bool(row.get(s, False))]
    label = "reactive" if not on else ("ProMoE" if len(on) == len(SWITCHES) else "+".join(SWITCH_SHORT[s] for s in on))
    if bool(row.get("cpu_experts", False)):
        label += "+cpu-experts"
    return label


_MODEL_CACHE: dict[str, str] = {}


def trace_model(trace: str | Path) -> str:
    """Short model name from the trace's meta.json ("Qwen3-30B-A3B (GGUF ...)" -> "Qwen3-30B-A3B")."""
    key = str(trace)
    if key not in _MODEL_CACHE:
        name = Path(key).name
        for cand in (Path(key), REPO_ROOT / key):
            try:
                meta = json.loads((cand / "meta.json").read_text())
                name = str(meta.get("model") or name).split(" (")[0].strip()
                break
            except (OSError, ValueError):
                continue
        _MODEL_CACHE[key] = name
    return _MODEL_CACHE[key]


def varying(df: pd.DataFrame, exclude=()) -> list[str]:
    """Config columns (not metrics) that take more than one value in df."""
    metric_like = set(METRICS) | set(COUNT_NAMES)
    out = []
    for c in df.columns:
        if c in metric_like or c in IGNORED_KEYS or c in exclude:
            continue
        if df[c].astype(str).nunique(dropna=False) > 1:
            out.append(c)
    return out


def baseline_mask(df: pd.DataFrame) -> pd.Series:
    """Rows of the reference system: reactive LRU (policy lru, no predictor, no ProMoE switch, no CPU experts)."""
    m = (df["cache.policy"] == "lru") & (df["prefetch.predictor"] == "none") & (df["schedule"] == "reactive")
    return m


def with_speedup(df: pd.DataFrame, metrics=("tpot_ms", "ttft_ms", "total_ms")) -> pd.DataFrame:
    """Add `speedup_<metric>` = metric of reactive LRU at the same settings / metric of the row (> 1 is faster).

    "The same settings" = every config column that varies in df except policy, predictor and the switches.
    Rows without a matching reactive-LRU run get NaN."""
    df = df.copy()
    keys = [c for c in varying(df, exclude=("cache.policy", "prefetch.predictor", "schedule", "cpu_experts"))
            if c not in ("prefetch.distance", "prefetch.top_n", "prefetch.chunks", "prefetch.max_inflight_mib",
                         "prefetch.predictor_params", "cache.policy_params")]
    keys.append("capacity")
    base = df[baseline_mask(df)]
    for m in metrics:
        if m not in df:
            continue
        if base.empty:
            df[f"speedup_{m}"] = np.nan
            continue
        ref = base.groupby([df.loc[base.index, k].astype(str) for k in keys])[m].first()
        idx = pd.MultiIndex.from_arrays([df[k].astype(str) for k in keys]) if len(keys) > 1 else df[keys[0]].astype(str)
        ref_vals = ref.reindex(idx).to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            df[f"speedup_{m}"] = ref_vals / df[m].to_numpy(dtype=float)
    return df


def summary_table(df: pd.DataFrame, metric: str = "tpot_ms", phase: str | None = "decode") -> pd.DataFrame:
    """Pivot: rows (trace, policy, predictor, schedule), columns cache sizes, values `metric`."""
    d = df if phase is None else df[df["phase"] == phase]
    return d.pivot_table(index=["trace_name", "cache.policy", "prefetch.predictor", "schedule"],
                         columns="capacity", values=metric, aggfunc="first")
