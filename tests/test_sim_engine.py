"""The SimPy engine: analytic cases, invariants under hypothesis, determinism, and the direction of each
ProMoE mechanism on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from predictors.base import Prediction, Predictor
from predictors.registry import make_predictor
from sim.engine import Simulation
from sim.engine.schedule import demand_lookups, iter_batches, layer_sets, load_sequences
from sim.engine.synthetic import make_trace
from sim.hardware import CostModel, load_profile
from traces.format import TraceMeta
from traces.reader import Trace
from traces.writer import write_trace

EXPERT_BYTES = 9_437_184  # a Qwen3-30B-A3B bf16 expert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Trace(make_trace(tmp_path_factory.mktemp("t") / "tiny", n_layers=4, n_experts=16, top_k=2, n_sequences=2,
                            prompt_len=6, decode_len=12, seed=1))


def build(trace, *, capacity_bytes, phase="both", policy="lru", predictor="none", chunked=False, chunks=3,
          ep=False, ro=False, distance=1, batch_size=1, top_n=None, max_inflight=None, check=True, cpu=False,
          profile="h200-quoted", record=False, engines=1):
    cost = CostModel(load_profile(profile), trace.meta, chunks=chunks if chunked else 1)
    cost.copy_engines = engines
    seqs = load_sequences(trace, phase, None, None)
    pred = make_predictor(predictor) if isinstance(predictor, str) else predictor
    return Simulation(trace.meta, seqs, cost, phase=phase, batch_size=batch_size, cache_capacity_bytes=capacity_bytes,
                      cache_policy=policy, predictor=pred, distance=distance, top_n=top_n,
                      max_inflight_bytes=max_inflight, chunked_prefetch=chunked, chunks=chunks, early_preemption=ep,
                      reordered_inference=ro, cpu_experts=cpu, trace=trace, check=check, record=record)


def analytic_parts(sim: Simulation):
    """(compute seconds, transfer seconds of one copy per lookup) summed over the schedule."""
    cost = sim.cost
    compute = xfer = 0.0
    for b in iter_batches(sim.sequences, sim.phase, sim.batch_size):
        cost.prepare(b.tokens)
        for layer, (ids, counts) in enumerate(layer_sets(b.experts)):
            compute += cost.dense_s[layer][b.tokens]
            for i, _ in enumerate(ids):
                compute += cost.expert_s[layer][counts[i] if counts is not None else 1]
                xfer += cost.xfer_s[layer]
    return compute, xfer


# -- (a) analytic cases ---------------------------------------------------------------------------------------
def test_all_resident_gives_compute_only_time(tiny):
    meta = tiny.meta
    sim = build(tiny, capacity_bytes=meta.total_expert_bytes(), predictor="oracle")
    assert sim.warm((layer, e) for layer in range(meta.n_layers) for e in range(meta.n_experts)) == \
        meta.n_layers * meta.n_experts
    m = sim.run()
    compute, _ = analytic_parts(sim)
    assert m["total_ms"] == pytest.approx(compute * 1e3, rel=1e-12)
    assert m["hit_rate"] == 1.0 and m["stall_ms"] == 0.0 and m["bytes_h2d"] == 0


@pytest.mark.parametrize("blocking", [False, True])
def test_blocking_predictor_is_on_the_compute_timeline(tiny, blocking):
    """Every expert resident: a predictor beside the stream costs nothing on it; a blocking one (the executor's:
    it predicts on the host at the gate, the GPU waiting) adds its cost once per layer whose target exists."""
    meta = tiny.meta
    cost_s, d = 1e-3, 2
    sim = Simulation(meta, load_sequences(tiny, "both", None, None), CostModel(load_profile("h200-quoted"), meta),
                     cache_capacity_bytes=meta.total_expert_bytes(), predictor=make_predictor("previous_token"),
                     distance=d, predictor_cost_s=cost_s, trace=tiny, check=True, predictor_blocking=blocking)
    sim.warm((layer, e) for layer in range(meta.n_layers) for e in range(meta.n_experts))
    m = sim.run()
    compute, _ = analytic_parts(sim)
    extra = m["batches"] * (meta.n_layers - d) * cost_s if blocking else 0.0
    assert m["total_ms"] == pytest.approx((compute + extra) * 1e3, rel=1e-9)
    assert m["bytes_h2d"] == 0


@pytest.mark.parametrize("blocking", [False, True])
def test_predictor_cost_grows_with_the_batch_tokens(tiny, blocking):
    """A call costs call + token x T (T: the batch's tokens, a whole prompt in prefill): a blocking predictor adds
    exactly that per layer whose target exists; beside the stream, each prediction is ready that much after its
    gate (the first call of a run, the predictor idle till then; the oracle names experts at every gate)."""
    meta = tiny.meta
    call_s, token_s, d = 1e-4, 3e-5, 1
    seqs = load_sequences(tiny, "both", None, None)
    sim = Simulation(meta, seqs, CostModel(load_profile("h200-quoted"), meta),
                     cache_capacity_bytes=meta.total_expert_bytes(), predictor=make_predictor("oracle"),
                     distance=d, predictor_cost_s=call_s, predictor_token_s=token_s, trace=tiny, check=True,
                     predictor_blocking=blocking)
    sim.warm((layer, e) for layer in range(meta.n_layers) for e in range(meta.n_experts))
    first = next(iter_batches(seqs, "both", 1))
    assert first.phase == "prefill" and first.tokens == 6
    pf = sim.prefetcher
    seen, free = [], []
    start_batch, predict_at_gate = pf.start_batch, pf.predict_at_gate

    def spy(batch):
        start_batch(batch)
        seen.append((batch.tokens, pf.cost_s))

    def spy_predict(layer, n_layers):
        free.append(pf.free_at)
        return predict_at_gate(layer, n_layers)

    pf.start_batch, pf.predict_at_gate = spy, spy_predict
    m = sim.run()
    assert seen[0] == (6, pytest.approx(call_s + 6 * token_s))  # the prompt: 6 tokens, one call per layer
    assert all(c == pytest.approx(call_s + t * token_s) for t, c in seen)
    compute, _ = analytic_parts(sim)
    tokens = sum(b.tokens for b in iter_batches(seqs, "both", 1))
    extra = (m["batches"] * call_s + tokens * token_s) * (meta.n_layers - d) if blocking else 0.0
    assert m["total_ms"] == pytest.approx((compute + extra) * 1e3, rel=1e-9)
    if not blocking:  # the first prediction: ready at the first gate (after layer 0's dense part) + its cost
        assert free[1] == pytest.approx(sim.cost.dense_s[0][6] + call_s + 6 * token_s, rel=1e-12)


def test_prefetch_call_cost_is_charged_once_per_call(tiny):
    """Every expert resident: the oracle's calls issue no copy, yet each costs the profile's
    prefetch_call_host_us on the compute timeline (the executor ranks and refreshes on its host at the gate)."""
    meta = tiny.meta
    call_us, d = 1000.0, 1
    prof = load_profile("h200-quoted").model_copy(update={"prefetch_call_host_us": call_us})
    sim = Simulation(meta, load_sequences(tiny, "both", None, None), CostModel(prof, meta),
                     cache_capacity_bytes=meta.total_expert_bytes(), predictor=make_predictor("oracle"),
                     distance=d, trace=tiny, check=True, predictor_blocking=True)
    sim.warm((layer, e) for layer in range(meta.n_layers) for e in range(meta.n_experts))
    m = sim.run()
    compute, _ = analytic_parts(sim)
    extra = m["batches"] * (meta.n_layers - d) * call_us * 1e-6
    assert m["prefetches"] == 0 and m["total_ms"] == pytest.approx((compute + extra) * 1e3, rel=1e-9)


@pytest.mark.parametrize("table_us", [None, 300.0])
def test_demand_host_cost_of_the_matching_expert_table(tiny, table_us):
    """Every lookup a demand load: each costs the host's issue time before its copy starts, the value of the
    expert table of exactly the trace's geometry when it has one (sim.hardware.transfer_host_us), else the
    profile's top-level one."""
    meta = tiny.meta
    prof = load_profile("h200-quoted").model_copy(update={"demand_transfer_host_us": 100.0})
    tables = [t.model_copy(update={"demand_transfer_host_us": table_us}) if t.expert_bytes == EXPERT_BYTES
              and t.hidden == meta.hidden_size else t for t in prof.expert_compute]
    prof = prof.model_copy(update={"expert_compute": tables})
    sim = Simulation(meta, load_sequences(tiny, "both", None, None), CostModel(prof, meta), cache_capacity_bytes=0,
                     predictor=make_predictor("none"), trace=tiny, check=True)
    assert "exact" in sim.cost.geometry[0]
    m = sim.run()
    compute, xfer = analytic_parts(sim)
    host_s = (100.0 if table_us is None else table_us) * 1e-6
    assert m["hits"] == 0
    assert m["total_ms"] == pytest.approx((compute + xfer + m["lookups"] * host_s) * 1e3, rel=1e-12)


@pytest.mark.parametrize("capacity", [0, EXPERT_BYTES - 1])
def test_empty_cache_no_prefetch_is_sum_of_transfers_and_compute(tiny, capacity):
    sim = build(tiny, capacity_bytes=capacity)
    m = sim.run()
    compute, xfer = analytic_parts(sim)
    assert m["hits"] == 0
    assert m["total_ms"] == pytest.approx((compute + xfer) * 1e3, rel=1e-12)
    assert m["stall_ms"] == pytest.approx(xfer * 1e3, rel=1e-12)
    assert m["bytes_h2d"] == m["lookups"] * EXPERT_BYTES


def test_lookup_stream_matches_sim_access(tiny):
    from sim.access import lookup_stream

    for phase in ("prefill", "decode", "both"):
        for bs in (1, 2):
            ours = demand_lookups(load_sequences(tiny, phase, None, None), phase, bs)
            theirs = lookup_stream(tiny, phase=phase, batch_size=bs).key_tuples()
            assert ours == theirs, (phase, bs)


# -- (b) invariants under hypothesis ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cap_experts=st.integers(0, 40),
    policy=st.sampled_from(["lru", "fifo", "lfu", "belady"]),
    predictor=st.sampled_from(["none", "oracle", "previous_token"]),
    chunked=st.booleans(), ep=st.booleans(), ro=st.booleans(), cpu=st.booleans(),
    distance=st.integers(1, 2), batch_size=st.integers(1, 2),
    phase=st.sampled_from(["prefill", "decode", "both"]),
    inflight=st.sampled_from([None, 3 * EXPERT_BYTES]),
    engines=st.sampled_from([1, 1, 2]),
)
def test_engine_invariants(tiny, cap_experts, policy, predictor, chunked, ep, ro, cpu, distance, batch_size, phase,
                           inflight, engines):
    sim = build(tiny, capacity_bytes=cap_experts * EXPERT_BYTES, policy=policy, predictor=predictor,
                chunked=chunked, ep=ep, ro=ro, cpu=cpu, distance=distance, batch_size=batch_size, phase=phase,
                max_inflight=inflight, check=True, engines=engines)  # check: capacity, resident when computed
    m = sim.run()
    cache = sim.cache
    assert sim.max_used_bytes <= cache.capacity_bytes and cache.used_bytes <= cache.capacity_bytes
    assert m["hits"] + m["misses"] == m["lookups"] == cache.stats.lookups
    assert m["misses"] == m["demand_misses"] + m["n_prefetch_late"]
    assert m["prefetched_used"] + m["n_prefetch_unused"] == m["prefetches"]
    assert m["bytes_h2d"] == m["bytes_demand"] + m["bytes_prefetch"]
    # every transfer moved whole chunks of its expert; finished ones all of it
    assert m["bytes_demand"] <= m["demand_loads"] * EXPERT_BYTES
    assert m["bytes_prefetch"] <= m["prefetches"] * EXPERT_BYTES
    if predictor == "none":
        assert m["prefetches"] == 0
        if not cpu:  # every demand load completes before its layer goes on
            assert m["bytes_demand"] == m["demand_loads"] * EXPERT_BYTES
            assert m["demand_loads"] == m["demand_misses"]
    assert m["layer_steps"] == m["batches"] * tiny.meta.n_layers
    assert 0.0 <= m["pcie_busy_frac"] <= engines + 1e-9
    assert m["stall_ms"] <= m["total_ms"] + 1e-9
    assert not sim.inflight or all(not t.finished for t in sim.inflight.values())


