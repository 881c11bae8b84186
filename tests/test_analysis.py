"""analysis/: loading results, speedups, sweep figures, MRC tables, trace exploration, the validation reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import explore, mrc, plots, results, validation

ROOT = Path(__file__).resolve().parents[1]
QWEN = ROOT / "data" / "traces" / "qwen3-30b-a3b"
FLAME = ROOT / "data" / "traces" / "flame-moe-290m-decoder"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- results -------------------------------------------------------------------------------------------------
def _rows(**over):
    base = {"sweep": "t", "run_id": "x", "trace": "data/traces/qwen3-30b-a3b", "hardware": "h200", "phase": "decode",
            "batch_size": 1, "cache.policy": "lru", "cache.scope": "global", "cache.cache_rate": 0.25,
            "cache.capacity_mib": None, "cache.capacity_experts": None, "prefetch.predictor": "none",
            "prefetch.distance": 1, "chunked_prefetch": False, "early_preemption": False,
            "reordered_inference": False, "cpu_experts": False, "hit_rate": 0.5, "tpot_ms": 10.0, "ttft_ms": np.nan,
            "total_ms": 100.0}
    base.update(over)
    return base


def test_annotate_schedule_capacity_and_model():
    df = results.annotate(pd.DataFrame([
        _rows(),
        _rows(chunked_prefetch=True, early_preemption=True, reordered_inference=True),
        _rows(chunked_prefetch=True),
        _rows(cpu_experts=True),
        _rows(**{"cache.cache_rate": None, "cache.capacity_mib": 512.0}),
    ]))
    assert df["schedule"].tolist() == ["reactive", "ProMoE", "chunked", "reactive+cpu-experts", "reactive"]
    assert df["capacity"].tolist()[:4] == [25.0] * 4 and df["capacity"].iloc[4] == 512.0
    assert df["capacity_unit"].iloc[0].startswith("cache rate") and df["capacity_unit"].iloc[4] == "cache size (MiB)"
    assert df["model"].iloc[0] == "Qwen3-30B-A3B" and df["trace_name"].iloc[0] == "qwen3-30b-a3b"


def test_speedup_against_reactive_lru_at_the_same_size():
    df = results.annotate(pd.DataFrame([
        _rows(tpot_ms=20.0),
        _rows(**{"cache.policy": "belady"}, tpot_ms=10.0),
        _rows(**{"prefetch.predictor": "oracle"}, chunked_prefetch=True, early_preemption=True,
              reordered_inference=True, tpot_ms=5.0),
        _rows(**{"cache.cache_rate": 0.5}, tpot_ms=8.0),
        _rows(**{"cache.cache_rate": 0.5, "cache.policy": "lfu"}, tpot_ms=16.0),
        _rows(**{"cache.cache_rate": 0.1, "cache.policy": "lfu"}, tpot_ms=16.0),  # no baseline at 10 %
    ]))
    s = results.with_speedup(df)["speedup_tpot_ms"].tolist()
    assert s[:5] == [1.0, 2.0, 4.0, 1.0, 0.5]
    assert np.isnan(s[5])


def test_load_results_reads_runs_when_not_consolidated(tmp_path):
    (tmp_path / "runs").mkdir()
    pd.DataFrame([_rows()]).to_parquet(tmp_path / "runs" / "a.parquet")
    assert len(results.load_results(tmp_path)) == 1
    with pytest.raises(FileNotFoundError, match="no results.parquet"):
        results.load_results(tmp_path / "missing")


def test_embedded_traces_listed():
    names = [p.name for p in results.embedded_traces()]
    assert "qwen3-30b-a3b" in names and "gemma-4-26b-a4b" in names


# -- sweep figures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    from sim.sweep import run_sweep

    d = tmp_path_factory.mktemp("sweep")
    spec = {"name": "tiny", "base": {"max_decode_tokens": 4, "trace": str(QWEN)},
            "grid": {"phase": ["prefill", "decode"], "cache.policy": ["lru", "belady"],
                     "cache.cache_rate": [0.1, 0.5], "prefetch.predictor": ["none", "oracle"]},
            "zip": [{"chunked_prefetch": [False, True], "early_preemption": [False, True],
                     "reordered_inference": [False, True]}]}
    (d / "sweep.yaml").write_text(yaml.safe_dump(spec))
    summary = run_sweep(d / "sweep.yaml", d / "out", workers=1, progress=False)
    assert summary["failed"] == 0
    return d / "out"


def test_write_sweep_plots(tiny_sweep, capsys):
    assert plots.main([str(tiny_sweep)]) == 0
    printed = capsys.readouterr().out.split()
    names = sorted(Path(p).name for p in printed)
    assert names == ["hit_rate__qwen3-30b-a3b.png", "latency__qwen3-30b-a3b.png", "speedup__qwen3-30b-a3b.png"]
    for p in printed:
        assert Path(p).parent == tiny_sweep / "plots"
        assert Path(p).read_bytes()[:8] == PNG_MAGIC
    assert not list((tiny_sweep / "plots").glob(".*"))  # no temporary files left


def test_figures_name_trace_and_hardware_and_label_axes(tiny_sweep):
    df = results.load_results(tiny_sweep)
    for fn in (plots.plot_hit_rate, plots.plot_latency, plots.plot_speedup):
        fig = fn(df)
        title = fig._suptitle.get_text()
        assert "Qwen3-30B-A3B" in title and "h200" in title
        for ax in fig.axes:
            if ax.get_visible() and ax.has_data():
                assert ax.get_xlabel() and ax.get_ylabel()
        assert fig.legends, "one legend per figure"


def test_plots_cli_missing_results(tmp_path, capsys):
    assert plots.main([str(tmp_path / "nothing")]) == 2
    assert "no results.parquet" in capsys.readouterr().err


def test_speedup_of_baseline_is_one(tiny_sweep):
    df = results.with_speedup(results.load_results(tiny_sweep))
    base = df[results.baseline_mask(df)]
    assert np.allclose(base["speedup_tpot_ms"].dropna(), 1.0)
    assert np.allclose(base["speedup_ttft_ms"].dropna(), 1.0)
    assert df["speedup_tpot_ms"].notna().sum() == (df["phase"] == "decode").sum()


# -- hit rate against cache size -----------------------------------------------------------------------------
def test_mrc_table_matches_sim_mrc():
    from sim.access import lookup_stream
    from sim.mrc import compute_mrc, hit_rate_at

    table = mrc.mrc_table(FLAME, ("lru", "fifo"), scopes=("global", "per_layer"), points=4)
    stream = lookup_stream(FLAME)
    ref = compute_mrc(stream, ["lru"], scope="per_layer")["policies"]["lru"]
    got = table[(table["policy"] == "lru") & (table["scope"] == "per_layer")]
    for c, h in zip(got["capacity_experts"], got["hit_rate"]):
        assert h == pytest.approx(hit_rate_at(ref, c))
    assert set(table["method"]) == {"stack", "simulated"}
    total = 8 * 64
    assert np.allclose(table["cache_rate_pct"], 100 * table["capacity_experts"] / total)


def test_token_working_set_and_lru_cliff():
    ws = mrc.token_working_set(QWEN)
    assert ws["experts"] == 48 * 6  # a decode token: every layer's top-6
    table = mrc.mrc_table(QWEN, ("lru", "belady"), scopes=("global",))
    cliff = mrc.lru_cliff(table, ws)
    # below one token's working set global LRU only hits inside the prompt; the optimum does far better there
    assert cliff["lru_hit_rate_below"] < cliff["lru_hit_rate_at"] < cliff["lru_hit_rate_at_2x"]
    bel = table[(table["policy"] == "belady") & (table["capacity_experts"] <= ws["experts"] - 1)]
    assert bel["hit_rate"].iloc[-1] > cliff["lru_hit_rate_below"] + 0.1


def test_mrc_cli_writes_png(tmp_path):
    out = tmp_path / "f.png"
    assert mrc.main([str(FLAME), "--out", str(out), "--policies", "lru,belady"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert mrc.main([str(tmp_path / "nope")]) == 2


# -- trace explorer ------------------------------------------------------------------------------------------
def test_popularity_and_transitions():
    d = explore.dense(FLAME)
    pop = explore.popularity(d)
    assert pop.shape == (d.L, d.E) and np.allclose(pop.sum(axis=1), 1.0)
    t = explore.transitions(d, 0)
    used = t.sum(axis=1) > 0
    assert np.allclose(t[used].sum(axis=1), d.k)  # each token routes to top_k experts at the next layer
    with pytest.raises(ValueError):
        explore.transitions(d, d.L - 1)
    conc = explore.transition_concentration(d)
    assert len(conc) == d.L - 1
    assert ((conc["top_k_transition_mass"] >= conc["independent_baseline"] - 1e-9)
            | conc["top_k_transition_mass"].isna()).all()


def test_transitions_hand_computed():
    class D:  # two tokens, two layers, top-1
        L, E, k, n_tokens = 2, 3, 1, 2
        experts = np.array([[[0], [1]], [[0], [2]]], dtype=np.int16)

    t = explore.transitions(D, 0)
    assert t[0].tolist() == [0.0, 0.5, 0.5] and t[1].sum() == 0


def test_reuse_distances_agree_with_traces_stats():
    from traces.reader import Trace
    from traces.stats import reuse_distances

    d = explore.dense(QWEN)
    r = explore.reuse_distances(d)
    s = reuse_distances(d)
    assert len(r) == s["lookups"]
    assert int((r["global"] < 0).sum()) == s["global"]["cold"] if "cold" in s["global"] else True
    assert Trace(QWEN).meta.n_layers == d.L


def test_explorer_figures_render():
    d = explore.dense(FLAME)
    for fig in (explore.plot_popularity(d, FLAME), explore.plot_reuse(explore.reuse_distances(d), d, FLAME),
                explore.plot_transitions(d, 0, FLAME),
                explore.plot_transition_concentration(explore.transition_concentration(d), d, FLAME)):
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel() and "flame-moe-290m" in ax.get_title()


# -- validation report ---------------------------------------------------------------------------------------
def test_no_report_is_none(tmp_path):
    assert validation.find_report(tmp_path / "absent") is None
    (tmp_path / "notes.md").write_text("x")
    assert validation.find_report(tmp_path) is None


def test_report_long_and_wide_layouts(tmp_path):
    long = pd.DataFrame({"config": ["a", "a", "b"], "metric": ["tpot_ms", "hit_rate", "tpot_ms"],
                         "real": [10.0, 0.5, 20.0], "sim": [11.0, 0.5, 18.0]})
    long.to_csv(tmp_path / "report.csv", index=False)
    (tmp_path / "other.json").write_text(json.dumps({"rows": [{"config": "a", "tpot_ms_real": 10.0,
                                                               "tpot_ms_sim": 12.0}]}))
    assert validation.find_report(tmp_path).name == "report.csv"
    t = validation.tidy(validation.read_table(tmp_path / "report.csv"))
    assert t["rel_error"].round(3).tolist() == [0.1, 0.0, -0.1]
    s = validation.summary(t)
    assert s.loc["tpot_ms", "runs"] == 2 and s.loc["tpot_ms", "max_abs_rel_error"] == pytest.approx(0.1)
    w = validation.tidy(validation.read_table(tmp_path / "other.json"))
    assert w[["metric", "real", "sim"]].values.tolist() == [["tpot_ms", 10.0, 12.0]]
    with pytest.raises(ValueError):
        validation.tidy(pd.DataFrame({"a": [1]}))
    fig = validation.plot_sim_vs_real(t)
    assert "h200" in fig._suptitle.get_text()


def test_report_in_executor_validate_layout(tmp_path):
    """executor.validate writes results.parquet (real_*, sim_*, diff_* columns), summary.md, meta.json."""
    pd.DataFrame({"name": ["lru", "promoe"], "real_tpot_ms": [10.0, 8.0], "sim_tpot_ms": [9.0, 8.8],
                  "diff_tpot_ms": [-0.1, 0.1], "real_hit_rate": [0.5, 0.9], "sim_hit_rate": [0.5, 0.9]}).to_parquet(
        tmp_path / "results.parquet")
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "summary.md").write_text("# x")
    assert validation.find_report(tmp_path).name == "results.parquet"
    t = validation.tidy(validation.read_table(validation.find_report(tmp_path)))
    assert sorted(t["metric"].unique()) == ["hit_rate", "tpot_ms"]
    assert t[t["metric"] == "tpot_ms"]["rel_error"].round(3).tolist() == [-0.1, 0.1]


def test_hit_rate_table_and_parallel_curves():
    (table, ws), = mrc.curves_parallel([FLAME], workers=1, policies=("lru", "fifo"), points=3, sim_budget=10**9)
    assert ws["experts"] > 0 and set(table["scope"]) == {"global", "per_layer"}
    t = mrc.hit_rate_table(table, (25, 100))
    assert list(t.columns) == ["method", "25%", "100%"]
    assert t.loc[("flame-moe-290m-decoder", "global", "lru"), "method"] == "exact"
    assert t.loc[("flame-moe-290m-decoder", "global", "fifo"), "method"] == "simulated, interpolated"
    # at 100 % every policy hits every warm lookup
    hr = t["100%"].to_numpy(dtype=float)
    assert np.allclose(hr, hr[0])
    small = mrc.mrc_table(FLAME, ("fifo",), scopes=("global",), points=12, sim_budget=3 * 20030)
    assert small["capacity_experts"].nunique() <= 3
