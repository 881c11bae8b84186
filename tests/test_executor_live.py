"""Live mode on the CPU: a tiny random Qwen3-MoE runs with its experts offloaded through the slab; its logits and
greedy tokens equal the plain model's, for several policies and switches; the runtime's invariants hold."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from executor.live import LiveOffload, find_moe_blocks  # noqa: E402
from predictors.registry import make_predictor  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model():
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def _greedy(model, prompt, n):
    with torch.no_grad():
        res = model(input_ids=torch.tensor([prompt]), use_cache=True)
        past, tok = res.past_key_values, int(res.logits[0, -1].argmax())
        out = [tok]
        for _ in range(n - 1):
            res = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = res.past_key_values, int(res.logits[0, -1].argmax())
            out.append(tok)
    return out


@pytest.mark.parametrize("policy,rate,predictor,switches", [
    ("lru", 0.25, "none", False),
    ("lru", 0.25, "previous_token", True),
    ("lfu", 0.5, "previous_token", True),
    ("fifo", 1.0, "none", True),
])
def test_live_equals_plain_model(tiny_model, policy, rate, predictor, switches):
    live = LiveOffload(copy.deepcopy(tiny_model), cache_rate=rate, cache_policy=policy,
                       predictor=make_predictor(predictor), distance=1, chunked_prefetch=switches,
                       early_preemption=switches, reordered_inference=switches, check=True)
    assert len(live.blocks) == 3 and live.geom.hidden == 32 and live.geom.moe_intermediate == 16
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        ref = tiny_model(input_ids=ids).logits
    out = live.forward(ids, phase="prefill", sequences=[0] * 6, positions=list(range(6)))
    assert torch.allclose(out.logits, ref, atol=1e-5, rtol=1e-5)
    assert live.generate([[1, 5, 9, 3]], 6) == [_greedy(tiny_model, [1, 5, 9, 3], 6)]
    m = live.finish()
    assert m["hits"] + m["misses"] == m["lookups"] > 0
    assert m["prefill_batches"] == 2 and m["decode_batches"] == 5
    assert live.rt.checks["slot_content_checks"] == m["lookups"]
    assert live.rt.max_used_bytes <= live.rt.cache.capacity_bytes
    if predictor == "none":
        assert m["prefetches"] == 0


def test_live_refuses_future_readers(tiny_model):
    with pytest.raises(ValueError, match="future"):
        LiveOffload(copy.deepcopy(tiny_model), cache_policy="belady")
    with pytest.raises(ValueError, match="future"):
        LiveOffload(copy.deepcopy(tiny_model), predictor=make_predictor("oracle"))
    assert len(find_moe_blocks(tiny_model)) == 3


def test_live_validation_run(tiny_model, tmp_path):
    """executor.validate's live mode: the model generates, the simulator replays the routing it produced."""
    import json

    from executor.calibrate import main as calibrate_main
    from executor.live import run_live, sequences_for_simulator
    from sim.config import build_config
    from sim.hardware import load_profile

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"ids": p}) for p in ([1, 5, 9, 3], [7, 2, 2, 8, 4])) + "\n")
    prof = tmp_path / "cpu.yaml"
    assert calibrate_main(["--out", str(prof), "--device", "cpu", "--repeats", "1", "--geometries", "tiny",
                           "--predictors", "none"]) == 0
    cfg = build_config({"trace": str(tmp_path), "max_sequences": 2, "max_decode_tokens": 3,
                        "cache": {"policy": "lru", "cache_rate": 0.5}})
    row = run_live({"geometry": "small-moe", "prompts": str(prompts)}, cfg, load_profile(str(prof)),
                   device="cpu", model=copy.deepcopy(tiny_model), repeats=3)
    assert row["status"] == "ok" and row["n_layers"] == 3
    # three timed runs after an untimed warm-up, each on a fresh copy of the model; the median is compared
    probes = json.loads(row["real_probes"])
    assert row["real_repeats"] == 3 and len(probes) == 3 and row["real_spread"] >= 0
    assert sorted(p["total_ms"] for p in probes)[1] == pytest.approx(row["real_total_ms"], abs=1e-3)
    assert row["real_lookups"] == row["sim_lookups"] and row["real_hits"] == row["sim_hits"]  # no prefetch
    assert row["real_ttft_ms"] is not None and row["real_tpot_ms"] is not None
    live = LiveOffload(copy.deepcopy(tiny_model), cache_rate=0.5)
    live.generate([[1, 2, 3]], 3)
    seqs, hidden = sequences_for_simulator(live)
    assert hidden is None  # no hidden-state predictor: none kept
    assert len(seqs) == 1 and seqs[0].prompts[0][1].shape == (3, 3, 2) and seqs[0].gen.shape == (2, 3, 2)
    # the routing stored in a validation row gives the same sequences back (validate --resimulate)
    from executor.live import routing_json, sequences_from_routing

    back, _ = sequences_from_routing(routing_json(live))
    assert len(back) == 1 and np.array_equal(back[0].all, seqs[0].all) and np.array_equal(back[0].gen, seqs[0].gen)
    assert np.array_equal(back[0].gen_positions, seqs[0].gen_positions)
    assert isinstance(row.get("live_routing"), str)