# -- (f) determinism -------------------------------------------------------------------------------------------------
def test_same_config_same_metrics(tiny):
    kw = dict(capacity_bytes=6 * EXPERT_BYTES, predictor="oracle", chunked=True, ep=True, ro=True)
    a = build(tiny, **kw).run()
    b = build(tiny, **kw).run()
    assert a == b


# -- the mechanisms, each in its expected direction --------------------------------------------------------------
def _trace(tmp_path, name, experts, *, n_experts=16, phase="decode", expert_bytes=EXPERT_BYTES):
    """experts: int [P, L, k] of one sequence."""
    experts = np.asarray(experts)
    P, L, k = experts.shape
    meta = TraceMeta(model="constructed", source="test", n_layers=L, n_experts=n_experts, top_k=k,
                     expert_bytes=[expert_bytes] * L, hidden_size=2048, dtype="bf16", license="CC0",
                     attribution="test")
    pos = np.repeat(np.arange(P), L)
    return Trace(write_trace(tmp_path / name, meta, sequence=np.zeros(P * L, int), phase=np.array([phase] * (P * L)),
                             position=pos, layer=np.tile(np.arange(L), P), experts=experts.reshape(P * L, k),
                             weights=np.full((P * L, k), 1.0 / k)))


class WrongPredictor(Predictor):
    """Predicts experts no token uses (the upper half of the ids; the constructed traces use the lower half),
    rotating with position and layer."""

    name = "wrong"

    def __init__(self, n=4):
        self.n = n

    def predict(self, view, distance, future=None):
        half = view.meta.n_experts // 2
        start = (int(view.positions[0]) * 3 + view.layer) % half
        ids = half + (start + np.arange(self.n)) % half
        return Prediction(ids, np.ones(len(ids)))


