"""Real and simulated side by side: `python -m executor.validate CONFIGS --profile PROFILE --out DIR`.

CONFIGS is a validation suite YAML (or a directory of them):

    base:                     # merged into every run (the simulator's run-config keys, sim/config.py)
      phase: both
      max_sequences: 2
      max_decode_tokens: 32
    grid:                     # optional: every run is repeated for each combination (dotted keys)
      cache.cache_rate: [0.25, 0.5]
    runs:
      - name: lru             # the label: policies are compared by it; "lru" is the reactive baseline
        geometry: qwen3-30b-a3b
        layers: null          # first N layers (see executor.memory); null = all the trace has
        mode: replay          # replay | live (live: the small trained model; see executor.live)
        trace: data/traces/qwen3-30b-a3b
        cache: {policy: lru}
      - name: promoe
        geometry: qwen3-30b-a3b
        trace: data/traces/qwen3-30b-a3b
        cache: {policy: lru}
        prefetch: {predictor: previous_token, distance: 2}
        chunked_prefetch: true
        early_preemption: true
        reordered_inference: true

For each run: the executor replays the trace with the geometry's shapes (executor.replay) and reports the slot
count it allocated; the simulator then runs the same trace, policy, predictor and switches on the same meta
(the geometry's bytes, the same first N layers), with the cache capacity = those slots x expert bytes, and the
hardware profile PROFILE (which should be the one `executor.calibrate` measured on the same machine).

Writes to DIR: `results.parquet` (one row per run: config columns, real_* and sim_* metrics, differences),
`summary.md` (the table real / simulated / difference for TTFT, TPOT and hit rate; each label's speedup over
"lru", real and simulated; fidelity: median and max |sim - real| / real of TTFT and TPOT, whether the ranking of
labels by total time agrees), `plots/` (simulated vs real scatter; speedups), `meta.json` (command, machine,
profile; `runs_command`: the last call that ran rows, kept when --report-only rewrites the report). Partial results
are written after each run (resumable with --resume: runs already in results.parquet are skipped).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from traces.atomic import atomic_write
from traces.errors import TraceError, run_cli

EXECUTOR_KEYS = ("name", "geometry", "layers", "mode", "set_geometry", "prompts")
TIME_METRICS = ("ttft_ms", "tpot_ms", "total_ms")
COMPARED = ("ttft_ms", "tpot_ms", "total_ms", "hit_rate", "stall_ms", "bytes_h2d", "pcie_busy_frac",
            "prefetch_precision", "prefetch_recall")


# -- the suite --------------------------------------------------------------------------------------------------
def load_suite(path: str | Path) -> list[dict]:
    """Expand a suite file (or every *.yaml of a directory) into run dicts (executor keys + run-config keys)."""
    from sim.config import read_yaml, set_dotted, unflatten

    p = Path(path)
    files = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
    if not files:
        raise TraceError("no *.yaml validation suites here", path=p)
    runs: list[dict] = []
    for f in files:
        raw = read_yaml(f) or {}
        if not isinstance(raw, dict) or not isinstance(raw.get("runs"), list):
            raise TraceError("a validation suite is a mapping with a 'runs:' list", path=f)
        unknown = set(raw) - {"name", "description", "base", "defaults", "grid", "runs"}
        if unknown:
            raise TraceError(f"unknown top-level keys {sorted(unknown)} (name, description, base, grid, runs)",
                             path=f)
        defaults = unflatten(raw.get("base") or raw.get("defaults") or {})
        grid = raw.get("grid") or {}
        keys = list(grid)
        combos = list(itertools.product(*[grid[k] for k in keys])) or [()]
        for i, run in enumerate(raw["runs"]):
            if not isinstance(run, dict) or "geometry" not in {**defaults, **run}:
                raise TraceError("each run needs at least 'geometry' (its own or the base's; and a trace)", path=f,
                                 where=f"runs[{i}]")
            for combo in combos:
                merged = json.loads(json.dumps(defaults))
                for k, v in unflatten(run).items():
                    if isinstance(v, dict) and isinstance(merged.get(k), dict):
                        merged[k].update(v)
                    else:
                        merged[k] = v
                for k, v in zip(keys, combo):
                    set_dotted(merged, k, v)
                merged.setdefault("name", f"run{i}")
                merged["_suite"] = str(f)
                merged["_base_dir"] = str(f.resolve().parent)
                runs.append(merged)
    return runs


def split_run(run: dict):
    """(executor options, RunConfig) of one expanded run."""
    from sim.config import build_config

    ex = {k: run.get(k) for k in EXECUTOR_KEYS}
    ex["mode"] = ex["mode"] or "replay"
    if ex["mode"] not in ("replay", "live"):
        raise TraceError(f"mode must be replay or live, got {ex['mode']!r}", path=run.get("_suite"))
    raw = {k: v for k, v in run.items() if k not in EXECUTOR_KEYS and not k.startswith("_")}
    cfg = build_config(raw, path=run.get("_suite"), base_dir=run.get("_base_dir"))
    return ex, cfg


def run_id(ex: dict, cfg) -> str:
    import hashlib

    blob = json.dumps({"ex": ex, "cfg": cfg.identity()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- one run -----------------------------------------------------------------------------------------------------
# host time the simulator charges on the compute stream, in the executor's categories (executor.runtime.HOST_METRICS):
# the report puts them beside the runtime's own accounting, to show which of the profile's host costs is off
SIM_HOST = ("host_predict_ms", "host_prefetch_issue_ms", "host_demand_issue_ms", "host_copy_issue_ms")


def simulate(cfg, setup, profile, capacity_bytes: int) -> dict:
    """The simulator on exactly what the executor ran: meta, sequences (first N layers), capacity in whole slots.
    Its metrics plus the host time it charged per category (SIM_HOST, warm-up batches left out)."""
    sim = build_simulation(cfg, setup, profile, capacity_bytes)
    m = sim.run()
    m.update({k: getattr(sim.c, k.removesuffix("_ms") + "_s") * 1e3 for k in SIM_HOST})  # (Counters.host_*_s)
    return m


def build_simulation(cfg, setup, profile, capacity_bytes: int, *, record: bool = False):
    """`simulate`'s Simulation, not yet run (`record`: keep its per-batch rows, for executor.gap)."""
    from predictors.registry import make_predictor
    from sim.engine import Simulation
    from sim.hardware import CostModel

    cost = CostModel(profile, setup.meta, pinned=cfg.pinned_memory,
                     chunks=cfg.prefetch.chunks if cfg.chunked_prefetch else 1)
    inflight = cfg.prefetch.max_inflight_mib * (1 << 20) if cfg.prefetch.max_inflight_mib is not None else None
    predictor = getattr(setup, "predictor", None)
    if predictor is None:
        predictor = make_predictor(cfg.prefetch.predictor, **cfg.prefetch.predictor_params)
    call_s, token_s = profile.predictor_cost(cfg.prefetch.predictor)
    sim = Simulation(setup.meta, setup.sequences, cost, phase=cfg.phase, batch_size=cfg.batch_size,
                     cache_capacity_bytes=capacity_bytes, cache_scope=cfg.cache.scope, cache_policy=cfg.cache.policy,
                     policy_params=cfg.cache.policy_params,
                     predictor=predictor, distance=cfg.prefetch.distance, top_n=cfg.prefetch.top_n,
                     max_inflight_bytes=inflight,
                     predictor_cost_s=call_s, predictor_token_s=token_s,
                     chunked_prefetch=cfg.chunked_prefetch, chunks=cfg.prefetch.chunks,
                     early_preemption=cfg.early_preemption, reordered_inference=cfg.reordered_inference,
                     cpu_experts=cfg.cpu_experts,
                     trace=setup.trace, record=record,
                     warmup_batches=getattr(setup, "warmup_batches", cfg.warmup_batches),
                     # the executor's default: it predicts on its host at the gate, the GPU waiting; with
                     # prefetch.blocking false on its predictor thread, only the prediction's copies waiting
                     predictor_blocking=cfg.prefetch.blocking is not False,
                     late_issue_on_stream=True)  # (not blocking: its main thread issues what its thread predicts)
    return sim


