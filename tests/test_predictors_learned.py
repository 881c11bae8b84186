"""Hidden-state predictors on a SYNTHETIC trace whose routing is a real function of its hidden states.

Random linear routers over hidden states that drift a little from layer to layer (predictors.synthetic, kind
"router"): applying layer l+d's router to layer l's hidden state (gate_reuse) or learning the map (learned_mlp)
must beat every history-based predictor there. The figures are synthetic, not model measurements.
"""

from __future__ import annotations

import numpy as np
import pytest

from predictors.artifact import load_artifact
from predictors.evaluate import evaluate
from predictors.evaluate import main as evaluate_main
from predictors.synthetic import make_trace
from predictors.train import main as train_main
from predictors.views import HiddenSource, iter_batches, load_sequences
from traces.reader import Trace

GEOM = dict(n_sequences=40, prompt_len=4, gen_len=26, n_layers=4, n_experts=8, top_k=2, hidden_size=16, drift=0.2)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return Trace(make_trace(tmp_path_factory.mktemp("router") / "t", "router", seed=0, **GEOM))


@pytest.fixture(scope="module")
def results(trace):
    out = {}
    for name in ("frequency", "previous_token", "cross_layer", "eam", "gate_reuse"):
        out[name] = evaluate(trace, name, 1)
    out["learned_mlp"] = evaluate(trace, "learned_mlp", 1, params={"max_units": 256})
    out["learned_history"] = evaluate(trace, "learned_history", 1, params={"epochs": 20})
    return out


def test_gate_reuse_recovers_the_router(results):
    assert results["gate_reuse"]["accuracy"] > 0.8


def test_learned_mlp_beats_every_history_predictor(results):
    acc = results["learned_mlp"]["accuracy"]
    assert acc > 0.75
    for name in ("frequency", "previous_token", "cross_layer", "eam", "learned_history"):
        assert acc > results[name]["accuracy"] + 0.2, name


def test_distance_zero_gate_reuse_reproduces_the_trace(trace):
    # sanity of the views: the layer's own router on its own input gives exactly the traced experts
    from predictors.registry import make_predictor

    p = make_predictor("gate_reuse")
    seqs = load_sequences(trace)[:2]
    for b in iter_batches(seqs, trace.meta, source=HiddenSource(trace)):
        for layer in range(trace.meta.n_layers):
            v = b.view(layer, with_hidden=True)
            if b.n_tokens == 1:
                assert set(p.predict(v, 0).top(2).tolist()) == set(b.actual(layer)[0].tolist())


def test_learned_mlp_artifact_round_trip(trace, tmp_path, capsys):
    out = tmp_path / "mlp.npz"
    assert train_main([str(trace.path), "--predictor", "learned_mlp", "--distance", "2", "--out", str(out),
                       "--set", "epochs=5", "--set", "max_units=64"]) == 0
    p, head = load_artifact(out)
    assert head["params"]["epochs"] == 5 and head["n_params"] > 0
    # ~ (16 inputs x 64 units + 64) + (64 x 8 + 8) per layer with a target 2 layers ahead, plus standardization
    assert set(p.n_params()) == {"l0_d2", "l1_d2"}
    assert all(n == 16 * 64 + 64 + 64 * 8 + 8 for n in p.n_params().values())
    capsys.readouterr()
    assert evaluate_main([str(trace.path), "--predictor", "learned_mlp", "--distance", "2", "--artifact",
                          str(out)]) == 0
    text = capsys.readouterr().out
    assert "learned_mlp d=2" in text and "accuracy" in text
    with pytest.raises(ValueError, match="not 1"):
        v = next(iter_batches(load_sequences(trace)[:1], trace.meta, source=HiddenSource(trace))).view(
            0, with_hidden=True)
        p.predict(v, 1)