def test_early_preemption_pipelines_misses(tmp_path):
    rng = np.random.default_rng(0)
    experts = np.stack([np.stack([rng.choice(8, 4, replace=False) for _ in range(6)]) for _ in range(10)])
    tr = _trace(tmp_path, "ep", experts)
    base = build(tr, capacity_bytes=0).run()
    ep = build(tr, capacity_bytes=0, ep=True).run()
    assert ep["total_ms"] < base["total_ms"] and ep["stall_ms"] < base["stall_ms"]
    assert ep["bytes_h2d"] == base["bytes_h2d"]


def test_early_preemption_drops_wrong_speculation(tmp_path):
    rng = np.random.default_rng(1)
    experts = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(6)]) for _ in range(10)])
    tr = _trace(tmp_path, "drop", experts)
    cap = 12 * EXPERT_BYTES
    base = build(tr, capacity_bytes=cap, predictor=WrongPredictor(6)).run()
    ep = build(tr, capacity_bytes=cap, predictor=WrongPredictor(6), ep=True).run()
    assert base["n_prefetch_dropped"] == 0 and ep["n_prefetch_dropped"] > 0
    assert ep["prefetch_precision"] == base["prefetch_precision"] == 0.0
    assert ep["stall_ms"] < base["stall_ms"] and ep["total_ms"] < base["total_ms"]


