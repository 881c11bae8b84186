"""The offloaded runtime on the CPU: outputs equal the all-resident reference for every policy and switch, cache
and slab invariants hold, and with prefetching off the hit/miss counts equal the simulator's (same cache code)."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")

from executor.geometry import get_geometry  # noqa: E402
from executor.model import BatchInputs, TraceWeights  # noqa: E402
from executor.replay import build_runtime, prepare  # noqa: E402
from sim.config import build_config  # noqa: E402
from sim.engine.schedule import demand_lookups, iter_batches  # noqa: E402
from sim.engine.synthetic import make_trace  # noqa: E402

POLICIES = ["lru", "lfu", "fifo", "belady", "static"]
RATES = [0.25, 0.5, 1.0]
PREDICTORS = ["none", "oracle", "previous_token"]
# (predictor, chunked, early preemption, reordered): every switch on and off at least once with every predictor
COMBOS = [
    ("none", False, False, False),
    ("none", True, True, True),
    ("oracle", True, True, True),
    ("oracle", False, False, True),
    ("previous_token", True, True, True),
    ("previous_token", False, True, False),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("exec") / "syn"
    # tiny geometry: 4 layers x 8 experts, top-2, hidden 32; expert bytes = 3 x 32 x 16 x 4 (fp32)
    return str(make_trace(d, n_layers=4, n_experts=8, top_k=2, n_sequences=2, prompt_len=6, decode_len=7,
                          expert_bytes=6144, hidden_size=32, seed=3))


def _cfg(trace_dir, policy="lru", rate=0.25, predictor="none", chunked=False, ep=False, ro=False, distance=1,
         **extra):
    raw = {"trace": trace_dir, "cache": {"policy": policy, "cache_rate": rate},
           "prefetch": {"predictor": predictor, "distance": distance}, "chunked_prefetch": chunked,
           "early_preemption": ep, "reordered_inference": ro, **extra}
    return build_config(raw)


def _policy_params(policy, setup, cfg):
    if policy == "static":  # a hot set fitted on the run's own lookups (an oracle static set, for the test)
        return {"profile": [list(k) for k in demand_lookups(setup.sequences, cfg.phase, cfg.batch_size)]}
    return {}


def _with_params(cfg, params):
    if params:
        cfg = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"policy_params": params})})
    return cfg


@pytest.fixture(scope="module")
def reference(trace_dir):
    """All-resident outputs of every batch (independent of policy and switches)."""
    geom = get_geometry("tiny")
    cfg = _cfg(trace_dir)
    setup = prepare(cfg, geom)
    rt = build_runtime(cfg, setup, device="cpu")
    tw = TraceWeights(setup.trace, setup.n_layers)
    outs = []
    for b in iter_batches(setup.sequences, cfg.phase, cfg.batch_size):
        outs.append(rt.model.reference_forward(BatchInputs(b, tw.for_batch(b), setup.n_layers, "cpu",
                                                           rt.model.dtype)))
    rt.engine.close()
    return outs


def _run(cfg, *, check=True, backend=None):
    geom = get_geometry("tiny")
    setup = prepare(cfg, geom)
    cfg = _with_params(cfg, _policy_params(cfg.cache.policy, setup, cfg))
    rt = build_runtime(cfg, setup, device="cpu", keep_outputs=True, check=check, transfer_backend=backend)
    m = rt.run()
    return rt, m, setup, cfg


def _assert_consistent(rt, m):
    assert m["hits"] + m["misses"] == m["lookups"]
    assert rt.cache.stats.hits + rt.cache.stats.misses == rt.cache.stats.lookups == m["lookups"]
    # ExpertCache counts a key inserted but still copying as resident; the runtime (as the simulator) calls it a
    # late prefetch, a miss
    assert m["hits"] <= rt.cache.stats.hits
    assert rt.max_used_bytes <= rt.cache.capacity_bytes
    assert rt.slab.used <= rt.n_slots
    assert m["prefetched_used"] <= m["prefetches"]
    assert m["demand_misses"] + m["n_prefetch_late"] == m["misses"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(x) for x in c))
def test_outputs_equal_reference(trace_dir, reference, policy, rate, combo):
    predictor, chunked, ep, ro = combo
    cfg = _cfg(trace_dir, policy, rate, predictor, chunked, ep, ro, distance=2 if ep else 1)
    rt, m, _, _ = _run(cfg)
    assert len(rt.outputs) == len(reference)
    for a, b in zip(rt.outputs, reference):
        assert torch.equal(a, b), "offloaded output differs from the all-resident reference"
    _assert_consistent(rt, m)
    assert rt.checks["slot_content_checks"] == m["lookups"]  # every computed expert's slot was checked


@pytest.mark.parametrize("switches", list(itertools.product(PREDICTORS, [False, True], [False, True], [False, True])),
                         ids=lambda c: "-".join(str(x) for x in c))
def test_every_switch_combination(trace_dir, reference, switches):
    predictor, chunked, ep, ro = switches
    rt, m, _, _ = _run(_cfg(trace_dir, "lru", 0.25, predictor, chunked, ep, ro), check=False)
    assert all(torch.equal(a, b) for a, b in zip(rt.outputs, reference))
    _assert_consistent(rt, m)
    if predictor == "none":
        assert m["prefetches"] == 0
    if predictor == "oracle":
        assert m["prefetches"] > 0


def _simulate(cfg, setup):
    from predictors.registry import make_predictor
    from sim.engine import Simulation
    from sim.hardware import CostModel, load_profile

    cost = CostModel(load_profile("h200"), setup.meta, chunks=cfg.prefetch.chunks if cfg.chunked_prefetch else 1)
    sim = Simulation(setup.meta, setup.sequences, cost, phase=cfg.phase, batch_size=cfg.batch_size,
                     cache_capacity_bytes=setup.capacity_bytes, cache_scope=cfg.cache.scope,
                     cache_policy=cfg.cache.policy, policy_params=cfg.cache.policy_params,
                     predictor=make_predictor(cfg.prefetch.predictor), distance=cfg.prefetch.distance,
                     chunked_prefetch=cfg.chunked_prefetch, early_preemption=cfg.early_preemption,
                     reordered_inference=cfg.reordered_inference, check=True)
    return sim, sim.run()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("rate,scope", [(0.25, "global"), (0.5, "global"), (1.0, "global"), (0.5, "per_layer")])
def test_counts_equal_simulator_without_prefetch(trace_dir, policy, rate, scope):
    cfg = _cfg(trace_dir, policy, rate, "none", chunked=True, ep=(rate == 0.25), ro=True)
    cfg = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"scope": scope})})
    rt, m, setup, cfg = _run(cfg, check=False)
    sim, sm = _simulate(cfg, setup)
    for k in ("lookups", "hits", "misses", "demand_misses", "demand_loads"):
        assert m[k] == sm[k], f"{k}: executor {m[k]} != simulator {sm[k]}"
    assert rt.cache.stats.as_dict() == sim.cache.stats.as_dict()
    assert sorted(rt.cache.resident) == sorted(sim.cache.resident)


def test_thread_backend_matches_reference(trace_dir, reference):
    """Real concurrency (a copy worker thread): timing-dependent counts, same outputs and invariants."""
    cfg = _cfg(trace_dir, "lru", 0.25, "oracle", True, True, True, distance=2)
    rt, m, _, _ = _run(cfg, check=True, backend="thread")
    assert all(torch.equal(a, b) for a, b in zip(rt.outputs, reference))
    _assert_consistent(rt, m)


def test_zero_capacity_streams_through_scratch(trace_dir, reference):
    cfg = _cfg(trace_dir, "lru", 0.0, "oracle", True, True, True)
    rt, m, _, _ = _run(cfg)
    assert rt.n_slots == 0 and m["hits"] == 0
    assert m["prefetches"] == 0  # a prefetch that cannot get a slot is skipped
    assert all(torch.equal(a, b) for a, b in zip(rt.outputs, reference))


def test_layers_subset_and_metrics(trace_dir):
    cfg = _cfg(trace_dir, "lru", 0.5, "previous_token", True, True, True)
    geom = get_geometry("tiny")
    setup = prepare(cfg, geom, layers=2)
    assert setup.n_layers == 2 and setup.meta.n_layers == 2
    rt = build_runtime(cfg, setup, device="cpu", check=True)
    m = rt.run()
    assert m["layer_steps"] == 2 * m["batches"]
    for k in ("hit_rate", "ttft_ms", "tpot_ms", "total_ms", "stall_ms", "bytes_h2d", "pcie_busy_frac"):
        assert k in m
    assert m["bytes_h2d"] == m["bytes_demand"] + m["bytes_prefetch"]
    assert "perf_counter" in m["timing"]
    # the host time behind the profile's predictor and per-transfer host costs, measured where it is spent
    m = build_runtime(_cfg(trace_dir, "lru", 0.5, "oracle", True, False, True), setup, device="cpu").run()
    assert m["prefetches"] and m["demand_loads"]
    assert m["host_predict_ms"] > 0 and m["host_prefetch_issue_ms"] > 0 and m["host_demand_issue_ms"] > 0
    assert m["host_predict_ms"] + m["host_prefetch_issue_ms"] + m["host_demand_issue_ms"] < m["total_ms"]
    assert m["host_expert_launch_ms"] > 0 and m["host_copy_wait_ms"] >= 0 and m["host_sync_wait_ms"] == 0  # (CPU)
    none = build_runtime(_cfg(trace_dir, "lru", 0.5), setup, device="cpu").run()
    assert none["host_predict_ms"] == none["host_prefetch_issue_ms"] == 0 and none["host_demand_issue_ms"] > 0
    # of which issuing chunk groups to the copy stream: every group issued once (no warm-up here), one per
    # unchunked transfer; chunked prefetches issue one group per chunk
    assert none["copy_issues"] == none["demand_loads"] and none["host_copy_issue_ms"] > 0
    assert m["copy_issues"] >= m["demand_loads"] + m["prefetches"] and m["host_copy_issue_ms"] > 0


def test_cpu_experts_refused(trace_dir):
    cfg = _cfg(trace_dir, "lru", 0.5, cpu_experts=True)
    with pytest.raises(NotImplementedError):
        _run(cfg)


def _instant_profile(tmp_path):
    """The H200 profile with a link a million times faster (every copy lands before the next thing happens) and
    free predictions."""
    import yaml

    from sim.hardware import load_profile

    raw = load_profile("h200").model_dump(mode="json")
    for table in ("pinned", "pageable"):
        if raw["h2d"].get(table):
            for p in raw["h2d"][table]["points"]:
                p["gbps"] = p["gbps"] * 1e6
    raw["name"] = "instant-link"
    # the executor's predictor cost is real time and its prediction is issued at the gate, before the experts
    raw["predictor_cost_us"] = {"default": 0.0}
    # and no host time per copy or per prefetcher call: the pump backend issues and lands a copy at once
    raw["h2d"]["issue_overhead_us"] = 0.0
    raw["demand_transfer_host_us"] = raw["prefetch_transfer_host_us"] = raw["prefetch_call_host_us"] = 0.0
    path = tmp_path / "instant.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_profile(str(path))


@pytest.mark.parametrize("policy", ["lru", "belady"])
@pytest.mark.parametrize("predictor,distance", [("oracle", 1), ("previous_token", 2), ("oracle", 2)])
@pytest.mark.parametrize("switches", [False, True])
def test_counts_equal_simulator_with_prefetch_on_an_instant_link(trace_dir, tmp_path, policy, predictor, distance,
                                                                 switches):
    """With copies that land at once (the simulator: a near-infinite link; the executor: the pump backend moving
    everything at each gate and wait), prefetching, the in-flight bound, touches, evictions and early preemption
    give the same counts on both sides: the same prefetcher and cache code make the same decisions."""
    from executor.validate import simulate

    cfg = _cfg(trace_dir, policy, 0.25, predictor, switches, switches, switches, distance=distance)
    geom = get_geometry("tiny")
    setup = prepare(cfg, geom)
    cfg = _with_params(cfg, _policy_params(policy, setup, cfg))
    rt = build_runtime(cfg, setup, device="cpu", check=False)
    # the simulator's copies land an instant after they start: before the gate (dense compute is longer), after
    # the gate's own decisions (same instant), before the next expert (its compute is longer)
    rt.pump_per_dense = rt.pump_per_expert = 10**9
    m = rt.run()
    sm = simulate(cfg, setup, _instant_profile(tmp_path), rt.n_slots * setup.meta.expert_bytes[0])
    for k in ("lookups", "hits", "misses", "demand_misses", "demand_loads", "prefetches", "prefetched_used",
              "n_prefetch_late", "n_prefetch_unused", "n_prefetch_dropped", "bytes_h2d"):
        assert m[k] == sm[k], f"{k}: executor {m[k]} != simulator {sm[k]}"


@pytest.mark.parametrize("backend", ["pump", "thread"])
@pytest.mark.parametrize("lookahead", [1, 2])
def test_asynchronous_copies_match_reference(trace_dir, reference, lookahead, backend):
    """The runtime with copies that land later on another thread (the CUDA backends' logic: completion seen by
    polling, waits on the copy's handle, several groups ahead; issued by the main thread or by a worker): same
    outputs, invariants hold."""
    from test_executor_parts import _AsyncCopier

    cfg = _cfg(trace_dir, "lru", 0.25, "oracle", True, True, True, distance=2)
    setup = prepare(cfg, get_geometry("tiny"))
    rt = build_runtime(cfg, setup, device="cpu", keep_outputs=True, check=True, transfer_backend=backend,
                       copier=_AsyncCopier(delay=0.0005), lookahead=lookahead)
    m = rt.run()
    assert all(torch.equal(a, b) for a, b in zip(rt.outputs, reference))
    _assert_consistent(rt, m)


@pytest.mark.parametrize("predictor", ["oracle", "previous_token"])
def test_predict_after_resident_experts(trace_dir, reference, predictor):
    """The GPU-friendly order (launch the resident experts, then predict) keeps outputs and invariants."""
    cfg = _cfg(trace_dir, "lru", 0.5, predictor, True, True, True, distance=2)
    setup = prepare(cfg, get_geometry("tiny"))
    rt = build_runtime(cfg, setup, device="cpu", keep_outputs=True, check=True)
    rt.predict_after_resident = True
    m = rt.run()
    assert all(torch.equal(a, b) for a, b in zip(rt.outputs, reference))
    _assert_consistent(rt, m)
    assert not rt._predict_pending and (m["prefetches"] > 0 or predictor != "oracle")


def test_trained_predictor_and_warmup_match_simulator(trace_dir, tmp_path):
    """A trainable predictor is fit exactly as `sim.run` fits it (training split, held-out sequences replayed) and
    warm-up batches are left out of the metrics on both sides: on an instant link every count agrees."""
    from executor.validate import simulate

    cfg = _cfg(trace_dir, "lru", 0.25, "learned_history", True, True, True, distance=1, warmup_batches=2)
    cfg = cfg.model_copy(update={"prefetch": cfg.prefetch.model_copy(update={"predictor_params": {"epochs": 2}})})
    setup = prepare(cfg, get_geometry("tiny"))
    assert setup.predictor is not None and setup.warmup_batches >= 2
    rt = build_runtime(cfg, setup, device="cpu", check=False)
    rt.pump_per_dense = rt.pump_per_expert = 10**9
    m = rt.run()
    sm = simulate(cfg, setup, _instant_profile(tmp_path), rt.n_slots * setup.meta.expert_bytes[0])
    assert m["batches"] == sm["batches"] > 0
    for k in ("lookups", "hits", "misses", "prefetches", "prefetched_used", "n_prefetch_unused", "bytes_h2d"):
        assert m[k] == sm[k], f"{k}: executor {m[k]} != simulator {sm[k]}"


@pytest.mark.parametrize("rate", [0.5, 1.0])
def test_grouped_resident_experts(trace_dir, reference, rate):
    """Batch-size-1 decode computes the leading resident experts of a layer as one group: the outputs still equal
    the all-resident reference, and every count equals the expert-by-expert run's."""
    cfg = _cfg(trace_dir, "lru", rate, "oracle", True, True, True, distance=1)
    setup = prepare(cfg, get_geometry("tiny"))
    runs = {}
    for group in (True, False):
        rt = build_runtime(cfg, setup, device="cpu", keep_outputs=True, check=True)
        rt.group_resident = group
        runs[group] = (rt, rt.run())
    rt, m = runs[True]
    assert rt.grouped_experts > 0 and runs[False][0].grouped_experts == 0
    assert all(torch.equal(a, b) for a, b in zip(rt.outputs, reference))
    for k in ("lookups", "hits", "misses", "demand_loads", "prefetches", "prefetched_used", "bytes_h2d"):
        assert m[k] == runs[False][1][k], k
    _assert_consistent(rt, m)


@pytest.mark.parametrize("predictor,distance", [("oracle", 2), ("previous_token", 2), ("previous_token", 1)])
def test_predictor_thread_matches_reference(trace_dir, reference, predictor, distance):
    """prefetch.blocking false: every prediction runs on the runtime's predictor thread (ProMoE's concurrent
    predictor) and is issued by the main thread when ready; outputs, cache and slab invariants are unchanged, no
    prediction is left behind, and the thread is stopped at the end of the run."""
    import sys
    import threading

    switch = sys.getswitchinterval()
    cfg = _cfg(trace_dir, "lru", 0.25, predictor, True, True, True, distance=distance)
    cfg = cfg.model_copy(update={"prefetch": cfg.prefetch.model_copy(update={"blocking": False})})
    setup = prepare(cfg, get_geometry("tiny"))
    rt = build_runtime(cfg, setup, device="cpu", keep_outputs=True, check=True)
    assert rt.predictor_thread
    threads = set()
    inner = rt.prefetcher.predict_at_gate

    def recorded(*args):
        threads.add(threading.current_thread().name)
        return inner(*args)

    rt.prefetcher.predict_at_gate = recorded
    m = rt.run()
    assert all(torch.equal(a, b) for a, b in zip(rt.outputs, reference))
    _assert_consistent(rt, m)
    assert threads and all(t.startswith("predictor") for t in threads)
    assert not rt._pred_jobs and rt._pred_pool is None
    assert sys.getswitchinterval() == switch  # restored
    assert m["predict_calls"] > 0 and m["host_predict_ms"] > 0
    if predictor == "oracle":
        assert m["prefetches"] > 0


def test_blocking_unset_keeps_the_inline_predictor(trace_dir):
    """Without prefetch.blocking the executor predicts at the gate on its main thread, as before."""
    cfg = _cfg(trace_dir, "lru", 0.25, "previous_token", distance=2)
    rt = build_runtime(cfg, prepare(cfg, get_geometry("tiny")), device="cpu")
    assert not rt.predictor_thread
    rt.run()
    assert rt._pred_pool is None


def test_learned_mlp_torch_backend_predicts_as_numpy(tmp_path):
    """executor.gpu_mlp: learned_mlp's predictions through its networks in torch (one row: a CUDA graph on a GPU;
    several rows, and everything here: eager) rank every expert as the numpy path does, so a replay issues the
    same prefetches; other predictors keep their own path."""
    from executor.gpu_mlp import GpuLearnedMLP, on_device
    from predictors.learned_mlp import LearnedMLPPredictor
    from predictors.registry import make_predictor
    from predictors.synthetic import make_trace as make_hidden_trace
    from predictors.views import HiddenSource, load_sequences
    from predictors.views import iter_batches as views_of
    from traces.reader import Trace

    d = make_hidden_trace(tmp_path / "h", "router", seed=0, n_sequences=12, prompt_len=4, gen_len=10, n_layers=4,
                          n_experts=8, top_k=2, hidden_size=16)
    cfg = build_config({"trace": str(d), "phase": "decode", "cache": {"policy": "lru", "cache_rate": 0.25},
                        "prefetch": {"predictor": "learned_mlp", "distance": 2, "predictor_params": {"epochs": 3}},
                        "chunked_prefetch": True, "early_preemption": True, "reordered_inference": True})
    setup = prepare(cfg, get_geometry("tiny"))
    assert type(setup.predictor) is LearnedMLPPredictor
    gpu = on_device(setup.predictor, "cpu")
    assert isinstance(gpu, GpuLearnedMLP) and on_device(setup.predictor, "cpu") is gpu
    # every network on the device before a run (on a GPU: its graph captured outside the timed runs)
    assert set(gpu._graphed) == {id(net) for net in setup.predictor._nets.values()} and gpu._graphed
    other = make_predictor("previous_token")
    assert on_device(other, "cpu") is other
    trace = Trace(d)
    rows = several = 0
    for b in views_of(load_sequences(trace), trace.meta, batch_size=1, source=HiddenSource(trace)):
        for layer in range(2):
            v = b.view(layer, with_hidden=True)
            want = setup.predictor.predict(v, 2).experts.tolist()
            assert gpu.predict(v, 2).experts.tolist() == want
            rows += len(v.hidden) == 1
            several += len(v.hidden) > 1
    assert rows and several
    runs = {}
    for backend in ("numpy", "torch"):
        rt = build_runtime(cfg, setup, device="cpu", check=True, keep_outputs=True, predictor_backend=backend)
        runs[backend] = (type(rt.prefetcher.predictor), rt.run(), rt.outputs)
    assert runs["numpy"][0] is LearnedMLPPredictor and runs["torch"][0] is GpuLearnedMLP
    for k in ("prefetches", "hits", "misses", "prefetched_used", "bytes_h2d"):
        assert runs["numpy"][1][k] == runs["torch"][1][k], k
    assert runs["numpy"][1]["prefetches"] > 0
    for a, b in zip(runs["numpy"][2], runs["torch"][2], strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="predictor_backend"):
        build_runtime(cfg, setup, device="cpu", predictor_backend="gpu")