def test_artifact_version_2_with_skip_and_float16_and_version_1_still_loads(trace, tmp_path):
    import json

    from predictors.artifact import VERSION, read_header

    out = tmp_path / "mlp.npz"
    assert train_main([str(trace.path), "--predictor", "learned_mlp", "--distance", "1", "--out", str(out),
                       "--set", "epochs=2", "--set", "max_units=32", "--set", "skip=true"]) == 0
    assert read_header(out)["version"] == VERSION == 2
    with np.load(out) as z:
        assert z["l0_d1/ws"].dtype == z["l0_d1/w1"].dtype == np.float16 and z["l0_d1/b1"].dtype == np.float32
        state = {k: z[k] for k in z.files if k != "__header__"}
        head = json.loads(str(z["__header__"]))
    p2, _ = load_artifact(out)
    v = next(iter_batches(load_sequences(trace)[:1], trace.meta, source=HiddenSource(trace))).view(
        0, with_hidden=True)
    # a version-1 artifact (no skip path, float32 weights) loads; a newer version than the reader's is refused
    old = {k: a.astype(np.float32) for k, a in state.items() if not k.endswith("/ws")}
    params = {**head["params"], "skip": False, "weights_dtype": "float32"}
    np.savez(tmp_path / "v1.npz", __header__=np.array(json.dumps({**head, "version": 1, "params": params})), **old)
    p1, h1 = load_artifact(tmp_path / "v1.npz")
    assert h1["version"] == 1 and "ws" not in p1._nets["l0_d1"]
    assert np.isfinite(p1.predict(v, 1).scores).all() and np.isfinite(p2.predict(v, 1).scores).all()
    np.savez(tmp_path / "v3.npz", __header__=np.array(json.dumps({**head, "version": VERSION + 1})), **state)
    with pytest.raises(ValueError, match="newer"):
        load_artifact(tmp_path / "v3.npz")


def test_learned_mlp_inference_is_numpy_and_deterministic(trace):
    a = evaluate(trace, "learned_mlp", 1, params={"epochs": 3, "max_units": 64})
    b = evaluate(trace, "learned_mlp", 1, params={"epochs": 3, "max_units": 64})
    assert a["accuracy"] == b["accuracy"]
    assert np.isfinite(a["accuracy"])


def test_learned_mlp_multilabel_loss_and_dropout(trace, results):
    r = evaluate(trace, "learned_mlp", 1, params={"max_units": 256, "loss": "bce", "dropout": 0.1})
    assert r["accuracy"] > 0.75
    assert r["accuracy"] > results["learned_history"]["accuracy"] + 0.2
    with pytest.raises(ValueError, match="loss"):
        evaluate(trace, "learned_mlp", 1, params={"loss": "hinge"})


def test_learned_mlp_router_target_is_layer_l_plus_d_router_softmax(trace, tmp_path):
    """target="router" trains on layer l+d's router softmax over its own input (training rows only), "mixed" on
    that averaged with the normalized top-k; "auto" picks the router where the trace has router weights and the
    top-k where it does not; "router" refuses a trace without router weights."""
    from predictors.evaluate import fit_on_split
    from predictors.learned_mlp import LearnedMLPPredictor, _softmax
    from predictors.registry import make_predictor
    from predictors.split import make_split

    rows = np.array([5, 0, 17, 3])
    topk = np.zeros((4, 8), np.float32)
    topk[np.arange(4), [1, 2, 3, 4]] = 1
    topk[np.arange(4), [0, 0, 0, 0]] = 1
    want = _softmax(np.asarray(trace.hidden_states(2), np.float32)[rows] @ np.asarray(trace.router_weights(2)).T)
    got, temp = LearnedMLPPredictor._router_target(trace, rows, 2, topk, "router", {"temperature": 1.0})
    assert temp == 1.0
    assert np.allclose(got, want, atol=1e-6) and np.allclose(got.sum(axis=1), 1, atol=1e-5)
    mixed, _ = LearnedMLPPredictor._router_target(trace, rows, 2, topk, "mixed", {"temperature": 1.0})
    assert np.allclose(mixed, 0.5 * (want + topk / 2), atol=1e-6)

    split = make_split(trace, 0.9, 0)
    auto = make_predictor("learned_mlp", distances=(1,), epochs=2, max_units=32)
    fit_on_split(auto, trace, split)
    assert auto.fit_report["target"] == "router"
    no_router = Trace(trace.path)
    no_router.meta = no_router.meta.model_copy(update={"has_router_weights": False})
    topk_fit = make_predictor("learned_mlp", distances=(1,), epochs=2, max_units=32)
    fit_on_split(topk_fit, no_router, split)
    assert topk_fit.fit_report["target"] == "topk"
    with pytest.raises(ValueError, match="router weights"):
        fit_on_split(make_predictor("learned_mlp", distances=(1,), target="router"), no_router, split)
    with pytest.raises(ValueError, match="target"):
        make_predictor("learned_mlp", target="logits")
    with pytest.raises(ValueError, match="temperature"):
        make_predictor("learned_mlp", temperature="hot")


