"""CPU smoke tests of the executor's commands: calibrate (dry run, validated by sim.hardware), validate (suite
expansion, executor + simulator side by side, report files), replay, and their error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from executor import calibrate, replay, validate  # noqa: E402
from sim.engine.synthetic import make_trace  # noqa: E402
from sim.hardware import load_profile  # noqa: E402

SUITE = """
base:
  trace: syn
  max_decode_tokens: 4
grid:
  cache.cache_rate: [0.25, 0.5]
runs:
  - {name: lru, geometry: tiny, cache: {policy: lru}}
  - name: promoe
    geometry: tiny
    cache: {policy: lru}
    prefetch: {predictor: previous_token, distance: 2}
    chunked_prefetch: true
    early_preemption: true
    reordered_inference: true
  - {name: live, geometry: tiny, mode: live}
"""


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """The commands set one CPU thread for their dry runs: give the rest of the test session its setting back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "cpu.yaml"
    rc = calibrate.main(["--out", str(out), "--device", "cpu", "--repeats", "1", "--geometries", "tiny",
                         "--predictors", "none,previous_token"])
    assert rc == 0
    return out


def test_calibrate_dry_run_profile(profile_path):
    prof = load_profile(str(profile_path))
    assert prof.name == "cpu-dry-run" and "NOT A GPU PROFILE" in prof.provenance
    assert prof.expert_compute[0].hidden == 32 and prof.expert_compute[0].intermediate == 16
    assert set(prof.predictor_cost_us) >= {"none", "previous_token", "default"}
    # taken from the runtime's own accounting (small-MoE replay), the observe + predict figure kept in the notes
    assert "previous_token runtime" in prof.notes and "observe+predict alone" in prof.notes
    # measured in decode and prefill: a call part and a per-token part, the prefill point in the notes (one
    # prompt, small-MoE: 7 of its 8 layers have a target)
    cost = prof.predictor_cost_us["previous_token"]
    assert cost.call >= 0 and cost.token >= 0 and "tokens (7 calls) prefill ->" in prof.notes
    # the transfer host costs measured per geometry, in its expert table; the first geometry's also top-level
    tiny = prof.expert_compute[0]
    # (the per-copy prefetch cost is the prefetch run's issue time less its calls at the idle run's cost per call:
    # one round of each on a loaded CPU can bring it to 0, where it is clipped)
    assert tiny.demand_transfer_host_us > 0 and tiny.prefetch_transfer_host_us >= 0 and tiny.prefetch_call_host_us > 0
    assert (prof.demand_transfer_host_us, prof.prefetch_transfer_host_us, prof.prefetch_call_host_us) == (
        tiny.demand_transfer_host_us, tiny.prefetch_transfer_host_us, tiny.prefetch_call_host_us)
    assert f"'transfer_host': {{'tiny-cpu-mini': {{'demand_transfer_us': {tiny.demand_transfer_host_us}," in prof.notes
    assert profile_path.read_text().startswith("# NOT A GPU PROFILE") and "&id" not in profile_path.read_text()


