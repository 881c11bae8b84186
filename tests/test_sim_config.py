"""Run configs and hardware profiles: validation, one-line errors naming the file and field, --set, the CLI."""

from __future__ import annotations

import json

import pytest

from sim.config import build_config, load_config, parse_sets
from sim.engine.synthetic import make_trace
from sim.hardware import PROFILES_DIR, CostModel, load_profile
from sim.run import main as run_main
from traces.errors import TraceError, run_cli
from traces.reader import Trace


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return make_trace(tmp_path_factory.mktemp("c") / "tiny", n_layers=3, n_experts=8, top_k=2, n_sequences=1,
                      prompt_len=4, decode_len=6)


def write(tmp_path, text, name="run.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_key_names_file_and_field(tmp_path, trace_dir):
    p = write(tmp_path, f"trace: {trace_dir}\ncache:\n  polcy: lru\n")
    with pytest.raises(TraceError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "cache.polcy" in str(e.value) and "cache.policy" in str(e.value)


def test_bad_value_names_field(tmp_path, trace_dir):
    p = write(tmp_path, f"trace: {trace_dir}\nphase: both\nprefetch: {{distance: 0}}\n")
    with pytest.raises(TraceError) as e:
        load_config(p)
    assert "prefetch.distance" in str(e.value) and str(p) in str(e.value)


def test_bad_yaml_names_line(tmp_path):
    p = write(tmp_path, "trace: x\ncache: [unclosed\n")
    with pytest.raises(TraceError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "line" in str(e.value)


def test_capacity_exclusive_and_override(tmp_path, trace_dir):
    p = write(tmp_path, f"trace: {trace_dir}\ncache: {{cache_rate: 0.5, capacity_mib: 10}}\n")
    with pytest.raises(TraceError, match="exactly one"):
        load_config(p)
    p = write(tmp_path, f"trace: {trace_dir}\ncache: {{cache_rate: 0.5}}\n")
    cfg = load_config(p, parse_sets(["cache.capacity_mib=100", "cache.policy=fifo", "early_preemption=true"]))
    assert cfg.cache.capacity_mib == 100 and cfg.cache.cache_rate is None and cfg.cache.policy == "fifo"
    assert cfg.early_preemption is True
    with pytest.raises(TraceError, match="--set field 'cache.polcy'"):
        load_config(p, {"cache.polcy": "lru"})


def test_trace_path_relative_to_config_file(tmp_path, trace_dir):
    sub = tmp_path / "cfgs"
    sub.mkdir()
    p = write(sub, "trace: ../t\n")
    (tmp_path / "t").symlink_to(trace_dir)
    assert load_config(p).resolve_trace() == (tmp_path / "t").resolve()


def test_missing_trace_one_line_error(tmp_path, capsys):
    p = write(tmp_path, "trace: no/such/trace\n")
    assert run_cli(run_main, [str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "field 'trace'" in err and "no/such/trace" in err


def test_run_cli_json(tmp_path, trace_dir, capsys):
    p = write(tmp_path, f"trace: {trace_dir}\ncache: {{policy: lru, capacity_experts: 4}}\n")
    assert run_cli(run_main, [str(p), "--json", "--set", "prefetch.predictor=oracle"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("hit_rate", "ttft_ms", "tpot_ms", "total_ms", "stall_ms", "bytes_h2d", "pcie_busy_frac",
              "prefetch_precision", "prefetch_recall", "prefetch_late", "prefetch_unused"):
        assert k in out["metrics"]
    assert out["config"]["prefetch.predictor"] == "oracle"
    # same config, same metrics and run id
    assert run_cli(run_main, [str(p), "--json", "--set", "prefetch.predictor=oracle"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again == out


def test_sweep_file_refused_by_run(tmp_path, trace_dir):
    p = write(tmp_path, f"base: {{trace: {trace_dir}}}\ngrid: {{cache.policy: [lru]}}\n")
    with pytest.raises(TraceError, match="sim.sweep"):
        load_config(p)


def test_profiles_load_and_lookup(trace_dir):
    for name in ("h200", "h200-quoted", "rtx4090-promoe"):
        prof = load_profile(name)
        assert prof.provenance
    measured = load_profile("h200")
    assert measured.provenance.startswith("measured by `python -m executor.calibrate")
    assert "NVIDIA H200" in measured.provenance
    assert measured.h2d.pinned.gbps(1 << 30) > measured.h2d.pinned.gbps(1 << 20) > 0
    h200 = load_profile("h200-quoted")
    assert "executor.calibrate" in h200.provenance
    assert "datasheets" in load_profile("rtx4090-promoe").provenance
    link = h200.h2d.pinned
    assert link.gbps(1 << 20) == pytest.approx(38.4) and link.gbps(1 << 30) == pytest.approx(55.5)
    assert 38.4 < link.gbps(2 << 20) < 49.9
    assert link.seconds(352e6) * 1e3 == pytest.approx(6.4, rel=0.02)  # Mixtral expert: 6.4 ms measured
    mixtral = next(t for t in h200.expert_compute if t.hidden == 4096)
    assert mixtral.at(1) == pytest.approx(0.117) and mixtral.at(64) == pytest.approx(0.138)
    assert 0.138 < mixtral.at(100) < 0.311
    cost = CostModel(h200, Trace(trace_dir).meta)  # 2048 x 768 bf16 experts: the exact small table
    assert "exact" in cost.geometry[0]
    cost.prepare(600)
    assert cost.expert_s[0][1] == pytest.approx(0.07e-3) and cost.expert_s[0][512] == pytest.approx(0.07e-3)


def test_profile_errors_name_file_and_field(tmp_path):
    p = write(tmp_path, "name: x\nprovenance: y\nh2d: {pinned: {points: []}}\nexpert_compute: []\n"
                        "dense_compute: []\nbogus: 1\n", name="bad.yaml")
    with pytest.raises(TraceError) as e:
        load_profile(str(p))
    msg = str(e.value)
    assert str(p) in msg and "h2d.pinned.points" in msg and "bogus" in msg
    with pytest.raises(TraceError, match="no hardware profile"):
        load_profile("no-such-gpu")


def test_predictor_cost_per_call_or_per_call_and_token(tmp_path):
    """predictor_cost_us entries: a number (per call, as before) or {call, token} (call + token x batch tokens)."""
    import yaml

    raw = yaml.safe_load((PROFILES_DIR / "h200-quoted.yaml").read_text())
    raw["predictor_cost_us"] = {"default": 6.5, "previous_token": 20, "learned_mlp": {"call": 300, "token": 40.5}}
    prof = load_profile(str(write(tmp_path, yaml.safe_dump(raw), name="ok.yaml")))
    assert prof.predictor_cost("learned_mlp") == pytest.approx((300e-6, 40.5e-6))
    assert prof.predictor_cost("previous_token") == pytest.approx((20e-6, 0.0))
    assert prof.predictor_cost("oracle") == pytest.approx((6.5e-6, 0.0))  # (default)
    assert prof.predictor_cost_s("learned_mlp", tokens=29) == pytest.approx((300 + 29 * 40.5) * 1e-6)
    assert prof.predictor_cost_s("previous_token") == pytest.approx(20e-6)
    for i, bad in enumerate([{"call": 300}, {"call": 1, "token": 2, "per": 3}, {"call": -1, "token": 0},
                             {"call": "x", "token": 1}, -5, "fast", True]):
        raw["predictor_cost_us"] = {"default": 0.0, "learned_mlp": bad}
        with pytest.raises(TraceError) as e:
            load_profile(str(write(tmp_path, yaml.safe_dump(raw), name=f"bad{i}.yaml")))
        assert "field 'predictor_cost_us'" in str(e.value) and "predictor_cost_us.learned_mlp" in str(e.value)


def test_transfer_host_costs_per_expert_table(tmp_path, trace_dir):
    """An expert table may carry its geometry's transfer host costs (>= 0, errors name the field); CostModel uses
    them for a trace of exactly that geometry, the profile's top-level ones otherwise."""
    import yaml

    raw = yaml.safe_load((PROFILES_DIR / "h200-quoted.yaml").read_text())
    raw.update(demand_transfer_host_us=100.0, prefetch_transfer_host_us=150.0, prefetch_call_host_us=5.0)
    meta = Trace(trace_dir).meta  # 2048 x 768 bf16 experts
    i = next(i for i, t in enumerate(raw["expert_compute"]) if t["hidden"] == 2048 and t["intermediate"] == 768)
    base = CostModel(load_profile(str(write(tmp_path, yaml.safe_dump(raw), name="top.yaml"))), meta)
    assert (base.demand_host_s, base.prefetch_host_s, base.prefetch_call_host_s) == pytest.approx(
        (100e-6, 150e-6, 5e-6))
    raw["expert_compute"][i].update(demand_transfer_host_us=200.0, prefetch_call_host_us=0.0)
    own = CostModel(load_profile(str(write(tmp_path, yaml.safe_dump(raw), name="own.yaml"))), meta)
    # the table's values where it has them (0 included), the top-level one where it has none
    assert (own.demand_host_s, own.prefetch_host_s, own.prefetch_call_host_s) == pytest.approx((200e-6, 150e-6, 0.0))
    # another geometry's table values are not used
    other = [dict(t) for t in raw["expert_compute"]]
    other[i] = {k: v for k, v in other[i].items() if not k.endswith("_host_us")}
    other[(i + 1) % len(other)]["demand_transfer_host_us"] = 999.0
    prof = load_profile(str(write(tmp_path, yaml.safe_dump({**raw, "expert_compute": other}), name="other.yaml")))
    assert CostModel(prof, meta).demand_host_s == pytest.approx(100e-6)
    for field in ("demand_transfer_host_us", "prefetch_transfer_host_us", "prefetch_call_host_us"):
        bad = [dict(t) for t in raw["expert_compute"]]
        bad[i][field] = -1.0
        with pytest.raises(TraceError) as e:
            load_profile(str(write(tmp_path, yaml.safe_dump({**raw, "expert_compute": bad}), name=f"{field}.yaml")))
        assert f"expert_compute.{i}.{field}" in str(e.value)


def test_build_config_dotted_and_nested(trace_dir):
    cfg = build_config({"trace": str(trace_dir), "cache": {"policy": "lfu"}, "cache.cache_rate": 0.5})
    assert cfg.cache.policy == "lfu" and cfg.cache.cache_rate == 0.5
    assert cfg.run_hash() == build_config({"trace": str(trace_dir), "cache.policy": "lfu",
                                           "cache.cache_rate": 0.5}).run_hash()


def test_trainable_predictor_runs_on_held_out_part(tmp_path, trace_dir):
    from sim.run import build_simulation

    p = write(tmp_path, f"trace: {trace_dir}\nprefetch: {{predictor: cross_layer, distance: 1}}\nphase: decode\n")
    sim = build_simulation(load_config(p))
    m = sim.run()
    # one-sequence trace: a positions split; the training positions are simulated as warm-up, not counted
    assert 0 < sim.warmup_batches < 6 and m["batches"] == 6 - sim.warmup_batches
    assert m["hits"] + m["misses"] == m["lookups"]


def test_warmup_batches_leave_metrics_out(tmp_path, trace_dir):
    from sim.run import build_simulation

    p = write(tmp_path, f"trace: {trace_dir}\nphase: decode\n")
    full = build_simulation(load_config(p)).run()
    part = build_simulation(load_config(p, {"warmup_batches": 2})).run()
    assert part["batches"] == full["batches"] - 2 and part["lookups"] < full["lookups"]
    assert part["total_ms"] < full["total_ms"]


def test_heldout_only_replays_what_a_trained_predictor_is_scored_on(tmp_path):
    """`heldout_only` with an untrained predictor covers exactly the sequences a trainable predictor's run covers
    (same train_fraction and seed), and leaves the config's identity alone when off."""
    from sim.run import build_simulation

    trace = make_trace(tmp_path / "t", n_layers=3, n_experts=8, top_k=2, n_sequences=10, prompt_len=4,
                       decode_len=6)
    base = {"trace": str(trace), "phase": "decode", "cache": {"cache_rate": 0.5}}
    trained = build_simulation(build_config({**base, "prefetch": {"predictor": "cross_layer", "distance": 1}}))
    held = build_simulation(build_config({**base, "heldout_only": True}))
    every = build_simulation(build_config(base))
    ids = [s.sequence for s in trained.sequences]
    assert 0 < len(ids) < 10
    assert [s.sequence for s in held.sequences] == ids
    assert len(every.sequences) == 10
    assert build_config({**base, "heldout_only": False}).run_hash() == build_config(base).run_hash()
    assert build_config({**base, "heldout_only": True}).run_hash() != build_config(base).run_hash()


def test_streaming_table_is_documentary(trace_dir):
    """h2d.streaming (copies queued back to back, executor.calibrate) is validated like the pinned table and does
    not change the link model, which reads h2d.pinned."""
    base = load_profile("h200")
    raw = base.model_dump()
    raw["h2d"]["streaming"] = {"points": [{"size": 1 << 20, "gbps": 47.0}, {"size": 3 << 20, "gbps": 52.7}]}
    with_streaming = type(base).model_validate(raw)
    assert with_streaming.h2d.streaming.gbps(2 << 20) > 47.0
    meta = Trace(trace_dir).meta
    assert CostModel(with_streaming, meta, chunks=3).chunk_s == CostModel(base, meta, chunks=3).chunk_s
    raw["h2d"]["streaming"] = {"points": [{"size": 3 << 20, "gbps": 52.7}, {"size": 1 << 20, "gbps": 47.0}]}
    with pytest.raises(ValueError, match="strictly increasing"):
        type(base).model_validate(raw)


def test_prefetch_blocking_puts_the_predictor_on_the_stream(tmp_path):
    """prefetch.blocking true charges the predictor's calls on the compute timeline (the run is slower by them);
    unset or false it runs beside the stream, as before; unset leaves the config's identity alone."""
    from sim.run import build_simulation

    trace = make_trace(tmp_path / "t", n_layers=4, n_experts=8, top_k=2, n_sequences=2, prompt_len=4,
                       decode_len=6)
    base = {"trace": str(trace), "phase": "decode", "cache": {"cache_rate": 0.5},
            "prefetch": {"predictor": "previous_token", "distance": 1}}

    def run(blocking):
        raw = {**base, "prefetch": {**base["prefetch"], **({} if blocking is None else {"blocking": blocking})}}
        sim = build_simulation(build_config(raw))
        m = sim.run()
        return build_config(raw), {**m, "host_predict_s": sim.c.host_predict_s}

    (c_unset, unset), (c_beside, beside), (c_block, block) = run(None), run(False), run(True)
    assert unset == beside and unset["host_predict_s"] == 0
    assert block["host_predict_s"] > 0 and block["tpot_ms"] > beside["tpot_ms"]
    assert "prefetch.blocking" not in c_unset.flat() and c_beside.flat()["prefetch.blocking"] is False
    assert c_unset.run_hash() != c_beside.run_hash() != c_block.run_hash()
    with pytest.raises(Exception, match="blocking"):
        build_config({**base, "prefetch": {**base["prefetch"], "blocking": "sometimes"}})


def test_late_issue_on_stream_charges_the_stream(tmp_path):
    """Not blocking: a prediction ready after its gate is issued later; with late_issue_on_stream (the executor's
    main thread issues what its predictor thread predicted) that issue's host cost is paid by the compute stream,
    else by a prefetch worker of its own. The same copies are issued either way; the slower stream then finds
    more of them landed (fewer late prefetches)."""
    from sim.run import build_simulation

    trace = make_trace(tmp_path / "t", n_layers=4, n_experts=8, top_k=2, n_sequences=2, prompt_len=4,
                       decode_len=6)
    cfg = build_config({"trace": str(trace), "phase": "decode", "cache": {"cache_rate": 0.25},
                        "prefetch": {"predictor": "oracle", "distance": 1}})
    runs = []
    for on_stream in (False, True):
        sim = build_simulation(cfg)
        sim.late_issue_on_stream = on_stream
        runs.append((sim.run(), sim.c.host_prefetch_issue_s))
    (off, off_host), (on, on_host) = runs
    assert off["prefetches"] > 0
    assert on_host > off_host and on["total_ms"] > off["total_ms"]
    assert on["prefetches"] == off["prefetches"] and on["n_prefetch_late"] <= off["n_prefetch_late"]
