"""The discrete-event model of one run: the GPU compute stream (layer loop), the H2D link, the expert cache and
the prefetcher, on one SimPy environment. Simulated time only; deterministic.

Per batch and layer (the GPU stream, one SimPy process `gpu_stream`):

1. dense part (attention, norms, gate). The stream runs ahead of the SimPy clock and syncs only when some
   event is due before its own time or when it must touch the link, so a layer whose experts are all resident
   while the link is idle costs no SimPy event at all (a sync processes the due events itself: see `sync`);
2. at the gate: one demand lookup per unique expert of the layer (ExpertCache.lookup, in first-occurrence
   order, as sim.access.lookup_stream), all held in the cache (`ExpertCache.hold`: not evictable) until the
   layer's experts are done. hit = resident and
   fully copied; a prefetch still queued or copying is a late prefetch (a miss); otherwise a demand miss.
   With `early_preemption` the layer's queued speculative transfers that are not needed are dropped, the
   needed ones raised to high priority, and every demand miss is enqueued now, at high priority. With
   `cpu_experts`, a demand miss is computed on the CPU (one CPU worker, concurrent with the GPU) when its CPU
   time is below copy + GPU time, and copied into the cache in the background at low priority (so the cache
   still learns). The prefetcher then predicts layer l+d;
3. experts in order: ascending id, or with `reordered_inference` resident first, then in flight (copying,
   queued high, queued low), then not started. Reaching an expert that is not resident: without early
   preemption its demand load is issued now (or its prefetch raised to high priority); the stream waits for
   the copy (stall). The layer ends when the GPU experts and the CPU experts are done. Two refinements where the
   profile measured them for this geometry (sim.hardware: `group_ms`, `kernel_ms`): the leading experts that
   are resident and take every token are one group at `group_ms` each (the executor batches them), and an
   expert that waited for its copy costs only max(kernel, its time - the wait) after it (its launches ran
   during the wait).

Copies reserve their cache slot when enqueued (evicting then, per policy) and are not evictable until they land
(the cache reads the engine's `inflight` dict: `ExpertCache(busy=...)`).
A demand miss that cannot get a slot (capacity 0, or everything pinned) is streamed through a scratch buffer
outside the cache budget; a prefetch that cannot get one is skipped. Prefetches target layers of the same
batch only (l + d < n_layers).
"""

from __future__ import annotations

from heapq import heappop

import simpy
from simpy.events import NORMAL

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
from sim.engine.link import Call, Link, Transfer
from sim.engine.metrics import Counters, count_unused_at_end, finalize, snapshot, subtract
from sim.engine.prefetcher import Prefetcher
from sim.engine.schedule import SequenceData, demand_lookups, iter_batches, layer_sets
from sim.hardware import CostModel
from traces.format import TraceMeta


def leading_group(order, kt, ready, cnt, T: int) -> int:
    """How many of a layer's first experts in compute order the executor computes as one resident group: resident
    now (`ready` None: all are) and each taking every token of the batch (`cnt` None: one token); 0 when fewer
    than two."""
    n = 0
    for e in order:
        if (ready is not None and kt[e] not in ready) or (cnt is not None and cnt[e] != T):
            break
        n += 1
    return n if n > 1 else 0


def group_then_each(carry: float, order, cnt, T: int, es, gs: float) -> float:
    """An all-resident layer's experts in `order` (`cnt`: tokens per expert): the leading ones that take every
    token as one group (gs each), the others at their own cost (es by tokens; the busy-link tables while a copy
    moves)."""
    n = leading_group(order, None, None, cnt, T)
    for _ in range(n):
        carry += gs
    for e in order[n:]:
        carry += es[cnt[e]]
    return carry


def _fire(env: simpy.Environment, entry: tuple) -> None:
    """What simpy.Environment.step does with an entry popped from its queue (SimPy 4): move the clock, take the
    event's callbacks, call them, fail on an unhandled failed event. The link's and the prefetcher's bare events
    (link.Call) run their function directly (a cancelled one, callbacks emptied, runs nothing)."""
    env._now = entry[0]
    event = entry[3]
    if type(event) is Call:
        if event.callbacks:
            event.callbacks = None
            event.fn(*event.args)
        else:
            event.callbacks = None
        return
    callbacks, event.callbacks = event.callbacks, None
    for callback in callbacks:
        callback(event)
    if not event._ok and not hasattr(event, "_defused"):
        exc = type(event._value)(*event._value.args)
        exc.__cause__ = event._value
        raise exc