def test_reordered_inference_computes_resident_first(tmp_path):
    # one prefill batch; the odd experts are resident, the even ones must be copied
    experts = np.array([[[e, (e + 1) % 8] for _ in range(3)] for e in range(8)])  # [P=8, L=3, k=2]
    tr = _trace(tmp_path, "ro", experts, phase="prefill")
    out = {}
    for ro in (False, True):
        sim = build(tr, capacity_bytes=64 * EXPERT_BYTES, phase="prefill", ep=True, ro=ro)
        sim.warm((layer, e) for layer in range(3) for e in (1, 3, 5, 7))
        out[ro] = sim.run()
    assert out[True]["total_ms"] < out[False]["total_ms"]
    assert out[True]["stall_ms"] < out[False]["stall_ms"]
    assert out[True]["hits"] == out[False]["hits"]


def test_chunking_bounds_the_wait_behind_a_prefetch(tmp_path):
    rng = np.random.default_rng(2)
    experts = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(6)]) for _ in range(10)])
    tr = _trace(tmp_path, "chunk", experts, expert_bytes=64 * EXPERT_BYTES)  # big experts: long copies
    cap = 10**12
    kw = dict(capacity_bytes=cap, predictor=WrongPredictor(2))
    whole = build(tr, **kw).run()
    chunked = build(tr, chunked=True, chunks=4, **kw).run()
    assert chunked["stall_ms"] < whole["stall_ms"]
    assert chunked["total_ms"] < whole["total_ms"]


def test_oracle_rank_layers_equals_predict():
    """The prefetcher asks the oracle once per batch (rank_layers); each layer's answer is predict()'s."""
    from types import SimpleNamespace

    oracle = make_predictor("oracle")
    rng = np.random.default_rng(3)
    meta = SimpleNamespace(n_experts=16)
    cases = [np.array([[rng.permutation(16)[:4] for _ in range(5)]]), rng.choice(16, (1, 5, 4)),
             rng.integers(-1, 16, (1, 5, 4)), rng.integers(0, 4, (1, 5, 4)),
             rng.integers(-1, 16, (4, 5, 4)), rng.integers(0, 16, (40, 5, 4))]
    for experts in cases:
        experts = experts.astype(np.int16)
        ranked = oracle.rank_layers(experts)
        for layer in range(5):
            view = SimpleNamespace(layer=layer - 1, meta=meta)
            want = oracle.predict(view, 1, lambda la, e=experts: e[:, la, :]).experts.tolist()
            assert ranked[layer] == want


def _link_landings(lookahead: int) -> dict:
    """A prefetch of 3 chunks (1 s each) starts at 0; a one-chunk demand load arrives at 0.5. Landing times."""
    import simpy

    from sim.engine.link import Link, Transfer

    env = simpy.Environment()
    landed = {}
    link = Link(env, 1, lambda t: landed.__setitem__("demand" if t.high else "prefetch", env.now), lookahead=lookahead)
    link.submit(Transfer((0, 0), 300, 3, 1.0, False, True, True, 0))

    def demand():
        yield env.timeout(0.5)
        link.submit(Transfer((0, 1), 100, 1, 1.0, True, False, True, 1))

    env.process(demand())
    env.run()
    return landed


