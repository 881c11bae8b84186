"""Grids of simulations: `python -m sim.sweep CONFIG_DIR_OR_FILE [--out DIR] [--workers N] [--backend local|dask]
[--scheduler ADDR]`.

A sweep file is YAML with a top-level `grid:` key (a directory argument runs every *.yaml/*.yml directly in it
that has one, in name order; single-run configs such as configs/examples/ are not sweeps and are skipped):

    name: default                 # optional; defaults to the file name
    description: ...              # optional
    base:                         # fixed settings of every run (a run config, nested or dotted keys)
      trace: data/traces/qwen3-30b-a3b
      prefetch.distance: 1
    grid:                         # dotted key: value or list; lists expand to a cartesian product
      cache.policy: [lru, lfu, fifo, belady]
      cache.cache_rate: [0.1, 0.25, 0.5]
    zip:                          # optional: groups of equal-length lists that vary together (one axis each)
      - {trace: [data/traces/a, data/traces/b], max_decode_tokens: [128, 64]}

Relative trace and profile paths are resolved against the sweep file's directory, then the repository root,
then the current directory. Every expanded run is validated (unknown keys rejected, file and field named)
before anything runs. A capacity given by the grid or zip replaces the base's (capacity_mib, capacity_experts
and cache_rate are exclusive).

Each run is keyed by a hash of its resolved config (settings, simulator version, trace and profile
fingerprints). A finished run is written at once, atomically, to DIR/runs/<hash>.parquet, so an interrupted
sweep loses no finished run and a rerun skips every run whose file exists. At the end the runs of this
invocation are consolidated, in grid order, into DIR/results.parquet (one row per run: `sweep`, `run_id`,
the dotted config keys, DESIGN.md's metrics and the counts). Results are deterministic and do not depend on
the backend or the number of workers.

Backends: `local` (default) a process pool of --workers processes (default: the number of CPUs; 1 runs
in-process); `dask` submits to a Dask cluster at --scheduler ADDR (without an address a LocalCluster of
--workers processes is started). Results travel back to this process, which writes them. Dask workers
need the project installed and the traces and profiles at the same absolute paths (a shared filesystem or
the same checkout location), since payloads carry resolved paths.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sim.config import SIM_VERSION, RunConfig, build_config, check_key, read_yaml
from traces.atomic import atomic_write
from traces.errors import TraceError, run_cli

SWEEP_KEYS = {"name", "description", "base", "grid", "zip"}


@dataclass
class Task:
    sweep: str
    file: str
    index: int
    config: RunConfig
    run_id: str


def _as_list(v) -> list:
    return list(v) if isinstance(v, list) else [v]


def expand_file(path: str | Path) -> list[Task]:
    """Validate one sweep file and expand it into tasks (duplicate configs collapse to the first)."""
    p = Path(path)
    raw = read_yaml(p)
    if not isinstance(raw, dict) or "grid" not in raw:
        raise TraceError("not a sweep: expected a mapping with a 'grid:' key", path=p)
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise TraceError(f"unknown sweep key; expected {', '.join(sorted(SWEEP_KEYS))}", path=p,
                         where=f"field '{unknown[0]}'")
    name = str(raw.get("name") or p.stem)
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise TraceError("must be a mapping of config keys", path=p, where="field 'base'")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise TraceError("must be a mapping of dotted config keys to values or lists", path=p, where="field 'grid'")
    zips = raw.get("zip") or []
    if "zip" in grid:
        zips = _as_list(zips) + _as_list(grid.pop("zip"))
    if isinstance(zips, dict):
        zips = [zips]
    axes: list[list[dict[str, Any]]] = []
    for gi, group in enumerate(zips):
        if not isinstance(group, dict) or not group:
            raise TraceError("each zip group must be a mapping of keys to equal-length lists", path=p,
                             where=f"field 'zip[{gi}]'")
        lengths = {k: len(_as_list(v)) for k, v in group.items()}
        for k in group:
            check_key(k, path=p, where=f"zip[{gi}]: ")
        if len(set(lengths.values())) != 1:
            raise TraceError(f"zip lists differ in length: {lengths}", path=p, where=f"field 'zip[{gi}]'")
        n = next(iter(lengths.values()))
        axes.append([{k: _as_list(v)[i] for k, v in group.items()} for i in range(n)])
    for k, v in grid.items():
        check_key(k, path=p, where="grid: ")
        axes.append([{k: x} for x in _as_list(v)])
    tasks: list[Task] = []
    seen: set[str] = set()
    base_dir = p.resolve().parent
    for i, combo in enumerate(itertools.product(*axes)):
        overrides: dict[str, Any] = {}
        for part in combo:
            overrides.update(part)
        cfg = build_config(base, path=p, base_dir=base_dir, overrides=overrides)
        cfg.resolve_trace()  # a missing trace is reported now, naming the file
        _check_names(cfg, p)
        rid = cfg.run_hash()
        if rid in seen:
            continue
        seen.add(rid)
        tasks.append(Task(name, str(p), i, cfg, rid))
    return tasks


def _check_names(cfg: RunConfig, path: Path) -> None:
    """Unknown policy, predictor or hardware profile: reported before anything runs."""
    from predictors.registry import available_predictors
    from sim.hardware import resolve_profile_path
    from sim.policies import policy_class

    try:
        policy_class(cfg.cache.policy)
    except ValueError as exc:
        raise TraceError(str(exc), path=path, where="field 'cache.policy'") from None
    if cfg.prefetch.predictor not in available_predictors():
        raise TraceError(f"unknown predictor {cfg.prefetch.predictor!r}; available: "
                         f"{', '.join(available_predictors())}", path=path, where="field 'prefetch.predictor'")
    try:
        resolve_profile_path(cfg.hardware, Path(cfg.base_dir) if cfg.base_dir else None)
    except TraceError as exc:
        raise TraceError(str(exc), path=path) from None


def discover(target: str | Path) -> list[Path]:
    p = Path(target)
    if p.is_dir():
        files = sorted(x for x in p.iterdir() if x.suffix in (".yaml", ".yml") and x.is_file())
        out = []
        for f in files:
            raw = read_yaml(f)
            if isinstance(raw, dict) and "grid" in raw:
                out.append(f)
        if not out:
            raise TraceError("no sweep files (YAML with a 'grid:' key) in this directory", path=p)
        return out
    if not p.exists():
        raise TraceError("no such file or directory", path=p)
    return [p]


# -- running ---------------------------------------------------------------------------------------------------
def _encode(v):
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True)
    return v


def run_task(payload: dict) -> dict:
    """Worker side: one run from a plain-dict payload; returns the result row."""
    from predictors._torchfit import single_threaded_blas
    from sim.run import run_config

    single_threaded_blas()  # a run's predictor multiplies a batch's few rows; the other workers share the cores

    cfg = RunConfig.model_validate(payload["config"])
    t0 = time.process_time()
    metrics = run_config(cfg)
    row = {"sweep": payload["sweep"], "run_id": payload["run_id"], "sim_version": SIM_VERSION}
    row.update({k: _encode(v) for k, v in cfg.flat().items()})
    row.update(metrics)
    row["_cpu_s"] = time.process_time() - t0  # kept out of results.parquet (not deterministic)
    return row


def _payload(t: Task) -> dict:
    cfg = t.config.model_dump(mode="json")
    cfg["base_dir"] = t.config.base_dir
    cfg["source_file"] = t.config.source_file
    return {"sweep": t.sweep, "run_id": t.run_id, "config": cfg}


def _write_run(runs_dir: Path, row: dict) -> None:
    row = {k: v for k, v in row.items() if not k.startswith("_")}
    table = pa.Table.from_pylist([row])
    atomic_write(runs_dir / f"{row['run_id']}.parquet", lambda tmp: pq.write_table(table, tmp))


def _iter_local(payloads: list[dict], workers: int):
    if workers <= 1:
        for p in payloads:
            yield p, run_task(p), None
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futs = {pool.submit(run_task, p): p for p in payloads}
        for f in as_completed(futs):
            exc = f.exception()
            yield futs[f], (None if exc else f.result()), exc


def _iter_dask(payloads: list[dict], workers: int, scheduler: str | None, client=None):
    from distributed import Client, LocalCluster, as_completed

    own = []
    if client is None:
        if scheduler:
            client = Client(scheduler)
        else:
            cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True)
            own.append(cluster)
            client = Client(cluster)
        own.insert(0, client)
    try:
        futs = {}
        for p in payloads:
            futs[client.submit(run_task, p, key=f"sim-run-{p['run_id']}", pure=False)] = p
        for f in as_completed(list(futs)):
            if f.status == "error":
                yield futs[f], None, f.exception()
            else:
                yield futs[f], f.result(), None
    finally:
        for x in own:
            x.close()


def run_sweep(target: str | Path, out: str | Path, *, workers: int | None = None, backend: str = "local",
              scheduler: str | None = None, client=None, progress: bool = True, limit: int | None = None) -> dict:
    """Expand, skip finished runs, run the rest, consolidate. Returns a summary dict.

    `limit` runs at most that many pending runs (for tests of interrupted sweeps)."""
    files = discover(target)
    tasks: list[Task] = []
    seen: set[str] = set()
    for f in files:
        for t in expand_file(f):
            if t.run_id not in seen:
                seen.add(t.run_id)
                tasks.append(t)
    out = Path(out)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    done = {t.run_id for t in tasks if (runs_dir / f"{t.run_id}.parquet").exists()}
    pending = [t for t in tasks if t.run_id not in done]
    # keep runs of one trace together (each worker caches its last trace)
    pending.sort(key=lambda t: (t.config.trace, t.config.phase, t.config.max_decode_tokens or 0))
    if limit is not None:
        pending = pending[:limit]
    workers = workers or os.cpu_count() or 1
    payloads = [_payload(t) for t in pending]
    failures: list[str] = []
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), initial=len(done), desc="sim.sweep", unit="run", disable=not progress,
               file=sys.stderr)
    t0 = time.perf_counter()
    cpu = 0.0
    try:
        it = (_iter_dask(payloads, workers, scheduler, client) if backend == "dask"
              else _iter_local(payloads, min(workers, max(1, len(payloads)))))
        for p, row, exc in it:
            if exc is not None:
                failures.append(f"{p['run_id']}: {type(exc).__name__}: {exc}")
                bar.write(f"error: run {p['run_id']} ({json.dumps(p['config'].get('cache'))}): {exc}")
            else:
                cpu += row.get("_cpu_s", 0.0)
                _write_run(runs_dir, row)
            bar.update(1)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    results = consolidate(out, tasks)
    return {"runs": len(tasks), "skipped": len(done), "ran": len(payloads) - len(failures), "failed": len(failures),
            "failures": failures, "results": str(results) if results else None, "wall_s": wall, "cpu_s": cpu}


def consolidate(out: Path, tasks: list[Task]) -> Path | None:
    runs_dir = out / "runs"
    frames = []
    for t in tasks:
        f = runs_dir / f"{t.run_id}.parquet"
        if f.exists():
            frames.append(pd.read_parquet(f))
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    return atomic_write(out / "results.parquet", lambda tmp: df.to_parquet(tmp, index=False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.sweep", description="Run a grid of simulations (resumable).")
    ap.add_argument("target", help="sweep YAML file, or a directory of them (files with a 'grid:' key)")
    ap.add_argument("--out", default="results/sweep", help="output directory (runs/ and results.parquet)")
    ap.add_argument("--workers", type=int, default=None, help="parallel runs (default: CPU count)")
    ap.add_argument("--backend", choices=("local", "dask"), default="local")
    ap.add_argument("--scheduler", default=None, help="Dask scheduler address (backend dask)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = ap.parse_args(argv)
    summary = run_sweep(args.target, args.out, workers=args.workers, backend=args.backend,
                        scheduler=args.scheduler, progress=not args.no_progress)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['runs']} runs: {summary['skipped']} already done, {summary['ran']} ran, "
              f"{summary['failed']} failed in {summary['wall_s']:.1f} s; results: {summary['results']}")
        for f in summary["failures"]:
            print(f"  failed {f}", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
