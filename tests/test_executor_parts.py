"""Executor parts on the CPU: geometry presets, the memory fit check, the transfer engine's queue semantics,
the host store and slab, the scheduling decisions."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from executor.buffers import HostExpertStore, SlotPool, chunk_ranges, expert_matrices  # noqa: E402
from executor.geometry import (  # noqa: E402
    PRESETS,
    geometry_from_hf_config,
    get_geometry,
    parse_geometry_overrides,
    resolve_geometry,
)
from executor.memory import GIB, FitError, arena_layout, check_fit, plan_memory  # noqa: E402
from executor.transfer import Transfer, TransferEngine  # noqa: E402
from sim.engine.decisions import compute_order, early_preemption_plan, expert_state  # noqa: E402
from traces.errors import TraceError  # noqa: E402
from traces.format import TraceMeta  # noqa: E402


# -- geometry -----------------------------------------------------------------------------------------------------
def test_presets_published_shapes():
    q = get_geometry("qwen3-30b-a3b")
    assert (q.hidden, q.moe_intermediate, q.n_layers, q.n_experts, q.top_k) == (2048, 768, 48, 128, 8)
    assert q.expert_bytes == 3 * 2048 * 768 * 2 == 9_437_184
    assert q.matrix_bytes * 3 == q.expert_bytes
    assert abs(q.dense_bytes[0] / 1e6 - 38.27) < 0.01  # q/k/v/o (32 / 4 heads x 128) + router, bf16
    g = get_geometry("gemma-4-26b-a4b")
    assert (g.hidden, g.moe_intermediate, g.n_layers, g.n_experts, g.top_k) == (2816, 704, 30, 128, 8)
    assert g.activation == "geglu"
    assert g.dense_bytes[5] != g.dense_bytes[0] and g.dense_bytes[5] == g.dense_bytes[11]  # global layers
    m = get_geometry("mixtral-8x7b")
    assert (m.hidden, m.moe_intermediate, m.n_layers, m.n_experts, m.top_k) == (4096, 14336, 32, 8, 2)
    assert m.expert_bytes == 352_321_536  # 352 MB, as DESIGN.md says
    assert "small-moe" in PRESETS
    # the small model's routing shape (so its trace replays) at Qwen2-57B-A14B's published widths
    w, small = get_geometry("small-moe-qwen2-57b-widths"), get_geometry("small-moe")
    assert (w.n_layers, w.n_experts, w.top_k) == (small.n_layers, small.n_experts, small.top_k)
    assert (w.hidden, w.moe_intermediate) == (3584, 2560) and w.expert_bytes == 55_050_240
    attention = 3584 * (28 + 2 * 4) * 128 + 28 * 128 * 3584
    assert w.dense_params[0] == attention + 32 * 3584 + 3 * 3584 * 20480  # + router + shared expert


def test_presets_match_quantized_trace_sizes(embedded_traces):
    """The public traces' GGUF sizes are exactly these shapes at Q4_K/Q5_0/Q6_K/Q8_0 block sizes."""
    q4k, q5_0, q6k, q8_0 = 144 / 256, 22 / 32, 210 / 256, 34 / 32  # bytes per weight
    for name, preset, mixes in [("qwen3-30b-a3b", "qwen3-30b-a3b", [(q4k, q4k, q4k), (q4k, q4k, q6k)]),
                                ("gemma-4-26b-a4b", "gemma-4-26b-a4b", [(q4k, q4k, q5_0), (q4k, q4k, q8_0)])]:
        meta = TraceMeta.load(embedded_traces / name / "meta.json")
        g = get_geometry(preset)
        expected = {round(sum(mix) * g.matrix_numel) for mix in mixes}
        assert set(meta.expert_bytes) == expected
        assert meta.n_layers == g.n_layers and meta.n_experts == g.n_experts


def test_flame_from_meta_and_trace_meta(embedded_traces):
    g = get_geometry("flame-moe-290m")
    meta = TraceMeta.load(embedded_traces / "flame-moe-290m-decoder" / "meta.json")
    assert g.expert_bytes == meta.expert_bytes[0] and g.hidden == 1024
    q = get_geometry("qwen3-30b-a3b")
    qm = TraceMeta.load(embedded_traces / "qwen3-30b-a3b" / "meta.json")
    m2 = q.trace_meta(qm, 4)
    assert m2.n_layers == 4 and m2.expert_bytes == [q.expert_bytes] * 4 and m2.hidden_size == 2048
    assert m2.dtype == "bf16" and m2.dense_bytes == q.dense_bytes[:4]


