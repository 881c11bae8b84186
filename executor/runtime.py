"""The offloaded MoE runtime: the simulator's layer loop (sim/engine/core.py) with real copies and real kernels.

Per batch and layer, on the compute stream (the default CUDA stream, or the CPU):

1. dense part (`ReplayModel.dense`), then the gate: on CUDA the host waits for the GPU to reach the gate (an
   event), as a real offloading system must to read the routing, so that "resident at the gate" means what the
   simulator means by it; while it waits it keeps the copy stream fed (`TransferEngine.feed_until`: the main
   thread issues every copy); finished copies are reaped (the simulator's `_landed`).
2. at the gate, exactly the simulator's decisions, with the same objects: `ExpertCache.lookup_layer` (one lookup
   per unique expert in first-occurrence order, sim.engine.schedule.layer_sets), hit = resident and fully copied, a
   prefetch still queued or copying = late prefetch (miss), else demand miss; the layer's experts are held
   (`ExpertCache.hold`) until the layer is done. With early preemption the layer's queued speculative transfers
   are upgraded if needed and dropped if not, and every demand miss is enqueued now at high priority. The
   prefetcher (the simulator's own `sim.engine.prefetcher.Prefetcher`, with the same predictor object, distance,
   top_n and in-flight bound; its predictor cost is real time here, so its simulated cost is 0) predicts layer
   l+d and enqueues speculative transfers.
3. experts in order (ascending id; reordered inference: resident, copying, queued high, queued low, not started;
   sim.engine.decisions). An expert not resident and not already copying at high priority: the host first waits
   for the GPU to reach it (as at the gate: the simulator's "the stream gets here"), then without early
   preemption its demand load is enqueued now (or its prefetch upgraded to high); the compute stream waits for
   the copy (stall, measured with CUDA events
   around the wait, or perf_counter on the CPU). Between these synchronisation points the host only launches
   resident experts' kernels, ahead of the GPU.

Copies reserve their cache slot (and a slab slot) when enqueued and are not evictable until they land (the cache
reads `inflight`: `ExpertCache(busy=...)`); a demand miss the cache cannot hold is copied into a scratch buffer;
a prefetch that cannot get a slot is skipped.
`cpu_experts` (Fiddler-style CPU compute of a miss) is not implemented in the executor.

Metrics: the simulator's names and definitions (`sim.engine.metrics.finalize`), from real time: per batch the
time between CUDA events at its start and end on the compute stream (perf_counter on the CPU), link busy time
from events around each chunk group on the copy stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch

from executor.buffers import SlotPool, chunk_ranges
from executor.model import BatchInputs, ReplayModel, layer_rows, rms_norm
from executor.transfer import Transfer, TransferEngine
from predictors.base import Predictor
from sim.cache import ExpertCache
from sim.engine.decisions import (
    classify_lookups,
    compute_order,
    early_preemption_plan,
    expert_state,
    gate_demand_loads,
    key_table,
    touch_hooks,
    touch_in_use_order,
)
from sim.engine.metrics import Counters, count_unused_at_end, finalize, snapshot, subtract
from sim.engine.prefetcher import Prefetcher
from sim.engine.schedule import SequenceData, demand_lookups, iter_batches, layer_sets
from traces.format import TraceMeta

# the interpreter's switch interval while the predictor thread runs (Python's default is 5 ms): the main thread
# spins in Python while it feeds the copy stream up to a gate (TransferEngine.feed_until), holding the interpreter
# lock but for brief C calls, and a thread waiting for the lock gets it only when the holder is asked to drop it
PREDICTOR_SWITCH_S = 5e-5

HOST_METRICS = ("host_predict_ms", "host_prefetch_issue_ms", "host_demand_issue_ms", "host_sync_wait_ms",
                "host_copy_wait_ms", "host_expert_launch_ms")
# their places in OffloadedRuntime.host_s
_PREDICT, _PREFETCH_ISSUE, _DEMAND_ISSUE, _SYNC_WAIT, _COPY_WAIT, _EXPERT_LAUNCH = range(len(HOST_METRICS))


class _Clock:
    """Timestamps on the compute stream: CUDA events (device) or perf_counter (CPU). Reporting only.

    `stream` is the compute stream, looked up once per batch (`refresh`): `Event.record()` without a stream looks
    the current stream up on every call, tens of microseconds of Python per event, paid per expert."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.stream = None
        self.refresh()

    def refresh(self) -> None:
        if self.cuda:
            self.stream = torch.cuda.current_stream(self.device)

    def event(self, timing: bool = False):
        """A CUDA event recorded now on the compute stream."""
        ev = torch.cuda.Event(enable_timing=timing)
        ev.record(self.stream)
        return ev

    def mark(self):
        if self.cuda:
            return self.event(True)
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) * 1e-3
        return b - a