def test_link_lookahead_commits_chunks_ahead_of_a_demand_load():
    # lookahead 1: the demand load waits for the chunk in flight only (0..1), copies 1..2, the prefetch resumes
    assert _link_landings(1) == {"demand": 2.0, "prefetch": 4.0}
    # lookahead 2: one more chunk of the prefetch was already committed: it waits until 2, copies 2..3
    assert _link_landings(2) == {"demand": 3.0, "prefetch": 4.0}
    # lookahead 3: the whole prefetch was committed
    assert _link_landings(3) == {"prefetch": 3.0, "demand": 4.0}


def _group_landing(high: bool, upgrade_at: float | None = None) -> float:
    """One transfer of 3 chunks of 1 s each, 0.25 s of which is the issue overhead of a chunk group; its landing."""
    import simpy

    from sim.engine.link import Link, Transfer

    env = simpy.Environment()
    landed = []
    link = Link(env, 1, lambda t: landed.append(env.now), issue_s=0.25)
    t = Transfer((0, 0), 300, 3, 1.0, high, not high, True, 0)
    link.submit(t)
    if upgrade_at is not None:
        def up():
            yield env.timeout(upgrade_at)
            link.upgrade(t)

        env.process(up())
    env.run()
    return landed[0]


def test_link_issue_overhead_once_per_chunk_group():
    # the executor (executor.transfer) hands a demand load's chunks to the copy stream as one group and a
    # prefetch's one chunk at a time; h2d.issue_overhead_us is link time lost per chunk group
    assert _group_landing(high=False) == 3.0  # three groups: three issue overheads
    assert _group_landing(high=True) == 2.5  # one group: one issue overhead (3 x 1 - 2 x 0.25)
    # a prefetch upgraded while its first chunk moves: that chunk lands at 1, the other two go as one group
    assert _group_landing(high=False, upgrade_at=0.5) == 2.75


def test_profile_lookahead_default_and_validation(tiny, tmp_path):
    import yaml

    from sim.hardware import PROFILES_DIR
    from traces.errors import TraceError

    raw = yaml.safe_load((PROFILES_DIR / "h200-quoted.yaml").read_text())
    runs = {}
    for la in (None, 1, 2):
        prof = {**raw, "h2d": {**raw["h2d"], **({} if la is None else {"lookahead": la})}}
        path = tmp_path / f"la{la}.yaml"
        path.write_text(yaml.safe_dump(prof))
        runs[la] = build(tiny, capacity_bytes=4 * EXPERT_BYTES, predictor=WrongPredictor(2), chunked=True,
                         profile=str(path)).run()
    assert runs[1] == runs[None]  # lookahead 1 is today's link exactly
    assert runs[2]["stall_ms"] > runs[None]["stall_ms"]  # demand loads wait behind committed chunks
    prof = {**raw, "h2d": {**raw["h2d"], "lookahead": 0}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(prof))
    with pytest.raises(TraceError, match="lookahead"):
        load_profile(str(tmp_path / "bad.yaml"))


def test_cpu_experts_path(tiny):
    sim = build(tiny, capacity_bytes=2 * EXPERT_BYTES, cpu=True, phase="decode")
    m = sim.run()
    assert m["cpu_experts_computed"] > 0
    assert m["hits"] + m["misses"] == m["lookups"]


def test_timeline_and_chrome_trace(tiny, tmp_path):
    import json

    import pandas as pd

    from sim.timeline import write_chrome_trace, write_timeline

    sim = build(tiny, capacity_bytes=4 * EXPERT_BYTES, predictor="oracle", chunked=True, record=True)
    m = sim.run()
    tl = pd.read_parquet(write_timeline(sim, tmp_path / "tl.parquet"))
    assert len(tl) == m["batches"]
    assert math.isclose(tl["end_ms"].iloc[-1], m["total_ms"], rel_tol=1e-12)
    doc = json.loads(write_chrome_trace(sim, tmp_path / "trace.json").read_text())
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {e["cat"] for e in xs} >= {"dense", "expert", "prefetch", "demand"}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in xs)


