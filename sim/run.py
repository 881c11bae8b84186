"""One simulation: `python -m sim.run CONFIG [--set key=value ...] [--json]`.

CONFIG is a single-run YAML (see sim/config.py for the keys and configs/examples/ for examples). Prints the
metrics (DESIGN.md's names, then counts); `--json` prints one JSON object. `--set timeline=PATH` and
`--set chrome_trace=PATH` also write a per-batch Parquet timeline and a Chrome/Perfetto trace.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from sim.config import RunConfig, load_config, parse_sets
from sim.engine import Simulation
from sim.engine.metrics import METRIC_NAMES
from sim.engine.schedule import load_sequences
from sim.hardware import CostModel, load_profile
from traces.errors import TraceError, run_cli
from traces.reader import Trace

_TRACES: dict[str, Trace] = {}
_SEQS: dict[tuple, list] = {}
_FITTED: dict[tuple, tuple] = {}  # prepare()'s (predictor, split) by what decides the fit (trained_predictor)


def _trace(path: Path) -> Trace:
    key = str(path)
    if key not in _TRACES:
        _TRACES.clear()
        _SEQS.clear()
        _TRACES[key] = Trace(path)
    return _TRACES[key]


def _sequences(trace: Trace, cfg: RunConfig):
    key = (str(trace.path), cfg.phase, cfg.max_sequences, cfg.max_decode_tokens)
    if key not in _SEQS:
        if len(_SEQS) > 8:
            _SEQS.clear()
        _SEQS[key] = load_sequences(trace, cfg.phase, cfg.max_sequences, cfg.max_decode_tokens)
    return _SEQS[key]


def build_simulation(cfg: RunConfig, *, record: bool = False, check: bool = False) -> Simulation:
    """The Simulation of a config. Input errors name the config file (when the config came from one)."""
    try:
        return _build(cfg, record=record, check=check)
    except TraceError as exc:
        if exc.path is None and cfg.source_file:
            raise TraceError(str(exc), path=cfg.source_file) from None
        raise


def _build(cfg: RunConfig, *, record: bool, check: bool) -> Simulation:
    from predictors.base import PredictorUnavailable
    from predictors.registry import make_predictor

    trace = _trace(cfg.resolve_trace())
    meta = trace.meta
    profile = load_profile(cfg.hardware, Path(cfg.base_dir) if cfg.base_dir else None)
    cost = CostModel(profile, meta, pinned=cfg.pinned_memory, chunks=cfg.prefetch.chunks if cfg.chunked_prefetch else 1)
    capacity = cache_capacity_bytes(cfg, meta)
    try:
        predictor = make_predictor(cfg.prefetch.predictor, **cfg.prefetch.predictor_params)
    except (ValueError, TypeError) as exc:
        raise TraceError(str(exc), where="field 'prefetch.predictor'") from None
    try:
        predictor.check_trace(meta)
    except PredictorUnavailable as exc:
        raise TraceError(str(exc), where="field 'prefetch.predictor'") from None
    seqs = _sequences(trace, cfg)
    warmup = cfg.warmup_batches
    if cfg.prefetch.artifact or getattr(predictor, "trainable", False):
        predictor, seqs, warmup = trained_predictor(cfg, trace, seqs)
    elif cfg.heldout_only:
        seqs, warmup = heldout_part(cfg, trace, seqs)
    inflight = cfg.prefetch.max_inflight_mib * (1 << 20) if cfg.prefetch.max_inflight_mib is not None else None
    call_s, token_s = profile.predictor_cost(cfg.prefetch.predictor)
    try:
        return Simulation(
            meta, seqs, cost, phase=cfg.phase, batch_size=cfg.batch_size, cache_capacity_bytes=capacity,
            cache_scope=cfg.cache.scope, cache_policy=cfg.cache.policy, policy_params=cfg.cache.policy_params,
            predictor=predictor, distance=cfg.prefetch.distance, top_n=cfg.prefetch.top_n,
            max_inflight_bytes=inflight, predictor_cost_s=call_s, predictor_token_s=token_s,
            chunked_prefetch=cfg.chunked_prefetch, chunks=cfg.prefetch.chunks,
            early_preemption=cfg.early_preemption, reordered_inference=cfg.reordered_inference,
            cpu_experts=cfg.cpu_experts, trace=trace, record=record, check=check, warmup_batches=warmup,
            predictor_blocking=bool(cfg.prefetch.blocking))
    except (ValueError, TypeError) as exc:
        raise TraceError(str(exc), where="field 'cache.policy'") from None


def cache_capacity_bytes(cfg: RunConfig, meta) -> int:
    """The config's cache capacity (capacity_mib, capacity_experts or cache_rate) in bytes for this trace."""
    from sim.cache import ExpertCache

    try:
        return ExpertCache.resolve_capacity_bytes(
            expert_bytes=meta.expert_bytes, n_experts=meta.n_experts, capacity_mib=cfg.cache.capacity_mib,
            capacity_experts=cfg.cache.capacity_experts, cache_rate=cfg.cache.cache_rate)
    except ValueError as exc:
        raise TraceError(str(exc), where="field 'cache'") from None