@contextlib.contextmanager
def quiet_gc():
    """No garbage collection inside a timed run. The runtime allocates small objects per expert (events,
    transfers, tuples) in a process that also holds traces and data frames; the collector's full passes then land
    at random points of the layer loop and cost milliseconds each, which made the same run vary by tens of
    percent. Everything alive before the run is frozen out of the collector's view; it runs again afterwards."""
    was = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        gc.unfreeze()


def truncate_sequences(seqs: list[SequenceData], n_layers: int) -> list[SequenceData]:
    """The first n layers of every sequence's routing (for `--layers N`)."""
    out = []
    for s in seqs:
        prompts = [(ph, ex[:, :n_layers], pos, None if hr is None else hr[:, :n_layers])
                   for ph, ex, pos, hr in s.prompts]
        out.append(SequenceData(s.sequence, prompts, s.gen[:, :n_layers], s.gen_positions,
                                None if s.gen_hidden_rows is None else s.gen_hidden_rows[:, :n_layers],
                                s.all[:, :n_layers], s.n_before_gen))
    return out


def max_unique_per_layer(seqs: list[SequenceData], phase: str, batch_size: int) -> int:
    m = 0
    for b in iter_batches(seqs, phase, batch_size):
        for ids, _ in layer_sets(b.experts):
            m = max(m, len(ids))
    return m


# where learned_mlp's predictions run (executor.gpu_mlp): "numpy" (the predictor's own path, on the host), "torch"
# (its networks in torch on the run's device: a one-row call as a CUDA graph on a GPU, eager on the CPU), "auto"
# (torch on a GPU, numpy elsewhere)
PREDICTOR_BACKENDS = ("auto", "numpy", "torch")