def test_learned_mlp_router_target_beats_topk_labels(trace):
    """On the synthetic router trace (sharp routers: top-2 of 8 hold 92 % of the softmax) the router's target at
    the automatic temperature (about 3.5 here, the top-2 mass brought to 0.6) teaches the map better than the
    k-hot labels; at T = 1 it would teach it worse (the small MoE's figures are in docs/predictors.md)."""
    from predictors.evaluate import prepare
    from predictors.learned_mlp import TOPK_MASS, _softmax, auto_temperature

    kw = {"max_units": 64, "epochs": 30}
    soft = evaluate(trace, "learned_mlp", 1, params=kw)  # the default: target auto, temperature auto
    hard = evaluate(trace, "learned_mlp", 1, params={**kw, "target": "topk"})
    sharp = evaluate(trace, "learned_mlp", 1, params={**kw, "target": "router", "temperature": 1.0})
    assert soft["accuracy"] > hard["accuracy"] + 0.02 > sharp["accuracy"] + 0.02
    p, _ = prepare(trace, "learned_mlp", 1, params={"max_units": 16, "epochs": 1})
    temps = p.fit_report["temperature"]
    assert p.fit_report["target"] == "router" and sorted(temps) == ["l0_d1", "l1_d1", "l2_d1"]
    assert all(2.0 < t < 6.0 for t in temps.values())
    logits = np.random.default_rng(0).standard_normal((500, 8)) * 5
    t = auto_temperature(logits, 2)
    top = np.argsort(-logits, axis=1)[:, :2]
    assert np.take_along_axis(_softmax(logits / t), top, axis=1).sum(axis=1).mean() == pytest.approx(TOPK_MASS,
                                                                                                       abs=1e-4)


def test_learned_mlp_gate_adds_the_reused_gate(trace, results):
    r = evaluate(trace, "learned_mlp_gate", 1, params={"max_units": 256})
    assert r["accuracy"] > 0.75
    assert r["accuracy"] >= results["gate_reuse"]["accuracy"] - 0.05
    for name in ("frequency", "previous_token", "cross_layer", "eam", "learned_history"):
        assert r["accuracy"] > results[name]["accuracy"] + 0.2, name


def test_learned_mlp_gate_needs_router_weights(tmp_path, capsys):
    from predictors.base import PredictorUnavailable
    from predictors.registry import make_predictor

    t = Trace(make_trace(tmp_path / "cl", "cross_layer", seed=0, n_sequences=4, prompt_len=2, gen_len=3,
                         n_layers=3, n_experts=6, top_k=2))
    with pytest.raises(PredictorUnavailable, match="hidden states and router weights"):
        make_predictor("learned_mlp_gate").check_trace(t.meta)