def test_validate_suite_report(tmp_path, profile_path):
    make_trace(tmp_path / "syn", n_layers=4, n_experts=8, top_k=2, n_sequences=1, prompt_len=5, decode_len=4,
               expert_bytes=6144, hidden_size=32)
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    runs = validate.load_suite(suite)
    assert len(runs) == 6 and {r["cache"]["cache_rate"] for r in runs} == {0.25, 0.5}
    out = tmp_path / "report"
    assert validate.main([str(suite), "--profile", str(profile_path), "--out", str(out), "--device", "cpu"]) == 0
    import pandas as pd

    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 6
    ok = df[df["status"] == "ok"]
    assert len(ok) == 4 and (df[df["name"] == "live"]["status"] == "skipped").all()
    lru = ok[ok["name"] == "lru"]
    assert (lru["real_hit_rate"] == lru["sim_hit_rate"]).all()  # no prefetch: same cache code, same hits
    assert (lru["real_speedup_vs_lru"] == 1).all()
    assert (ok["capacity_bytes"] == ok["slab_slots"] * 6144).all()
    # each config's real side is the median of repeated runs (a run on a fresh store is repeated, not counted)
    assert (ok["real_repeats"] == 3).all() and (ok["real_spread"] >= 0).all()
    # beside each repeat: the host's speed and the link's bandwidth at that moment (CPU: no link), and its time
    probes = [json.loads(p) for p in ok["real_probes"]]
    assert all(len(p) == 3 and all(r["host_loop_us"] > 0 and r["h2d_gbps"] is None for r in p) for p in probes)
    # the GPU probes are absent on the CPU; the run's own host accounting is there
    assert all(r["launch_us"] is None and r["gpu_us"] is None and r["host_ms"] > 0 for p in probes for r in p)
    assert (df["wall_s"] >= 0).all() and (ok["wall_s"] > 0).all()
    # the labels of one cache rate ran their repeats interleaved (lru, promoe, lru, promoe, ...): host drift
    # between configs weighs on both alike
    for rate in (0.25, 0.5):
        at = ok[ok["cache.cache_rate"] == rate].set_index("name")["real_probes"]
        orders = {name: [r["order"] for r in json.loads(p)] for name, p in at.items()}
        assert orders == {"lru": [0, 2, 4], "promoe": [1, 3, 5]}
    # beside the runtime's host accounting, what the simulator charged for the same work: the profile's costs x
    # its counts (tiny table: per demand load, per prefetch copy and call; previous_token per call + per token)
    prof = load_profile(str(profile_path))
    tiny = prof.expert_compute[0]
    call_s, token_s = prof.predictor_cost("previous_token")
    for _, r in ok.iterrows():
        assert r["sim_host_demand_issue_ms"] == pytest.approx(r["sim_demand_loads"] * tiny.demand_transfer_host_us
                                                              / 1e3)
        if r["name"] == "lru":
            assert r["sim_host_predict_ms"] == 0 and r["sim_host_prefetch_issue_ms"] == 0
        else:  # 2 calls (layers 0 and 1, d = 2) per batch: the 5-token prompt and 4 one-token decode steps
            assert r["sim_host_predict_ms"] == pytest.approx(2 * ((call_s + 5 * token_s) + 4 * (call_s + token_s))
                                                             * 1e3)
            copies = r["sim_prefetches"] * tiny.prefetch_transfer_host_us / 1e3
            assert copies <= r["sim_host_prefetch_issue_ms"] <= copies + 10 * tiny.prefetch_call_host_us / 1e3
    assert (ok["real_copy_issues"] >= ok["real_demand_loads"]).all() and (ok["real_host_copy_issue_ms"] > 0).all()
    text = (out / "summary.md").read_text()
    assert "CPU DRY RUN" in text and "| promoe |" in text and "## Host time by category" in text
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dry_run"] and meta["fidelity"]["ok"] == 4 and meta["fidelity"]["median_real_spread"] >= 0
    # the noise attribution from the probes (CPU: host speed only, no link figure)
    fid = meta["fidelity"]
    assert fid["noise_repeats"] == 12 and len(fid["noise_host_ratio_range"]) == 2
    assert -1 <= fid["noise_time_vs_host_spearman"] <= 1 and "noise_link_ratio_range" not in fid
    assert "noise_gpu_ratio_range" not in fid and -1 <= fid["noise_time_vs_host_work_spearman"] <= 1
    # the hypervisor's steal during each repeat (Linux: /proc/stat), per second of the run
    assert all(r["steal_ms"] is None or r["steal_ms"] >= 0 for p in probes for r in p)
    assert "noise_steal_ms_per_s_range" in fid or not any(r["steal_ms"] is not None for p in probes for r in p)
    assert (out / "plots" / "tpot_ms_sim_vs_real.png").exists()
    # resumable: nothing is re-run
    assert validate.main([str(suite), "--profile", str(profile_path), "--out", str(out), "--device", "cpu",
                          "--resume"]) == 0
    assert len(pd.read_parquet(out / "results.parquet")) == 6
    # --report-only rewrites the report from the Parquet alone (nothing runs), with the note on top and the
    # fidelity broken down per geometry and mode
    (out / "summary.md").unlink()
    assert validate.main([str(suite), "--profile", str(profile_path), "--out", str(out), "--device", "cpu",
                          "--report-only", "--note", "PARTIAL: a test"]) == 0
    text = (out / "summary.md").read_text()
    assert text.splitlines()[2] == "**PARTIAL: a test**" and "| promoe |" in text
    meta = json.loads((out / "meta.json").read_text())
    assert meta["note"] == "PARTIAL: a test" and meta["fidelity"]["ok"] == 4
    # ... and keeps naming the call that ran the rows beside its own
    assert "--report-only" in meta["command"] and "--resume" in meta["runs_command"]
    assert "--report-only" not in meta["runs_command"] and f"The runs: `{meta['runs_command']}`" in text
    assert set(meta["fidelity"]["by_geometry_mode"]) == {f"{g}/{m}" for g, m in zip(df["geometry"], df["mode"])}
    # --resimulate recomputes the simulator side only: the same profile gives the same figures, a slower link
    # changes the simulated times and nothing real
    sim_cols = [c for c in df.columns if c.startswith("sim_") and "speedup" not in c and "oracle" not in c]
    real_cols = [c for c in df.columns if c.startswith("real_")]
    assert validate.main([str(suite), "--profile", str(profile_path), "--out", str(out), "--device", "cpu",
                          "--report-only", "--resimulate"]) == 0
    again = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(again[sim_cols + real_cols], df[sim_cols + real_cols])
    import yaml

    slow = yaml.safe_load(profile_path.read_text())
    for pt in slow["h2d"]["pinned"]["points"]:
        pt["gbps"] /= 100
    slow_path = tmp_path / "slow.yaml"
    slow_path.write_text(yaml.safe_dump(slow))
    assert validate.main([str(suite), "--profile", str(slow_path), "--out", str(out), "--device", "cpu",
                          "--report-only", "--resimulate"]) == 0
    slower = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(slower[real_cols], df[real_cols])
    ok2 = slower["status"] == "ok"
    new, old = slower[ok2]["sim_ttft_ms"].values, df[ok2]["sim_ttft_ms"].values
    assert (new >= old - 1e-9).all() and (new > old).any()  # (prefetching hides the slower link in some runs)
    # executor.gap: the per-batch gap of every run (its real batch times kept in the row: prompt, then 4 decode
    # batches), fitted
    from executor.gap import run_gaps

    gaps = run_gaps(str(suite), str(profile_path), out)
    done = df[df["status"] == "ok"]
    assert {g["run_id"] for g in gaps} == set(done["run_id"])
    for g in gaps:
        real = json.loads(done[done["run_id"] == g["run_id"]]["real_batch_ms"].iloc[0])
        assert g["batches"] == len(real) == 5 and g["real_ms"] == pytest.approx(np.mean(real))
        assert g["gap_ms"] == pytest.approx(g["real_ms"] - g["sim_ms"]) and g["gap_sd_ms"] >= 0


