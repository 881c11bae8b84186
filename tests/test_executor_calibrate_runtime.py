"""The runtime's own host-cost calibration (executor.calibrate_runtime) and how it folds into the profile tables."""

import pytest

torch = pytest.importorskip("torch")

from executor.calibrate import add_runtime_costs, add_transfer_host  # noqa: E402
from executor.calibrate_runtime import (  # noqa: E402
    _decode_runs,
    _layer_step_ms,
    calibration_inflight_mib,
    cycle_trace,
    runtime_layer_costs,
    runtime_predictor_costs,
    runtime_transfer_costs,
)
from executor.geometry import get_geometry  # noqa: E402
from traces.reader import Trace  # noqa: E402


def test_cycle_trace_touches_every_expert_within_the_warmup(tmp_path):
    p = cycle_trace(tmp_path / "c", n_layers=2, n_experts=6, top_k=2, decode_len=5, expert_bytes=3 * 32 * 16 * 4,
                    hidden=32)
    routing = Trace(p).routing(0, "decode")
    assert routing.experts.shape == (5, 2, 2)
    first = {int(e) for row in routing.experts[:3, 0] for e in row}
    assert first == set(range(6))


def test_runtime_costs_run_all_hits_on_cpu():
    geom = get_geometry("tiny")
    # raises if the measured steps had a miss (the warm-up must load every expert)
    ms = _layer_step_ms(geom, "cpu", 2, n_layers=2, n_experts=4, tokens=4, repeats=1)
    assert ms > 0
    rc = runtime_layer_costs(geom, "cpu", repeats=1, n_layers=2, tokens=4)
    assert rc["top_k"] == 2 and rc["per_expert_ms"] >= 0 and rc["layer_base_ms"] >= 0
    # base = time(top-1) - per expert (computed on its own), clipped at 0 (timing noise on a shared CPU)
    assert rc["layer_base_ms"] + rc["per_expert_ms"] == pytest.approx(max(rc["layer_ms_top1"], rc["per_expert_ms"]),
                                                                      abs=1e-4)
    # the per-expert figure comes from the run computing experts one by one, the group's from the grouped run
    assert rc["per_expert_ms"] == pytest.approx(max(0.0, rc["layer_ms_top2"] - rc["layer_ms_top1"]), abs=1e-4)
    assert rc["group_expert_ms"] == pytest.approx(max(0.0, rc["layer_ms_top2_grouped"] - rc["layer_base_ms"]) / 2,
                                                  abs=1e-4)


def test_layer_costs_interleave_the_three_steps_and_pair_them_by_round(monkeypatch):
    """The three steps run round by round (top-1, top-K, top-K grouped, again), and per_expert is the median of
    each round's difference: here 1 ms, where the difference of the steps' medians would give 2 (the third
    round's top-K ran in a slow spell)."""
    import executor.calibrate_runtime as cr

    t1, tk, tg = [1.0, 2.0, 3.0], [5.0, 3.0, 4.0], [2.0, 2.5, 3.5]
    calls = []

    def fake(geom, device, top_k, *, group_resident=True, **kw):
        step = "1" if top_k == 1 else ("g" if group_resident else "k")
        r = sum(1 for c in calls if c == step)
        calls.append(step)
        assert kw["repeats"] == 1 and isinstance(kw["models"], dict)
        return {"1": t1, "k": tk, "g": tg}[step][r]

    monkeypatch.setattr(cr, "_layer_step_ms", fake)
    rc = cr.runtime_layer_costs(get_geometry("mixtral-8x7b"), "cpu", repeats=3)  # top-2: per expert = tk - t1
    assert calls == ["1", "k", "g"] * 3 and rc["rounds"] == 3 and rc["top_k"] == 2
    assert rc["per_expert_ms"] == 1.0  # rounds: 4, 1, 1
    assert rc["layer_base_ms"] == 1.0  # t1 - per expert by round: 0 (clipped), 1, 2
    assert rc["group_expert_ms"] == 0.75  # (tg - base) / 2 by round: 1, 0.75, 0.75
    assert (rc["layer_ms_top1"], rc["layer_ms_top2"], rc["layer_ms_top2_grouped"]) == (2.0, 4.0, 2.5)
    # "min": each step's fastest round (1, 3, 2), the split made from those
    calls.clear()
    rc = cr.runtime_layer_costs(get_geometry("mixtral-8x7b"), "cpu", repeats=3, stat="min")
    assert (rc["layer_ms_top1"], rc["layer_ms_top2"], rc["layer_ms_top2_grouped"]) == (1.0, 3.0, 2.0)
    assert (rc["per_expert_ms"], rc["layer_base_ms"], rc["group_expert_ms"], rc["stat"]) == (2.0, 0.0, 1.0, "min")
    with pytest.raises(ValueError, match="host statistic"):
        cr.runtime_layer_costs(get_geometry("mixtral-8x7b"), "cpu", repeats=1, stat="mean")