def run_group(items: list[tuple[dict, object]], profile, *, device=None, host_budget=None, gpu_budget=None,
              check=False, models: dict | None = None, lookahead: int = 1, predict_after_resident: bool = False,
              prefill_repeats: int = 5, decode_repeats: int = 3, real_stat: str = "median",
              predictor_backend: str = "auto") -> list[dict]:
    """The rows of several replay configs of one geometry and phase (`group_key`), their repeats interleaved:
    repeat r of every config, then repeat r + 1, so a drift of the host's speed between configs (it spreads a
    config's repeats by 12-22 % on the H200 machine) weighs on every label alike, not on whichever ran in the slow
    minutes, and does not decide the ranking or the speedups. A live config runs on its own (its repeats reload
    the model). `real_stat`: which repeat a row compares (`repeat_runs`)."""
    import torch

    if len(items) == 1 and items[0][0]["mode"] == "live":
        from executor.live import run_live

        ex, cfg = items[0]
        # (each live run reloads the model: repeats at the decode count for prefill rows too, to bound the time)
        return [guarded(lambda: run_live(ex, cfg, profile, device=device, lookahead=lookahead,
                                         repeats=decode_repeats, real_stat=real_stat,
                                         predictor_backend=predictor_backend), ex)]
    if any(ex["mode"] == "live" for ex, _ in items):
        raise ValueError("a live config runs on its own, not in an interleaved group")
    plans = [guarded(lambda ex=ex, cfg=cfg: replay_plan(
        ex, cfg, profile, device=device, host_budget=host_budget, gpu_budget=gpu_budget, check=check, models=models,
        lookahead=lookahead, predict_after_resident=predict_after_resident, predictor_backend=predictor_backend), ex)
        for ex, cfg in items]
    ready = [i for i, p in enumerate(plans) if not isinstance(p, dict)]  # (a dict: the row of one that failed)
    n = max(prefill_repeats if cfg.phase == "prefill" else decode_repeats for _, cfg in items)
    chosen = repeat_runs([plans[i][0] for i in ready], n,
                         device or ("cuda" if torch.cuda.is_available() else "cpu"), stat=real_stat)
    rows = list(plans)
    for i, m in zip(ready, chosen):
        if isinstance(m, Exception):
            rows[i] = error_row(m, items[i][0])
        else:
            rows[i] = guarded(lambda i=i, m=m: plans[i][1](*m), items[i][0])
    return rows


# what a config that cannot run raises: a mode refuses it (NotImplementedError), a FitError or a configuration
# that does not fit (TraceError, ValueError); its row says so and the suite goes on
CONFIG_ERRORS = (NotImplementedError, TraceError, ValueError)


def error_row(exc: Exception, ex: dict) -> dict:
    """The row of a config that could not run: skipped (NotImplementedError) or error."""
    if isinstance(exc, NotImplementedError):
        return {"status": "skipped", "error": str(exc)}
    print(f"error: run {ex['name']} ({ex['geometry']}, {ex['mode']}): {exc}", file=sys.stderr)
    return {"status": "error", "error": str(exc)}


def guarded(make, ex: dict):
    """make(), or `error_row` of the configuration error it raised."""
    try:
        return make()
    except CONFIG_ERRORS as exc:
        return error_row(exc, ex)