def test_overrides_layers_and_hf_config(tmp_path):
    g = resolve_geometry("qwen3-30b-a3b", parse_geometry_overrides(["hidden=1024", "dtype=fp16"]), layers=3)
    assert g.hidden == 1024 and g.dtype == "fp16" and g.n_layers == 3 and len(g.dense_params) == 3
    with pytest.raises(TraceError, match="unknown geometry field"):
        parse_geometry_overrides(["hiden=3"])
    with pytest.raises(TraceError, match="--layers"):
        resolve_geometry("tiny", layers=99)
    with pytest.raises(TraceError, match="unknown geometry"):
        get_geometry("nope")
    cfg = {"model_type": "qwen3_moe", "hidden_size": 64, "moe_intermediate_size": 32, "num_hidden_layers": 2,
           "num_experts": 4, "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "torch_dtype": "bfloat16"}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    h = get_geometry(str(tmp_path))
    assert (h.hidden, h.moe_intermediate, h.n_layers, h.n_experts, h.top_k, h.dtype) == (64, 32, 2, 4, 2, "bf16")
    mix = geometry_from_hf_config({"hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8,
                                   "num_hidden_layers": 32, "num_experts_per_tok": 2, "num_attention_heads": 32,
                                   "num_key_value_heads": 8})
    assert mix.expert_bytes == get_geometry("mixtral-8x7b").expert_bytes
    assert mix.dense_params == get_geometry("mixtral-8x7b").dense_params


# -- memory -------------------------------------------------------------------------------------------------------
def test_arena_layout_power_of_two():
    arena, per, n = arena_layout(352_321_536, 256)  # Mixtral experts
    assert arena == GIB and per == 3 and n == 86
    arena, per, n = arena_layout(100, 10)
    assert n == 1 and arena == 1024


def test_fit_error_names_numbers_and_layers():
    g = get_geometry("mixtral-8x7b")

    def plan(n):
        return plan_memory(g, n_layers=n, slab_slots=2 * n, scratch_slots=8, max_tokens=512)

    with pytest.raises(FitError) as exc:
        check_fit(plan, 32, host_budget=40 * GIB, gpu_budget_bytes=100 * GIB)
    msg = str(exc.value)
    assert "host memory" in msg and "40.00 GiB" in msg and "--layers 15" in msg
    with pytest.raises(FitError, match="GPU memory"):
        check_fit(plan, 32, host_budget=200 * GIB, gpu_budget_bytes=5 * GIB)
    assert check_fit(plan, 32, host_budget=200 * GIB, gpu_budget_bytes=100 * GIB).n_layers == 32
    q = get_geometry("qwen3-30b-a3b")
    ok = check_fit(lambda n: plan_memory(q, n_layers=n, slab_slots=48 * 32, scratch_slots=128, max_tokens=512),
                   48, gpu_budget_bytes=130 * GIB)
    assert ok.host_pinned_bytes <= 100 * GIB  # Qwen3's 48 layers fit the default budget


def test_replay_refuses_before_allocating(tmp_path):
    from executor.replay import build_runtime, prepare
    from sim.config import build_config
    from sim.engine.synthetic import make_trace

    d = make_trace(tmp_path / "t", n_layers=2, n_experts=8, top_k=2, n_sequences=1, prompt_len=2, decode_len=1)
    cfg = build_config({"trace": str(d), "cache": {"cache_rate": 0.5}})
    setup = prepare(cfg, get_geometry("mixtral-8x7b"), layers=2)
    with pytest.raises(FitError, match="--layers 1"):
        build_runtime(cfg, setup, device="cpu", host_budget=8 * GIB)


# -- host store, slab -----------------------------------------------------------------------------------------------
def test_store_is_seeded_and_chunked():
    g = get_geometry("tiny")
    a = HostExpertStore(g, seed=1, pin=False)
    b = HostExpertStore(g, seed=1, pin=False)
    c = HostExpertStore(g, seed=2, pin=False)
    assert torch.equal(a.expert((3, 7)), b.expert((3, 7)))
    assert not torch.equal(a.expert((3, 7)), c.expert((3, 7)))
    assert not torch.equal(a.expert((3, 7)), a.expert((3, 6)))
    assert not a.pinned and not a.arenas[0].is_pinned()
    wg, wu, wd = expert_matrices(a.expert((0, 0)), g)
    assert wg.shape == (16, 32) and wu.shape == (16, 32) and wd.shape == (32, 16)
    r = chunk_ranges(g.expert_numel, 3)
    assert r == [(0, g.matrix_numel), (g.matrix_numel, 2 * g.matrix_numel), (2 * g.matrix_numel, g.expert_numel)]
    assert chunk_ranges(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]


def test_slot_pool():
    p = SlotPool(2, 4, torch.float32, "cpu")
    assert p.assign("a") == 0 and p.assign("b") == 1
    with pytest.raises(RuntimeError, match="no free slot"):
        p.assign("c")
    p.release("a")
    assert p.assign("c") == 0 and p.used == 2


# -- transfer engine (pump backend: deterministic) ----------------------------------------------------------------
def _t(key, high, n_chunks=3, seq=0, log=None):
    src = torch.arange(12, dtype=torch.float32) + 100 * key[1]
    dst = torch.zeros(12)
    t = Transfer(key, src, dst, 48, chunk_ranges(12, n_chunks), high=high, speculative=not high, cached=True,
                 seq=seq)
    return t


def test_priority_chunks_and_no_preemption():
    eng = TransferEngine("pump")
    low = _t((0, 1), high=False)
    eng.submit(low)
    assert eng.pump(1) == 1  # one chunk of the prefetch
    assert low.chunks_done == 1 and not low.finished
    high = _t((0, 2), high=True)
    eng.submit(high)
    eng.pump(1)  # a demand load goes first: all its chunks at once
    assert high.finished and high.chunks_done == 3 and low.chunks_done == 1
    assert torch.equal(high.dst, high.src)
    eng.pump(5)
    assert low.finished and torch.equal(low.dst, low.src)
    assert [t.key for t in eng.poll()] == [(0, 2), (0, 1)]
    assert eng.bytes == 96 and eng.bytes_prefetch == 48 and eng.pending_bytes == 0
    eng.close()


def test_upgrade_drop_and_wait():
    eng = TransferEngine("pump")
    a, b, c = _t((1, 1), False, seq=0), _t((1, 2), False, seq=1), _t((1, 3), False, seq=2)
    for t in (a, b, c):
        eng.submit(t)
    eng.pump(1)  # a: chunk 1 of 3
    assert eng.drop(a)  # the chunk already moved is wasted; the rest is discarded
    assert a.dropped and not a.finished and eng.bytes == 16
    eng.upgrade(c)  # c jumps the queue
    eng.wait(c)
    assert c.finished and b.chunks_done == 0
    assert eng.pending_bytes == 48  # b only
    assert not eng.drop(c)  # finished: nothing to drop
    eng.close()  # b not started: dropped at close
    assert b.dropped and eng.pending_bytes == 0


def test_thread_backend_moves_everything():
    eng = TransferEngine("thread")
    ts = [_t((0, i), high=(i % 2 == 0), seq=i) for i in range(6)]
    for t in ts:
        eng.submit(t)
    for t in ts:
        eng.wait(t)
    assert all(t.finished and torch.equal(t.dst, t.src) for t in ts)
    assert len(eng.poll()) == 6
    eng.close()
    assert eng.busy_s() >= 0


# -- decisions -----------------------------------------------------------------------------------------------------
def test_compute_order_and_state():
    ready = {(0, 5)}
    copying = SimpleNamespace(t_start=0, seq=3, high=False)
    q_high = SimpleNamespace(t_start=None, seq=1, high=True)
    q_low = SimpleNamespace(t_start=None, seq=0, high=False)
    inflight = {(0, 2): copying, (0, 7): q_high, (0, 1): q_low}

    def state(k):
        return expert_state(k, ready, inflight)

    ids = [7, 1, 9, 5, 2]
    assert compute_order(0, ids, reordered=False, any_missing=True, state=state) == [1, 2, 5, 7, 9]
    assert compute_order(0, ids, reordered=True, any_missing=True, state=state) == [5, 2, 7, 1, 9]
    assert compute_order(0, ids, reordered=True, any_missing=False, state=state) == [1, 2, 5, 7, 9]


def test_early_preemption_plan():
    ts = [SimpleNamespace(key=(2, 1), used=True, speculative=True), SimpleNamespace(key=(2, 3), used=False,
                                                                                   speculative=True),
          SimpleNamespace(key=(3, 1), used=False, speculative=True),
          SimpleNamespace(key=(2, 4), used=False, speculative=False)]
    up, drop = early_preemption_plan(2, ts)
    assert [t.key for t in up] == [(2, 1)] and [t.key for t in drop] == [(2, 3)]


class _AsyncCopier:
    """Stands in for the CUDA copier: a copy group lands later, on a background thread (like a copy stream)."""

    asynchronous = True

    def __init__(self, delay=0.002, gate=None):
        import queue
        import threading

        self.delay = delay
        self.gate = gate  # a threading.Event: nothing lands before it is set (a test's submissions all queued)
        self.q = queue.Queue()
        self.order = []
        threading.Thread(target=self._stream, daemon=True).start()

    def _stream(self):
        import time

        while True:
            t, c0, c1, ev = self.q.get()
            if self.gate is not None:
                self.gate.wait()
            time.sleep(self.delay)
            a, b = t.ranges[c0][0], t.ranges[c1 - 1][1]
            t.dst[a:b].copy_(t.src[a:b])
            self.order.append((t.key, c0, c1))
            ev.set()

    def copy_group(self, worker, t, c0, c1):
        import threading

        ev = threading.Event()
        self.q.put((t, c0, c1, ev))
        return ev

    def wait(self, h):
        h.wait()

    def done(self, h):
        return h.is_set()

    def span_s(self, h):
        return self.delay

    def wait_event(self, h):
        return h


@pytest.mark.parametrize("backend", ["pump", "thread"])
@pytest.mark.parametrize("lookahead", [1, 2])
def test_asynchronous_engine_semantics(lookahead, backend):
    """The CUDA backends' logic (groups completing later, lookahead, poll, wait returning the event) with a
    stand-in copier, issued from the main thread (`pump`: the `cuda` backend) or a worker (`cuda-thread`):
    everything lands, demand loads overtake queued prefetches, at most `lookahead` groups ahead."""
    import threading

    gate = threading.Event()  # no group lands until every transfer is submitted (a loaded machine's main thread
    cp = _AsyncCopier(gate=gate)  # can be descheduled longer than a group's delay between two submissions)
    eng = TransferEngine(backend, copier=cp, lookahead=lookahead)
    lows = [_t((0, i), high=False, seq=i) for i in range(4)]
    for t in lows:
        eng.submit(t)
    high = _t((1, 9), high=True, seq=9)
    eng.submit(high)
    gate.set()
    ev = eng.wait(high)  # returns once all its chunks are on the "stream"
    assert ev is high.last_handle and high.all_enqueued
    ev.wait()
    done = []
    for t in lows:
        eng.wait(t).wait()
    import time

    deadline = time.time() + 5
    while len(done) < 5 and time.time() < deadline:
        done += eng.poll()
        time.sleep(0.005)
    assert {t.key for t in done} == {t.key for t in lows} | {high.key}
    assert all(torch.equal(t.dst, t.src) for t in lows + [high])
    # the demand load went before the prefetches' remaining chunks: at most `lookahead` prefetch groups before it
    first_high = next(i for i, o in enumerate(cp.order) if o[0] == high.key)
    assert first_high <= lookahead
    if backend == "pump":  # the main thread filled the stream on submit: exactly `lookahead` groups were ahead
        assert first_high == lookahead
    assert cp.order[first_high] == (high.key, 0, 3)  # all its chunks in one group
    eng.close()
    assert eng.pending_bytes == 0 and eng.bytes == 48 * 5


def test_copy_issue_accounting_by_where_it_happens():
    """The engine times every chunk-group issue (issue_host_s, issues) and, of it, the part inside submit() by
    kind: an idle link is started by the submitting call (lookahead 1: the first submit issues, the next queue)."""
    import threading

    gate = threading.Event()
    eng = TransferEngine("pump", copier=_AsyncCopier(gate=gate), lookahead=1)
    low = _t((0, 1), high=False)
    eng.submit(low)  # idle: its first chunk group goes out in this submit
    assert eng.issues == 1 and eng.submit_issue_s["prefetch"] > 0 and eng.submit_issue_s["demand"] == 0
    high = _t((1, 2), high=True)
    eng.submit(high)  # the stream holds a group already: queued
    assert eng.issues == 1 and eng.submit_issue_s["demand"] == 0
    gate.set()
    eng.wait(high).wait()  # issued in the wait, not in a submit
    assert eng.issues >= 2 and eng.submit_issue_s["demand"] == 0
    eng.close()
    assert eng.issues == 4  # the prefetch's three single-chunk groups and the demand load's one group of three
    assert eng.issue_host_s >= eng.submit_issue_s["prefetch"]


def test_raw_chunk_copies_move_exactly_the_chunks_asked_for():
    """The cuda copier's driver path (`issue_chunk_copies`) computes each chunk's byte addresses itself: checked
    here with the host's memmove as the copy function, on views with an offset into larger buffers (as the host
    arenas and the slab are), bf16 elements, and a partial chunk group."""
    import ctypes

    from executor.transfer import issue_chunk_copies

    calls = []

    def memmove(dst, src, n, stream):
        calls.append((n, stream))
        ctypes.memmove(dst, src, n)
        return 0

    arena = torch.arange(40, dtype=torch.bfloat16)
    slab = torch.zeros(2, 30, dtype=torch.bfloat16)
    t = Transfer((0, 5), arena[7:37], slab[1], 60, chunk_ranges(30, 3), high=False, speculative=True, cached=True,
                 seq=0)
    issue_chunk_copies(memmove, t, 1, 2, "s")  # the middle chunk only
    assert torch.equal(slab[1, 10:20], arena[17:27]) and not slab[1, :10].any() and not slab[1, 20:].any()
    assert not slab[0].any() and calls == [(20, "s")]
    issue_chunk_copies(memmove, t, 0, 3, "s")
    assert torch.equal(slab[1], arena[7:37]) and [n for n, _ in calls[1:]] == [20, 20, 20]
    with pytest.raises(RuntimeError, match="CUresult 1"):
        issue_chunk_copies(lambda *a: 1, t, 0, 1, None)
    bad = Transfer((0, 6), arena[::2], slab[0, :20], 40, chunk_ranges(20, 1), high=True, speculative=False,
                   cached=True, seq=1)
    with pytest.raises(ValueError, match="contiguous"):
        issue_chunk_copies(memmove, bad, 0, 1, None)


def test_probe_steal_during_each_run():
    from executor.probe import cpu_steal_ms, machine_probe, steal_during

    probes = [{"steal_ms": 10.0}, {"steal_ms": 15.0}, {"steal_ms": None}]
    steal_during(probes, 30.0)
    assert [p["steal_ms"] for p in probes] == [5.0, None, None]  # a missing reading leaves its neighbours unknown
    p = machine_probe("cpu")
    assert p["host_loop_us"] > 0 and p["h2d_gbps"] is None
    assert cpu_steal_ms() is None or cpu_steal_ms() >= 0


def test_validate_pins_cpus_or_says_why():
    import os

    from executor.validate import pin_cpus
    from traces.errors import TraceError

    before = os.sched_getaffinity(0)
    try:
        pin_cpus(str(min(before)))
        assert os.sched_getaffinity(0) == {min(before)}
        # torch's CPU pool started before the pin: its threads keep every core (a host store fills in parallel)
        import glob

        import torch

        allowed = [os.sched_getaffinity(int(t.rsplit("/", 1)[1])) for t in glob.glob("/proc/self/task/*")]
        if torch.get_num_threads() > 1 and len(before) > 1:
            assert before in allowed
    finally:
        os.sched_setaffinity(0, before)
    with pytest.raises(TraceError, match="--cpus"):
        pin_cpus("not-a-cpu")