def test_batch_gap_fit():
    """The fit recovers a known per-batch constant and per-miss cost."""
    from executor.gap import batch_gap

    misses = [0, 3, 1, 5, 2]
    sim = [{"duration_ms": 1.0 + m, "lookups": 8, "hits": 8 - m} for m in misses]
    real = [r["duration_ms"] + 0.4 + 0.05 * m for r, m in zip(sim, misses)]
    fit = batch_gap([9.0] + real, sim, n_layers=4)  # a leading real batch the simulation lacks is left out
    assert fit["batches"] == 5 and fit["per_batch_ms"] == pytest.approx(0.4)
    assert fit["per_layer_us"] == pytest.approx(100) and fit["per_miss_us"] == pytest.approx(50)
    assert fit["gap_sd_ms"] == pytest.approx(np.std([0.05 * m for m in misses]))
    assert batch_gap([1.0, 2.0], sim[:2], 4) is None


def test_suite_errors(tmp_path):
    from traces.errors import TraceError

    bad = tmp_path / "bad.yaml"
    bad.write_text("runs: [{geometry: tiny}]\nextra: 1\n")
    with pytest.raises(TraceError, match="unknown top-level"):
        validate.load_suite(bad)
    bad.write_text("runs: [{trace: x}]\n")
    with pytest.raises(TraceError, match="geometry"):
        validate.load_suite(bad)
    ok = tmp_path / "ok.yaml"  # the geometry may come from the base
    ok.write_text("base: {geometry: tiny, trace: x}\ngrid: {cache.cache_rate: [0.25, 0.5]}\nruns: [{name: a}]\n")
    assert [(r["geometry"], r["cache"]["cache_rate"]) for r in validate.load_suite(ok)] == [("tiny", 0.25),
                                                                                          ("tiny", 0.5)]