def group_key(ex: dict, cfg) -> tuple:
    """Configs whose repeats interleave (`run_group`): replays of one geometry, layers, trace, phase, batch size
    and cache size, i.e. the labels a ranking compares (they share the host store: same geometry, layers and
    seed, so no repeat rebuilds it for another label)."""
    if ex["mode"] == "live":
        return ("live", id(ex))
    return (str(ex["geometry"]), str(ex.get("layers")), json.dumps(ex.get("set_geometry")), str(cfg.trace),
            cfg.seed, cfg.phase, cfg.batch_size, cfg.max_sequences, cfg.max_decode_tokens, cfg.cache.scope,
            cfg.cache.cache_rate, cfg.cache.capacity_mib, cfg.cache.capacity_experts)


def replay_plan(ex: dict, cfg, profile, *, device=None, host_budget=None, gpu_budget=None, check=False,
                models: dict | None = None, lookahead: int = 1, predict_after_resident: bool = False,
                predictor_backend: str = "auto"):
    """(one, finish) for a replay config: `one()` runs it once on the GPU (None for a run to leave out), `finish(
    (rt, real), repeat_cols)` simulates it and makes the row from the compared repeat (`repeat_runs`)."""
    from executor.geometry import parse_geometry_overrides, resolve_geometry
    from executor.memory import DEFAULT_HOST_BUDGET
    from executor.replay import build_runtime, prepare

    geom = resolve_geometry(ex["geometry"], parse_geometry_overrides(ex.get("set_geometry")))
    setup = prepare(cfg, geom, layers=ex.get("layers"))

    def one():
        # the first run on a freshly built host store is slower (its pinned pages' first DMA): left out, run again
        # (the configs of a group share the store: only the run that built it is left out)
        key = models.get("key") if models is not None else None
        rt = build_runtime(cfg, setup, device=device, host_budget=host_budget or DEFAULT_HOST_BUDGET,
                           gpu_budget_bytes=gpu_budget, check=check, models=models, lookahead=lookahead,
                           predict_after_resident=predict_after_resident, predictor_backend=predictor_backend)
        rt.warmup()
        m = rt.run()
        if models is not None and models.get("key") != key:
            return None
        # what the row needs of the runtime, not the runtime: the repeats' slabs must not stay on the GPU together
        return SimpleNamespace(n_slots=rt.n_slots, device=rt.device, batch_rows=rt.batch_rows), m

    def finish(compared, repeat_cols: dict) -> dict:
        rt, real = compared
        capacity = rt.n_slots * setup.meta.expert_bytes[0]
        sim = simulate(cfg, setup, profile, capacity)
        return compare_row(real, sim, {"geometry_name": setup.geometry.name, "n_layers": setup.n_layers,
                                       **repeat_cols, "slab_slots": rt.n_slots, "capacity_bytes": capacity,
                                       "device": str(rt.device), "real_batch_ms": batch_times(rt),
                                       **pcie_floor(cfg, setup, profile, capacity)})

    return one, finish


def batch_times(rt) -> str:
    """The compared run's time of each batch, ms, in run order (JSON): where along the run real and
    simulated times part."""
    return json.dumps([round(r["duration_ms"], 4) for r in rt.batch_rows])


REAL_STATS = ("median", "fastest")


def repeat_run(run, n: int, device, stat: str = "median") -> tuple[tuple, dict]:
    """`repeat_runs` of one run."""
    return repeat_runs([run], n, device, stat)[0]


