"""Predictors on small synthetic traces with known structure; metrics; the train/evaluate commands; artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from predictors.artifact import load_artifact, read_header
from predictors.base import BatchView, PredictorUnavailable
from predictors.evaluate import evaluate
from predictors.evaluate import main as evaluate_main
from predictors.metrics import Scorer, goodpred
from predictors.registry import available_predictors, make_predictor
from predictors.synthetic import make_trace
from predictors.train import main as train_main
from predictors.views import iter_batches, load_sequences
from traces.errors import TraceError
from traces.reader import Trace

GEOM = dict(n_sequences=10, prompt_len=4, gen_len=10, n_layers=5, n_experts=12, top_k=2)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    return {kind: Trace(make_trace(d / kind, kind, seed=1, **GEOM)) for kind in ("cross_layer", "repeat")}


def test_every_issue_predictor_is_registered():
    names = set(available_predictors())
    assert {"none", "oracle", "frequency", "previous_token", "cross_layer", "eam", "gate_reuse", "learned_mlp",
            "learned_history"} <= names


@pytest.mark.parametrize("distance", [1, 2, 3])
def test_cross_layer_is_exact_on_a_deterministic_mapping(traces, distance):
    r = evaluate(traces["cross_layer"], "cross_layer", distance)
    assert r["accuracy"] == 1.0 and r["prefill"]["accuracy"] == 1.0
    assert r["n_eval"] == GEOM["gen_len"] * 1  # 10% of 10 sequences = 1 held-out sequence


def test_previous_token_is_exact_on_repeated_tokens(traces):
    for d in (1, 2):
        r = evaluate(traces["repeat"], "previous_token", d)
        assert r["accuracy"] == 1.0
        assert r["prefill"]["accuracy"] == 0.0  # a prompt's first batch has no previous token to copy


def test_oracle_and_none_bound_the_range(traces):
    t = traces["cross_layer"]
    assert evaluate(t, "oracle", 2)["accuracy"] == 1.0
    r = evaluate(t, "none", 2)
    assert r["accuracy"] == 0.0 and r["precision"] is None


def test_frequency_counts_what_it_observed(traces):
    t = traces["repeat"]
    (seq,) = load_sequences(t, [0])
    f = make_predictor("frequency")
    f.reset()
    batches = list(iter_batches([seq], t.meta))
    for b in batches[:3]:  # the prompt and two decode tokens
        for layer in range(t.meta.n_layers):
            f.observe(b.view(layer))
    view = batches[3].view(0)
    pred = f.predict(view, 1)
    expected = set(seq.experts[0, 1].tolist())  # this sequence repeats one routing everywhere
    assert set(pred.top(2).tolist()) == expected
    assert pred.scores[0] == GEOM["prompt_len"] + 2
    f.reset()
    assert f.predict(view, 1).experts.size == 0


def test_learned_history_beats_frequency_on_cross_layer_structure(traces):
    t = traces["cross_layer"]
    lh = evaluate(t, "learned_history", 1, params={"epochs": 40, "lr": 0.02})
    fr = evaluate(t, "frequency", 1)
    assert lh["accuracy"] > fr["accuracy"] + 0.3


def test_eam_finds_the_matching_sequence(tmp_path):
    # each sequence repeats its routing; EAM over held-out positions of ONE sequence matches its own windows
    t = Trace(make_trace(tmp_path / "r", "repeat", n_sequences=1, prompt_len=4, gen_len=60, n_layers=4,
                         n_experts=16, top_k=2))
    r = evaluate(t, "eam", 1, params={"window": 8})
    assert r["split"]["kind"] == "positions" and r["accuracy"] == 1.0


def test_metrics_definitions():
    s = Scorer(n_layers=3, top_k=2, budgets=[1, 4])
    # decode: actual {1, 2}; prediction [1, 5, 2]: accuracy at |A|=2 -> 1 hit
    s.add(1, np.array([[1, 2]]), np.array([1, 5, 2]), decode=True, token_keys=[(0, 5)])
    # decode: actual {3, 4}; prediction [4, 3]: 2 hits
    s.add(2, np.array([[3, 4]]), np.array([4, 3]), decode=True, token_keys=[(0, 6)])
    # prefill, two tokens: actual {0, 1, 2}; prediction [0]: 1 hit of budget 3
    s.add(1, np.array([[0, 1], [1, 2]]), np.array([0]), decode=False, token_keys=[(0, 0), (0, 1)])
    # absent rows are skipped
    s.add(2, np.array([[-1, -1]]), np.array([0]), decode=True)
    r = s.summary()
    assert r["accuracy"] == pytest.approx(3 / 4) and r["n_eval"] == 2 and r["n_predictions"] == 2
    assert r["budgets"]["1"] == {"precision": 1.0, "recall": 0.5}
    assert r["budgets"]["4"]["precision"] == pytest.approx(4 / 5) and r["budgets"]["4"]["recall"] == 1.0
    assert [x["layer"] for x in r["per_layer"]] == [1, 2]
    assert r["per_layer"][0]["accuracy"] == 0.5 and r["per_layer"][1]["accuracy"] == 1.0
    assert r["prefill"]["accuracy"] == pytest.approx(1 / 3) and r["prefill"]["n_tokens"] == 2
    assert goodpred(0.8, 0.5) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        goodpred(0.8, 1.5)


def test_hidden_state_predictors_refuse_traces_without_them(traces, capsys):
    meta = traces["repeat"].meta
    for name in ("gate_reuse", "learned_mlp"):
        with pytest.raises(PredictorUnavailable, match="needs hidden states"):
            make_predictor(name).check_trace(meta)
    rc = evaluate_main([str(traces["repeat"].path), "--predictor", "gate_reuse", "--distance", "1"])
    assert rc == 2 and "needs hidden states and router weights" in capsys.readouterr().err


def test_unknown_predictor_and_bad_distance_are_clear_errors(traces, capsys):
    path = str(traces["repeat"].path)
    assert evaluate_main([path, "--predictor", "nope", "--distance", "1"]) == 2
    assert "unknown predictor 'nope'" in capsys.readouterr().err
    assert evaluate_main([path, "--predictor", "frequency", "--distance", "9"]) == 2
    assert "distance 9" in capsys.readouterr().err


def test_train_then_evaluate_the_artifact(traces, tmp_path, capsys):
    path = str(traces["cross_layer"].path)
    out = tmp_path / "cl.npz"
    assert train_main([path, "--predictor", "cross_layer", "--distance", "2", "--out", str(out), "--seed", "3",
                       "--json"]) == 0
    capsys.readouterr()
    head = read_header(out)
    assert head["predictor"] == "cross_layer" and head["distance"] == 2 and head["split"]["seed"] == 3
    assert set(head["split"]["train"]).isdisjoint(head["split"]["eval"])
    assert head["trace"]["model"] == "synthetic-cross_layer"
    assert evaluate_main([path, "--predictor", "cross_layer", "--distance", "2", "--artifact", str(out),
                          "--json", "--budget", "1", "4"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"accuracy", "precision", "recall", "n_eval", "per_layer", "budgets"} <= set(r)
    assert r["accuracy"] == 1.0 and set(r["budgets"]) == {"1", "2", "4"}
    assert r["split"]["eval_sequences"] == head["split"]["eval"]
    # the artifact is what make_predictor(..., artifact=) gives the simulator
    p = make_predictor("cross_layer", artifact=str(out))
    q, _ = load_artifact(out)
    assert p.artifact_header["split"] == head["split"]
    assert np.array_equal(p.get_state()["prob_d2"], q.get_state()["prob_d2"])
    # no half-written file stays behind
    assert [f.name for f in tmp_path.iterdir()] == ["cl.npz"]


def test_a_view_is_what_the_predictor_interface_expects(traces):
    t = traces["repeat"]
    (seq,) = load_sequences(t, [1])
    b = next(iter_batches([seq], t.meta))
    v = b.view(2)
    assert isinstance(v, BatchView) and v.phase == "prefill" and v.current.shape == (GEOM["prompt_len"], 3, 2)
    assert v.past[1].shape == (0, GEOM["n_layers"], 2)


def test_report_rewrites_only_the_generated_part(traces, tmp_path):
    from predictors.report import BEGIN, END
    from predictors.report import main as report_main

    root = tmp_path / "traces"
    root.mkdir()
    make_trace(root / "tiny", "cross_layer", seed=2, **GEOM)
    doc = tmp_path / "predictors.md"
    doc.write_text(f"# Hand-written\n\nkept\n\n{BEGIN}\nold table\n{END}\n\ntail kept\n")
    assert report_main(["--traces", str(root), "--out", str(doc), "--predictors", "frequency", "cross_layer",
                        "gate_reuse", "--folds", "5"]) == 0
    text = doc.read_text()
    assert text.startswith("# Hand-written\n\nkept\n") and text.rstrip().endswith("tail kept")
    assert "old table" not in text and "| cross_layer | 1.000 | 1.000 | 1.000 | 100 |" in text
    assert "5-fold cross-validation" in text and "Not run (`gate_reuse`)" in text
    rows = json.loads((tmp_path / "predictors-results.json").read_text())
    assert {r["predictor"] for r in rows} == {"frequency", "cross_layer", "gate_reuse"}
    # --render-only rewrites the table from that JSON alone; a broken JSON is an error naming the file
    doc.write_text(f"# Hand-written\n\n{BEGIN}\nold table\n{END}\n")
    assert report_main(["--out", str(doc), "--render-only", "--folds", "5"]) == 0
    assert "old table" not in doc.read_text() and "| cross_layer | 1.000 | 1.000 | 1.000 | 100 |" in doc.read_text()
    bad = tmp_path / "bad.json"
    for content in ("{not json", '{"a": 1}'):
        bad.write_text(content)
        with pytest.raises(TraceError, match=f"{bad}: not a results JSON"):
            report_main(["--out", str(doc), "--render-only", "--json-out", str(bad)])


def test_on_the_embedded_public_trace_when_present():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "data" / "traces" / "qwen3-30b-a3b"
    if not (path / "meta.json").exists():
        pytest.skip("embedded trace data/traces/qwen3-30b-a3b not present")
    r = evaluate(path, "cross_layer", 2)
    assert r["split"]["kind"] == "positions" and r["n_eval"] == 13  # the last 10% of 128 generated positions
    assert r["accuracy"] > evaluate(path, "frequency", 2)["accuracy"]


def test_teacher_forced_rows_replay_as_decode_or_as_one_batch(tmp_path):
    from traces.format import TraceMeta
    from traces.writer import write_trace

    n_seq, n_pos, n_layers, k = 2, 5, 3, 2
    rows = n_seq * n_pos * n_layers
    seq = np.repeat(np.arange(n_seq), n_pos * n_layers)
    pos = np.tile(np.repeat(np.arange(n_pos), n_layers), n_seq)
    lay = np.tile(np.arange(n_layers), n_seq * n_pos)
    meta = TraceMeta(model="tf", source="test", n_layers=n_layers, n_experts=4, top_k=k, expert_bytes=[1] * n_layers,
                     license="CC0-1.0", attribution="test")
    experts = np.stack([(pos + lay) % 4, (pos + lay + 1) % 4], axis=1)
    t = Trace(write_trace(tmp_path / "tf", meta, sequence=seq, phase=np.full(rows, "teacher_forced"), position=pos,
                          layer=lay, experts=experts, weights=np.full((rows, k), 0.5)))
    seqs = load_sequences(t)
    as_decode = list(iter_batches(seqs, t.meta))
    assert [b.phase for b in as_decode] == ["decode"] * (n_seq * n_pos)
    assert as_decode[3].view(0).past[0].shape[0] == 3
    as_prompt = list(iter_batches(seqs, t.meta, teacher_forced="prefill"))
    assert [(b.phase, b.n_tokens) for b in as_prompt] == [("prefill", n_pos)] * n_seq
    r = evaluate(t, "oracle", 1)
    assert r["headline_batches"] == "decode" and r["n_eval"] == n_pos  # one held-out sequence


@pytest.mark.parametrize("name", ["frequency", "previous_token", "cross_layer", "eam", "learned_history"])
def test_a_view_without_past_entries_is_accepted(traces, name):
    # a caller (the simulator) may leave sequences with no earlier positions out of view.past
    from dataclasses import replace

    from predictors.evaluate import build_predictor, fit_on_split
    from predictors.split import make_split

    t = traces["cross_layer"]
    p = build_predictor(name, 1, params={"epochs": 2} if name == "learned_history" else None)
    fit_on_split(p, t, make_split(t))
    (seq,) = load_sequences(t, [0])
    batches = list(iter_batches([seq], t.meta))
    for b in (batches[0], batches[1]):
        v = replace(b.view(1), past={})
        p.observe(v)
        assert p.predict(v, 1).experts.ndim == 1


# -- artifacts fit on a separate training trace (--split 1.0) ---------------------------------------------------
@pytest.fixture(scope="module")
def two_traces(tmp_path_factory):
    """Two traces of the same (synthetic) model with different sequences: one to fit on, one to score."""
    d = tmp_path_factory.mktemp("separate")
    return (Trace(make_trace(d / "train", "cross_layer", seed=1, **GEOM)),
            Trace(make_trace(d / "eval", "cross_layer", seed=1, **{**GEOM, "n_sequences": 6, "gen_len": 7})))


def _fit_all(trace, out, capsys, distance=1):
    assert train_main([str(trace.path), "--predictor", "cross_layer", "--distance", str(distance), "--split", "1.0",
                       "--out", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_fit_all_artifact_records_its_training_trace_and_scores_all_of_another(two_traces, tmp_path, capsys):
    train_t, eval_t = two_traces
    res = _fit_all(train_t, tmp_path / "cl.npz", capsys)
    head = read_header(tmp_path / "cl.npz")
    assert head["split"]["kind"] == "all" and head["split"]["eval"] == [] and res["split"] == "all"
    assert len(head["split"]["train"]) == GEOM["n_sequences"]
    assert head["trace"]["routing_sha256"] and head["trace"]["n_sequences"] == GEOM["n_sequences"]
    n_pos = GEOM["prompt_len"] + GEOM["gen_len"]
    assert head["fit"] == {"sequences": 10, "tokens": 10 * n_pos, "rows": 10 * n_pos * GEOM["n_layers"]}
    assert len(head["sequence_fingerprints"]) == GEOM["n_sequences"]
    r = evaluate(eval_t, "cross_layer", 1, artifact=str(tmp_path / "cl.npz"))
    assert r["split"]["kind"] == "separate" and r["split"]["eval_sequences"] == list(range(6))
    assert r["n_eval"] == 6 * 7  # every decode position of every sequence
    assert r["fit"]["where"] == "separate training trace" and r["fit"]["tokens"] == 10 * n_pos
    assert r["accuracy"] == 1.0  # the same model's cross-layer map, learned on other sequences
    # fit in place (no artifact): the split of this trace, with its sizes
    r2 = evaluate(eval_t, "cross_layer", 1)
    assert r2["fit"]["where"] == "sequences split of this trace" and r2["fit"]["sequences"] == 5


def test_fit_all_artifact_is_refused_on_its_own_trace(two_traces, tmp_path, capsys):
    """The content-hash check: an artifact fit on every sequence of a trace must not score that trace."""
    train_t, _ = two_traces
    _fit_all(train_t, tmp_path / "cl.npz", capsys)
    assert evaluate_main([str(train_t.path), "--predictor", "cross_layer", "--distance", "1", "--artifact",
                          str(tmp_path / "cl.npz")]) == 2
    assert "fit on every sequence of this trace (routing.parquet sha256" in capsys.readouterr().err


def test_artifact_is_refused_on_a_trace_holding_its_training_sequences(two_traces, tmp_path, capsys):
    """A different file (other hash) that contains training sequences: refused by their fingerprints."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    train_t, _ = two_traces
    _fit_all(train_t, tmp_path / "cl.npz", capsys)
    sub = tmp_path / "subset"
    shutil.copytree(train_t.path, sub)
    table = pq.read_table(sub / "routing.parquet")
    pq.write_table(table.filter(pa.compute.greater(table.column("sequence"), 0)), sub / "routing.parquet")
    assert evaluate_main([str(sub), "--predictor", "cross_layer", "--distance", "1", "--artifact",
                          str(tmp_path / "cl.npz")]) == 2
    err = capsys.readouterr().err
    assert "9 of this trace's sequences (e.g. sequence 1) are sequences the artifact was fit on" in err


