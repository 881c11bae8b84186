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


def test_gpu_data_path_standardizes_like_the_cpu_path():
    """The GPU branch of _torchfit (float16 input copied as is, standardized by torch) on the CPU: same mu/sigma
    as numpy's, and a network that fits the same data about as well."""
    torch = pytest.importorskip("torch")
    from predictors import _torchfit

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((600, 8)) * 3 + 1).astype(np.float16)
    y = _torchfit.multi_hot(np.argsort(-x.astype(np.float32) @ rng.standard_normal((8, 6)), axis=1)[:, :2], 6)
    kw = dict(hidden_units=16, epochs=5, lr=1e-2, weight_decay=0.0, batch_size=64, seed=0, standardize=True,
              patience=3, device=torch.device("cpu"))
    a = _torchfit._train(torch, x, y, **kw)
    b = _torchfit._train(torch, x, y, torch_prep=True, **kw)
    assert np.allclose(a["mu"], b["mu"], atol=1e-4) and np.allclose(a["sigma"], b["sigma"], atol=1e-4)
    assert a["w1"].shape == b["w1"].shape == (8, 16)