def test_live_dense_table_and_its_use(tiny_model, tmp_path):
    """Calibration of a live model's layer (every expert resident; experts subtracted as the profile charges them)
    gives a table by batch tokens, and a live run's simulation then uses it instead of the dense stand-in."""
    from executor.calibrate import main as calibrate_main
    from executor.live import live_profile, measure_live_dense
    from sim.hardware import CostModel, HardwareProfile, load_profile

    prof_path = tmp_path / "cpu.yaml"
    assert calibrate_main(["--out", str(prof_path), "--device", "cpu", "--repeats", "1", "--geometries", "tiny",
                           "--predictors", "none"]) == 0
    prof = load_profile(str(prof_path))
    table = measure_live_dense(copy.deepcopy(tiny_model), prof, name="small-moe", prompt_lens=(3, 6), new_tokens=3,
                               repeats=2, device="cpu")
    assert table["tokens"] == [1, 3, 6] and all(v >= 0 for v in table["ms"]) and table["ms"][-1] > 0
    with_live = HardwareProfile.model_validate({**prof.model_dump(), "live_dense_compute": [table]})
    live = LiveOffload(copy.deepcopy(tiny_model), cache_rate=0.5)
    assert live_profile(prof, "small-moe", live.meta) is prof  # no table: unchanged
    used = live_profile(with_live, "small-moe", live.meta)
    cost = CostModel(used, live.meta)
    cost.prepare(6)
    assert cost.dense_s[0][6] == pytest.approx(table["ms"][2] * 1e-3)
    assert live_profile(with_live, "other-model", live.meta) is with_live