def test_add_runtime_costs_floors_experts_and_adds_layer_bookkeeping():
    et = {"ms": [0.03, 0.05, 0.4], "note": "n"}
    dts = [{"ms": [0.2, 0.3], "note": "d"}]
    add_runtime_costs(et, dts, {"per_expert_ms": 0.1, "layer_base_ms": 0.5, "group_expert_ms": 0.03})
    assert et["ms"] == [0.1, 0.1, 0.4]  # max(kernel, host) per expert
    assert et["group_ms"] == 0.03  # a resident group's cost per expert
    assert dts[0]["ms"] == [0.5, 0.6]  # + (base - skeleton at the smallest batch)


def test_add_transfer_host_writes_the_copy_issue_apart():
    """With the copy issue measured apart, the table holds the transfer costs without it and copy_issue_host_us."""
    et: dict = {}
    add_transfer_host(et, {"demand_transfer_us": 170.0, "prefetch_transfer_us": 300.0, "prefetch_call_us": 6.0,
                           "prefetch_issue_us": 310.0, "copy_issue_us": 100.0, "demand_transfer_net_us": 70.0,
                           "prefetch_transfer_net_us": 220.0})
    assert et == {"demand_transfer_host_us": 70.0, "prefetch_transfer_host_us": 220.0, "prefetch_call_host_us": 6.0,
                  "copy_issue_host_us": 100.0}


def test_add_transfer_host_writes_the_geometry_table():
    """calibrate writes each geometry's runtime_transfer_costs into its expert table, under the profile's names."""
    et = {"name": "g", "hidden": 32, "intermediate": 16, "tokens": [1], "ms": [0.1]}
    add_transfer_host(et, {"demand_transfer_us": 170.0, "prefetch_transfer_us": 300.0, "prefetch_call_us": 6.0,
                           "prefetch_issue_us": 310.0})
    assert (et["demand_transfer_host_us"], et["prefetch_transfer_host_us"], et["prefetch_call_host_us"]) == (
        170.0, 300.0, 6.0)
    from sim.hardware import ExpertTable

    assert ExpertTable.model_validate(et).prefetch_transfer_host_us == 300.0


def test_transfer_cost_runs_miss_and_prefetch_as_intended():
    geom = get_geometry("tiny")
    # the all-miss run: per-layer capacity k of 2k experts, the cycle alternating halves: every lookup misses
    demand = _decode_runs(geom, "cpu", 2, n_layers=2, n_experts=4, tokens=6, repeats=1, warm=2,
                          extra={"cache.scope": "per_layer", "cache.cache_rate": 0.5})[0]
    assert demand["hits"] == 0 and demand["demand_loads"] == demand["lookups"] > 0 and demand["prefetches"] == 0
    res = runtime_transfer_costs(geom, "cpu", 2, repeats=1, n_layers=2, tokens=6)
    # the runtime's own accounting of its host time per transfer issued
    assert set(res) == {"demand_transfer_us", "prefetch_call_us", "prefetch_transfer_us", "prefetch_issue_us",
                        "copy_issue_us", "demand_transfer_net_us", "prefetch_transfer_net_us"}
    assert min(res.values()) > 0
    # the copy issue apart: each kind's own cost without the chunk groups its submit issued (an idle link; on the
    # CPU the pump backend issues only when pumped, so nothing is issued in a submit here: equal)
    assert res["demand_transfer_net_us"] <= res["demand_transfer_us"]
    assert res["prefetch_transfer_net_us"] <= res["prefetch_transfer_us"]
    # the per-call run: every expert resident, the oracle's calls rank the next layer's experts and issue nothing
    idle = _decode_runs(geom, "cpu", 2, n_layers=2, n_experts=4, tokens=6, repeats=1,
                        extra={"prefetch.predictor": "oracle", "prefetch.distance": 1, "chunked_prefetch": True})[0]
    assert idle["prefetches"] == 0 and idle["misses"] == 0 and idle["host_prefetch_issue_ms"] > 0
    # spreading the call over its copies gives the old per-copy figure, which is above the copy's own
    assert res["prefetch_issue_us"] >= res["prefetch_transfer_us"]