def test_share_as_saves_the_same_networks_under_the_twin_name(tmp_path, capsys):
    from predictors.artifact import load_artifact as load

    t = make_trace(tmp_path / "r", "router", seed=0, n_sequences=6, prompt_len=3, gen_len=5, n_layers=3,
                   n_experts=8, top_k=2, hidden_size=8)
    a, b = tmp_path / "m.npz", tmp_path / "g.npz"
    assert train_main([str(t), "--predictor", "learned_mlp", "--distance", "1", "--fit-all", "--set", "epochs=2",
                       "--out", str(a), "--share-as", f"learned_mlp_gate:{b}"]) == 0
    pa_, ha = load(a)
    pb, hb = load(b)
    assert hb["predictor"] == "learned_mlp_gate" and "learned_mlp" in hb["shared_from"]
    assert all(np.array_equal(v, pb.get_state()[k]) for k, v in pa_.get_state().items())
    assert train_main([str(t), "--predictor", "learned_mlp", "--distance", "1", "--fit-all", "--out", str(a),
                       "--share-as", f"cross_layer:{b}"]) == 2
    assert "its fit is not learned_mlp's" in capsys.readouterr().err


def test_report_says_where_each_row_was_fit(two_traces, tmp_path, capsys):
    from predictors.report import render, run_all

    train_t, eval_t = two_traces
    (tmp_path / "arts" / "eval").mkdir(parents=True)
    _fit_all(train_t, tmp_path / "arts" / "eval" / "cross_layer_d1.npz", capsys)
    rows = run_all([eval_t.path], ["frequency", "cross_layer"], folds=1, log=lambda s: None,
                   artifacts=tmp_path / "arts")
    text = render(rows, 1)
    line = next(x for x in text.splitlines() if x.startswith("| cross_layer |"))
    assert "separate trace" in line and "10 seqs, 140 tokens" in line
    assert "artifacts fit on a separate training trace" in text
    by = {(r["predictor"], r["distance"]): r for r in rows}
    assert by[("cross_layer", 1)]["split"]["kind"] == "separate"
    assert by[("cross_layer", 2)]["fit"]["where"] == "sequences split of this trace"


