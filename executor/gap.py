"""Where real and simulated time part, batch by batch:
`python -m executor.gap SUITE --profile PROFILE --out REPORT_DIR [--only NAME] [--json]`.

A validation row keeps its compared run's per-batch times (`real_batch_ms`). Here the simulator replays each
stored run again (as `validate --resimulate` does), keeping its per-batch rows, and the per-batch gap
(real - simulated) is fitted by least squares as `per_batch_ms + per_miss_us x misses`, misses being the
batch's simulated lookups that missed. A gap that is mostly a constant per batch (per layer: `per_layer_us`)
points at host work the profile does not charge on every layer step (bookkeeping, prediction, a sync); one that
grows with the misses points at the miss path (issuing copies, waiting for them). `gap_sd_ms` is the spread of
the per-batch gap around its mean: the run's own batch-to-batch noise."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from traces.errors import TraceError, run_cli


def batch_gap(real_ms: list[float], sim_rows: list[dict], n_layers: int) -> dict | None:
    """The fit for one run: real per-batch times against the simulation's rows, aligned from the end (a warm-up
    the real side left out comes first); None for a run of fewer than 3 batches (a one-prompt prefill)."""
    n = min(len(real_ms), len(sim_rows))
    if n < 3:
        return None
    real = np.asarray(real_ms[-n:], dtype=float)
    rows = sim_rows[-n:]
    sim = np.array([r["duration_ms"] for r in rows])
    miss = np.array([r["lookups"] - r["hits"] for r in rows], dtype=float)
    gap = real - sim
    design = np.c_[np.ones(n), miss] if np.ptp(miss) > 0 else np.ones((n, 1))
    coef, *_ = np.linalg.lstsq(design, gap, rcond=None)
    per_miss = float(coef[1]) if len(coef) > 1 else None
    return {"batches": n, "real_ms": float(real.mean()), "sim_ms": float(sim.mean()), "gap_ms": float(gap.mean()),
            "per_batch_ms": float(coef[0]), "per_layer_us": float(coef[0]) / n_layers * 1e3,
            "per_miss_us": None if per_miss is None else per_miss * 1e3, "misses_per_batch": float(miss.mean()),
            "gap_sd_ms": float(gap.std())}


def run_gaps(suite: str, profile_path: str, out: Path, only: str | None = None) -> list[dict]:
    import pandas as pd

    from executor.validate import build_simulation, load_suite, row_simulation_inputs, run_id, split_run, stored_run
    from sim.hardware import load_profile

    results = out / "results.parquet"
    if not results.exists():
        raise TraceError(f"{results}: no results", where="--out")
    df = pd.read_parquet(results)
    if "real_batch_ms" not in df:
        raise TraceError(f"{results}: no per-batch times (real_batch_ms; recorded since session 5)")
    runs = {run_id(*split_run(r)): r for r in load_suite(suite)}
    profile = load_profile(profile_path)
    out_rows = []
    for row in df.to_dict("records"):
        if row.get("status") != "ok" or not isinstance(row.get("real_batch_ms"), str):
            continue
        if only and only not in str(row["name"]):
            continue
        cfg, setup, prof = row_simulation_inputs(row, stored_run(row, runs, suite), profile, out)
        sim = build_simulation(cfg, setup, prof, int(row["capacity_bytes"]), record=True)
        sim.run()
        fit = batch_gap(json.loads(row["real_batch_ms"]), sim.batch_rows, int(row["n_layers"]))
        if fit is None:
            continue
        out_rows.append({"run_id": row["run_id"], "name": row["name"], "geometry": row["geometry"],
                         "mode": row["mode"], "phase": row["phase"], "cache_rate": row.get("cache.cache_rate"),
                         **fit})
    return out_rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m executor.gap", description=__doc__.splitlines()[0])
    ap.add_argument("suite", help="the validation suite the report was made from")
    ap.add_argument("--profile", required=True, help="hardware profile for the simulator side")
    ap.add_argument("--out", required=True, help="the report directory (results.parquet)")
    ap.add_argument("--only", help="only runs whose name contains this")
    ap.add_argument("--json", action="store_true", help="print one JSON list")
    args = ap.parse_args(argv)
    rows = run_gaps(args.suite, args.profile, Path(args.out), args.only)
    if args.json:
        print(json.dumps(rows))
        return 0
    cols = ("name", "geometry", "mode", "phase", "cache_rate", "batches", "real_ms", "sim_ms", "gap_ms",
            "per_batch_ms", "per_layer_us", "per_miss_us", "misses_per_batch", "gap_sd_ms")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
