"""Golden regression test of the discrete-event simulator: the full metrics dict of `sim.run` (and, for two
recorded runs, digests of the Chrome trace events and the per-batch timeline rows) for a varied set of configs,
compared EXACTLY (floats bit for bit) with tests/data/sim_golden_metrics.json.

The golden file was generated from the engine before its speed work; any change to the simulator's results
fails here. When a change of the model is deliberate (and SIM_VERSION is bumped), regenerate it:

    .venv/bin/python tests/test_sim_golden.py --regenerate

and say so in the commit message.

The runs read frozen inputs, so that re-measuring the H200 (profiles/h200.yaml) or re-recording the small model's
trace does not move them: `hardware: h200` means tests/data/h200_golden.yaml (the profile as of 2026-11-29 11:52
UTC) and the small-moe runs replay the routing-only small-moe-qwen3moe-e32k4-balanced trace.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

GOLDEN = Path(__file__).resolve().parent / "data" / "sim_golden_metrics.json"
Q = "data/traces/qwen3-30b-a3b"
G = "data/traces/gemma-4-26b-a4b"
S = "data/traces/small-moe-qwen3moe-e32k4-balanced"
H200 = REPO / "tests" / "data" / "h200_golden.yaml"  # frozen: see the module docstring
SMALL = {"max_sequences": 8, "max_decode_tokens": 24}  # keep the small-moe runs short
PROMOE = {"chunked_prefetch": True, "early_preemption": True, "reordered_inference": True}
TWO_ENGINES = "h200-2engines"  # the h200 profile with two copy engines (written to a temporary file)

# name -> config (sim.config keys); every policy, both scopes, the three capacity units, the predictors at
# distances 1 and 2, the ProMoE switches one by one and together, prefill/decode/both, batch sizes 1 and 4, the
# CPU-expert path, a small in-flight bound, zero capacity, warm-up, pageable memory, two copy engines.
CONFIGS: dict[str, dict] = {
    "bench": {"trace": Q, "phase": "decode", "cache": {"policy": "lru", "scope": "global", "cache_rate": 0.25},
              "prefetch": {"predictor": "oracle", "distance": 1}},
    "bench_no_prefetch": {"trace": Q, "phase": "decode", "cache": {"policy": "lru", "cache_rate": 0.25}},
    "q_lfu_experts_prevtok": {"trace": Q, "phase": "both", "cache": {"policy": "lfu", "capacity_experts": 600},
                              "prefetch": {"predictor": "previous_token", "distance": 1}},
    "q_lfu_history_perlayer": {"trace": Q, "phase": "decode",
                               "cache": {"policy": "lfu", "scope": "per_layer", "cache_rate": 0.2,
                                         "policy_params": {"keep_history": True}},
                               "prefetch": {"predictor": "oracle", "distance": 2}},
    "q_fifo_perlayer_crosslayer_d2": {"trace": Q, "phase": "decode",
                                      "cache": {"policy": "fifo", "scope": "per_layer", "cache_rate": 0.3},
                                      "prefetch": {"predictor": "cross_layer", "distance": 2}},
    "q_belady_oracle_d2": {"trace": Q, "phase": "decode", "cache": {"policy": "belady", "cache_rate": 0.2},
                           "prefetch": {"predictor": "oracle", "distance": 2}},
    "q_static_hot_mib": {"trace": Q, "phase": "both",
                         "cache": {"policy": "static", "capacity_mib": 1500,
                                   "policy_params": {"hot": [[la, e] for la in range(48) for e in range(0, 128, 9)]}},
                         "prefetch": {"predictor": "oracle", "distance": 1}},
    "q_lcs_arc_prevtok": {"trace": Q, "phase": "decode", "cache": {"policy": "lcs:ARC", "capacity_mib": 2000},
                           "prefetch": {"predictor": "previous_token", "distance": 1}},
    "q_chunked_oracle": {"trace": Q, "phase": "decode", "chunked_prefetch": True,
                         "prefetch": {"predictor": "oracle", "distance": 1}},
    "q_promoe_oracle_d2": {"trace": Q, "phase": "decode", **PROMOE, "cache": {"cache_rate": 0.15},
                           "prefetch": {"predictor": "oracle", "distance": 2, "chunks": 4}},
    "q_ep_prevtok": {"trace": Q, "phase": "decode", "early_preemption": True,
                     "prefetch": {"predictor": "previous_token", "distance": 1}},
    "q_ro_oracle": {"trace": Q, "phase": "decode", "reordered_inference": True,
                    "prefetch": {"predictor": "oracle", "distance": 1}},
    # early preemption that drops queued prefetches, late prefetches (a slow link, a wrong predictor)
    "q_promoe_pageable_prevtok_d2": {"trace": Q, "phase": "decode", "pinned_memory": False, **PROMOE,
                                     "prefetch": {"predictor": "previous_token", "distance": 2}},
    "q_promoe_rtx4090_topn": {"trace": Q, "phase": "decode", "hardware": "rtx4090-promoe", **PROMOE,
                              "prefetch": {"predictor": "previous_token", "distance": 2, "top_n": 12}},
    "q_prefill_perlayer_promoe": {"trace": Q, "phase": "prefill", **PROMOE, "cache": {"scope": "per_layer"},
                                  "prefetch": {"predictor": "oracle", "distance": 1}},
    "q_cpu_experts": {"trace": Q, "phase": "decode", "hardware": "h200-quoted", "cpu_experts": True,
                      "cache": {"cache_rate": 0.1}},
    "q_cpu_experts_promoe_both": {"trace": Q, "phase": "both", "hardware": "h200-quoted", "cpu_experts": True,
                                  **PROMOE, "prefetch": {"predictor": "oracle", "distance": 1}},
    "q_inflight_bound": {"trace": Q, "phase": "decode", "prefetch": {"predictor": "oracle", "distance": 2,
                                                                     "max_inflight_mib": 8}},
    "q_zero_capacity": {"trace": Q, "phase": "decode", "cache": {"capacity_mib": 0},
                        "prefetch": {"predictor": "oracle", "distance": 1}},
    "q_pageable_topn": {"trace": Q, "phase": "decode", "pinned_memory": False,
                        "prefetch": {"predictor": "previous_token", "distance": 1, "top_n": 3}},
    "q_two_engines_promoe": {"trace": Q, "phase": "decode", "hardware": TWO_ENGINES, **PROMOE,
                             "prefetch": {"predictor": "oracle", "distance": 2}},
    "q_two_engines_chunked_ep": {"trace": Q, "phase": "both", "hardware": TWO_ENGINES, "chunked_prefetch": True,
                                 "early_preemption": True, "prefetch": {"predictor": "previous_token"}},
    "g_lru_oracle": {"trace": G, "phase": "decode", "prefetch": {"predictor": "oracle", "distance": 1}},
    "g_lfu_perlayer_crosslayer_promoe": {"trace": G, "phase": "both", **PROMOE,
                                         "cache": {"policy": "lfu", "scope": "per_layer", "cache_rate": 0.3},
                                         "prefetch": {"predictor": "cross_layer", "distance": 2}},
    "g_cpu_experts_rtx4090": {"trace": G, "phase": "decode", "hardware": "rtx4090-promoe", "cpu_experts": True,
                              "prefetch": {"predictor": "previous_token", "distance": 1}},
    "s_b4_lru_oracle": {"trace": S, **SMALL, "phase": "decode", "batch_size": 4,
                        "prefetch": {"predictor": "oracle", "distance": 1}},
    "s_b4_lfu_perlayer_prevtok_promoe": {"trace": S, **SMALL, "phase": "both", "batch_size": 4, **PROMOE,
                                         "cache": {"policy": "lfu", "scope": "per_layer", "cache_rate": 0.4},
                                         "prefetch": {"predictor": "previous_token", "distance": 2}},
    "s_prefill_fifo_frequency": {"trace": S, **SMALL, "phase": "prefill", "cache": {"policy": "fifo"},
                                 "prefetch": {"predictor": "frequency", "distance": 1}},
    "s_b4_cpu_experts_ep": {"trace": S, **SMALL, "phase": "decode", "batch_size": 4, "hardware": "h200-quoted",
                            "cpu_experts": True, "early_preemption": True,
                            "prefetch": {"predictor": "oracle", "distance": 1}},
    "s_b4_belady_perlayer": {"trace": S, **SMALL, "phase": "both", "batch_size": 4,
                             "cache": {"policy": "belady", "scope": "per_layer", "capacity_experts": 60}},
    "s_warmup_prevtok": {"trace": S, **SMALL, "phase": "decode", "warmup_batches": 5,
                            "cache": {"capacity_experts": 40},
                            "prefetch": {"predictor": "previous_token", "distance": 1}},
}
# recorded runs: the metrics plus digests of the Chrome trace events and the timeline rows
RECORDED = {
    "rec_q_promoe": {"trace": Q, "phase": "both", **PROMOE, "prefetch": {"predictor": "oracle", "distance": 1}},
    "rec_s_b4_cpu_experts": {"trace": S, **SMALL, "phase": "decode", "batch_size": 4, "hardware": "h200-quoted",
                             "cpu_experts": True, "chunked_prefetch": True,
                             "prefetch": {"predictor": "previous_token", "distance": 1}},
}
ALL = {**CONFIGS, **RECORDED}


def _profile_dir(tmp: Path) -> Path:
    prof = yaml.safe_load(H200.read_text())
    prof["name"] = TWO_ENGINES
    prof["h2d"]["copy_engines"] = 2
    (tmp / f"{TWO_ENGINES}.yaml").write_text(yaml.safe_dump(prof))
    return tmp


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _fit_in_sample(cfg, trace, seqs):
    from predictors.registry import make_predictor

    predictor = make_predictor(cfg.prefetch.predictor, **cfg.prefetch.predictor_params)
    predictor.fit(trace, [s.sequence for s in seqs])
    return predictor, seqs, cfg.warmup_batches


def compute(name: str, tmp: Path) -> dict:
    import sim.run as sim_run
    from sim.config import build_config
    from sim.run import build_simulation
    from sim.timeline import chrome_events

    raw = dict(ALL[name])
    if raw.get("hardware", "h200") == "h200":
        raw["hardware"] = str(H200)
    if raw.get("hardware") == TWO_ENGINES:
        raw["hardware"] = str(_profile_dir(tmp) / f"{TWO_ENGINES}.yaml")
    cfg = build_config(raw)
    record = name in RECORDED
    # a trainable predictor (cross_layer) is fit on every sequence of the trace and the whole trace simulated,
    # so that these figures pin the simulator, not the predictors' train/held-out split (predictors.split)
    saved = sim_run.trained_predictor
    sim_run.trained_predictor = _fit_in_sample
    try:
        sim = build_simulation(cfg, record=record)
    finally:
        sim_run.trained_predictor = saved
    out = {"metrics": sim.run()}
    if record:
        out["chrome_events"] = _digest(chrome_events(sim))
        out["batch_rows"] = _digest(sim.batch_rows)
        out["n_spans"] = [len(sim.spans), len(sim.link_spans)]
    return out


def _has_libcachesim() -> bool:
    try:
        import libcachesim  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(ALL))
def test_golden(name, golden, tmp_path):
    if name.startswith("q_lcs") and not _has_libcachesim():
        pytest.skip("libcachesim not installed")
    assert name in golden, f"{name} missing from {GOLDEN.name}: regenerate (see the module docstring)"
    got = json.loads(json.dumps(compute(name, tmp_path)))  # the JSON round trip keeps floats exactly
    want = golden[name]
    diff = {k: (want["metrics"].get(k), v) for k, v in got["metrics"].items() if want["metrics"].get(k) != v}
    assert not diff, f"{name}: metrics differ (golden, now): {diff}"
    assert got == want


def test_golden_file_covers_every_config(golden):
    assert sorted(golden) == sorted(ALL)


def regenerate() -> None:
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ALL:
            out[name] = compute(name, Path(tmp))
            print(name, out[name]["metrics"]["total_ms"], file=sys.stderr)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/test_sim_golden.py --regenerate   (rewrites the golden file from this code)")
    regenerate()