class OffloadedRuntime:
    def __init__(
        self,
        model: ReplayModel,
        meta: TraceMeta,
        sequences: list[SequenceData],
        *,
        weights_fn,
        phase: str = "both",
        batch_size: int = 1,
        cache_capacity_bytes: int,
        cache_scope: str = "global",
        cache_policy: str = "lru",
        policy_params: dict | None = None,
        predictor: Predictor,
        distance: int = 1,
        top_n: int | None = None,
        max_inflight_bytes: float | None = None,
        chunked_prefetch: bool = False,
        chunks: int = 3,
        early_preemption: bool = False,
        reordered_inference: bool = False,
        cpu_experts: bool = False,
        trace=None,
        transfer_backend: str | None = None,
        copy_engines: int = 1,
        lookahead: int = 1,
        pump_per_expert: int = 1,
        pump_per_dense: int = 1,
        pump_after_gate: int = 0,
        keep_outputs: bool = False,
        check: bool = False,
        scratch_slots: int | None = None,
        copier=None,
        predict_after_resident: bool = False,
        sync_misses: bool = True,
        group_resident: bool = True,
        warmup_batches: int = 0,
        hidden_fn=None,
        copy_api: str = "driver",
        predictor_thread: bool = False,
        predictor_backend: str = "auto",
    ):
        from sim.policies import policy_class

        if cpu_experts:
            raise NotImplementedError("cpu_experts is simulated only; the executor does not compute experts on the CPU")
        if len(set(meta.expert_bytes)) != 1:
            raise ValueError("the executor's slab holds experts of one size; give a geometry with uniform experts")
        self.model = model
        self.meta = meta
        self.sequences = sequences
        self.weights_fn = weights_fn
        self.phase = phase
        self.batch_size = batch_size
        self.device = model.device
        self.L = meta.n_layers
        future = None
        if policy_class(cache_policy).needs_future:
            future = demand_lookups(sequences, phase, batch_size)
        self.inflight: dict = {}  # key -> Transfer (cached, queued or copying): not evictable
        self.cache = ExpertCache(n_layers=meta.n_layers, n_experts=meta.n_experts, expert_bytes=meta.expert_bytes,
                                 capacity_bytes=cache_capacity_bytes, scope=cache_scope, policy=cache_policy,
                                 policy_params=policy_params, future=future, busy=self.inflight)
        eb = meta.expert_bytes[0]
        n_parts = meta.n_layers if cache_scope == "per_layer" else 1
        self.n_slots = (cache_capacity_bytes // n_parts // eb) * n_parts
        numel = model.store.numel
        self.slab = SlotPool(self.n_slots, numel, model.dtype, self.device, "slab", split=model.split)
        if scratch_slots is None:
            scratch_slots = max_unique_per_layer(sequences, phase, batch_size)
        self.scratch = SlotPool(max(1, scratch_slots), numel, model.dtype, self.device, "scratch", split=model.split)
        if transfer_backend is None:
            transfer_backend = "cuda" if self.device.type == "cuda" else "pump"
        self.engine = TransferEngine(transfer_backend, device=self.device, copy_engines=copy_engines,
                                     lookahead=lookahead, copier=copier, copy_api=copy_api)
        self.link = self.engine  # the prefetcher reads `eng.link.pending_bytes`
        self.chunks = chunks if chunked_prefetch else 1
        self.ranges = chunk_ranges(numel, self.chunks)
        self.early_preemption = early_preemption
        self.reordered = reordered_inference
        self.pump_per_expert = pump_per_expert
        self.pump_per_dense = pump_per_dense
        self.pump_after_gate = pump_after_gate
        # False: predict at the gate, before any expert kernel is launched (the simulator's event order);
        # True: launch the leading resident experts first, so the GPU computes while the host predicts
        self.predict_after_resident = predict_after_resident
        # True: the host waits for the GPU to reach a non-resident expert before acting on it (the simulator's
        # semantics); False: it acts as soon as it gets there itself, ahead of the GPU (an experiment's knob)
        self.sync_misses = sync_misses
        # the leading experts resident at the gate that take every token (batch-size-1 decode) computed as one
        # group (`ReplayModel.experts_into`): at batch size 1 the host's launches are most of a layer step
        self.group_resident = group_resident
        self.grouped_experts = 0  # experts computed in groups (reporting)
        self._predict_pending = False
        # True (prefetch.blocking false): the predictor runs on a worker thread of its own, as ProMoE's does beside
        # inference, and the main thread issues its prediction at its next step after it is ready (`_collect`);
        # the simulator's non-blocking prefetcher (one worker: a call starts when the previous one is done)
        self.predictor_thread = predictor_thread
        self._pred_pool: ThreadPoolExecutor | None = None  # started by the first call, stopped by close()
        self._pred_jobs: deque = deque()
        self.warmup_batches = warmup_batches  # leading batches run but left out of the metrics (as the simulator)
        self.keep_outputs = keep_outputs
        self.check = check
        self.ready: set = set()
        self.unused_pf: set = set()
        self.c = Counters()
        self.seq = 0
        self.gated = (-1, -1)
        self.env = SimpleNamespace(now=0.0)  # the prefetcher's clock: predictions are issued at once (cost = real)
        self.cost = SimpleNamespace(expert_bytes=list(meta.expert_bytes))
        if predictor_backend not in PREDICTOR_BACKENDS:
            raise ValueError(f"predictor_backend must be one of {PREDICTOR_BACKENDS}, got {predictor_backend!r}")
        if predictor_backend == "torch" or (predictor_backend == "auto" and self.device.type == "cuda"):
            from executor.gpu_mlp import on_device

            predictor = on_device(predictor, self.device)  # learned_mlp's networks on the GPU
        predictor.reset()
        self.prefetcher = Prefetcher(self, predictor, distance, top_n, max_inflight_bytes, 0.0, trace, meta=meta,
                                     hidden_fn=hidden_fn)
        self._touch_hooks = touch_hooks(self.cache)
        self._key_rows = key_table(meta.n_layers, meta.n_experts)
        self.clock = _Clock(self.device)
        self._reset_run()
        self.outputs: list[torch.Tensor] = []
        self.max_used_bytes = 0
        self.checks = {"slot_content_checks": 0, "computed_resident_checks": 0}

    def _keys(self, layer: int, ids) -> list:
        """The keys (layer, e) of `ids`: the shared tuples the simulator and the prefetcher use (key_table)."""
        return list(map(self._key_rows[layer].__getitem__, ids))

    # -- cache + transfer glue (sim: start_transfer, _landed, _drop, _evicted) -----------------------------------
    def _evicted(self, victims) -> None:
        for v in victims:
            self.ready.discard(v)
            self.slab.release(v)
            if v in self.unused_pf:
                self.unused_pf.discard(v)
                self.c.n_prefetch_unused += 1

    def start_transfer(self, key, *, speculative: bool, target=None, at=None) -> Transfer | None:
        """Reserve a cache slot and a slab slot (or a scratch buffer) and queue the copy. `at` (the simulator's
        run-ahead time) is accepted for the shared prefetcher and ignored: here it is always now."""
        t0 = time.perf_counter()
        cache = self.cache
        victims = cache.insert(key)
        if victims is None:
            if speculative:
                return None
            cached = False
            pool = self.scratch
            owner = ("scratch", key)
        else:
            cached = True
            if victims:
                self._evicted(victims)
            pool = self.slab
            owner = key
            if self.check:
                assert cache.used_bytes <= cache.capacity_bytes, "cache capacity exceeded"
                assert self.slab.used < self.slab.n_slots or self.slab.free, "slab full"
            self.max_used_bytes = max(self.max_used_bytes, cache.used_bytes)
        slot = pool.assign(owner)
        t = Transfer(key, self.model.store.expert(key), pool.view(slot), self.meta.expert_bytes[key[0]], self.ranges,
                     high=not speculative, speculative=speculative, cached=cached, seq=self.seq, slot=slot,
                     guards=pool.guards(slot), target=target)
        self.seq += 1
        if cached:
            self.inflight[key] = t
        if speculative:
            self.c.prefetches += 1
        else:
            self.c.demand_loads += 1
        self.engine.submit(t)
        if not speculative:  # (a prefetch's host time is counted around the prefetcher's whole issue, in predict)
            self.host_s[_DEMAND_ISSUE] += time.perf_counter() - t0
        return t

    def _reap(self) -> None:
        for t in self.engine.poll():
            self._landed(t)

    def _landed(self, t: Transfer) -> None:
        if t.reaped:
            return
        t.reaped = True
        self._note_write(t)
        if t.cached and not t.dropped:
            key = t.key
            del self.inflight[key]  # (evictable again)
            self.ready.add(key)
            if t.speculative and not t.used:
                self.unused_pf.add(key)

    def _drop(self, t: Transfer) -> None:
        if not self.engine.drop(t):
            return
        if t.cached:
            del self.inflight[t.key]
            self.cache.remove(t.key)
            self._note_write(t)  # a chunk may still be landing in this slot: later copies into it wait for it
            self.slab.release(t.key)
        self.c.n_prefetch_dropped += 1
        self.c.n_prefetch_unused += 1

    def _note_write(self, t: Transfer) -> None:
        if self.device.type == "cuda" and t.group_handle is not None:
            (self.slab if t.cached else self.scratch).last_write[t.slot] = t.group_handle[1]

    def _state(self, key) -> tuple:
        return expert_state(key, self.ready, self.inflight)

    # -- checks --------------------------------------------------------------------------------------------------
    def _check_buffer(self, key, buf: torch.Tensor, pool: SlotPool, owner) -> None:
        slot = pool.slot_of.get(owner)
        assert slot is not None and pool.owner[slot] == owner, f"expert {key} computed without a slot"
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        assert torch.equal(buf.cpu(), self.model.store.expert(key)), f"slot {slot} does not hold expert {key}"
        self.checks["slot_content_checks"] += 1

    def _check_slab(self) -> None:
        """Every resident key holds a slot; slot count never exceeds capacity."""
        assert self.slab.used <= self.n_slots, "slab over capacity"
        assert self.cache.used_bytes <= self.cache.capacity_bytes, "cache capacity exceeded"
        for key in self.cache.resident:
            assert key in self.slab.slot_of, f"resident expert {key} has no slab slot"
        assert len(self.slab.slot_of) == len(self.cache), "slab slots and cache residency disagree"
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for key in self.ready:  # landed: the slot holds exactly the host copy
            assert key in self.cache, f"ready expert {key} is not resident in the cache"
            slot = self.slab.slot_of[key]
            assert torch.equal(self.slab.view(slot).cpu(), self.model.store.expert(key)), \
                f"slab slot {slot} does not hold expert {key}"
        self.checks["resident_slot_checks"] = self.checks.get("resident_slot_checks", 0) + len(self.ready)

    def warmup(self, token_counts=None) -> None:
        """Run the dense part and one expert once per token count (kernels, cuBLAS handles, allocator) without
        touching the cache or the link, so the first timed batch is not a cold start."""
        model = self.model
        if token_counts is None:
            sizes = {b.tokens for b in iter_batches(self.sequences, self.phase, self.batch_size)}
            token_counts = sorted(sizes)[:1] + sorted(sizes)[-1:]
        self.scratch.view(0).copy_(model.store.expert((0, 0)))
        mats = self.scratch.matrices(0)
        for n in token_counts:
            x = model.embed([0] * n, list(range(n)))
            x = model.dense(0, x)
            h = rms_norm(x)
            # every token routed to experts 0 and 1 (both the scratch slot's weights): the one-by-one path, and
            # for one token the grouped path's batched kernels
            rows = layer_rows(np.tile([0, 1], (n, 1)), torch.ones(n, 2, dtype=h.dtype, device=h.device), h.device)
            out2d = torch.zeros(2 * n, h.shape[1], dtype=h.dtype, device=h.device)
            model.expert_into(out2d, mats, h, rows[0])
            if self.group_resident and n == 1:
                model.experts_into(out2d, self.scratch, [0, 0], h, [rows[0], rows[1]])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- the layer step (used by run() for replay and by executor.live from the model's MoE blocks) -------------
    def begin_batch(self, batch) -> None:
        """Start a forward pass. `batch` is a sim.engine.schedule.Batch (live mode fills `experts` layer by layer)."""
        if self.prefetcher.active:
            self.prefetcher.start_batch(batch)
        self._batch_index = batch.index
        self.clock.refresh()
        self._batch_start = self.clock.mark()
        if self._first_mark is None:
            self._first_mark = self._batch_start
        if batch.index == self.warmup_batches and batch.index > 0:  # warm-up over: metrics count from here
            e = self.engine
            self._snap = (snapshot(self.c), len(self._batch_marks), len(self._stall_marks),
                          self._stall_host_s, len(e.spans), e.bytes, e.bytes_demand, e.bytes_prefetch,
                          self._batch_start, list(self.host_s), self.predict_calls, e.issue_totals())

    def gate(self, layer: int, ids: list[int]) -> tuple[list[int], dict]:
        """The gate of `layer` (call after its dense part is enqueued): sync, reap, lookups (held keys), early
        preemption, prefetch. Returns (compute order, demand transfers started here)."""
        cache, ready, inflight, unused_pf, c = self.cache, self.ready, self.inflight, self.unused_pf, self.c
        engine = self.engine
        engine.pump(self.pump_per_dense)
        self._sync_to_stream()
        self._reap()
        if self._pred_jobs:
            self._collect()
        b = self._batch_index
        self.gated = (b, layer)
        keys = self._keys(layer, ids)
        missing = classify_lookups(layer, ids, ready, inflight, unused_pf, c, keys)
        cache.lookup_layer(keys, self._touch_hooks is not None, missing is None)  # (holds them; touched in end_layer)
        local: dict = {}
        ep = self.early_preemption
        if ep:  # at every gate, miss or not (this layer's queued speculation is now exact or useless)
            up, drop = early_preemption_plan(layer, engine.low_snapshot())
            for t in up:
                engine.upgrade(t)
            for t in drop:
                self._drop(t)
        order = compute_order(layer, ids, reordered=self.reordered, any_missing=missing is not None,
                              state=self._state)
        if missing is not None and ep:
            for e in gate_demand_loads(layer, order, ready, inflight):
                local[(layer, e)] = self.start_transfer((layer, e), speculative=False)
        if self.prefetcher.active:
            if self.predict_after_resident:
                self._predict_pending = True  # done by expert_buffer at the first non-resident expert
            else:
                self.predict(layer)
        if self.pump_after_gate and engine.pump(self.pump_after_gate):
            self._reap()
        return order, local

    def _sync_to_stream(self) -> None:
        """CUDA: the host waits until the GPU has reached this point of the compute stream, keeping the copy
        stream fed meanwhile (`TransferEngine.feed_until`). On the CPU the host is the compute stream."""
        if self.device.type == "cuda":
            t0 = time.perf_counter()
            ev = self.clock.event()
            self.engine.feed_until(ev.query)
            ev.synchronize()
            self.host_s[_SYNC_WAIT] += time.perf_counter() - t0

    def predict(self, layer: int) -> None:
        """The simulator's prefetcher at this layer's gate: observe, predict layer + d, issue. Its CPU time is real
        time here (the simulator charges the profile's predictor_cost_us instead). With the predictor thread the
        call is queued to it and issued later by `_collect`."""
        self._predict_pending = False
        if layer + self.prefetcher.distance < self.L:  # a call the simulator charges predictor_cost_us for
            self.predict_calls += 1
        if self.predictor_thread:
            if self._pred_pool is None:
                self._pred_pool = ThreadPoolExecutor(1, thread_name_prefix="predictor")
                self._switch_s = sys.getswitchinterval()
                sys.setswitchinterval(PREDICTOR_SWITCH_S)
            self._pred_jobs.append(self._pred_pool.submit(self._predict_job, layer, self._batch_index))
            return
        t0 = time.perf_counter()
        r = self.prefetcher.predict_at_gate(layer, self.L)
        self.host_s[_PREDICT] += time.perf_counter() - t0
        self._issue_prediction(r, self._batch_index)

    def _issue_prediction(self, r, batch_index: int) -> None:
        """Queue the copies of a prediction (experts, target) or None, timing the host's issue."""
        if r is not None:
            t1 = time.perf_counter()
            self.prefetcher.issue(r[0], r[1], batch_index)
            self.host_s[_PREFETCH_ISSUE] += time.perf_counter() - t1

    def _predict_job(self, layer: int, batch_index: int) -> tuple:
        """On the predictor thread: the prediction at `layer`'s gate and the thread's time on it."""
        t0 = time.perf_counter()
        r = self.prefetcher.predict_at_gate(layer, self.L)
        return r, batch_index, time.perf_counter() - t0

    def _collect(self, wait: bool = False) -> None:
        """Main thread: issue the predictions the thread has finished, in order (all of them, waiting, if `wait`).
        A prediction whose target layer has passed its gate meanwhile is not issued (Prefetcher.issue), as in the
        simulator."""
        jobs = self._pred_jobs
        while jobs and (wait or jobs[0].done()):
            r, b, dt = jobs.popleft().result()
            self.host_s[_PREDICT] += dt
            self._issue_prediction(r, b)

    def expert_buffer(self, layer: int, e: int, local: dict) -> tuple[object, SlotPool, int]:
        """The matrices (`SlotPool.matrices`) of the slot holding expert (layer, e), its pool and slot, waiting for
        its copy (starting it if needed)."""
        key = (layer, e)
        engine = self.engine
        if self._predict_pending and key not in self.ready:
            self.predict(layer)
        if key not in self.ready:
            # the simulator's "the GPU reaches this expert": before the host acts on a missing expert (starts its
            # demand load, or raises its queued prefetch) it waits for the compute stream to get here, so the
            # load does not start early just because the host runs ahead of the GPU (that would be an unasked-for
            # early preemption). A copy already at high priority needs no action: only the GPU waits for it.
            pending = local.get(key) or self.inflight.get(key)
            if self.sync_misses and (pending is None or not pending.high):
                self._sync_to_stream()
            self._reap()  # copies that landed meanwhile become evictable (and may be this one) before an insert
            if self._pred_jobs:
                self._collect()
        if key in self.ready:
            pool, owner = self.slab, key
        else:
            t = local.get(key)
            if t is None:
                t = self.inflight.get(key)
            if t is None:  # not requested yet: the demand load starts when the stream gets here
                t = local[key] = self.start_transfer(key, speculative=False)
            if not t.finished:
                if not t.high:
                    engine.upgrade(t)
                if self.device.type == "cuda":
                    m0 = self.clock.mark()
                    w0 = time.perf_counter()
                    ev = engine.wait(t)
                    self.host_s[_COPY_WAIT] += time.perf_counter() - w0
                    self.clock.stream.wait_event(ev)
                    self._stall_marks.append((m0, self.clock.mark()))
                else:
                    m0 = time.perf_counter()
                    ev = engine.wait(t)
                    if ev is not None:  # an asynchronous stand-in copier (tests): wait for the copy itself
                        engine.copier.wait(ev)
                    waited = time.perf_counter() - m0
                    self._stall_host_s += waited
                    self.host_s[_COPY_WAIT] += waited
            self._reap()  # (cuda: t may still be copying; the stream waits on its event)
            if t.cached:
                pool, owner = self.slab, key
            else:
                pool, owner = self.scratch, ("scratch", key)
                self._scratch_used.append(owner)
        slot = pool.slot_of[owner]
        if self.check:
            assert self.cache.contains(key) or pool is self.scratch, f"expert {key} computed uncached"
            self.checks["computed_resident_checks"] += 1
            self._check_buffer(key, pool.view(slot), pool, owner)
        return pool.matrices(slot), pool, slot

    def compute_experts(self, layer: int, order: list[int], local: dict, h: torch.Tensor, rows: dict,
                        out2d: torch.Tensor) -> None:
        """Every expert of the layer, in `order`. With `group_resident`, the leading ones that are resident at the
        gate and take every token run as one group first (they would run first anyway: same order, same
        result); the rest one by one, each waiting for its copy if needed (`expert_buffer`)."""
        model = self.model
        n = 0
        if self.group_resident:
            ready = self.ready
            while n < len(order) and (layer, order[n]) in ready and rows[order[n]][3]:
                n += 1
            if n >= 2:
                slab = self.slab
                keys = self._keys(layer, order[:n])
                slots = [slab.slot_of[k] for k in keys]
                if self.check:
                    for k, s in zip(keys, slots):
                        assert self.cache.contains(k), f"expert {k} computed uncached"
                        self._check_buffer(k, slab.view(s), slab, k)
                    self.checks["computed_resident_checks"] += n
                t0 = time.perf_counter()
                model.experts_into(out2d, slab, slots, h, [rows[e] for e in order[:n]])
                self.host_s[_EXPERT_LAUNCH] += time.perf_counter() - t0
                self.grouped_experts += n
                self._layer_reads.extend((slab, s) for s in slots)
                self.engine.pump(self.pump_per_expert * n)
            else:
                n = 0
        host = self.host_s
        for e in order[n:]:
            mats, pool, slot = self.expert_buffer(layer, e, local)
            t0 = time.perf_counter()
            model.expert_into(out2d, mats, h, rows[e])
            host[_EXPERT_LAUNCH] += time.perf_counter() - t0
            self.expert_done(pool, slot)

    def expert_done(self, pool: SlotPool, slot: int) -> None:
        """After the expert's kernels are enqueued: note the slot's read (guarded at the end of the layer), let
        the link move (pump backends)."""
        self._layer_reads.append((pool, slot))
        self.engine.pump(self.pump_per_expert)
        if self._pred_jobs:
            self._collect()

    def end_layer(self, layer: int, ids: list[int]) -> None:
        if self._predict_pending:
            self.predict(layer)
        if self.device.type == "cuda" and self._layer_reads:
            # one event guards every slot the layer read: none of them can be refilled before the layer ends
            # (its experts are held until hold(()) below, its scratch slots released here)
            ev = self.clock.event()
            for pool, slot in self._layer_reads:
                pool.last_read[slot] = ev
        self._layer_reads = []
        for owner in self._scratch_used:
            self.scratch.release(owner)
        self._scratch_used = []
        self.c.layer_steps += 1
        keys = self._keys(layer, ids)
        if self._touch_hooks is not None:
            # recency = order of first use in the batch
            touch_in_use_order(self._touch_hooks, self.cache.resident, layer, ids, keys)
        self.cache.hold(())
        if self.check:
            self._check_slab()

    def end_batch(self, phase: str, tokens: int, output: torch.Tensor | None = None) -> None:
        if self._pred_jobs:  # (the thread reads the batch: done with it before the next one starts)
            self._collect(wait=True)
        self._batch_marks.append((phase, self._batch_start, self.clock.mark(), tokens, self._batch_index))
        if self.keep_outputs and output is not None:
            self.outputs.append(output.detach().to("cpu"))
        self.c.batches += 1
        self.c.tokens += tokens

    def _reset_run(self) -> None:
        self._batch_marks: list = []
        self._stall_marks: list = []
        self._stall_host_s = 0.0
        self._first_mark = None
        self._scratch_used: list = []
        self._layer_reads: list = []
        self._batch_index = -1
        self._snap = None
        # host seconds spent (perf_counter) predicting, issuing prefetches (the prefetcher's issue: ranking, cache
        # inserts, slots, submits) and issuing demand loads: what the profile's predictor_cost_us,
        # prefetch_transfer_host_us and demand_transfer_host_us stand for (executor.calibrate_runtime reads them);
        # then waiting for the GPU (gates, misses), waiting for copies to be issued (engine.wait) and launching
        # expert kernels: where a run's host time goes, beside its GPU time (HOST_METRICS)
        self.host_s = [0.0] * len(HOST_METRICS)
        # predictor calls with a target layer (layer + distance < L): host_predict_ms / predict_calls is the cost
        # per call the simulator charges (the calls at the last layers predict nothing; their time is in the sum)
        self.predict_calls = 0

    # -- the replay loop -------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Replay every batch of the trace; returns the metrics."""
        model = self.model
        L = self.L
        self._reset_run()
        with quiet_gc():
            self._replay(model, L)
        return self.metrics()

    def _replay(self, model, L) -> None:
        try:
            for batch in iter_batches(self.sequences, self.phase, self.batch_size):
                T = batch.tokens
                inputs = BatchInputs(batch, self.weights_fn(batch), L, self.device, model.dtype)
                sets = layer_sets(batch.experts[:, :L])
                self.begin_batch(batch)
                x = model.embed(batch.sequences, batch.positions)
                for layer in range(L):
                    ids = sets[layer][0]
                    x = model.dense(layer, x)
                    order, local = self.gate(layer, ids)
                    h = rms_norm(x)
                    out = torch.zeros((T, inputs.top_k, x.shape[1]), dtype=x.dtype, device=x.device)
                    out2d = out.view(-1, x.shape[1])
                    self.compute_experts(layer, order, local, h, inputs.rows[layer], out2d)
                    x = x + out.sum(dim=1)
                    self.end_layer(layer, ids)
                self.end_batch(batch.phase, T, x)
        finally:
            self.close()

    def close(self) -> None:
        if self._pred_pool is not None:
            self._collect(wait=True)
            self._pred_pool.shutdown()
            self._pred_pool = None
            sys.setswitchinterval(self._switch_s)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._reap()
        self.engine.close()
        self._reap()

    def metrics(self) -> dict:
        """The simulator's metrics from the real run (after close()); warm-up batches left out as it does."""
        c = dataclasses.replace(self.c)
        clock = self.clock
        cuda = self.device.type == "cuda"
        e = self.engine
        # prefetches still unused at the end (landed, or queued/copying and never needed)
        count_unused_at_end(c, self.unused_pf, self.inflight)
        marks, stalls, host_stall = self._batch_marks, self._stall_marks, self._stall_host_s
        spans, moved, demand, prefetch = e.spans, e.bytes, e.bytes_demand, e.bytes_prefetch
        first = self._first_mark
        host = list(self.host_s)
        calls = self.predict_calls
        issue0: dict = {}
        if self._snap is not None:
            c0, i0, s0, h0, k0, m0, d0, p0, first, host0, calls0, issue0 = self._snap
            host = [a - b for a, b in zip(host, host0)]
            calls -= calls0
            subtract(c, c0)
            marks, stalls, host_stall, spans = marks[i0:], stalls[s0:], host_stall - h0, spans[k0:]
            moved, demand, prefetch = moved - m0, demand - d0, prefetch - p0
        self.batch_rows = []
        c.prefill_batches = c.decode_batches = 0
        c.prefill_s = c.decode_s = 0.0
        for ph, a, b_, T, bi in marks:
            dur = clock.seconds(a, b_)
            if ph == "prefill":
                c.prefill_batches += 1
                c.prefill_s += dur
            else:
                c.decode_batches += 1
                c.decode_s += dur
            self.batch_rows.append({"batch": bi, "phase": ph, "tokens": T, "duration_ms": dur * 1e3})
        c.stall_s = sum(clock.seconds(a, b) for a, b in stalls) if cuda else host_stall
        total = clock.seconds(first, marks[-1][2]) if marks else 0.0
        busy = sum(e.copier.span_s(h) for h in spans)
        m = finalize(c, total_s=total, busy_s=busy, bytes_h2d=moved, bytes_demand=demand, bytes_prefetch=prefetch)
        m.update({k: h * 1e3 for k, h in zip(HOST_METRICS, host)})
        # of which issuing chunk groups to the copy stream (wherever it happened; not one of HOST_METRICS, whose
        # parts are disjoint), and of it the part inside the demand loads' / the prefetches' own submit: the
        # per-group issue cost a profile charges apart from the transfer bookkeeping (copy_issue_host_us)
        m.update({k: v - issue0.get(k, 0) for k, v in e.issue_totals().items()})
        m["predict_calls"] = calls
        m["slab_slots"] = self.n_slots
        m["scratch_slots"] = self.scratch.n_slots
        m["cache_capacity_bytes"] = self.cache.capacity_bytes
        m["timing"] = "cuda_events" if cuda else "perf_counter (CPU: not a GPU measurement)"
        m["copy_api"] = getattr(e.copier, "api", "cpu")
        return m