def test_train_many_fits_networks_of_every_layer_at_once():
    """One batched fit of several networks (different row counts, float16 input as on a GPU): each network
    learns its own map, the numpy forward (with the linear skip path) matches, and the report says what ran."""
    pytest.importorskip("torch")
    from predictors import _torchfit

    rng = np.random.default_rng(1)
    xs, ys, ws = [], [], []
    for n in (900, 600, 750):
        w = rng.standard_normal((8, 6))
        x = (rng.standard_normal((n, 8)) * 2 + 1).astype(np.float16)
        xs.append(x)
        ws.append(w)
        ys.append(_torchfit.multi_hot(np.argsort(-x.astype(np.float32) @ w, axis=1)[:, :2], 6))
    rep: dict = {}
    nets = _torchfit.train_many(xs, ys, hidden_units=16, epochs=40, lr=1e-2, batch_size=64, seed=0, skip=True,
                                schedule="cosine", warmup=1, patience=40, report=rep)
    assert len(nets) == 3 and all(net["ws"].shape == (8, 6) and net["w1"].shape == (8, 16) for net in nets)
    assert rep["networks"] == 3 and rep["rows"] == [900, 600, 750] and rep["validation_rows"] == [90, 60, 75]
    assert rep["epochs_run"] == 40 and rep["stopped"] == "epochs" and all(b >= 1 for b in rep["best_epoch"])
    for i, net in enumerate(nets):
        x = xs[i].astype(np.float32)
        top = np.argsort(-_torchfit.forward(net, x), axis=1)[:, :2]
        hits = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(top, np.argsort(-x @ ws[i], axis=1)[:, :2])])
        assert hits > 0.85, (i, hits)  # each network learned ITS layer's map
        other = np.argsort(-x @ ws[(i + 1) % 3], axis=1)[:, :2]
        assert np.mean([len(set(a) & set(b)) / 2 for a, b in zip(top, other)]) < 0.7
    # an old network (no skip path) runs as before; the skip path adds x_std @ ws
    net = {k: v for k, v in nets[0].items() if k != "ws"}
    x = xs[0][:5].astype(np.float32)
    xs_std = (x - nets[0]["mu"]) / nets[0]["sigma"]
    assert np.allclose(_torchfit.forward(nets[0], x), _torchfit.forward(net, x) + xs_std @ nets[0]["ws"], atol=1e-4)
    assert _torchfit.n_params(nets[0]) == _torchfit.n_params(net) + 48
    # early stopping and the time limit end a fit early
    rep2: dict = {}
    _torchfit.train_many(xs[:1], ys[:1], hidden_units=8, epochs=50, lr=1e-2, batch_size=64, patience=1, report=rep2)
    assert rep2["stopped"] == "patience" and rep2["epochs_run"] < 50
    rep3: dict = {}
    _torchfit.train_many(xs[:1], ys[:1], hidden_units=8, epochs=50, time_limit=1e-9, report=rep3)
    assert rep3["stopped"] == "time_limit" and rep3["epochs_run"] == 0