def test_transfer_cost_runs_interleave_and_pair_each_prefetch_run_with_its_call_cost(monkeypatch):
    """Demand, call and prefetch runs alternate round by round, and a prefetch run's per-copy cost subtracts its
    own round's call cost: here 10 us, where the median call cost (10) would leave 1 us in two of three rounds."""
    import executor.calibrate_runtime as cr

    order, n = [], {"demand": 0, "call": 0, "prefetch": 0}
    call_us, pf_host_ms = [1.0, 10.0, 10.0], [0.066, 0.12, 0.066]

    def fake(geom, device, top_k, *, extra, warm, repeats, models, **kw):
        kind = ("prefetch" if "cache.scope" in extra else "call") if "prefetch.predictor" in extra else "demand"
        r = n[kind]
        n[kind] += 1
        order.append(kind)
        assert repeats == 1 and isinstance(models, dict)
        if kind == "demand":
            return [{"demand_loads": 4, "host_demand_issue_ms": 0.4, "host_copy_issue_demand_submit_ms": 0.0,
                     "copy_issues": 4, "host_copy_issue_ms": 0.2}]
        if kind == "call":  # 6 calls (tokens 6 x (2 layers - 1))
            return [{"prefetches": 0, "host_prefetch_issue_ms": call_us[r] * 6 / 1e3}]
        return [{"prefetches": 6, "host_prefetch_issue_ms": pf_host_ms[r], "host_copy_issue_prefetch_submit_ms": 0.0,
                 "copy_issues": 6, "host_copy_issue_ms": 0.3}]

    monkeypatch.setattr(cr, "_decode_runs", fake)
    res = cr.runtime_transfer_costs(get_geometry("tiny"), "cpu", 2, repeats=3, n_layers=2, tokens=6)
    assert order == ["demand", "call", "prefetch"] * 3
    assert res["prefetch_call_us"] == 10.0
    assert res["prefetch_transfer_us"] == pytest.approx(10.0)  # rounds: 10, 10, 1
    assert res["demand_transfer_us"] == pytest.approx(100.0) and res["copy_issue_us"] == pytest.approx(50.0)
    # "min": the lowest round of each figure (the call cost 1 us, the paired per-copy cost 1 us)
    n.update(demand=0, call=0, prefetch=0)
    res = cr.runtime_transfer_costs(get_geometry("tiny"), "cpu", 2, repeats=3, n_layers=2, tokens=6, stat="min")
    assert res["prefetch_call_us"] == 1.0 and res["prefetch_transfer_us"] == pytest.approx(1.0)
    assert res["prefetch_issue_us"] == pytest.approx(11.0) and res["demand_transfer_us"] == pytest.approx(100.0)


def test_predictor_cost_of_a_trained_hidden_state_predictor():
    """calibrate times learned_mlp fit on the small-MoE trace (its hidden states), beside the plain ones; the
    fallback for unmeasured predictors stays the dearest plain one."""
    from executor.calibrate import measure_predictors
    from executor.geometry import REPO_ROOT

    cost = measure_predictors(["previous_token", "learned_mlp"], str(REPO_ROOT / "data" / "traces" / "qwen3-30b-a3b"),
                              1, max_calls=30)
    assert cost["learned_mlp"] > 0 and cost["previous_token"] > 0
    assert cost["default"] == cost["previous_token"]


