"""The prefetcher: asks a predictor at distance d and turns its ranking into speculative transfers.

It builds a `BatchView` with only what a real system knows at the gate of layer l: the batch's routing up to
layer l, the earlier positions of each sequence, the hidden state entering layer l if the trace has it (only
fetched when the predictor declares `needs`), and router weights. The future is handed over only to
predictors with `reads_future` (the oracle), as a function of the target layer.

The predictor runs on the CPU, concurrently with the GPU, one call at a time: its prediction is ready at
max(gate time, predictor free) + cost (profile's predictor_cost_us: per call + per token of the batch, set at
each batch's start); the transfers are issued then. A
prediction that becomes ready after its target layer's gate is discarded. Predicted experts that are not issued
(that late prediction, the in-flight bound reached, no evictable slot) are reported to the engine
(`engine.not_issued(target_key, experts)`) where it counts them (the simulator: those the batch then misses at the
target gate, n_prefetch_not_issued); an engine without that method counts nothing.
"""

from __future__ import annotations

from collections import deque
from heapq import heappush

import numpy as np
from simpy.events import NORMAL

from predictors.base import BatchView, Predictor
from predictors.views import HiddenSource
from sim.engine.decisions import key_table, touch_hooks
from sim.engine.link import Call
from sim.engine.schedule import Batch
from traces.format import TraceMeta

_new = object.__new__
_INF = float("inf")


def make_view(base: dict, layer: int, current: np.ndarray, hidden) -> BatchView:
    """BatchView(**base, layer=layer, current=current, hidden=hidden), without the frozen dataclass's per-field
    object.__setattr__ calls (one view per layer and batch is on the simulator's hot path)."""
    v = _new(BatchView)
    d = v.__dict__
    d.update(base)
    d["layer"] = layer
    d["current"] = current
    d["hidden"] = hidden
    return v