# -- (d) the engine's LRU equals the miss-ratio curve (gate semantics) on the public traces ------------------------
TRACES = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "traces"


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "gemma-4-26b-a4b"])
def test_engine_lru_hits_equal_mrc(name):
    """No prefetch, global LRU in bytes: the engine's hits equal sim.mrc's (one-pass curve and its replay) at 1000
    and 4000 MiB, because the engine touches a layer's experts in first-occurrence order at the layer's end."""
    from sim import mrc
    from sim.access import lookup_stream
    from sim.cache import ExpertCache

    path = TRACES / name
    if not path.exists():
        pytest.skip("embedded public traces missing")
    trace = Trace(path)
    stream = lookup_stream(trace)
    seqs = load_sequences(trace, "both", None, None)
    caps = [ExpertCache.resolve_capacity_bytes(expert_bytes=trace.meta.expert_bytes, n_experts=trace.meta.n_experts,
                                               capacity_mib=mib) for mib in (1000, 4000)]
    curve = mrc.compute_mrc(stream, ["lru"], unit="bytes", capacities=caps)["policies"]["lru"]
    for cap in caps:
        cost = CostModel(load_profile("h200-quoted"), trace.meta)
        m = Simulation(trace.meta, seqs, cost, phase="both", cache_capacity_bytes=cap, cache_policy="lru",
                       predictor=make_predictor("none"), trace=trace).run()
        assert m["lookups"] == len(stream)
        assert m["hits"] == mrc.simulate_hits(stream, "lru", cap, unit="bytes")
        assert m["hits"] == round(mrc.hit_rate_at(curve, cap) * len(stream))


# -- hot-path shortcuts give exactly what the plain code gives ---------------------------------------------------
def test_oracle_small_path_equals_lexsort_ranking():
    """The oracle's few-token path (Python counting) ranks exactly as the lexsort over all experts did."""
    from types import SimpleNamespace

    rng = np.random.default_rng(5)
    oracle = make_predictor("oracle")
    meta = SimpleNamespace(n_experts=16)
    for _ in range(300):
        T, k = int(rng.integers(1, 10)), int(rng.integers(1, 5))
        target = rng.integers(-1, 16, size=(T, k)).astype(np.int16)
        p = oracle.predict(SimpleNamespace(layer=0, meta=meta), 1, lambda layer, t=target: t)
        ids = target[target >= 0].astype(np.int64)
        counts = np.bincount(ids, minlength=16).astype(np.float64)
        order = np.lexsort((np.arange(16), -counts))
        order = order[counts[order] > 0]
        assert p.experts.dtype == np.int64 and p.scores.dtype == np.float64
        assert np.array_equal(p.experts, order) and np.array_equal(p.scores, counts[order])


def test_make_view_equals_batchview():
    import dataclasses

    from predictors.base import BatchView
    from sim.engine.prefetcher import make_view

    base = {"meta": "m", "sequences": np.arange(2), "positions": np.arange(2), "past": {}, "phase": "decode",
            "router_weights": None}
    cur = np.zeros((2, 3, 2), np.int16)
    v = make_view(base, 2, cur, None)
    w = BatchView(layer=2, current=cur, hidden=None, **base)
    assert type(v) is BatchView
    for f in dataclasses.fields(BatchView):
        assert getattr(v, f.name) is getattr(w, f.name), f.name


# -- the executor's launch-bound refinements (profile fields group_ms and kernel_ms) ----------------------------
def _refined_profile(tmp_path, group_ms=None, kernel_ms=None):
    import yaml

    raw = yaml.safe_load(open("profiles/h200-quoted.yaml"))
    for t in raw["expert_compute"]:
        if t["hidden"] == 2048 and t["intermediate"] == 768:  # EXPERT_BYTES at hidden 2048: the exact table
            if group_ms is not None:
                t["group_ms"] = group_ms
            if kernel_ms is not None:
                t["kernel_ms"] = [kernel_ms] * len(t["tokens"])
    path = tmp_path / "refined.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_resident_group_costs_group_ms_per_expert(tmp_path):
    """Every expert resident, one token per batch: a layer of n >= 2 experts costs dense + n x group_ms instead of
    the per-expert table (the executor computes them as one group); a layer of one expert is not grouped."""
    rng = np.random.default_rng(3)
    experts = np.stack([np.stack([rng.choice(8, 4, replace=False) for _ in range(3)]) for _ in range(5)])
    experts[:, 2, 1:] = experts[:, 2, :1]  # layer 2: one expert per token (a duplicate id is one lookup)
    tr = _trace(tmp_path, "grp", experts)
    group_ms = 0.01
    out = {}
    for name, prof in (("plain", "h200-quoted"), ("group", _refined_profile(tmp_path, group_ms=group_ms))):
        sim = build(tr, capacity_bytes=64 * EXPERT_BYTES, profile=prof)
        sim.warm((layer, e) for layer in range(3) for e in range(8))
        out[name] = (sim.run(), sim)
    m, sim = out["group"]
    cost = sim.cost
    dense = sum(cost.dense_s[layer][1] for layer in range(3))
    expect = 5 * (dense + 2 * 4 * group_ms * 1e-3 + cost.expert_s[2][1])
    assert m["total_ms"] == pytest.approx(expect * 1e3, rel=1e-9)
    assert m["total_ms"] < out["plain"][0]["total_ms"] and m["hits"] == out["plain"][0]["hits"]


