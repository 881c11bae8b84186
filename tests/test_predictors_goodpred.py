"""GoodPred = accuracy x fetch rate, the fetch rate taken from a simulation with the predictor as prefetcher."""

from __future__ import annotations

import json

import pytest

from predictors.evaluate import main as evaluate_main
from predictors.goodpred import fetch_rate, goodpred
from predictors.synthetic import make_trace

GEOM = dict(n_sequences=20, prompt_len=4, gen_len=12, n_layers=5, n_experts=12, top_k=2, drift=0.6)


@pytest.fixture(scope="module")
def router_trace(tmp_path_factory):
    return str(make_trace(tmp_path_factory.mktemp("gp") / "router", "router", seed=2, **GEOM))


def test_fetch_rate_is_the_share_of_useful_prefetches_in_time():
    assert fetch_rate({"prefetched_used": 10, "n_prefetch_late": 3}) == pytest.approx(0.7)
    assert fetch_rate({"prefetched_used": 0, "n_prefetch_late": 0}) is None


def test_infinitely_fast_link_gives_goodpred_equal_accuracy(router_trace):
    r = goodpred(router_trace, "gate_reuse", 1, cache_rate=0.1, link_scale=float("inf"))
    assert 0.3 < r["accuracy"] < 1.0  # drift makes the reused gate imperfect
    assert r["sim"]["metrics"]["prefetched_used"] > 0
    assert r["fetch_rate"] == 1.0 and r["goodpred"] == pytest.approx(r["accuracy"])
    # the simulation ran the same held-out sequences the accuracy was measured on (decode batches, batch size 1)
    assert r["sim"]["metrics"]["batches"] == r["n_eval"]


def test_slow_link_lowers_the_fetch_rate_not_the_accuracy(router_trace):
    fast = goodpred(router_trace, "gate_reuse", 1, cache_rate=0.1)
    slow = goodpred(router_trace, "gate_reuse", 1, cache_rate=0.1, link_scale=1e-2)
    assert slow["accuracy"] == fast["accuracy"]  # the same fitted predictor on the same held-out sequences
    assert slow["fetch_rate"] < fast["fetch_rate"]
    assert slow["goodpred"] == pytest.approx(slow["accuracy"] * slow["fetch_rate"])
    assert slow["sim"]["metrics"]["n_prefetch_late"] > 0


def test_goodpred_command_and_reactive_predictor(router_trace, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("trace: unused-here\nhardware: h200\nphase: decode\ncache:\n  policy: lfu\n  cache_rate: 0.2\n")
    assert evaluate_main([router_trace, "--predictor", "oracle", "--distance", "1", "--goodpred", "--config",
                          str(cfg), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"accuracy", "precision", "recall", "n_eval", "fetch_rate", "goodpred", "sim"} <= set(r)
    assert r["accuracy"] == 1.0 and r["sim"]["config"]["cache.policy"] == "lfu"
    assert r["goodpred"] == pytest.approx(r["fetch_rate"])
    assert evaluate_main([router_trace, "--predictor", "none", "--distance", "1", "--goodpred", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fetch_rate"] is None and r["goodpred"] is None  # nothing prefetched: no fetch rate
    assert evaluate_main([router_trace, "--predictor", "oracle", "--distance", "1", "--goodpred", "--folds", "3"]) == 2


def test_predictor_sweep_configs_expand_and_name_only_usable_predictors():
    from pathlib import Path

    from predictors.registry import make_predictor
    from sim.sweep import expand_file
    from traces.reader import Trace

    root = Path(__file__).resolve().parents[1] / "configs"
    sizes = {}
    for f in (root / "predictors.yaml", root / "examples" / "predictors-sweep.yaml",
              root / "examples" / "predictors-sweep-hidden.yaml"):
        tasks = expand_file(f)
        sizes[f.name] = len(tasks)
        for t in tasks:  # every predictor can run on its trace (needs are met)
            make_predictor(t.config.prefetch.predictor).check_trace(Trace(t.config.resolve_trace()).meta)
    assert sizes["predictors.yaml"] <= 10  # it runs in the default sweep: keep it small