@pytest.mark.parametrize("past,blocking", [(False, None), (True, None), (True, False)])
def test_live_learned_predictor_in_the_loop(tiny_model, tmp_path, monkeypatch, past, blocking):
    """A learned_mlp fit on a trace recorded from the same model predicts from the live hidden states; the
    simulator replays the states the run kept (float16, as the trace) and makes the same predictions, also later
    from the validation row (validate --resimulate). With `past_input` also from the previous position's layer
    inputs, which the live run keeps per sequence and the simulator reads at the trace rows before the batch.
    With prefetch.blocking false the live run predicts on its predictor thread: it must see the same states."""
    import json

    from executor.calibrate import main as calibrate_main
    from executor.live import live_predictor, run_live, sequences_from_routing, simulate_live
    from predictors.train import main as train_main
    from sim.config import build_config
    from sim.hardware import load_profile
    from traces.record import main as record_main

    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    trace = tmp_path / "train-trace"
    assert record_main(["--model", str(model_dir), "--out", str(trace), "--num-prompts", "24", "--prompt-len", "8",
                        "--max-new-tokens", "8", "--hidden-states", "--seed", "3", "--quiet"]) == 0
    art = tmp_path / "learned_mlp_d1.npz"
    assert train_main([str(trace), "--predictor", "learned_mlp", "--distance", "1", "--split", "1.0", "--set",
                       "epochs=3", "--out", str(art)] + (["--set", "past_input=true"] if past else [])) == 0
    prof = tmp_path / "cpu.yaml"
    assert calibrate_main(["--out", str(prof), "--device", "cpu", "--repeats", "1", "--geometries", "tiny",
                           "--predictors", "none"]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"ids": p}) for p in ([1, 5, 9, 3], [7, 2, 2, 8, 4])) + "\n")
    cfg = build_config({"trace": str(tmp_path), "max_sequences": 2, "max_decode_tokens": 4,
                        "cache": {"policy": "lru", "cache_rate": 0.25},
                        "prefetch": {"predictor": "learned_mlp", "distance": 1, "artifact": str(art),
                                     **({} if blocking is None else {"blocking": blocking})}})
    profile = load_profile(str(prof))
    # every prediction, keyed by what it was made from (layer, the hidden state's bytes)
    import threading

    from predictors.learned_mlp import LearnedMLPPredictor

    calls: list = []
    threads: set = set()
    predict = LearnedMLPPredictor.predict

    def logged(self, view, distance, future=None):
        threads.add(threading.current_thread().name)
        out = predict(self, view, distance, future)
        before = view.past_hidden(view.layer + distance).tobytes() if past else b""
        calls.append(((view.layer, view.hidden.tobytes(), before), tuple(out.experts.tolist())))
        return out

    monkeypatch.setattr(LearnedMLPPredictor, "predict", logged)
    row = run_live({"geometry": "small-moe", "prompts": str(prompts)}, cfg, profile, device="cpu",
                   model=copy.deepcopy(tiny_model), repeats=1)
    assert row["status"] == "ok" and isinstance(row["live_hidden"], str)
    assert row["real_prefetches"] > 0 and row["real_lookups"] == row["sim_lookups"]
    real = dict(calls)
    calls.clear()
    assert any(t.startswith("predictor") for t in threads) == (blocking is False)  # (and the simulator: main)
    # the row alone gives the simulation back, the predictor seeing exactly the states the live run fed it
    seqs, hidden = sequences_from_routing(row["live_routing"], row["live_hidden"])
    meta = LiveOffload(copy.deepcopy(tiny_model)).meta
    again = simulate_live(cfg, profile, "small-moe", meta, seqs, int(row["capacity_bytes"]), hidden,
                          live_predictor(cfg, art))
    assert again["prefetches"] == row["sim_prefetches"] and again["hits"] == row["sim_hits"]
    sim = dict(calls)
    assert len(sim) > 10 and all(real.get(k) == v for k, v in sim.items())
    if past:  # decode calls saw earlier positions' states, prompt calls zeros
        befores = {k[2] for k in sim}
        assert len(befores) > 2 and any(not np.frombuffer(b, np.float32).any() for b in befores)
    with pytest.raises(ValueError, match="hidden"):  # the predictor needs the states the row kept
        simulate_live(cfg, profile, "small-moe", meta, seqs, int(row["capacity_bytes"]), None,
                      live_predictor(cfg, art))
    # a trainable predictor without an artifact is refused (the run is reported as skipped)
    bare = build_config({**cfg.identity(), "prefetch": {"predictor": "learned_mlp", "distance": 1}})
    with pytest.raises(NotImplementedError, match="artifact"):
        run_live({"geometry": "small-moe", "prompts": str(prompts)}, bare, profile, device="cpu",
                 model=copy.deepcopy(tiny_model), repeats=1)