def trained_predictor(cfg: RunConfig, trace: Trace, seqs):
    """Returns (predictor, sequences, warmup_batches). A trainable predictor is fit on the training split (or
    loaded from an artifact): only the held-out sequences are simulated; with a positions split (a one-sequence
    trace) the training positions are warm-up. `python -m sim.run` and `python -m executor.replay` both call it."""
    from predictors.evaluate import prepare
    from sim.config import resolve_path

    artifact = None
    if cfg.prefetch.artifact:
        artifact = str(resolve_path(cfg.prefetch.artifact, cfg.base_dir, field="prefetch.artifact",
                                    source=cfg.source_file))
    routing = Path(trace.path) / "routing.parquet"
    st = routing.stat() if routing.exists() else None
    key = (str(trace.path), st and (st.st_size, st.st_mtime_ns), cfg.prefetch.predictor, cfg.prefetch.distance,
           json.dumps(cfg.prefetch.predictor_params, sort_keys=True), artifact,
           artifact and Path(artifact).stat().st_mtime_ns, cfg.prefetch.train_fraction, cfg.seed)
    if key not in _FITTED:  # a fit is deterministic and runs reset() the predictor: fit once per process
        try:
            _FITTED.clear()
            _FITTED[key] = prepare(trace, cfg.prefetch.predictor, cfg.prefetch.distance,
                                   params=cfg.prefetch.predictor_params or None, artifact=artifact,
                                   fraction=cfg.prefetch.train_fraction, seed=cfg.seed)
        except (ValueError, TypeError, ImportError) as exc:
            raise TraceError(str(exc), where="field 'prefetch.predictor'") from None
    predictor, split = _FITTED[key]
    return (predictor, *restrict_to_split(cfg, seqs, split))


def heldout_part(cfg: RunConfig, trace: Trace, seqs):
    """(sequences, warmup_batches) of `heldout_only`: the part a trainable predictor fit with the config's
    train_fraction and seed would be simulated on (the same split as `trained_predictor` without an artifact)."""
    from predictors.split import make_split

    try:
        split = make_split(trace, cfg.prefetch.train_fraction, cfg.seed)
    except ValueError as exc:
        raise TraceError(str(exc), where="field 'heldout_only'") from None
    return restrict_to_split(cfg, seqs, split)


def restrict_to_split(cfg: RunConfig, seqs, split):
    """(sequences, warmup_batches): the split's held-out sequences; for a positions split (one-sequence traces)
    the batches before the first held-out position become warm-up."""
    from sim.engine.schedule import iter_batches

    held = set(split.eval)
    seqs = [s for s in seqs if s.sequence in held]
    warmup = cfg.warmup_batches
    if split.cut:
        n = 0
        for b in iter_batches(seqs, cfg.phase, cfg.batch_size):
            idx = [_time_index(seqs, s, p, b.phase) for s, p in zip(b.sequences.tolist(), b.positions.tolist())]
            if min(idx) >= min(split.scored_from(s) for s in b.sequences.tolist()):
                break
            n += 1
        warmup = max(warmup, n)
    return seqs, warmup


def _time_index(seqs, sequence: int, position: int, phase: str) -> int:
    """Index of a batch token in its sequence's time-ordered positions (prompt batches start at 0)."""
    if phase == "prefill":
        return 0
    sd = next(s for s in seqs if s.sequence == sequence)
    return sd.n_before_gen + int(np.flatnonzero(sd.gen_positions == position)[0])


def run_config(cfg: RunConfig, *, check: bool = False) -> dict:
    """Run one config; write the timeline/Chrome trace if the config asks for them. Returns the metrics."""
    record = bool(cfg.timeline or cfg.chrome_trace)
    sim = build_simulation(cfg, record=record, check=check)
    metrics = sim.run()
    if record:
        from sim.timeline import write_chrome_trace, write_timeline

        base = Path(cfg.base_dir) if cfg.base_dir else Path.cwd()
        if cfg.timeline:
            write_timeline(sim, _out_path(cfg.timeline, base))
        if cfg.chrome_trace:
            write_chrome_trace(sim, _out_path(cfg.chrome_trace, base))
    return metrics


def _out_path(p: str, base: Path) -> Path:
    path = Path(p)
    return path if path.is_absolute() else Path.cwd() / path


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def main(argv=None) -> int:
    from predictors._torchfit import single_threaded_blas

    single_threaded_blas()
    ap = argparse.ArgumentParser(prog="python -m sim.run", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="single-run YAML config")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                    help="override a config key (dotted, e.g. cache.policy=lfu); repeatable")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, parse_sets(args.set))
    metrics = run_config(cfg)
    if args.json:
        print(json.dumps({"config": cfg.flat(), "run_id": cfg.run_hash(), "metrics": metrics}))
    else:
        for k in METRIC_NAMES:
            print(f"{k:20s} {_fmt(metrics[k])}")
        for k, v in metrics.items():
            if k not in METRIC_NAMES:
                print(f"{k:20s} {_fmt(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