def repeat_runs(runs, n: int, device, stat: str = "median") -> list:
    """A run's time varies from one run to the next (host scheduling, the copy engine): each `run()` (returning
    (extra, metrics), or None for a run to leave out and repeat) is run until n runs are kept, round-robin over
    `runs` (repeat r of each, then repeat r + 1), each after a machine probe (executor.probe). Returns per run the
    compared run, by total time the median (`stat` "median") or the fastest ("fastest": the host's interference
    only adds time, so the fastest repeat is the machine's own speed, what a calibration with `--host-stat min`
    measures), and the row's repeat columns: real_stat, real_repeats, real_spread ((max - min) / the median
    run's total) and real_probes (each with its run's total, CPU steal and its place in the round-robin); for a run that
    raised a configuration error (TraceError, ValueError, NotImplementedError) the exception instead, the others
    going on without it."""
    from executor.probe import cpu_steal_ms, machine_probe, steal_during
    from executor.runtime import HOST_METRICS

    if stat not in REAL_STATS:
        raise ValueError(f"real statistic {stat!r}: one of {', '.join(REAL_STATS)}")
    kept: list[list] = [[] for _ in runs]
    probes: list[list] = [[] for _ in runs]
    in_order: list[dict] = []  # every probe as taken: a repeat's steal runs up to the next probe, whoever's
    order = 0
    failed: dict[int, Exception] = {}
    for _ in range(max(1, n)):
        for i, run in enumerate(runs):
            if i in failed:
                continue
            try:
                for _ in range(3):
                    probe = machine_probe(device)
                    r = run()
                    if r is not None:
                        break
                else:  # (a run left out builds a fresh host store; one that does so every time would never end)
                    raise ValueError("three runs in a row were left out (each built a fresh host store)")
            except CONFIG_ERRORS as exc:  # this config only; the others go on
                failed[i] = exc
                continue
            kept[i].append(r)
            host = sum(r[1].get(k) or 0.0 for k in HOST_METRICS)  # the run's own host time (runtime accounting)
            probes[i].append({**probe, "total_ms": round(r[1]["total_ms"], 3), "host_ms": round(host, 3),
                              "order": order})
            in_order.append(probes[i][-1])
            order += 1
    steal_during(in_order, cpu_steal_ms())
    out: list = []
    for i, (rs, ps) in enumerate(zip(kept, probes)):
        if i in failed:
            out.append(failed[i])
            continue
        totals = [r[1]["total_ms"] for r in rs]
        by_time = sorted(rs, key=lambda r: r[1]["total_ms"])
        median = by_time[len(rs) // 2]
        spread = (max(totals) - min(totals)) / median[1]["total_ms"]
        out.append((median if stat == "median" else by_time[0],
                    {"real_stat": stat, "real_repeats": len(rs), "real_spread": spread, "real_probes": json.dumps(ps)}))
    return out


def keep_artifact(path: str, out: Path) -> str:
    """A live run's predictor artifact copied into the report (`live-predictors/`, named by its content hash), so
    that --resimulate finds it without the model's directory; returns the path relative to the report."""
    import hashlib
    import shutil

    src = Path(path)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    rel = Path("live-predictors") / f"{src.stem}-{digest}{src.suffix}"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    if not (out / rel).exists():
        shutil.copyfile(src, out / rel)
    return str(rel)


def stored_run(row: dict, by_id: dict, suite, where: str | None = None) -> dict:
    """The suite run (by run id) a stored report row came from, or an error naming the row and the suite."""
    if row["run_id"] not in by_id:
        raise TraceError(f"run {row['run_id']} ({row.get('name')}) is not in {suite}", where=where)
    return by_id[row["run_id"]]


def resimulate_row(row: dict, run: dict, profile, out: Path) -> dict:
    """The row with its simulator side recomputed (same run config, trace, layers and slot capacity; the real side
    untouched): the model or the profile changed since the real run. Live runs replay the routing (and hidden
    states) they stored, with the predictor artifact kept in the report (`keep_artifact`)."""
    sim = simulate(*row_simulation_inputs(row, run, profile, out), int(row["capacity_bytes"]))
    real = {k[len("real_"):]: v for k, v in row.items() if k.startswith("real_")}
    new = compare_row(real, sim, {})
    return {**row, **{k: v for k, v in new.items() if k.startswith(("sim_", "diff_"))}}


def row_simulation_inputs(row: dict, run: dict, profile, out: Path) -> tuple:
    """(config, setup, profile) the simulator side of a stored row runs on (`simulate`, `build_simulation`)."""
    from executor.geometry import parse_geometry_overrides, resolve_geometry
    from executor.replay import prepare

    ex, cfg = split_run(run)
    geom = resolve_geometry(ex["geometry"], parse_geometry_overrides(ex.get("set_geometry")))
    if ex["mode"] != "live":
        return cfg, prepare(cfg, geom, layers=ex.get("layers")), profile
    from executor.live import live_meta, live_predictor, live_simulation_inputs, sequences_from_routing

    blob = row.get("live_routing")
    if not isinstance(blob, str):
        raise TraceError("a live row without its routing (recorded before --resimulate existed)",
                         where=str(row.get("run_id")))
    seqs, hidden = sequences_from_routing(blob, row.get("live_hidden"))
    meta = live_meta(geom, int(row["n_layers"]), seqs[0].all.shape[2], str(ex["geometry"]))
    art = row.get("live_artifact")
    predictor = live_predictor(cfg, out / art if isinstance(art, str) else None)
    return live_simulation_inputs(cfg, profile, str(ex["geometry"]), meta, seqs, hidden, predictor)


def compare_row(real: dict, sim: dict, extra: dict) -> dict:
    """One report row: real_*, sim_* and diff_* (relative for times and bytes, absolute for ratios)."""
    row = {"status": "ok", **extra, "timing": real.get("timing"), "copy_api": real.get("copy_api")}
    for k in COMPARED:
        r, s = real.get(k), sim.get(k)
        row[f"real_{k}"] = r
        row[f"sim_{k}"] = s
        if r is not None and s is not None:
            row[f"diff_{k}"] = (s - r) if k in ("hit_rate", "pcie_busy_frac", "prefetch_precision",
                                                "prefetch_recall") else ((s - r) / r if r else None)
    for k in ("lookups", "hits", "prefetches", "demand_loads"):
        row[f"real_{k}"], row[f"sim_{k}"] = real.get(k), sim.get(k)
    from executor.runtime import HOST_METRICS

    for k in HOST_METRICS + ("host_copy_issue_ms", "copy_issues"):  # where the executor's host time went
        row[f"real_{k}"] = real.get(k)
    for k in SIM_HOST:  # what the simulator charged for the same work
        row[f"sim_{k}"] = sim.get(k)
    return row


# -- the report --------------------------------------------------------------------------------------------------
def time_column(phase) -> str:
    """The time a run is judged by: TTFT for prefill runs, TPOT for decode runs, total time otherwise (per-batch
    means, so labels that replay different sequences, e.g. a trained predictor's held-out ones, compare)."""
    return {"prefill": "ttft_ms", "decode": "tpot_ms"}.get(str(phase), "total_ms")


def add_speedups(df):
    """Each label's speedup over the 'lru' label of the same geometry, trace, cache capacity and phase (TTFT in
    prefill, TPOT in decode, total time for both), and its time over the 'oracle' label's."""
    import numpy as np

    group = ["geometry", "trace", "cache.cache_rate", "cache.capacity_mib", "cache.capacity_experts", "phase"]
    group = [g for g in group if g in df.columns]
    df = df.copy()
    for side in ("real", "sim"):
        df[f"{side}_speedup_vs_lru"] = np.nan
        df[f"{side}_over_oracle"] = np.nan
    if "name" not in df.columns or "status" not in df.columns:
        return df
    for _, sub in df[df["status"] == "ok"].groupby(group, dropna=False):
        for label, col, inverse in (("lru", "speedup_vs_lru", True), ("oracle", "over_oracle", False)):
            base = sub[sub["name"] == label]
            if base.empty:
                continue
            for side in ("real", "sim"):
                tcol = f"{side}_{time_column(sub['phase'].iloc[0] if 'phase' in sub else None)}"
                b = base[tcol].iloc[0]
                t = sub[tcol]
                df.loc[sub.index, f"{side}_{col}"] = b / t if inverse else t / b
    if "pcie_floor_ms" in df.columns:
        df["real_over_pcie_floor"] = df["real_total_ms"] / df["pcie_floor_ms"]
    return df


def pcie_floor(cfg, setup, profile, capacity_bytes: int) -> dict:
    """The bytes that must move with this cache (Belady's misses on the run's demand lookups, each expert once per
    miss) and the time they take at the profile's pinned bandwidth: no schedule can beat it."""
    from sim.cache import ExpertCache
    from sim.engine.schedule import demand_lookups, iter_batches, layer_sets

    keys = demand_lookups(setup.sequences, cfg.phase, cfg.batch_size)
    meta = setup.meta
    cache = ExpertCache(n_layers=meta.n_layers, n_experts=meta.n_experts, expert_bytes=meta.expert_bytes,
                        capacity_bytes=capacity_bytes, scope=cfg.cache.scope, policy="belady", future=keys)
    warmup = getattr(setup, "warmup_batches", cfg.warmup_batches)
    moved = 0
    for b in iter_batches(setup.sequences, cfg.phase, cfg.batch_size):  # the order of `keys`
        for layer, (ids, _) in enumerate(layer_sets(b.experts)):
            for e in ids:
                if not cache.lookup((layer, e)):
                    cache.insert((layer, e))
                    if b.index >= warmup:  # warm-up batches are out of the measured time too
                        moved += meta.expert_bytes[layer]
    link = profile.h2d.pinned
    return {"must_move_bytes": moved,
            "pcie_floor_ms": link.seconds(meta.expert_bytes[0]) * 1e3 * moved / meta.expert_bytes[0]}


def fidelity(df, breakdown: bool = True) -> dict:
    """Median and max |sim - real| / real of TTFT and TPOT over the ok runs, the ranking agreement of labels per
    (geometry, trace, cache rate, phase) group, the median spread of the repeated real runs, and (`breakdown`)
    the same per geometry and mode."""
    import numpy as np

    ok = df[df["status"] == "ok"]
    out = {"runs": int(len(df)), "ok": int(len(ok))}
    for k in ("ttft_ms", "tpot_ms"):
        col = f"diff_{k}"
        if col in ok:
            v = ok[col].dropna().abs()
            out[f"median_abs_rel_diff_{k}"] = float(np.median(v)) if len(v) else None
            out[f"max_abs_rel_diff_{k}"] = float(v.max()) if len(v) else None
    # ranking of labels by total time, per group, real vs simulated
    agree = []
    group = [g for g in ("geometry", "trace", "cache.cache_rate", "phase") if g in ok.columns]
    if group and "name" in ok:
        for _, sub in ok.groupby(group, dropna=False):
            if len(sub) > 1:
                tcol = time_column(sub["phase"].iloc[0] if "phase" in sub else None)
                agree.append(list(sub.sort_values(f"real_{tcol}")["name"]) ==
                             list(sub.sort_values(f"sim_{tcol}")["name"]))
    out["ranking_groups"] = len(agree)
    out["ranking_agrees"] = int(sum(agree))
    # the real side's own noise: (max - min) / median of a config's repeated runs (the floor of any fidelity figure)
    if "real_spread" in ok and ok["real_spread"].notna().any():
        out["median_real_spread"] = float(np.median(ok["real_spread"].dropna()))
    if breakdown:
        out.update(noise(ok))
    if breakdown and "geometry" in ok and "mode" in ok:
        by = {}
        for (geom, mode), sub in df.groupby(["geometry", "mode"], dropna=False):
            by[f"{geom}/{mode}"] = fidelity(sub, breakdown=False)
        out["by_geometry_mode"] = by
    return out


def noise(ok) -> dict:
    """Where the real side's run-to-run noise comes from, from the probes taken before each repeat (executor.probe):
    each repeat's time, host loop time, kernel-launch time, GPU matmul time, link bandwidth and the run's own host
    accounting (host_ms) over its config's medians; the range of each ratio and the rank correlation of the time
    ratio with each other ratio (Spearman's rho)."""
    import numpy as np
    import pandas as pd

    if "real_probes" not in ok:
        return {}
    rows = []
    cols = ("total_ms", "host_loop_us", "launch_us", "gpu_us", "h2d_gbps", "host_ms")
    steal = []  # (time ratio, steal ms per second of the run)
    for blob in ok["real_probes"].dropna():
        probes = json.loads(blob)
        if len(probes) < 2:
            continue
        med = {c: np.median([p[c] for p in probes]) if all(p.get(c) is not None for p in probes) else None
               for c in cols}  # (no GPU figures on the CPU; older rows lack the newer probes)
        rows += [{c: p[c] / med[c] if med[c] else np.nan for c in cols} for p in probes]
        if med["total_ms"]:
            steal += [(p["total_ms"] / med["total_ms"], p["steal_ms"] / p["total_ms"] * 1e3) for p in probes
                      if p.get("steal_ms") is not None and p["total_ms"]]
    if len(rows) < 4:
        return {}
    r = pd.DataFrame(rows)
    out = {"noise_repeats": len(r)}
    for c, name in zip(cols, ("time", "host", "launch", "gpu", "link", "host_work")):
        if r[c].notna().any():
            out[f"noise_{name}_ratio_range"] = [round(float(r[c].min()), 3), round(float(r[c].max()), 3)]
            if c != "total_ms":
                out[f"noise_time_vs_{name}_spearman"] = round(float(r["total_ms"].corr(r[c], method="spearman")), 3)
    if len(steal) >= 4:  # CPU time stolen by the hypervisor during a run, per second of the run (all CPUs)
        t, st = pd.Series([x[0] for x in steal]), pd.Series([x[1] for x in steal])
        out["noise_steal_ms_per_s_range"] = [round(float(st.min()), 1), round(float(st.max()), 1)]
        if st.nunique() > 1:
            out["noise_time_vs_steal_spearman"] = round(float(t.corr(st, method="spearman")), 3)
    return out


def _fmt(v, pct=False) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if pct:
        return f"{100 * v:+.1f}%"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def runs_command(meta_path: Path) -> str | None:
    """The last call that ran rows of the report a report-only call re-renders, from the report's earlier
    meta.json: a report re-rendered from its Parquet keeps naming a call that measured it, not only the last one
    that wrote it. None where no earlier meta.json names one."""
    try:
        prev = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if prev.get("runs_command"):
        return prev["runs_command"]
    cmd = prev.get("command")
    return cmd if cmd and "--report-only" not in cmd.split() else None


def summary_markdown(df, fid: dict, meta: dict) -> str:
    lines = [f"# Validation: real executor vs simulator ({meta.get('profile_name', '')})", ""]
    if meta.get("note"):
        lines += [f"**{meta['note']}**", ""]
    lines += [f"Machine: {meta.get('machine')}; device: {meta.get('device')}; command: `{meta.get('command')}`", ""]
    if meta.get("runs_command", meta.get("command")) != meta.get("command"):
        lines += [f"The runs: `{meta.get('runs_command') or 'not recorded'}`", ""]
    lines += [f"Profile: {meta.get('profile')} ({meta.get('profile_provenance', '')})", ""]
    if "real_stat" in df.columns and df["real_stat"].notna().any():
        stats = ", ".join(sorted({str(v) for v in df["real_stat"].dropna()}))
        lines += [f"Real side: the {stats} of each config's repeated runs (by total time; `real_spread` = "
                  "(max - min) / median of them)", ""]
    if meta.get("dry_run"):
        lines += ["**CPU DRY RUN: timings are CPU wall times against a CPU dry-run profile; not a validation.**", ""]
    lines += ["| run | geometry | layers | phase | rate | slots | TTFT real | TTFT sim | diff | TPOT real | TPOT sim | "
              "diff | hit real | hit sim | diff | speedup real | speedup sim |",
              "|" + "---|" * 17]
    for _, r in df.iterrows():
        if r.get("status") != "ok":
            lines.append(f"| {r.get('name')} | {r.get('geometry')} | | | | | {r.get('status')}: "
                         f"{str(r.get('error', ''))[:80]} |" + " |" * 10)
            continue
        lines.append("| " + " | ".join([
            str(r.get("name")), str(r.get("geometry")), _fmt(r.get("n_layers")), str(r.get("phase")),
            _fmt(r.get("cache.cache_rate")), _fmt(r.get("slab_slots")),
            _fmt(r.get("real_ttft_ms")), _fmt(r.get("sim_ttft_ms")), _fmt(r.get("diff_ttft_ms"), True),
            _fmt(r.get("real_tpot_ms")), _fmt(r.get("sim_tpot_ms")), _fmt(r.get("diff_tpot_ms"), True),
            _fmt(r.get("real_hit_rate")), _fmt(r.get("sim_hit_rate")), _fmt(r.get("diff_hit_rate")),
            _fmt(r.get("real_speedup_vs_lru")), _fmt(r.get("sim_speedup_vs_lru"))]) + " |")
    if "real_over_oracle" in df.columns:
        lines += ["", "## Distance from the bounds", "",
                  "time (TTFT in prefill, TPOT in decode, total for both) / the oracle-prefetch label's (same group); "
                  "total time / the PCIe floor (the bytes Belady must move with this capacity, warm-up excluded, at "
                  "the measured bandwidth)", "",
                  "| run | geometry | phase | rate | total real ms | / oracle real | / oracle sim | PCIe floor ms | "
                  "/ floor real |", "|" + "---|" * 9]
        for _, r in df[df["status"] == "ok"].iterrows():
            lines.append("| " + " | ".join([str(r.get("name")), str(r.get("geometry")), str(r.get("phase")),
                                            _fmt(r.get("cache.cache_rate")), _fmt(r.get("real_total_ms")),
                                            _fmt(r.get("real_over_oracle")), _fmt(r.get("sim_over_oracle")),
                                            _fmt(r.get("pcie_floor_ms")), _fmt(r.get("real_over_pcie_floor"))])
                         + " |")
    if all(f"sim_{k}" in df.columns for k in SIM_HOST):
        lines += host_table(df)
    lines += ["", "## Fidelity", ""]
    for k, v in fid.items():
        if isinstance(v, dict):
            lines.append(f"- {k}:")
            for g, sub in v.items():
                lines.append(f"  - {g}: " + ", ".join(f"{a} {_fmt(b)}" for a, b in sub.items()))
        else:
            lines.append(f"- {k}: {_fmt(v)}")
    lines += ["", "TTFT/TPOT differences are (sim - real) / real; hit-rate differences are sim - real.", ""]
    return "\n".join(lines)


def host_table(df) -> list[str]:
    """The report section: per run, the host time the runtime spent (its own accounting) and the simulator charged
    (the profile's costs x its counts), ms over the measured batches, for the three costs the profile holds per
    call or per copy (predictor_cost_us, prefetch_call/transfer_host_us, demand_transfer_host_us)."""
    head = ["", "## Host time by category", "",
            "ms over the measured batches: real = the runtime's own accounting (perf_counter around each part), sim = "
            "what the simulator charged on the compute stream for the same work (the profile's cost per call or per "
            "copy x its counts)", "",
            "copy issue: the host time of issuing chunk groups to the copy stream; real: of the other columns and "
            "the rest (`host_copy_issue_ms`, groups issued in brackets; runs from before it was recorded show -); "
            "sim: charged apart, on top of the other columns, only by profiles with `copy_issue_host_us`", "",
            "| run | geometry | phase | rate | predict real | predict sim | prefetch issue real | prefetch issue sim | "
            "demand issue real | demand issue sim | copy issue real | copy issue sim |", "|" + "---|" * 12]
    lines = []
    for _, r in df[df["status"] == "ok"].iterrows():
        cells = []
        for k in SIM_HOST:
            cells += [_fmt(r.get(f"real_{k}")), _fmt(r.get(f"sim_{k}"))]
        if all(c in ("-", "0") for c in cells):
            continue
        if cells[-2] != "-":
            cells[-2] += f" ({_fmt(r.get('real_copy_issues'))})"
        lines.append("| " + " | ".join([str(r.get("name")), str(r.get("geometry")), str(r.get("phase")),
                                        _fmt(r.get("cache.cache_rate"))] + cells) + " |")
    return head + lines if lines else []


def write_plots(df, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"]
    made = []
    pdir = out_dir / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    for k in ("ttft_ms", "tpot_ms"):
        sub = ok[[f"real_{k}", f"sim_{k}"]].dropna()
        if sub.empty:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(sub[f"real_{k}"], sub[f"sim_{k}"], s=14)
        lim = [0, float(max(sub.max())) * 1.05]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel(f"real {k}")
        ax.set_ylabel(f"simulated {k}")
        ax.set_title(f"{k}: simulated vs real")
        fig.tight_layout()
        fig.savefig(pdir / f"{k}_sim_vs_real.png", dpi=120)
        plt.close(fig)
        made.append(f"plots/{k}_sim_vs_real.png")
    if "real_speedup_vs_lru" in ok and ok["real_speedup_vs_lru"].notna().any():
        sub = ok.dropna(subset=["real_speedup_vs_lru"])
        labels = [f"{r['name']}\n{r.get('geometry')}" for _, r in sub.iterrows()]
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(sub)), 4))
        xs = range(len(sub))
        ax.bar([x - 0.2 for x in xs], sub["real_speedup_vs_lru"], width=0.4, label="real")
        ax.bar([x + 0.2 for x in xs], sub["sim_speedup_vs_lru"], width=0.4, label="simulated")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_ylabel("speedup over reactive LRU")
        ax.legend()
        fig.tight_layout()
        fig.savefig(pdir / "speedup_vs_lru.png", dpi=120)
        plt.close(fig)
        made.append("plots/speedup_vs_lru.png")
    return made