def test_report_beside_keeps_the_in_trace_fit_and_adds_the_artifact_row(two_traces, tmp_path, capsys):
    from predictors.report import render, run_all

    train_t, eval_t = two_traces
    (tmp_path / "arts" / "eval").mkdir(parents=True)
    _fit_all(train_t, tmp_path / "arts" / "eval" / "cross_layer_d1.npz", capsys)
    rows = run_all([eval_t.path], ["cross_layer"], folds=1, log=lambda s: None, artifacts=tmp_path / "arts",
                   beside=True)
    d1 = [r for r in rows if r["distance"] == 1]
    assert len(d1) == 2 and sorted(r["split"]["kind"] for r in d1) == ["separate", "sequences"]
    assert [r.get("beside", False) for r in d1] == [True, False]
    assert len([r for r in rows if r["distance"] == 2]) == 1  # no artifact at d=2: the in-trace fit only
    lines = render(rows, 1).splitlines()
    main = next(x for x in lines if x.startswith("| cross_layer |"))
    extra = next(x for x in lines if x.startswith("| cross_layer (separate training trace) |"))
    assert "9:1 split of this trace" in main and "10 seqs, 140 tokens" in extra
    assert extra.split(" | ")[2:4] == ["–", "–"]  # the artifact row has d=1 only


