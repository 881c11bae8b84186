"""sim.sweep: grid and zip expansion, validation errors, resumability, determinism, the Dask backend."""

from __future__ import annotations

import pandas as pd
import pytest

from sim.engine.synthetic import make_trace
from sim.sweep import expand_file, run_sweep
from traces.errors import TraceError


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return make_trace(tmp_path_factory.mktemp("s") / "tiny", n_layers=3, n_experts=8, top_k=2, n_sequences=1,
                      prompt_len=4, decode_len=6)


def sweep_file(tmp_path, trace_dir, extra=""):
    p = tmp_path / "sweep.yaml"
    p.write_text(f"""name: t
base:
  trace: {trace_dir}
  cache: {{scope: global}}
grid:
  cache.policy: [lru, fifo]
  cache.cache_rate: [0.25, 0.5]
  prefetch.predictor: [none, oracle]
zip:
  - chunked_prefetch: [false, true]
    early_preemption: [false, true]
{extra}""")
    return p


def test_grid_and_zip_expand(tmp_path, trace_dir):
    tasks = expand_file(sweep_file(tmp_path, trace_dir))
    assert len(tasks) == 2 * 2 * 2 * 2
    combos = {(t.config.chunked_prefetch, t.config.early_preemption) for t in tasks}
    assert combos == {(False, False), (True, True)}
    assert len({t.run_id for t in tasks}) == len(tasks)


@pytest.mark.parametrize("extra,field", [
    ("  cache.polcy: [lru]\n", "cache.polcy"),
])
def test_unknown_grid_key(tmp_path, trace_dir, extra, field):
    p = tmp_path / "bad.yaml"
    p.write_text(f"base: {{trace: {trace_dir}}}\ngrid:\n{extra}")
    with pytest.raises(TraceError) as e:
        expand_file(p)
    assert str(p) in str(e.value) and field in str(e.value)


def test_bad_sweep_files(tmp_path, trace_dir):
    p = tmp_path / "bad.yaml"
    p.write_text(f"base: {{trace: {trace_dir}}}\ngrid: {{phase: [decode]}}\nzip: [{{phase: [a, b], seed: [1]}}]\n")
    with pytest.raises(TraceError, match="zip lists differ"):
        expand_file(p)
    p.write_text(f"base: {{trace: {trace_dir}}}\ngrid: {{phase: [decode]}}\ngrdi: 1\n")
    with pytest.raises(TraceError, match="field 'grdi'"):
        expand_file(p)
    p.write_text(f"base: {{trace: {trace_dir}}}\ngrid: {{phase: [sideways]}}\n")
    with pytest.raises(TraceError, match="phase"):
        expand_file(p)
    p.write_text(f"base: {{trace: {trace_dir}}}\ngrid: {{cache.policy: [lru, lruu]}}\n")
    with pytest.raises(TraceError, match="field 'cache.policy'"):
        expand_file(p)
    p.write_text(f"base: {{trace: {trace_dir}}}\ngrid: {{prefetch.predictor: [oracel]}}\n")
    with pytest.raises(TraceError, match="field 'prefetch.predictor'"):
        expand_file(p)
    p.write_text("base: {trace: no/such/trace}\ngrid: {phase: [decode]}\n")
    with pytest.raises(TraceError, match="field 'trace'"):
        expand_file(p)


def test_resumable_and_deterministic(tmp_path, trace_dir):
    f = sweep_file(tmp_path, trace_dir)
    out = tmp_path / "out"
    first = run_sweep(f, out, workers=1, progress=False, limit=5)  # an interrupted sweep: 5 runs finished
    assert first["ran"] == 5 and len(list((out / "runs").glob("*.parquet"))) == 5
    second = run_sweep(f, out, workers=2, progress=False)
    assert second["skipped"] == 5 and second["ran"] == 11 and second["failed"] == 0
    third = run_sweep(f, out, workers=1, progress=False)
    assert third["skipped"] == 16 and third["ran"] == 0
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 16 and df["run_id"].is_unique
    assert {"hit_rate", "ttft_ms", "tpot_ms", "cache.policy", "early_preemption"} <= set(df.columns)
    # a fresh sweep in one process gives the same table
    fresh = run_sweep(f, tmp_path / "fresh", workers=1, progress=False)
    assert fresh["ran"] == 16
    pd.testing.assert_frame_equal(df, pd.read_parquet(tmp_path / "fresh" / "results.parquet"))


def test_dask_local_cluster(tmp_path, trace_dir):
    distributed = pytest.importorskip("distributed")
    f = sweep_file(tmp_path, trace_dir)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cl:
        res = run_sweep(f, tmp_path / "dask", backend="dask", scheduler=cl.scheduler_address, progress=False)
    assert res["ran"] == 16 and res["failed"] == 0
    local = run_sweep(f, tmp_path / "local", workers=1, progress=False)
    assert local["ran"] == 16
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "dask" / "results.parquet"),
                                  pd.read_parquet(tmp_path / "local" / "results.parquet"))


def test_killed_sweep_loses_no_finished_run(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    trace = make_trace(tmp_path / "mid", n_layers=8, n_experts=16, top_k=2, n_sequences=1, prompt_len=8,
                       decode_len=40)
    f = tmp_path / "kill.yaml"
    f.write_text(f"base: {{trace: {trace}}}\ngrid:\n  cache.cache_rate: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]\n"
                 "  cache.policy: [lru, fifo, lfu]\n  prefetch.predictor: [none, oracle]\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sim.sweep", str(f), "--out", str(out), "--workers", "1",
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = out / "runs"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if runs.exists() and len(list(runs.glob("*.parquet"))) >= 3:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.stem for p in runs.glob("*.parquet")}
    assert finished
    for p in runs.glob("*.parquet"):  # every stored run is complete and readable
        assert len(pd.read_parquet(p)) == 1
    res = run_sweep(f, out, workers=1, progress=False)
    assert res["skipped"] == len(finished) and res["ran"] == 48 - len(finished) and res["failed"] == 0
    assert len(pd.read_parquet(out / "results.parquet")) == 48