def test_launches_overlap_the_wait_for_a_copy(tmp_path):
    """An empty cache, no prefetch: each expert waits for its copy, during which its launches run, so after the
    copy only max(kernel_ms, ms - wait) is left (here the kernels: the wait is longer than the launches)."""
    tr = _trace(tmp_path, "ovl", np.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]]))
    kernel_ms = 0.005
    plain = build(tr, capacity_bytes=0).run()
    sim = build(tr, capacity_bytes=0, profile=_refined_profile(tmp_path, kernel_ms=kernel_ms))
    m = sim.run()
    cost = sim.cost
    n = m["lookups"]
    assert cost.xfer_s[0] > cost.expert_s[0][1]  # the wait outlasts the launches
    expect = plain["total_ms"] - n * (cost.expert_s[0][1] - kernel_ms * 1e-3) * 1e3
    assert m["total_ms"] == pytest.approx(expect, rel=1e-9)
    assert m["stall_ms"] == pytest.approx(plain["stall_ms"], rel=1e-12)


def test_kernel_ms_must_match_the_tokens(tmp_path):
    import yaml

    from traces.errors import TraceError

    raw = yaml.safe_load(open(_refined_profile(tmp_path, kernel_ms=0.01)))
    raw["expert_compute"][1]["kernel_ms"] = [0.01]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(TraceError, match="kernel_ms"):
        load_profile(str(bad))


def test_group_then_each_charges_the_leading_full_experts_as_a_group():
    from sim.engine.core import group_then_each, leading_group

    es = [0.0, 1.0, 2.0, 3.0, 4.0]  # by tokens
    # T = 4: experts 1 and 2 take every token (a group), 3 takes two, 4 every token but after it (alone)
    cnt = {1: 4, 2: 4, 3: 2, 4: 4}
    assert group_then_each(10.0, [1, 2, 3, 4], cnt, 4, es, 0.5) == 10.0 + 2 * 0.5 + (2.0 + 4.0)
    # one leading full expert is not a group
    assert group_then_each(0.0, [3, 1], cnt, 4, es, 0.5) == 2.0 + 4.0
    assert leading_group([1, 2, 4], {e: ("k", e) for e in cnt}, {("k", 1), ("k", 2)}, cnt, 4) == 2


def _with_copy_issue(sim: Simulation, us: float) -> Simulation:
    """The same simulation with copy_issue_host_us set (a profile that measured the copy issue apart)."""
    sim.cost.copy_issue_host_s = us * 1e-6
    sim.link.issue_host_s = us * 1e-6
    return sim


def test_copy_issue_on_an_idle_link_delays_each_demand_load(tiny):
    """Reactive LRU with a small cache: every demand load finds the link idle (the stream waited for the last
    one), so the host issues its copy before it can start: the run takes exactly that much longer per load, and
    the simulator counts it as copy-issue host time."""
    kw = dict(capacity_bytes=4 * EXPERT_BYTES, phase="decode")
    base = build(tiny, **kw).run()
    sim = _with_copy_issue(build(tiny, **kw), 50.0)
    m = sim.run()
    assert m["demand_loads"] == base["demand_loads"] > 0 and m["hits"] == base["hits"]
    assert m["total_ms"] - base["total_ms"] == pytest.approx(m["demand_loads"] * 0.050, rel=1e-6)
    assert sim.c.host_copy_issue_s == pytest.approx(m["demand_loads"] * 50e-6)


def test_copy_issue_of_queued_groups_is_paid_by_the_stream(tiny):
    """Chunked prefetching: a speculative copy moves one chunk group at a time, each issued by the host; the groups
    not issued in a submit are paid at the stream's next sync (or dropped while it waits for a copy), so the run
    gets slower and the charged issue time covers more groups than the submits alone."""
    kw = dict(capacity_bytes=8 * EXPERT_BYTES, phase="decode", predictor="oracle", chunked=True, ep=True, ro=True)
    base = build(tiny, **kw).run()
    sim = _with_copy_issue(build(tiny, **kw), 50.0)
    m = sim.run()
    assert m["prefetches"] > 0 and m["total_ms"] > base["total_ms"]
    assert sim.c.host_copy_issue_s > 0
    assert sim.link.issue_debt == 0 and sim.link.submit_debt == 0  # nothing left unpaid at the end