def test_previous_token_one_token_path_equals_the_votes():
    """The one-token path (what batch-size-1 decode takes at every layer) gives exactly the general path's
    prediction, experts and scores, on the public Qwen3 trace; also when the previous position lacks the row."""
    from predictors.base import BatchView
    from predictors.previous_token import PreviousTokenPredictor
    from sim.config import REPO_ROOT
    from sim.engine.schedule import load_sequences
    from traces.reader import Trace

    trace = Trace(REPO_ROOT / "data" / "traces" / "qwen3-30b-a3b")
    meta = trace.meta
    p = PreviousTokenPredictor()
    checked = 0
    for s in load_sequences(trace, "both", 2, 6):
        rows = s.all.copy()
        rows[3, 5] = -1  # a position without the row at one layer: the path must look further back
        for pos in range(0, rows.shape[0]):
            for layer in (0, 3, 20):
                for d in (1, 2):
                    if layer + d >= meta.n_layers:
                        continue
                    view = BatchView(meta, layer, np.array([s.sequence]), np.array([pos]),
                                     rows[pos:pos + 1, :layer + 1], {s.sequence: rows[:pos]})
                    fast, slow = p.predict(view, d), p.votes(view, layer + d)
                    assert np.array_equal(fast.experts, slow.experts) and np.array_equal(fast.scores, slow.scores)
                    checked += 1
    assert checked > 100