def test_learned_mlp_skip_path_and_fit_report(trace, tmp_path, capsys):
    """skip=true: every network carries the linear path `ws`; the artifact round-trips; train --json reports
    each distance's batched fit."""
    import json

    out = tmp_path / "s.npz"
    assert train_main([str(trace.path), "--predictor", "learned_mlp", "--distance", "1", "--out", str(out),
                       "--set", "skip=true", "--set", "max_units=32", "--set", "epochs=3",
                       "--set", "schedule=cosine", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rep = res["fit_report"]["d1"]
    # --reshare: learned_mlp_gate from the saved networks, no trace and no fit
    gate = tmp_path / "g.npz"
    assert train_main(["--reshare", str(out), "--predictor", "learned_mlp_gate", "--out", str(gate)]) == 0
    g, ghead = load_artifact(gate)
    assert g.name == "learned_mlp_gate" and ghead["distance"] == 1 and "learned_mlp" in ghead["shared_from"]
    assert ghead["sequence_fingerprints"] and ghead["split"]["kind"] == "sequences"
    with pytest.raises(SystemExit):
        train_main(["--predictor", "learned_mlp", "--out", str(gate)])  # a fit needs TRACE and --distance
    assert train_main(["--reshare", str(out), "--predictor", "learned_history", "--out", str(gate)]) == 2
    assert rep["networks"] == ["l0_d1", "l1_d1", "l2_d1"] and rep["epochs_run"] <= 3
    pred, head = load_artifact(out)
    assert head["params"]["skip"] is True
    assert set(pred._nets) == {"l0_d1", "l1_d1", "l2_d1"} and all("ws" in n for n in pred._nets.values())
    for name, net in pred._nets.items():  # float16 weights on disk, the same values as the gate's copy
        assert all(np.array_equal(net[k], g._nets[name][k]) for k in net)
    with np.load(out) as z:
        assert z["l0_d1/w1"].dtype == np.float16 and z["l0_d1/mu"].dtype == np.float32


def test_views_give_the_previous_positions_layer_inputs(trace):
    """view.past_hidden(m): the input of layer m at each token's sequence's last position before the batch: the
    previous token's in decode, zeros in the prompt batch (nothing before it); the simulator's batches carry the
    same rows (sim.engine.schedule prev_hidden_rows), in a decode-only run too."""
    from sim.engine.schedule import iter_batches as sim_batches
    from sim.engine.schedule import load_sequences as sim_sequences

    src = HiddenSource(trace)
    seqs = load_sequences(trace)[:3]
    L = trace.meta.n_layers
    expected = {}  # (sequence, position) -> previous position's rows [L] as the views give them
    for b in iter_batches(seqs, trace.meta, source=src):
        v = b.view(1, with_hidden=True)
        for m in range(L):
            got = v.past_hidden(m)
            assert got.shape == (b.n_tokens, trace.meta.hidden_size) and not got.flags.writeable
            if b.phase == "prefill":
                assert not got.any()
        (s, a, _), = b.parts
        if b.phase == "decode":
            for m in range(L):
                assert np.array_equal(v.past_hidden(m)[0], src.hidden(m, s.hidden_rows[a - 1: a, m])[0])
            expected[(s.sequence, int(b.positions[0]))] = s.hidden_rows[a - 1]
    for phase in ("both", "decode"):
        for b in sim_batches(sim_sequences(trace, phase, 3, None), phase, 1):
            if b.phase == "prefill":
                assert (b.prev_hidden_rows == -1).all()
            else:
                assert np.array_equal(b.prev_hidden_rows[0], expected[(int(b.sequences[0]), int(b.positions[0]))])


def test_learned_mlp_past_input_widens_the_input_and_needs_the_past(trace, tmp_path, capsys):
    """past_input: the network reads [layer l's input, layer l+d's input at the previous position]; the artifact
    keeps the option; a view without past_hidden (live mode) is refused with a message; the simulator runs it."""
    import json

    from predictors.base import BatchView
    from sim.run import main as sim_main

    art = tmp_path / "past.npz"
    assert train_main([str(trace.path), "--predictor", "learned_mlp", "--distance", "1", "--set", "max_units=16",
                       "--set", "epochs=2", "--set", "past_input=true", "--out", str(art)]) == 0
    p, _ = load_artifact(art)
    assert p.params["past_input"] is True
    assert p._nets["l0_d1"]["w1"].shape[0] == 2 * trace.meta.hidden_size
    b = next(iter(iter_batches(load_sequences(trace)[:1], trace.meta, source=HiddenSource(trace))))
    v = b.view(0, with_hidden=True)
    assert len(p.predict(v, 1).experts)
    bare = BatchView(**{**v.__dict__, "past_hidden": None})
    with pytest.raises(ValueError, match="previous position's hidden states"):
        p.predict(bare, 1)
    capsys.readouterr()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"trace: {trace.path}\nhardware: h200\ncache: {{cache_rate: 0.25}}\n"
                   f"prefetch: {{predictor: learned_mlp, distance: 1, artifact: {art}}}\n")
    assert sim_main([str(cfg), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert m["prefetch_precision"] > 0


def test_report_rows_of_an_option_variant(trace):
    """predictors.report scores `learned_mlp+past_input` (VARIANTS: learned_mlp with past_input=true) under its own
    label, in its own table row; it is skipped with a message on traces without hidden states."""
    from predictors.report import VARIANTS, render, resolve, run_all

    assert resolve("learned_mlp+past_input") == VARIANTS["learned_mlp+past_input"]
    assert resolve("cross_layer") == ("cross_layer", None)
    rows = run_all([trace.path], ["learned_mlp+past_input"], folds=1, log=lambda s: None)
    assert {r["predictor"] for r in rows} == {"learned_mlp+past_input"} and len(rows) == 3
    assert all(r["params"].get("past_input") is True for r in rows)
    line = next(x for x in render(rows, 1).splitlines() if x.startswith("| learned_mlp+past_input |"))
    assert "9:1 split of this trace" in line


def test_column_stats_in_chunks_equal_the_whole_input_ones():
    """The standardization's mean and deviation, taken a chunk of rows at a time (GPU memory), are the ones of
    the whole input at once, for chunks that do and do not divide the rows."""
    torch = pytest.importorskip("torch")
    from predictors._torchfit import column_stats

    x = torch.from_numpy((np.random.default_rng(3).standard_normal((1001, 7)) * 3 + 2).astype(np.float16))
    xd = x.double()
    mu0 = xd.mean(dim=0)
    sd0 = ((xd - mu0) ** 2).mean(dim=0).sqrt() + 1e-3
    for chunk in (1, 10, 1001, 4096):
        mu, sd = column_stats(x, chunk=chunk)
        assert mu.dtype == torch.float64 and torch.allclose(mu, mu0, rtol=1e-12, atol=1e-12)
        assert torch.allclose(sd, sd0, rtol=1e-12, atol=1e-12)


def test_report_refuses_an_artifact_of_another_variant(trace, tmp_path):
    """An artifact is scored under the report row its file is named after; a past_input network named as plain
    learned_mlp (or the reverse) is refused, naming the file, instead of being reported under the wrong label."""
    from predictors.report import run_all
    from traces.errors import TraceError

    arts = tmp_path / "arts" / trace.path.name
    arts.mkdir(parents=True)
    assert train_main([str(trace.path), "--predictor", "learned_mlp", "--distance", "1", "--set", "epochs=2",
                       "--set", "max_units=16", "--set", "past_input=true",
                       "--out", str(arts / "learned_mlp_d1.npz")]) == 0
    with pytest.raises(TraceError, match="learned_mlp_d1.npz.*past_input=True.*learned_mlp\\+past_input"):
        run_all([trace.path], ["learned_mlp"], folds=1, log=lambda s: None, artifacts=tmp_path / "arts")
    (arts / "learned_mlp_d1.npz").rename(arts / "learned_mlp+past_input_d1.npz")
    rows = run_all([trace.path], ["learned_mlp+past_input"], folds=1, log=lambda s: None,
                   artifacts=tmp_path / "arts", beside=True)
    assert [r["distance"] for r in rows if r.get("beside")] == [1] and len(rows) == 4


def test_single_threaded_blas_limits_numpy_to_one_thread():
    """The commands that run predictors (evaluate, report, sim.run, the sweep's runs) call single_threaded_blas:
    a batch's prediction is a few rows, and spinning BLAS threads beside other processes made it 80x slower.
    Checked in a fresh process that starts with two BLAS threads."""
    pytest.importorskip("threadpoolctl")
    import os
    import subprocess
    import sys

    code = ("from threadpoolctl import threadpool_info as info; import numpy; "
            "from predictors._torchfit import single_threaded_blas as one; "
            "n = lambda: max(i['num_threads'] for i in info() if i['user_api'] == 'blas'); "
            "a = n(); one(); print(a, n())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"})
    assert out.stdout.split() == ["2", "1"], out


def test_report_summary_takes_the_best_learned_mlp_fit_against_every_history_fit():
    """The target column reads the most accurate learned_mlp row (any option variant, in-trace or separate
    training trace; never learned_mlp_gate) against the most accurate history-based row of either kind."""
    from predictors.report import best_learned_mlp

    a = {"accuracy": 0}
    by = {("learned_mlp", 1): {**a, "accuracy": 0.82}, ("learned_mlp+past_input", 1): {**a, "accuracy": 0.84},
          ("learned_history", 1): {**a, "accuracy": 0.62}, ("learned_mlp_gate", 1): {**a, "accuracy": 0.95},
          ("gate_reuse", 1): {**a, "accuracy": 0.93}}
    extra = {("learned_mlp+past_input", 1): {**a, "accuracy": 0.902}, ("learned_history", 1): {**a, "accuracy": 0.68}}
    assert best_learned_mlp(by, extra, 1) == {"top": 0.902, "top_history": 0.68,
                                              "top_label": "learned_mlp+past_input, separate training trace"}
    assert best_learned_mlp(by, {}, 1) == {"top": 0.84, "top_history": 0.62, "top_label": "learned_mlp+past_input"}
    assert best_learned_mlp({("cross_layer", 2): {**a, "accuracy": 0.5}}, {}, 2)["top"] is None


def test_per_gate_fast_paths_equal_the_general_ones(trace):
    """The prediction's hot path (one decode row read as a slice, the in-place forward pass and softmax, the ranking
    without a mask when every score is positive) returns exactly what the general code does."""
    from predictors import _torchfit
    from predictors.base import rank_counts
    from predictors.learned_mlp import _softmax, softmax_sum
    from predictors.views import gather_rows

    src = HiddenSource(trace)
    h = np.asarray(trace.hidden_states(1))
    for rows in ([3], [5, 0, 7], [4, -1, 2], [-1], list(range(40))):
        r = np.array(rows, dtype=np.int64)
        general = np.zeros((len(r), h.shape[1]), dtype=np.float32)
        general[r >= 0] = h[r[r >= 0]]
        np.testing.assert_array_equal(src.hidden(1, r), general)
        np.testing.assert_array_equal(gather_rows(h, r, np.float32), general)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    net = {"mu": rng.standard_normal(16).astype(np.float32), "sigma": rng.random(16).astype(np.float32) + 0.5,
           "w1": rng.standard_normal((16, 8)).astype(np.float32), "b1": rng.standard_normal(8).astype(np.float32),
           "w2": rng.standard_normal((8, 5)).astype(np.float32), "b2": rng.standard_normal(5).astype(np.float32),
           "ws": rng.standard_normal((16, 5)).astype(np.float32)}
    z = (x - net["mu"]) / net["sigma"]
    expected = np.maximum(z @ net["w1"] + net["b1"], 0.0) @ net["w2"] + net["b2"] + z @ net["ws"]
    np.testing.assert_array_equal(_torchfit.forward(net, x), expected)
    for t in (1, 3):
        logits = _torchfit.forward(net, x[:t])
        np.testing.assert_array_equal(softmax_sum(logits.copy()), _softmax(logits).sum(axis=0))
    for counts in ([0.0, 2.0, 2.0, 1.0], [3.0, 1.0, 2.0], [0.0, 0.0], [-1.0, 4.0, 0.0]):
        c = np.array(counts)
        p = rank_counts(c)
        order = np.argsort(-c, kind="stable")
        order = order[c[order] > 0]
        assert p.experts.tolist() == order.tolist() and p.scores.tolist() == c[order].tolist()
        assert p.experts.dtype == np.int64 and p.scores.dtype == np.float64