def test_predictor_cost_per_call_from_the_runtime(monkeypatch):
    """calibrate's predictor cost is the runtime's host_predict_ms over the calls it counts: exactly one per decode
    token and layer with a target layer, and at least the observe + predict time of those very calls (timed
    inside them, same process: the runtime's figure adds the view and the hidden states around them); a prefill
    replay (the prompt as one batch) gives the second point of call + token x tokens."""
    import time

    from predictors.learned_mlp import LearnedMLPPredictor

    durations, batch_tokens = [], []  # of each learned_mlp.predict call, in call order
    predict = LearnedMLPPredictor.predict

    def timed(self, view, distance, future=None):
        batch_tokens.append(view.current.shape[0])
        t0 = time.perf_counter()
        try:
            # a call that costs 3 ms + 0.5 ms per token on top of its own work: a fit through both points
            # then has a clear intercept and slope whatever this (shared) CPU's own timings
            time.sleep(3e-3 + 0.5e-3 * view.current.shape[0])
            return predict(self, view, distance, future)
        finally:
            durations.append(time.perf_counter() - t0)

    monkeypatch.setattr(LearnedMLPPredictor, "predict", timed)
    res = runtime_predictor_costs(["none", "learned_mlp"], "cpu", sequences=1, tokens=4, layers=3, repeats=1,
                                  fit_params={"epochs": 1, "max_rows": 200})
    lm = res["learned_mlp"]
    none = {"us": 0.0, "calls": 0, "host_predict_ms": 0.0, "prefetches": 0, "tokens_per_call": 0.0}
    assert res["none"] == {**none, "prefill": none}  # (no call: nothing to fit)
    assert lm["prefetches"] == 0 and lm["prefill"]["prefetches"] == 0  # every expert resident: no copy issued
    assert lm["calls"] == 4 * (3 - 1)  # 4 decode tokens x layers 0..1 predicting layer + 1 (of 3)
    assert lm["tokens_per_call"] == 1.0
    # the prefill replay: the sequence's prompt as one batch, one call per layer with a target, all its tokens
    pre = lm["prefill"]
    prompt = batch_tokens[-1]
    assert pre["calls"] == 3 - 1 and pre["tokens_per_call"] == prompt > 1
    assert batch_tokens == [1] * 2 * lm["calls"] + [prompt] * 2 * pre["calls"]
    # the fit: call + token x tokens through both measured points, both parts >= 0
    assert lm["call_us"] > 0 and lm["token_us"] > 0
    assert lm["call_us"] + lm["token_us"] == pytest.approx(lm["us"], abs=2e-3)
    assert lm["call_us"] + lm["token_us"] * prompt == pytest.approx(pre["us"], abs=1e-3 * prompt)
    # decode first: the warm-up pass (the same tokens first) calls it as often; the measured pass is the second
    # half; then the prefill replay's two passes
    assert len(durations) == 2 * lm["calls"] + 2 * pre["calls"]
    inner_ms = sum(durations[lm["calls"]:2 * lm["calls"]]) * 1e3
    assert lm["host_predict_ms"] >= inner_ms - 1e-3 > 0
    assert lm["us"] == pytest.approx(lm["host_predict_ms"] * 1e3 / lm["calls"], rel=1e-4)
    assert lm["us"] >= inner_ms * 1e3 / lm["calls"] - 1e-3


def test_fit_call_token_through_the_points_and_never_negative():
    from executor.calibrate_runtime import fit_call_token

    assert fit_call_token([(1, 330.0), (29, 1450.0)]) == pytest.approx((290.0, 40.0))
    assert fit_call_token([(1, 10.0), (2, 12.0), (3, 14.0)]) == pytest.approx((8.0, 2.0))
    assert fit_call_token([(1, 330.0), (29, 300.0)]) == pytest.approx((315.0, 0.0))  # falling: noise, no growth
    assert fit_call_token([(1, 1.0), (3, 9.0)]) == pytest.approx((0.0, 2.8))  # rising faster: x.y / x.x, origin
    assert fit_call_token([(1, 5.0)]) == (5.0, 0.0)