def _overlap_profile(tmp_path, name, overlap, kernel_ms=None):
    import yaml

    raw = yaml.safe_load(open(_refined_profile(tmp_path, kernel_ms=kernel_ms)))
    raw["copy_compute_overlap"] = overlap
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_copy_slows_the_kernels_not_the_host_launches(tmp_path):
    """copy_compute_overlap < 1 slows an expert that computes while a copy moves. Where the kernels' own times are
    known (kernel_ms) it is the kernel that slows: an expert takes max(its time, kernel x penalty), so a
    launch-bound expert (kernel x penalty under its host-floored time) is not slowed; without kernel_ms the whole
    time is multiplied, as before."""
    rng = np.random.default_rng(5)
    experts = np.stack([np.stack([rng.choice(16, 2, replace=False) for _ in range(4)]) for _ in range(12)])
    tr = _trace(tmp_path, "busy", experts)
    runs = {}
    for name, overlap, kernel in (("ref", 1.0, 0.001), ("launch_bound", 0.5, 0.001), ("kernel_bound", 0.5, 1.0),
                                  ("no_kernel", 0.5, None)):
        prof = _overlap_profile(tmp_path, name, overlap, kernel)
        sim = build(tr, capacity_bytes=40 * EXPERT_BYTES, profile=prof, predictor="oracle", chunked=True, ep=True,
                    ro=True)
        runs[name] = sim.run()
        cost = CostModel(load_profile(prof), tr.meta)
        cost.prepare(4)
        es, kb = cost.expert_s[0], cost.kernel_busy_s[0]
        if kernel is None:
            assert kb is None and cost.expert_busy_s[0] == pytest.approx([x * 1.5 for x in es])
        else:
            assert cost.expert_busy_s[0][1:] == pytest.approx([max(x, kernel * 1e-3 * 1.5) for x in es[1:]])
    assert runs["ref"]["prefetches"] > 0 and runs["ref"]["hits"] > 0  # experts computed while copies moved
    # launch-bound: only what is left of an expert after waiting for its copy (its kernel, 0.001 ms) can slow
    ref, lb = runs["ref"]["total_ms"], runs["launch_bound"]["total_ms"]
    assert ref <= lb <= ref + runs["ref"]["lookups"] * 0.0005 + 1e-9
    assert runs["kernel_bound"]["total_ms"] > runs["ref"]["total_ms"]
    assert runs["no_kernel"]["total_ms"] > runs["ref"]["total_ms"]


# -- predictions that were never issued (GoodPred's fetch rate counts them against the predictor's timeliness) ----
def test_unissued_predictions_count_when_the_batch_then_misses_them(tiny):
    """With no cache slot to copy into (capacity 0) the oracle issues nothing and every lookup misses: each demand
    miss at a layer it predicts (>= d) is a correct prediction never issued, and layer 0, never a target, adds
    none. An in-flight bound smaller than one expert also leaves predictions unissued; without the bound none
    is. The fetch rate divides by both kinds of useful prediction."""
    from predictors.goodpred import fetch_rate

    meta = tiny.meta
    zero = build(tiny, capacity_bytes=0, predictor="oracle", distance=2)
    missed = {}
    gate = zero.cache.lookup_layer

    def spy(keys, touched, all_resident):  # every lookup misses here: count them by layer
        for k in keys:
            missed[k[0]] = missed.get(k[0], 0) + 1
        return gate(keys, touched, all_resident)

    zero.cache.lookup_layer = spy
    m = zero.run()
    assert m["prefetches"] == 0 and m["hits"] == 0 and m["demand_misses"] == sum(missed.values())
    assert m["n_prefetch_not_issued"] == m["demand_misses"] - missed[0] - missed[1] > 0
    assert fetch_rate(m) == 0.0
    cap = meta.total_expert_bytes() // 4
    bound = build(tiny, capacity_bytes=cap, predictor="oracle", max_inflight=1).run()
    assert bound["prefetches"] == 0 and 0 < bound["n_prefetch_not_issued"] <= bound["demand_misses"]
    free = build(tiny, capacity_bytes=cap, predictor="oracle").run()
    assert free["n_prefetch_not_issued"] == 0 and free["prefetched_used"] > 0
    assert fetch_rate({"prefetched_used": 10, "n_prefetch_late": 3, "n_prefetch_not_issued": 5}) == \
        pytest.approx(7 / 15)


def test_predictions_ready_after_their_gate_count_as_unissued(tiny):
    """A predictor beside the stream that takes longer than a layer: most of its predictions arrive after their
    target gate and are dropped; those the batch missed there (recorded for this batch and the one before) are
    counted. (A layer that stalls on its demand loads lets a few arrive in time.)"""
    meta = tiny.meta
    cap = meta.total_expert_bytes() // 4
    layer_s = build(tiny, capacity_bytes=cap).run()
    layer_s = layer_s["total_ms"] * 1e-3 / layer_s["layer_steps"]
    sim = Simulation(meta, load_sequences(tiny, "both", None, None), CostModel(load_profile("h200-quoted"), meta),
                     cache_capacity_bytes=cap, predictor=make_predictor("oracle"), distance=1,
                     predictor_cost_s=1.5 * layer_s, trace=tiny, check=True)
    m = sim.run()
    assert m["prefetches"] < m["n_prefetch_not_issued"] <= m["demand_misses"]