def test_replay_cli_json_and_fit_error(tmp_path, capsys):
    make_trace(tmp_path / "syn", n_layers=2, n_experts=8, top_k=2, n_sequences=1, prompt_len=3, decode_len=2,
               expert_bytes=6144, hidden_size=32)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("trace: syn\ncache: {policy: lfu, cache_rate: 0.5}\n")
    assert replay.main([str(cfg), "--geometry", "tiny", "--device", "cpu", "--json", "--check",
                        "--predictor-backend", "torch"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"]["lookups"] == out["metrics"]["hits"] + out["metrics"]["misses"]
    assert out["layers"] == 2 and out["metrics"]["slab_slots"] == 8
    from traces.errors import run_cli

    rc = run_cli(replay.main, [str(cfg), "--geometry", "mixtral-8x7b", "--device", "cpu", "--host-budget-gib", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit" in err and "GiB" in err


def test_smoke_command_on_cpu(capsys):
    """`python -m executor.smoke` (the first command of a GPU session) passes on the CPU backends."""
    from executor import smoke

    assert smoke.main(["--device", "cpu", "--backend", "thread"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] and summary["cases"] >= len(smoke.CASES)


def test_issue_bench_refuses_without_a_gpu(capsys):
    """`python -m executor.issue_bench` times CUDA calls: without a GPU it says so (exit 2), no traceback."""
    import torch

    from executor import issue_bench

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    assert issue_bench.main(["--n", "10"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_repeat_runs_interleave_and_isolate_a_failing_config():
    """Round-robin over the configs; a config that keeps being left out (a fresh host store on every run) ends as
    its own error after three tries, the others go on."""
    calls = []

    def ok_run(name, total):
        def run():
            calls.append(name)
            return name, {"total_ms": total}
        return run

    def never():
        calls.append("never")
        return None

    first, failed, second = validate.repeat_runs([ok_run("a", 1.0), never, ok_run("b", 2.0)], 2, "cpu")
    assert calls == ["a", "never", "never", "never", "b", "a", "b"]
    assert isinstance(failed, ValueError) and "three runs in a row" in str(failed)
    assert first[0] == ("a", {"total_ms": 1.0}) and first[1]["real_repeats"] == 2
    assert [p["order"] for p in json.loads(second[1]["real_probes"])] == [1, 3]


def test_repeat_runs_compare_the_median_or_the_fastest_repeat():
    """`stat` picks the compared repeat by total time; the spread is over all of them either way; an unknown
    statistic is refused."""
    def timed(totals):
        it = iter(totals)

        def run():
            t = next(it)
            return t, {"total_ms": t}
        return run

    (med, cols), = validate.repeat_runs([timed([5.0, 3.0, 9.0])], 3, "cpu", stat="median")
    (fast, cols_f), = validate.repeat_runs([timed([5.0, 3.0, 9.0])], 3, "cpu", stat="fastest")
    assert med[0] == 5.0 and fast[0] == 3.0
    assert cols["real_stat"] == "median" and cols_f["real_stat"] == "fastest"
    assert cols["real_spread"] == cols_f["real_spread"] == pytest.approx((9.0 - 3.0) / 5.0)
    with pytest.raises(ValueError, match="real statistic"):
        validate.repeat_runs([timed([1.0])], 1, "cpu", stat="mean")
