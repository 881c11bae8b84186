"""Simulator speed: `python -m sim.bench [--json]`.

des_layer_steps_per_s     simulated layer-steps (one layer of one batch) per CPU second of the discrete-event
                          model: decode, global LRU over a quarter of the experts, next-layer prefetch (the
                          oracle predictor, d=1), the public Qwen3-30B-A3B trace, H200 profile. Best of several
                          repetitions, measured with time.process_time (CPU time of this process: one core).
des_layer_steps_per_s_no_prefetch   the same without a predictor (the engine and cache alone)
mrc_accesses_per_s, libcachesim_accesses_per_s, mrc_speedup_vs_libcachesim
                          from sim.mrc.bench_mrc: the exact all-sizes LRU miss-ratio curve vs libCacheSim's LRU at
                          one size (its C loop, process_trace; *_e2e: with building and writing its trace), same
                          lookups, one core; null when sim.mrc is not available.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sim.config import REPO_ROOT, build_config
from traces.errors import run_cli

QWEN3 = REPO_ROOT / "data" / "traces" / "qwen3-30b-a3b"

BENCH_CONFIG = {
    "trace": str(QWEN3),
    "hardware": "h200",
    "phase": "decode",
    "cache": {"policy": "lru", "scope": "global", "cache_rate": 0.25},
    "prefetch": {"predictor": "oracle", "distance": 1},
}


def bench_des(config: dict | None = None, min_seconds: float = 2.0, max_reps: int = 20) -> dict:
    from sim.run import build_simulation

    cfg = build_config(config or BENCH_CONFIG)
    best = 0.0
    steps = 0
    reps = 0
    spent = 0.0
    while reps < max_reps and (spent < min_seconds or reps < 3):
        sim = build_simulation(cfg)
        c0, w0 = time.process_time(), time.perf_counter()
        m = sim.run()
        dc, dw = time.process_time() - c0, time.perf_counter() - w0
        spent += dw
        reps += 1
        steps = m["layer_steps"]
        best = max(best, steps / max(dc, 1e-9))
    return {"des_layer_steps_per_s": best, "des_layer_steps_per_run": steps, "des_repetitions": reps,
            "des_config": cfg.flat()}


def bench_mrc_figures() -> dict:
    keys = ("mrc_accesses_per_s", "libcachesim_accesses_per_s", "mrc_speedup_vs_libcachesim")
    try:
        from sim.mrc import bench_mrc
    except ImportError as exc:
        return {**dict.fromkeys(keys), "mrc_note": f"sim.mrc.bench_mrc not available: {exc}"}
    try:
        res = bench_mrc(QWEN3)
    except Exception as exc:  # report, don't hide the DES figure
        return {**dict.fromkeys(keys), "mrc_note": f"sim.mrc.bench_mrc failed: {type(exc).__name__}: {exc}"}
    out = {k: res.get(k) for k in keys}
    out.update({f"mrc_{k}" if not k.startswith(("mrc", "lib")) else k: v for k, v in res.items() if k not in keys})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.bench", description="Simulator speed figures.")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum measuring time of the DES benchmark")
    args = ap.parse_args(argv)
    if not Path(QWEN3).exists():
        print(f"error: {QWEN3}: the public Qwen3 trace is missing", file=sys.stderr)
        return 2
    out = bench_des(min_seconds=args.seconds)
    no_pf = bench_des({**BENCH_CONFIG, "prefetch": {"predictor": "none"}}, min_seconds=args.seconds / 2)
    out["des_layer_steps_per_s_no_prefetch"] = no_pf["des_layer_steps_per_s"]
    out.update(bench_mrc_figures())
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