class Prefetcher:
    """`engine`: the driver (the SimPy Simulation or the executor's runtime): its `ready`, `inflight`, `cache`,
    `link.pending_bytes`, `cost.expert_bytes`, `gated`, `env` and `start_transfer` are used (for a late issue,
    `issue_late`, also `c.prefetches` and `issued_later`).
    `meta`: the meta the run models (the executor's geometry sizes, its first N layers); default the engine's.
    `trace`: where optional arrays come from (router weights, hidden states), or None.
    `hidden_fn(batch, layer)`: the hidden state entering `layer` for the batch's tokens ([T, hidden] float32) or
    None; default: the trace's hidden states at the batch's `hidden_rows` (live mode passes its own).
    `cost_s` + `token_s` x the batch's tokens: a call's host time (`cost_s`, what the engine reads per call, is
    set once per batch, and only when `token_s` is non-zero)."""

    def __init__(self, engine, predictor: Predictor, distance: int, top_n: int | None, max_inflight_bytes: float | None,
                 cost_s: float, trace=None, *, meta: TraceMeta | None = None, hidden_fn=None, token_s: float = 0.0):
        self.engine = engine
        self.predictor = predictor
        self.distance = distance
        self.top_n = top_n
        self.max_inflight = max_inflight_bytes
        self.cost_s = cost_s
        self.call_s = cost_s
        self.token_s = token_s
        self.free_at = 0.0
        self.trace = trace
        self.meta = meta if meta is not None else engine.meta
        self.active = predictor.name != "none"
        self.reads_future = bool(predictor.reads_future)
        self.needs_hidden = "hidden_states" in predictor.needs and (self.meta.has_hidden_states or
                                                                      hidden_fn is not None)
        self.hidden_fn = hidden_fn if hidden_fn is not None else self._trace_hidden
        # the trace's hidden states, through one HiddenSource (predictors.views, as evaluation reads them): the input
        # of layer l at the batch's rows, and the previous position's (view.past_hidden, unless the batch brings its
        # own `past_hidden`, as live mode does); none for a caller with its own hidden_fn
        from_trace = self.needs_hidden and hidden_fn is None and trace is not None
        self._hidden_source = HiddenSource(trace) if from_trace else None
        self.router = None
        if self.meta.has_router_weights and trace is not None:
            self.router = trace.router_weights
        self.pending = 0  # predictions computed but not yet issued (their inserts are in the future)
        self._times: deque[float] = deque()
        self.next_issue = float("inf")
        self._batch: Batch | None = None
        self._future = None
        self._view_base: dict = {}
        self._touch_hooks = False  # the cache's touch hooks, looked up at the first issue
        self._keys = key_table(self.meta.n_layers, self.meta.n_experts)
        self._n = 0
        # observe() is skipped for predictors that do not override it (the base hook does nothing)
        self._observe = predictor.observe if type(predictor).observe is not Predictor.observe else None
        # a predictor that reads the future may answer for a whole batch at once (`rank_layers(experts)`: per
        # layer, predict()'s experts); it is asked once per batch then (nothing to observe, no view to build)
        self._rank_layers = getattr(predictor, "rank_layers", None) if self.reads_future and \
            self._observe is None else None
        self._ranked: list | None = None
        self._not_issued = getattr(engine, "not_issued", None)

    def start_batch(self, batch: Batch) -> None:
        self._batch = batch
        # the view's per-batch fields, built once (predict_at_gate adds the layer's)
        self._view_base = {"meta": self.meta, "sequences": batch.sequences, "positions": batch.positions,
                           "past": batch.past, "phase": batch.phase, "router_weights": self.router}
        if self.needs_hidden:
            past = getattr(batch, "past_hidden", None)  # a live run's own (executor.live)
            src = self._hidden_source
            prev = getattr(batch, "prev_hidden_rows", None) if src is not None else None
            if past is None and prev is not None:
                past = lambda layer: src.hidden(layer, prev[:, layer])  # noqa: E731
            self._view_base["past_hidden"] = past
        T = batch.tokens
        self._n = self.top_n if self.top_n is not None else self.meta.top_k * T
        if self.token_s:
            self.cost_s = self.call_s + self.token_s * T  # every call on this batch sees its T tokens
        if self.reads_future:
            experts = batch.experts
            self._future = lambda layer: experts[:, layer, :]
            if self._rank_layers is not None:  # the oracle: every layer's answer at once (one call per batch)
                self._ranked = self._rank_layers(experts)

    def _trace_hidden(self, batch: Batch, layer: int):
        """The input of `layer` at the batch's rows (read-only float32), or None where a row has none."""
        src = self._hidden_source
        if batch.hidden_rows is None or src is None:
            return None
        rows = batch.hidden_rows[:, layer]
        return src.hidden(layer, rows) if (rows >= 0).all() else None

    def forget_hidden(self) -> None:
        """Drop the hidden-state arrays read so far (live mode: its stand-in trace holds only the running batch's)."""
        if self._hidden_source is not None:
            self._hidden_source = HiddenSource(self.trace)

    def predict_at_gate(self, layer: int, n_layers: int):
        """At the gate of `layer`: observe, then predict layer + d. Returns (experts best first, target) or None."""
        target = layer + self.distance
        ranked = self._ranked
        if ranked is not None:
            if target >= n_layers:
                return None
            experts = ranked[target][: self._n]
            return (experts, target) if experts else None
        batch = self._batch
        observe = self._observe
        if target >= n_layers and observe is None:
            return None  # nothing to predict, nothing to observe
        hidden = self.hidden_fn(batch, layer) if self.needs_hidden else None
        view = make_view(self._view_base, layer, batch.experts[:, : layer + 1], hidden)
        if observe is not None:
            observe(view)
        if target >= n_layers:
            return None
        p = self.predictor.predict(view, self.distance, self._future)
        experts = p.experts[: self._n].tolist()
        return (experts, target) if experts else None

    def needs_link(self, experts: list[int], target: int) -> bool:
        """Whether issuing these would start a transfer (else it only refreshes resident experts)."""
        ready, inflight = self.engine.ready, self.engine.inflight
        return any((target, e) not in ready and (target, e) not in inflight for e in experts)

    def schedule(self, experts, target, batch_key, delay: float) -> None:
        """Issue after `delay` (the predictor's CPU time)."""
        env = self.engine.env
        self.pending += 1
        when = env._now + delay
        times = self._times
        times.append(when)
        self.next_issue = times[0]
        # an event at `when` (link.call_in, inlined)
        heappush(env._queue, (when, NORMAL, next(env._eid), Call(self._delayed, (experts, target, batch_key))))

    def _delayed(self, experts, target, batch_key) -> None:
        self.pending -= 1
        times = self._times
        times.popleft()
        self.next_issue = times[0] if times else _INF
        self.issue_late(experts, target, batch_key)

    def issue_late(self, experts: list[int], target: int, batch_key: int) -> None:
        """`issue` for a prediction that was ready after its gate (scheduled, or run in place of its event by the
        engine); the engine is told how many copies it queued (`issued_later`)."""
        eng = self.engine
        n0 = eng.c.prefetches
        self.issue(experts, target, batch_key)
        eng.issued_later(eng.c.prefetches - n0)

    def issue(self, experts: list[int], target: int, batch_key: int, at: float | None = None) -> None:
        """Refresh the resident predicted experts and queue copies of the others (at `at`, the caller's own
        time when it runs ahead of the clock)."""
        eng = self.engine
        tgt = (batch_key, target)
        if tgt <= eng.gated:  # its layer already passed the gate: too late to matter
            if self._not_issued is not None:
                self._not_issued(tgt, experts)
            return
        hooks = self._touch_hooks
        if hooks is False:
            hooks = self._touch_hooks = touch_hooks(eng.cache)
        ready = eng.ready
        inflight = eng.inflight
        keys = self._keys[target]
        on_touch = hooks[target] if hooks is not None else None
        bound = self.max_inflight
        for i, e in enumerate(experts):  # (one pass: cheaper than testing for the all-resident case first)
            key = keys[e]
            if key in ready:  # (ready: resident) a prefetch of a resident expert refreshes it (ProMoE)
                if on_touch is not None:
                    on_touch(key)  # = cache.touch(key)
            elif key not in inflight:
                if bound is not None and eng.link.pending_bytes + eng.cost.expert_bytes[target] > bound:
                    if self._not_issued is not None:  # this one and the rest stay unissued
                        self._not_issued(tgt, [x for x in experts[i:] if keys[x] not in ready
                                               and keys[x] not in inflight])
                    break
                if eng.start_transfer(key, speculative=True, target=tgt, at=at) is None and \
                        self._not_issued is not None:  # no evictable slot
                    self._not_issued(tgt, (e,))