def test_profile_takes_call_and_token_where_prefill_was_measured():
    from executor.calibrate import predictor_costs
    from sim.hardware import HardwareProfile, load_profile

    micro = {"previous_token": 20.0, "learned_mlp": 85.0, "default": 20.0}
    runtime = {"previous_token": {"us": 30.0, "calls": 10},
               "learned_mlp": {"us": 330.0, "calls": 10, "prefill": {"us": 1450.0, "calls": 2, "tokens_per_call": 29.0},
                               "call_us": 290.0, "token_us": 40.0}}
    cost, note = predictor_costs(micro, runtime)
    assert cost == {"previous_token": 30.0, "learned_mlp": {"call": 290.0, "token": 40.0}, "default": 30.0}
    assert ("learned_mlp runtime 330.0 us (10 calls) decode, 1450.0 us per call at 29.0 tokens (2 calls) prefill "
            "-> 290.0 + 40.0 us/token") in note
    raw = load_profile("h200-quoted").model_dump()
    prof = HardwareProfile.model_validate({**raw, "predictor_cost_us": cost})  # what calibrate writes validates
    assert prof.predictor_cost_s("learned_mlp", tokens=29) == pytest.approx(1450e-6)


def test_profile_takes_the_runtime_predictor_cost_and_notes_both():
    from executor.calibrate import predictor_costs

    micro = {"none": 0.3, "previous_token": 20.0, "learned_mlp": 85.0, "gate_reuse": 40.0, "default": 20.0}
    runtime = {"none": {"us": 0.0, "calls": 0}, "previous_token": {"us": 30.0, "calls": 10},
               "learned_mlp": {"us": 330.0, "calls": 10}}
    cost, note = predictor_costs(micro, runtime)
    assert cost["learned_mlp"] == 330.0 and cost["previous_token"] == 30.0 and cost["gate_reuse"] == 40.0
    assert cost["default"] == 30.0  # the dearest one reading no hidden states, as measure_predictors
    assert "learned_mlp runtime 330.0 us (10 calls), observe+predict alone 85.0 us" in note
    assert "gate_reuse observe+predict alone 40.0 us (no runtime measurement)" in note


def test_transfer_cost_runs_admit_prefetches_of_large_experts():
    """The prefetch run's in-flight bound holds two layers of copies even for Mixtral's 336 MiB experts (the
    suite's 512 MiB admitted none, and calibrate stopped with 'issued no demand loads or no prefetches')."""
    mixtral = get_geometry("mixtral-8x7b")
    assert calibration_inflight_mib(mixtral, 2) * 2**20 >= 4 * mixtral.expert_bytes
    assert calibration_inflight_mib(get_geometry("qwen3-30b-a3b"), 8) == 512  # the suite's bound where it fits


def test_h2d_best_of_passes_keeps_each_sizes_fastest(monkeypatch):
    """A slow spell during one pass of the link sweep (session 12: 32-35 GB/s for 4-256 MiB on one instance, 47-55
    elsewhere) does not become the profile's link speed: each size keeps its fastest pass, the passes alternate
    the sizes' order, and every pass's figures are returned."""
    from executor import calibrate

    orders = []
    slow = {1 << 20: 30.0, 1 << 24: 33.0}  # the first pass's spell

    def fake(device, sizes, timer, *, pinned):
        orders.append(list(sizes))
        first = len(orders) == 1
        return [{"size": s, "gbps": slow.get(s, 50.0) if first else 52.0} for s in sizes]

    monkeypatch.setattr(calibrate, "measure_h2d", fake)
    sizes = [1 << 16, 1 << 20, 1 << 24]
    pts, passes = calibrate.measure_h2d_best("cpu", sizes, None, pinned=True, passes=2)
    assert orders == [sizes, sizes[::-1]]
    assert pts == [{"size": s, "gbps": 52.0} for s in sizes]
    assert passes == [[50.0, 30.0, 33.0], [52.0, 52.0, 52.0]]
    one, single = calibrate.measure_h2d_best("cpu", sizes, None, pinned=True, passes=1)
    assert single == [[52.0, 52.0, 52.0]] and [p["gbps"] for p in one] == [52.0] * 3