class Simulation:
    def __init__(
        self,
        meta: TraceMeta,
        sequences: list[SequenceData],
        cost: CostModel,
        *,
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
        predictor_cost_s: float = 0.0,
        predictor_token_s: float = 0.0,
        chunked_prefetch: bool = False,
        chunks: int = 3,
        early_preemption: bool = False,
        reordered_inference: bool = False,
        cpu_experts: bool = False,
        trace=None,
        record: bool = False,
        check: bool = False,
        warmup_batches: int = 0,
        predictor_blocking: bool = False,
        late_issue_on_stream: bool = False,
    ):
        """`predictor_blocking`: the predictor runs on the compute timeline at the gate, and its copies are issued
        when it returns (the real executor predicts on its host, the GPU waiting); by default it runs beside the
        stream and only delays its own copies (`predictor_cost_s` + `predictor_token_s` x the batch's tokens
        later). `late_issue_on_stream` (not blocking): a prediction ready after its gate is issued by the compute
        stream's host thread, which pays its issue cost at its next sync (the executor's predictor thread only
        predicts); by default a prefetch worker of its own issues it, at no cost to the stream."""
        from sim.policies import policy_class

        self.meta = meta
        self.sequences = sequences
        self.phase = phase
        self.batch_size = batch_size
        self.cost = cost
        self.env = simpy.Environment()
        future = None
        if policy_class(cache_policy).needs_future:
            future = demand_lookups(sequences, phase, batch_size)
        self.inflight: dict = {}  # key -> Transfer (cached, queued or copying): not evictable
        self.cache = ExpertCache(n_layers=meta.n_layers, n_experts=meta.n_experts, expert_bytes=meta.expert_bytes,
                                 capacity_bytes=cache_capacity_bytes, scope=cache_scope, policy=cache_policy,
                                 policy_params=policy_params, future=future, busy=self.inflight)
        self.ready: set = set()  # cached and fully copied
        self.unused_pf: set = set()  # landed prefetches not yet looked up
        self.c = Counters()
        self.chunks = chunks if chunked_prefetch else 1
        # per layer: (bytes of an expert, seconds of one chunk) of a transfer
        self._xfer = [(cost.expert_bytes[la], cost.chunk_s[la] if self.chunks > 1 else cost.xfer_s[la])
                      for la in range(meta.n_layers)]
        self.early_preemption = early_preemption
        self.reordered = reordered_inference
        if cpu_experts and cost.profile.cpu_expert_compute is None:
            raise ValueError(f"cpu_experts needs a cpu_expert_compute table in profile {cost.profile.name!r}")
        self.cpu_experts = cpu_experts
        self.check = check
        self.record = record
        self.spans: list | None = [] if record else None
        self.link_spans: list | None = [] if record else None
        self.batch_rows: list | None = [] if record else None
        self.link = Link(self.env, cost.copy_engines, self._landed, self.link_spans, lookahead=cost.lookahead,
                         issue_s=cost.issue_s, issue_host_s=cost.copy_issue_host_s)
        self.seq = 0
        self.gated = (-1, -1)
        # predictions not issued (Prefetcher -> not_issued): pending ones by target gate (batch, layer) -> experts,
        # and the demand misses of the gates of this batch and the one before (for predictions ready too late)
        self._unissued: dict[tuple[int, int], set] = {}
        self._gate_missed: dict[tuple[int, int], list] = {}
        self._gate_missed_before: dict[tuple[int, int], list] = {}
        predictor.reset()
        self.prefetcher = Prefetcher(self, predictor, distance, top_n, max_inflight_bytes, predictor_cost_s, trace,
                                     meta=meta, token_s=predictor_token_s)
        self.max_used_bytes = 0
        self.warmup_batches = warmup_batches  # leading batches simulated but left out of the metrics
        self.predictor_blocking = predictor_blocking
        # host time of predictions issued after their gate (ready later: `issued_later`), owed by the compute stream
        self.late_issue_on_stream = late_issue_on_stream
        self.prefetch_debt_s = 0.0
        self._snap: tuple | None = None

    def warm(self, keys) -> int:
        """Make experts resident before the run (a warm start); returns how many fit."""
        n = 0
        for key in keys:
            key = (int(key[0]), int(key[1]))
            victims = self.cache.insert(key)
            if victims is None:
                continue
            self._evicted(victims)
            self.ready.add(key)
            n += 1
        return n

    # -- cache + link glue --------------------------------------------------------------------------------------
    def _evicted(self, victims) -> None:
        for v in victims:
            self.ready.discard(v)
            if v in self.unused_pf:
                self.unused_pf.discard(v)
                self.c.n_prefetch_unused += 1

    def start_transfer(self, key, *, speculative: bool, target=None, background: bool = False,
                       at: float | None = None) -> Transfer | None:
        """Reserve a slot (or stream) and queue the copy. `at`: the caller's own time if it runs ahead of the
        clock (see _gpu_stream); the link starts it then if an engine is idle."""
        cache = self.cache
        victims = cache.insert(key)  # (not evictable once in self.inflight, below)
        if victims is None:
            if speculative or background:
                return None
            cached = False
        else:
            cached = True
            if victims:  # self._evicted(victims), inline
                ready = self.ready
                unused = self.unused_pf
                for v in victims:
                    ready.discard(v)
                    if v in unused:
                        unused.discard(v)
                        self.c.n_prefetch_unused += 1
            if self.check:
                assert cache.used_bytes <= cache.capacity_bytes, "cache capacity exceeded"
                self.max_used_bytes = max(self.max_used_bytes, cache.used_bytes)
        nbytes, chunk_s = self._xfer[key[0]]
        seq = self.seq
        self.seq = seq + 1
        t = Transfer(key, nbytes, self.chunks, chunk_s, not (speculative or background), speculative, cached, seq)
        if cached:
            self.inflight[key] = t
        if speculative:
            self.c.prefetches += 1
        else:
            self.c.demand_loads += 1
        self.link.submit(t, at)
        return t

    def issued_later(self, n_prefetches: int) -> None:
        """A prediction that was ready after its gate has just been issued (`n_prefetches` copies queued). With
        `late_issue_on_stream` the host's main thread issued it between its launches, so its cost, as at the gate
        (prefetch_call_host_us + prefetch_transfer_host_us per copy), is owed by the compute stream and paid at its
        next sync."""
        if self.late_issue_on_stream:
            cost = self.cost
            self.prefetch_debt_s += cost.prefetch_call_host_s + n_prefetches * cost.prefetch_host_s

    def not_issued(self, target: tuple[int, int], experts) -> None:
        """The prefetcher did not issue these predicted experts for gate `target` (batch, layer): those the batch
        misses on demand there count as n_prefetch_not_issued, at the gate, or now if it has passed."""
        if target <= self.gated:
            missed = self._gate_missed.get(target) or self._gate_missed_before.get(target)
            if missed:
                self.c.n_prefetch_not_issued += sum(1 for e in experts if e in missed)
        elif experts:
            self._unissued.setdefault(target, set()).update(experts)

    def _landed(self, t: Transfer) -> None:
        if t.cached:
            key = t.key
            del self.inflight[key]  # (evictable again)
            self.ready.add(key)
            if t.speculative and not t.used:
                self.unused_pf.add(key)
        if t.done is not None:
            t.done.succeed()

    def _drop(self, t: Transfer, at: float | None = None) -> None:
        self.link.drop(t, at)
        if t.cached:
            del self.inflight[t.key]
            self.cache.remove(t.key)
        self.c.n_prefetch_dropped += 1
        self.c.n_prefetch_unused += 1

    def _state(self, key) -> tuple:
        """Order of reordered inference (sim.engine.decisions.expert_state)."""
        return expert_state(key, self.ready, self.inflight)

    # -- the GPU compute stream -----------------------------------------------------------------------------------
    def _gpu_stream(self, batches):
        """The GPU compute stream. It runs ahead of the SimPy clock: `carry` is compute time not yet yielded,
        so the stream's own time is env._now + carry. It yields (syncs the clock) only before it touches the link
        or the cache while some event is scheduled at or before its own time; otherwise nothing else can have
        happened meanwhile and skipping the yield is exact. A layer whose experts are all resident while the
        link is idle therefore costs no SimPy event at all."""
        env = self.env
        cache = self.cache
        ready = self.ready
        inflight = self.inflight
        unused_pf = self.unused_pf
        link = self.link
        c = self.c
        cost = self.cost
        L = self.meta.n_layers
        pf = self.prefetcher if self.prefetcher.active else None
        ep = self.early_preemption
        ro = self.reordered
        cpu = self.cpu_experts
        check = self.check
        spans = self.spans
        overlap_penalty = cost.overlap_penalty  # (sim.hardware: a copy slows the kernels, not the launches)
        penalized = overlap_penalty != 1.0
        group_s = cost.group_s  # per layer: a resident group's cost per expert, or None (sim.hardware)
        demand_host = cost.demand_host_s
        prefetch_host = cost.prefetch_host_s
        prefetch_call = cost.prefetch_call_host_s  # per call with a prediction to issue (prefetch_call_host_us)
        issue_host = cost.copy_issue_host_s  # per chunk group issued (copy_issue_host_us; 0: not charged apart)
        blocking = self.predictor_blocking
        carry = 0.0
        queue = env._queue  # SimPy 4 internals: a heap of (time, priority, event id, event)
        eids = env._eid

        # The stream drives the event queue itself instead of yielding to SimPy: `sync(carry)` is exactly what
        # `yield env.timeout(carry)` does (the same event id is taken, every event ordered before that timeout is
        # processed by env.step() in the same order, then the clock moves to the timeout's time) and `wait(ev)` is
        # `yield ev` (events are processed until ev has been), without a Timeout object or a process switch.
        # Popped events are processed by _fire, as env.step() would. `n`: the
        # timeout's event id when it was taken earlier (the direct issue below), else a fresh one.
        def sync(carry: float, n: int | None = None) -> None:
            """With copy_issue_host_us, the host time of the chunk groups the link moved meanwhile (the executor's
            main thread issues them between its launches) is spent here too: the stream's clock moves on by it,
            events in that time happening as they come, until no debt is left."""
            t = env._now + carry
            if n is None:
                n = next(eids)
            while True:
                while queue:
                    h = queue[0]
                    if h[0] < t or (h[0] == t and (h[1] < NORMAL or (h[1] == NORMAL and h[2] < n))):
                        heappop(queue)
                        _fire(env, h)
                    else:
                        break
                env._now = t
                debt = link.issue_debt + link.submit_debt
                pdebt = self.prefetch_debt_s  # (predictions issued later, `issued_later`)
                if not (debt or pdebt):
                    return
                link.issue_debt = link.submit_debt = 0.0
                self.prefetch_debt_s = 0.0
                c.host_copy_issue_s += debt
                c.host_prefetch_issue_s += pdebt
                t += debt + pdebt
                n = next(eids)

        def paid_submit() -> float:
            """The host time of the chunk group a submit just issued to an idle link (Link.submit_debt): counted,
            cleared, for the caller to add to its carry."""
            debt = link.submit_debt
            link.submit_debt = 0.0
            c.host_copy_issue_s += debt
            return debt

        def wait(ev) -> None:
            while ev.callbacks is not None:
                if not queue:
                    raise RuntimeError("the GPU stream waits for a copy that never lands")
                _fire(env, heappop(queue))
        lookup_layer = cache.lookup_layer
        hold = cache.hold
        hooks = touch_hooks(cache)
        touched = hooks is not None  # every layer's keys are touched at its end
        resident = cache.resident
        table = key_table(L, self.meta.n_experts)
        for batch in batches:
            T = batch.tokens
            cost.prepare(T)
            expert_s = cost.expert_s
            dense_s = cost.dense_s
            kernel_s = cost.kernel_s
            expert_busy_s, kernel_busy_s, group_busy_s = cost.expert_busy_s, cost.kernel_busy_s, cost.group_busy_s
            xfer_s = cost.xfer_s
            cpu_s = cost.cpu_s
            sets = layer_sets(batch.experts)
            b = batch.index
            start = env._now + carry
            stall0, hits0, look0 = c.stall_s, c.hits, c.lookups
            if b == self.warmup_batches and b > 0:  # warm-up over: metrics count from here
                link_ = self.link
                self._snap = (snapshot(c), start, link_.busy_s, link_.bytes, link_.bytes_demand,
                              link_.bytes_prefetch)
            if pf is not None:
                pf.start_batch(batch)
                self._gate_missed_before, self._gate_missed = self._gate_missed, {}
            unissued = self._unissued
            gate_missed = self._gate_missed
            for layer in range(L):
                ids, counts = sets[layer]
                d = dense_s[layer][T]
                if spans is not None:
                    spans.append(("dense", layer, b, env._now + carry, d))
                carry += d
                if queue and queue[0][0] <= env._now + carry:  # something happens before the gate: let it happen first
                    hold(())  # (the last layer's experts were held until here: nothing could evict them before)
                    sync(carry)
                    carry = 0.0
                self.gated = (b, layer)
                # -- the gate: lookups ---------------------------------------------------------------------------
                kt = table[layer]
                keys = [kt[e] for e in ids]
                missing = classify_lookups(layer, ids, ready, inflight, unused_pf, c, keys)
                if pf is not None:  # the demand misses here, against the predictions that were not issued
                    pend = unissued.pop((b, layer), None) if unissued else None
                    if missing is not None:
                        dm = gate_missed[(b, layer)] = [e for e in missing if kt[e] not in inflight]
                        if pend:
                            c.n_prefetch_not_issued += sum(1 for e in dm if e in pend)
                lookup_layer(keys, touched, missing is None)  # (and holds them; ready: resident)
                n_ids = len(ids)
                es = expert_s[layer]
                cnt = dict(zip(ids, counts)) if counts is not None else None
                local: dict | None = None
                cpu_done = 0.0
                vt = env._now + carry  # the gate time; nothing is scheduled before it (checked above)
                if ep and link.low:  # early preemption: this layer's queued speculation is now exact or useless
                    up, drop = early_preemption_plan(layer, link.low)
                    for t in up:
                        link.upgrade(t, vt)
                    for t in drop:
                        self._drop(t, vt)
                if missing is not None:
                    local = {}
                    if cpu:
                        cpu_s_l = cpu_s[layer]
                        now = vt
                        for e in missing:
                            key = kt[e]
                            if key in inflight:
                                continue
                            n = cnt[e] if cnt is not None else 1
                            if cpu_s_l[n] < xfer_s[layer] + es[n]:
                                s0 = max(now, self._cpu_free)
                                self._cpu_free = s0 + cpu_s_l[n]
                                cpu_done = self._cpu_free
                                c.cpu_experts_computed += 1
                                local[key] = None
                                # copy it in the background at low priority, so the cache keeps learning
                                self.start_transfer(key, speculative=False, background=True, at=vt)
                                if spans is not None:
                                    spans.append(("cpu", key, b, s0, cpu_s_l[n]))
                    order = compute_order(layer, ids, reordered=ro, any_missing=True, state=self._state)
                    if local:
                        order = [e for e in order if (layer, e) not in local]
                    if ep:
                        for e in gate_demand_loads(layer, order, ready, inflight):
                            local[kt[e]] = self.start_transfer(kt[e], speculative=False, at=vt)
                            carry += demand_host
                            c.host_demand_issue_s += demand_host
                        if link.submit_debt:  # the first load found the link idle: the gate issued its copy
                            carry += paid_submit()
                # -- the prefetcher ----------------------------------------------------------------------------------
                direct = None
                if pf is not None and blocking:
                    r = pf.predict_at_gate(layer, L)
                    if layer + pf.distance < L:  # the predictor ran: the stream waits for it
                        carry += pf.cost_s
                        c.host_predict_s += pf.cost_s
                    if r is not None:
                        if carry and queue and queue[0][0] <= env._now + carry:
                            sync(carry)  # copies landing while it predicted land first
                            carry = 0.0
                        n0 = c.prefetches
                        pf.issue(r[0], r[1], b, at=env._now + carry)
                        issue_cost = prefetch_call + (c.prefetches - n0) * prefetch_host
                        carry += issue_cost
                        c.host_prefetch_issue_s += issue_cost
                        if link.submit_debt:  # a copy found the link idle: this call issued its first group
                            carry += paid_submit()
                elif pf is not None:
                    r = pf.predict_at_gate(layer, L)
                    if r is not None:
                        experts, target = r
                        free = pf.free_at
                        when = (free if free > vt else vt) + pf.cost_s  # (max(vt, free), without a C call)
                        pf.free_at = when
                        if when > vt:
                            if local is None and spans is None and not (queue and queue[0][0] <= when):
                                direct = r  # issued below without an event, if before the layer's end
                            else:
                                pf.schedule(experts, target, b, when - env._now)
                        else:
                            n0 = c.prefetches
                            pf.issue(experts, target, b, at=vt)
                            issue_cost = prefetch_call + (c.prefetches - n0) * prefetch_host  # host cost of issuing
                            carry += issue_cost
                            c.host_prefetch_issue_s += issue_cost
                            if link.submit_debt:
                                carry += paid_submit()
                # -- the experts -------------------------------------------------------------------------------------
                gs = group_s[layer]
                if local is None and spans is None:
                    # all resident at the gate, and held until its end: compute only (no
                    # event is processed meanwhile, so whether the link is busy does not change during the loop)
                    busy = penalized and link.n_busy
                    esl = expert_busy_s[layer] if busy else es
                    gsl = group_busy_s[layer] if busy else gs
                    if cnt is None:  # one token: every expert takes it (a resident group when gs is measured)
                        x = gsl if gs is not None and n_ids > 1 else esl[1]
                        for _ in ids:
                            carry += x
                    elif gs is not None and n_ids > 1:
                        carry = group_then_each(carry, sorted(ids), cnt, T, esl, gsl)
                    else:
                        for e in sorted(ids):
                            carry += esl[cnt[e]]
                    if direct is not None:
                        # What the scheduled issue would do, without its event: nothing is queued before `when` and
                        # this layer computes without touching the link or the cache, so the issue can run now with
                        # the clock at `when` (as its event would), then a sync to the layer's end. `e0`, taken in
                        # place of that sync's own id, orders the issue's new events after the sync, as they were.
                        if when <= env._now + carry:
                            e0 = next(eids)
                            now = env._now
                            env._now = when
                            pf.issue_late(experts, target, b)
                            env._now = now
                            sync(carry, e0)
                            carry = 0.0
                        else:  # (ids: nothing was taken since the gate, so scheduling it now is the same)
                            pf.schedule(experts, target, b, when - env._now)
                else:  # (the per-expert loop below: some expert missing at the gate, or spans recorded)
                    if local is None:
                        local = {}
                        order = sorted(ids) if n_ids > 1 else ids
                    if gs is not None and order:
                        # the leading experts resident now that take every token: one group (executor.runtime's
                        # compute_experts), the rest one by one below
                        n = leading_group(order, kt, ready, cnt, T)
                        if n:
                            x = group_busy_s[layer] if (penalized and link.n_busy) else gs
                            if spans is not None:
                                spans.append(("expert", kt[order[0]], b, env._now + carry, n * x))
                            for _ in range(n):
                                carry += x
                            order = order[n:]
                    ks = kernel_s[layer]
                    for e in order:
                        key = kt[e]
                        tk = cnt[e] if cnt is not None else 1  # its tokens
                        x = es[tk]
                        if key not in ready:
                            pre = 0.0
                            if demand_host and key not in local and key not in inflight:
                                carry += demand_host  # the host issues this demand load (demand_transfer_host_us)
                                c.host_demand_issue_s += demand_host
                            vt = env._now + carry  # the GPU reaches this expert now
                            if carry and queue and queue[0][0] <= vt:  # let what happens before it happen first
                                sync(carry)
                                carry = 0.0
                                vt = env._now
                            if (issue_host and link._idle and key not in ready and key not in local
                                    and key not in inflight):
                                # its copy goes to an idle link: it can start only once the host has issued it
                                pre = issue_host
                                carry += pre
                                c.host_copy_issue_s += pre
                                vt = env._now + carry
                                if queue and queue[0][0] <= vt:
                                    sync(carry)
                                    carry = 0.0
                                    vt = env._now
                            if key not in ready:
                                t = local.get(key)
                                if t is None:
                                    t = inflight.get(key)
                                if t is None:  # not requested yet: the demand load starts when the stream gets here
                                    t = local[key] = self.start_transfer(key, speculative=False, at=vt)
                                    if pre:  # its first group was paid above, before its start
                                        if link.submit_debt:
                                            link.submit_debt = 0.0
                                        else:
                                            t.prepaid = 1  # (queued after all: the group goes out later)
                                    elif link.submit_debt:
                                        carry += paid_submit()
                                if not t.finished:  # it lands after vt: nothing is scheduled before vt
                                    if not t.high:
                                        link.upgrade(t, vt)
                                    wait(link.wait_event(t))
                                    waited = env._now - vt
                                    c.stall_s += waited
                                    carry = 0.0
                                    # the groups issued while the stream waited: the executor's host issued them
                                    # while it waited for this copy (engine.wait), off the critical path
                                    link.issue_debt = link.submit_debt = 0.0
                                    if waited and ks is not None:
                                        # its launches ran while the stream waited for the copy: the kernels, or what
                                        # is left of the launches, remain (sim.hardware, kernel_ms)
                                        k_ = ks[tk]
                                        x = k_ if k_ > x - waited else x - waited
                        if check:
                            assert key in ready or (local.get(key) is not None and local[key].finished), \
                                f"expert {key} computed while not resident"
                        if penalized and link.n_busy:
                            kb = kernel_busy_s[layer]
                            if kb is None:
                                x *= overlap_penalty
                            elif kb[tk] > x:  # the kernel slowed by the copy outlasts the launches
                                x = kb[tk]
                        if spans is not None:
                            spans.append(("expert", key, b, env._now + carry, x))
                        carry += x
                    if cpu_done:
                        gpu_end = env._now + carry
                        if cpu_done > gpu_end:
                            c.stall_s += cpu_done - gpu_end
                            carry = cpu_done - env._now
                if carry and pf is not None and pf.pending and pf.next_issue <= env._now + carry:
                    # a prediction issues (inserts, evicts) before this layer's end, while its experts are held
                    sync(carry)
                    carry = 0.0
                if hooks is not None:  # recency = order of first use in the batch (touch_in_use_order)
                    if missing is None:  # all resident at the gate and held since: still resident
                        touch = hooks[layer]
                        for key in keys:
                            touch(key)
                    else:
                        touch_in_use_order(hooks, resident, layer, ids, keys)
            end = env._now + carry
            dur = end - start
            c.layer_steps += L
            c.batches += 1
            c.tokens += T
            if batch.phase == "prefill":
                c.prefill_batches += 1
                c.prefill_s += dur
            else:
                c.decode_batches += 1
                c.decode_s += dur
            if self.batch_rows is not None:
                self.batch_rows.append({
                    "batch": b, "phase": batch.phase, "tokens": T, "sequences": batch.sequences.tolist(),
                    "positions": batch.positions.tolist(), "start_ms": start * 1e3, "end_ms": end * 1e3,
                    "duration_ms": dur * 1e3, "stall_ms": (c.stall_s - stall0) * 1e3,
                    "lookups": c.lookups - look0, "hits": c.hits - hits0, "bytes_h2d_cum": link.bytes,
                })
        hold(())
        if carry:
            sync(carry)
        return
        yield  # (a SimPy process; never reached)

    def run(self) -> dict:
        self._cpu_free = 0.0
        max_tokens = max([len(p[1]) for s in self.sequences for p in s.prompts] + [self.batch_size, 1])
        self.cost.prepare(max_tokens)
        batches = iter_batches(self.sequences, self.phase, self.batch_size)
        proc = self.env.process(self._gpu_stream(batches))
        self.env.run(until=proc)
        total = self.env.now
        c = self.c
        # prefetches still unused at the end (landed, or queued/copying and never needed)
        count_unused_at_end(c, self.unused_pf, self.inflight)
        link = self.link
        busy, moved, demand, prefetch = link.busy_s, link.bytes, link.bytes_demand, link.bytes_prefetch
        if self._snap is not None:  # leave the warm-up batches out
            c0, t0, busy0, moved0, demand0, prefetch0 = self._snap
            subtract(c, c0)
            total, busy, moved, demand, prefetch = (total - t0, busy - busy0, moved - moved0, demand - demand0,
                                                    prefetch - prefetch0)
        return finalize(c, total_s=total, busy_s=busy, bytes_h2d=moved, bytes_demand=demand,
                        bytes_prefetch=prefetch)