def pin_cpus(spec: str) -> None:
    """Pin the main thread (and the threads it starts later) to the CPUs of `spec` ("2", "2,3"); a clear error
    otherwise. torch's CPU thread pool is started first, so its threads keep every core: pinned before it, the pool
    inherited the one core and filling Qwen3's 54 GiB host store took over 430 s (session 5)."""
    import os

    import torch

    torch.empty(1 << 24).fill_(1.0).sum()  # (a parallel op: the pool's threads start now, with every core)
    try:
        cpus = {int(c) for c in spec.split(",") if c.strip()}
        os.sched_setaffinity(0, cpus)
    except (ValueError, OSError, AttributeError) as exc:
        raise TraceError(f"cannot pin to CPUs {spec!r}: {exc}", where="--cpus") from None


def main(argv=None) -> int:
    import pandas as pd
    import torch

    from executor.memory import GIB
    from executor.runtime import PREDICTOR_BACKENDS
    from sim.config import flatten
    from sim.hardware import load_profile

    ap = argparse.ArgumentParser(prog="python -m executor.validate", description=__doc__.splitlines()[0])
    ap.add_argument("configs", help="validation suite YAML or a directory of them")
    ap.add_argument("--profile", required=True, help="hardware profile measured on this machine")
    ap.add_argument("--out", required=True, help="report directory")
    ap.add_argument("--device", default=None)
    ap.add_argument("--only", default=None, help="run only runs whose name contains this")
    ap.add_argument("--geometries", default=None, help="run only runs of these geometries (comma-separated)")
    ap.add_argument("--resume", action="store_true", help="skip runs already in DIR/results.parquet")
    ap.add_argument("--check", action="store_true", help="executor invariant checks (slow)")
    ap.add_argument("--host-budget-gib", type=float, default=100.0)
    ap.add_argument("--gpu-budget-gib", type=float, default=None)
    ap.add_argument("--machine", default=platform.node())
    ap.add_argument("--cpus", default=None, metavar="LIST",
                    help="pin the main thread to these CPUs (e.g. 2 or 2,3; Linux; torch's CPU pool keeps every core): "
                         "the host is what varies from one repeat to the next, and a pinned main thread is not moved "
                         "between cores")
    ap.add_argument("--lookahead", type=int, default=None,
                    help="chunk groups ahead on the copy stream (default: the profile's h2d.lookahead, which the "
                         "simulator models)")
    ap.add_argument("--predict-after-resident", action="store_true",
                    help="launch resident experts before running the predictor")
    ap.add_argument("--layers", type=int, default=None, help="replay only the first N layers in every run")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: rewrite summary.md, meta.json and plots/ from DIR/results.parquet")
    ap.add_argument("--resimulate", action="store_true",
                    help="with --report-only: recompute every run's simulator side with --profile and today's "
                         "simulator (the real measurements are kept)")
    ap.add_argument("--predictor-backend", default="auto", choices=PREDICTOR_BACKENDS,
                    help="where learned_mlp's predictions run in the real runs: torch on the GPU (a CUDA graph per "
                         "network), numpy on the host; auto (default): torch on a GPU")
    ap.add_argument("--note", default=None, help="a line shown at the top of the summary (e.g. why it is partial)")
    ap.add_argument("--prefill-repeats", type=int, default=5,
                    help="real runs per prefill config (--real-stat picks the compared one)")
    ap.add_argument("--decode-repeats", type=int, default=3, help="real runs per decode config")
    ap.add_argument("--real-stat", choices=REAL_STATS, default="fastest",
                    help="which repeat of a config is compared: the fastest (default: the host's interference only "
                         "adds time; matches executor.calibrate's default --host-stat min) or the median")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a run-config key in every run (e.g. max_decode_tokens=32)")
    ap.add_argument("--set-geometry", action="append", default=[], metavar="KEY=VALUE",
                    help="override a geometry field in every run (e.g. hidden=64 for a CPU smoke run)")
    args = ap.parse_args(argv)
    if args.cpus:
        pin_cpus(args.cpus)
    profile = load_profile(args.profile)
    lookahead = args.lookahead if args.lookahead is not None else profile.h2d.lookahead
    from sim.config import parse_sets, set_dotted

    runs = load_suite(args.configs)
    suite_runs = len(runs)
    overrides = parse_sets(args.set)
    for r in runs:
        for k, v in overrides.items():
            set_dotted(r, k, v)
        if args.layers is not None:
            r["layers"] = args.layers
        if args.set_geometry:
            r["set_geometry"] = list(r.get("set_geometry") or []) + list(args.set_geometry)
    if args.only:
        runs = [r for r in runs if args.only in str(r.get("name"))]
    if args.geometries:
        keep = {g.strip() for g in args.geometries.split(",") if g.strip()}
        runs = [r for r in runs if str(r.get("geometry")) in keep]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        torch.set_num_threads(1)  # CPU dry run: OpenMP spin-waiting on a shared machine makes tiny matmuls erratic
    results = out / "results.parquet"
    rows: list[dict] = []
    done: set[str] = set()
    if args.resume and results.exists():
        prev = pd.read_parquet(results)
        prev = prev[prev["status"] != "error"]  # failed runs are run again
        rows = prev.to_dict("records")
        done = set(prev["run_id"])
    # runs of one geometry together, so the host store is built once per geometry (see replay.build_runtime)
    runs = sorted(runs, key=lambda r: (str(r.get("geometry")), str(r.get("layers")), str(r.get("trace"))))
    models: dict = {}
    if args.report_only:
        if not results.exists():
            raise TraceError(f"{results}: no results to report on", where="--report-only")
        rows = pd.read_parquet(results).to_dict("records")
        if args.resimulate:
            by_id = {run_id(*split_run(r)): r for r in runs}
            for i, row in enumerate(rows):
                if row.get("status") != "ok":
                    continue
                rows[i] = resimulate_row(row, stored_run(row, by_id, args.configs, "--resimulate"), profile, out)
        runs = []
    # the labels of one geometry, phase and cache size run together, their repeats interleaved (run_group)
    todo, groups = [], {}
    for i, run in enumerate(runs):
        ex, cfg = split_run(run)
        rid = run_id(ex, cfg)
        if rid not in done:  # (groups numbered in order of first appearance)
            todo.append((groups.setdefault(json.dumps(group_key(ex, cfg), default=str), len(groups)), i, ex, cfg, rid))
    todo.sort(key=lambda t: t[:2])
    for _, group in itertools.groupby(todo, key=lambda t: t[0]):
        group = [t[1:] for t in group]
        bases = []
        for i, ex, cfg, rid in group:
            print(f"[{i + 1}/{len(runs)}] {ex['name']} {ex['geometry']} {cfg.cache.policy} "
                  f"rate={cfg.cache.cache_rate} phase={cfg.phase}", file=sys.stderr)
            bases.append({"run_id": rid, "name": ex["name"], "geometry": ex["geometry"], "mode": ex["mode"],
                          "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else "none (CPU)",
                          "torch": torch.__version__, "layers_asked": ex.get("layers"),
                          **{k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                             for k, v in flatten(cfg.identity()).items()}})
        t_run = time.perf_counter()
        group_rows = run_group([(ex, cfg) for _, ex, cfg, _ in group], profile, device=device,
                               host_budget=int(args.host_budget_gib * GIB),
                               gpu_budget=int(args.gpu_budget_gib * GIB) if args.gpu_budget_gib else None,
                               check=args.check, models=models, lookahead=lookahead,
                               predict_after_resident=args.predict_after_resident,
                               prefill_repeats=args.prefill_repeats, decode_repeats=args.decode_repeats,
                               real_stat=args.real_stat, predictor_backend=args.predictor_backend)
        wall = (time.perf_counter() - t_run) / len(group)  # the group's time, shared out
        for base, row in zip(bases, group_rows):
            if row.get("live_artifact"):
                row["live_artifact"] = keep_artifact(row["live_artifact"], out)
            rows.append({**base, **row, "wall_s": round(wall, 3)})
        df = pd.DataFrame(rows)
        atomic_write(results, lambda p, df=df: df.to_parquet(p, index=False))
    df = add_speedups(pd.DataFrame(rows)) if rows else pd.DataFrame()
    if not df.empty:
        atomic_write(results, lambda p: df.to_parquet(p, index=False))
    fid = fidelity(df) if not df.empty else {}
    argv_shown = list(sys.argv[1:] if argv is None else argv)
    if "--note" in argv_shown[:-1]:  # the note is shown on its own at the top
        argv_shown[argv_shown.index("--note") + 1] = "..."
    meta = {"command": "python -m executor.validate " + " ".join(argv_shown),
            "machine": args.machine, "device": device,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else "none (CPU)",
            "torch": torch.__version__, "profile": args.profile, "profile_name": profile.name,
            "profile_provenance": profile.provenance, "dry_run": not device.startswith("cuda"), "fidelity": fid,
            "suite_runs": suite_runs, "note": args.note}
    meta["runs_command"] = meta["command"]
    if args.report_only:  # the runs' machine is in the rows (timing, gpu, torch); this host only wrote the report
        meta["runs_command"] = runs_command(out / "meta.json")
        cuda_rows = "timing" in df and (df["timing"] == "cuda_events").any()
        meta["device"] = "cuda" if cuda_rows else device
        meta["dry_run"] = not cuda_rows
        for k in ("gpu", "torch"):
            vals = sorted({str(v) for v in df[k].dropna()}) if k in df else []
            meta[k] = ", ".join(vals) if vals else "not recorded in the rows"
    atomic_write(out / "summary.md", lambda p: Path(p).write_text(summary_markdown(df, fid, meta)))
    meta["plots"] = write_plots(df, out) if not df.empty else []
    atomic_write(out / "meta.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=str) + "\n"))
    print(json.dumps(fid))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
