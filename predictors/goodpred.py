"""GoodPred (ProMoE) = accuracy x fetch rate, the fetch rate measured by the simulator.

`python -m predictors.evaluate TRACE --predictor NAME --distance D --goodpred [--config SIMCONFIG |
--hardware h200 --cache-rate R] [--link-scale X] [--json]`

1. The predictor is fit once on the training split (trainable ones) and saved to a temporary artifact, or
   loaded from `--artifact`; the accuracy and the simulation use that same predictor, and both run only the
   held-out sequences (an untrained predictor goes through an artifact too, so the simulator runs the same
   held-out part; on a one-sequence trace the training positions are the simulation's warm-up).
2. accuracy: `predictors.evaluate.evaluate` on the held-out decode positions (ProMoE's accuracy).
3. fetch rate: one simulation (sim.run's Python API) with this predictor as the prefetcher at the same
   distance, on the same held-out sequences. The simulator counts, for every speculative transfer whose
   expert was looked up (`prefetched_used`), whether it had arrived by the lookup or was still queued or
   copying (`n_prefetch_late`), and the correct predictions that were never issued (ready only after their
   target gate, the in-flight bound reached, no evictable slot) and ended as demand misses
   (`n_prefetch_not_issued`):

       fetch_rate = (prefetched_used - n_prefetch_late) / (prefetched_used + n_prefetch_not_issued)

   i.e. the share of the useful predicted experts that were copied in time. None when no useful prediction
   needed a copy (predictor `none`, or every predicted expert already resident).
4. goodpred = accuracy x fetch_rate (`predictors.metrics.goodpred`).

`--link-scale X` multiplies the profile's host-to-device bandwidth by X (and divides its per-copy latency and
chunk overhead by X) through a scaled copy of the profile in a temporary directory: `inf` is an infinitely
fast link (the fetch rate is 1 and GoodPred equals the accuracy), 0.01 a link 100x slower than the profile's.

Layering: `predictors` does not import `sim` (DESIGN.md: executor -> sim -> predictors -> traces); this module
is a command-line driver that imports `sim` only inside `goodpred()`, and nothing in `predictors` imports it.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from predictors.metrics import clean
from predictors.metrics import goodpred as goodpred_of

SIM_KEYS = ("hit_rate", "tpot_ms", "ttft_ms", "stall_ms", "prefetch_precision", "prefetch_recall",
            "prefetch_late", "prefetch_unused", "prefetches", "prefetched_used", "n_prefetch_late",
            "n_prefetch_not_issued",
            "demand_misses", "lookups", "batches")


def fetch_rate(metrics: dict) -> float | None:
    """Share of the useful predictions (copied and looked up, or never issued and then missed) that arrived
    before their lookup."""
    used = metrics.get("prefetched_used") or 0
    useful = used + (metrics.get("n_prefetch_not_issued") or 0)
    if not useful:
        return None
    return (used - (metrics.get("n_prefetch_late") or 0)) / useful


def scaled_profile(hardware: str, scale: float, out_dir: Path, base_dir: Path | None = None) -> Path:
    """A copy of profile `hardware` with bandwidth x scale and latency / scale (scale=inf: latency 0)."""
    import yaml

    from sim.hardware import resolve_profile_path

    src = resolve_profile_path(hardware, base_dir)
    data = yaml.safe_load(src.read_text())
    h2d = data.get("h2d") or {}
    for table in ("pinned", "pageable"):
        for pt in (h2d.get(table) or {}).get("points", []) or []:
            pt["gbps"] = float(pt["gbps"]) * (1e9 if math.isinf(scale) else scale)
    for key in ("latency_us", "chunk_overhead_us"):
        if key in h2d:
            h2d[key] = 0.0 if math.isinf(scale) else float(h2d[key]) / scale
    data["name"] = f"{data.get('name', src.stem)}-link-x{scale:g}"
    data["provenance"] = f"{src.name} with host-to-device bandwidth x{scale:g} (predictors.goodpred --link-scale)"
    out = out_dir / f"{src.stem}-link-x{scale:g}.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def goodpred(trace_path: str, name: str, distance: int, *, config: str | None = None, hardware: str = "h200",
             cache_rate: float | None = None, phase: str = "decode", link_scale: float = 1.0,
             params: dict | None = None, artifact: str | None = None, fraction: float = 0.9, seed: int = 0,
             sim_sets: dict | None = None) -> dict:
    """Accuracy, fetch rate (from a simulation) and GoodPred of predictor `name` at `distance` on held-out data."""
    from predictors.evaluate import build_predictor, evaluate
    from predictors.train import train
    from sim.config import build_config, load_config
    from sim.run import run_config
    from traces.reader import Trace

    trace = Trace(trace_path)
    with tempfile.TemporaryDirectory(prefix="goodpred-") as tmp:
        tmp_dir = Path(tmp)
        if artifact is None:  # also for untrained predictors: the simulator then runs the held-out part only
            build_predictor(name, distance, seed, params).check_trace(trace.meta)
            artifact = str(tmp_dir / f"{name}-d{distance}.npz")
            train(str(trace.path), name, distance, artifact, fraction=fraction, seed=seed, params=params,
                  command="predictors.goodpred (temporary)")
        acc = evaluate(trace, name, distance, artifact=artifact, fraction=fraction, seed=seed, params=params)

        over = {"trace": str(Path(trace.path).resolve()), "prefetch.predictor": name,
                "prefetch.distance": distance, "prefetch.predictor_params": params or {},
                "prefetch.artifact": artifact, "prefetch.train_fraction": fraction, "seed": seed}
        over.update(sim_sets or {})
        if config is not None:
            if cache_rate is not None:
                over["cache.cache_rate"] = cache_rate
            cfg = load_config(config, over)
        else:
            raw = {"hardware": hardware, "phase": phase, "cache": {"cache_rate": 0.25 if cache_rate is None
                                                                   else cache_rate}}
            cfg = build_config(raw, overrides=over)
        hw = cfg.hardware if link_scale == 1.0 else f"{cfg.hardware} (link x{link_scale:g})"
        if link_scale != 1.0:
            prof = scaled_profile(cfg.hardware, link_scale, tmp_dir, Path(cfg.base_dir) if cfg.base_dir else None)
            cfg = cfg.model_copy(update={"hardware": str(prof)})
        metrics = run_config(cfg)
        sim_cfg = {"hardware": hw, "phase": cfg.phase, "cache.policy": cfg.cache.policy,
                   "cache.scope": cfg.cache.scope, "cache.cache_rate": cfg.cache.cache_rate,
                   "cache.capacity_mib": cfg.cache.capacity_mib, "batch_size": cfg.batch_size,
                   "link_scale": link_scale, "config": config}
    fr = fetch_rate(metrics)
    out = dict(acc)
    out["fetch_rate"] = fr
    out["goodpred"] = goodpred_of(acc["accuracy"], fr) if fr is not None and acc["accuracy"] is not None else None
    out["sim"] = {"config": sim_cfg, "metrics": {k: metrics.get(k) for k in SIM_KEYS}}
    return clean(out)
