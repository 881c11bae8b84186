"""The host-to-device link: copy engines as SimPy processes serving a two-level priority queue of transfers.

- Demand loads (`high`) go before prefetches (`low`); FIFO within a level. An idle engine starts a submitted
  transfer at once (a demand submitted later in the same instant waits for that piece, as on real hardware).
- A transfer is split into chunks (one chunk unless chunked prefetch is on). A chunk in flight is never
  preempted: a high-priority arrival waits for at most the chunk in progress.
- For speed a copy engine moves all remaining chunks of a transfer with one timeout (a "piece"); when a
  demand load must not wait behind it, the engine process is interrupted and stops at the end of the chunk
  in flight (exactly what chunk-by-chunk copying gives). An idle engine sleeps on an event, which the next
  submission schedules to fire when its piece is done: one event per transfer, none per chunk, no process
  per transfer; a waiter sleeps on the event of the piece that lands its transfer.
"""

from __future__ import annotations

from collections import deque

import simpy


class Transfer:
    __slots__ = ("key", "nbytes", "n_chunks", "chunks_left", "chunk_s", "high", "speculative", "cached", "done",
                 "finished", "used", "dropped", "active", "moved", "seq", "t_enqueue", "t_start", "t_end", "target",
                 "final_ev")

    def __init__(self, key, nbytes: int, n_chunks: int, chunk_s: float, *, high: bool, speculative: bool,
                 cached: bool, seq: int, now: float, target=None):
        self.key = key
        self.nbytes = nbytes
        self.n_chunks = n_chunks
        self.chunks_left = n_chunks
        self.chunk_s = chunk_s
        self.high = high
        self.speculative = speculative
        self.cached = cached  # False: streamed into a scratch buffer outside the cache budget
        self.done: simpy.Event | None = None  # created only when someone waits
        self.finished = False
        self.used = False
        self.dropped = False
        self.active = False
        self.moved = 0
        self.seq = seq
        self.t_enqueue = now
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.target = target  # (batch, layer) a prefetch was issued for
        self.final_ev: simpy.Event | None = None  # the event of the piece that lands it, once that piece runs


class Link:
    """H2D copy engines. `on_complete(transfer)` is called when the last chunk of a live transfer lands."""

    def __init__(self, env: simpy.Environment, n_engines: int, on_complete, record=None):
        self.env = env
        self.high: deque[Transfer] = deque()
        self.low: deque[Transfer] = deque()
        self.on_complete = on_complete
        self.record = record  # list to append (name, start_s, dur_s, engine) chunk spans to, or None
        self._idle: list[tuple[int, simpy.Event]] = []
        self._started: list[tuple | None] = [None] * n_engines
        self._running: list[tuple | None] = [None] * n_engines  # (transfer, start, chunks) of the piece moving
        self._cut_at: list[float] = [0.0] * n_engines
        self.busy_s = 0.0
        self.bytes = 0
        self.bytes_demand = 0
        self.bytes_prefetch = 0
        self.n_busy = 0
        self.pending_bytes = 0  # bytes of live transfers not yet moved (the in-flight bound reads it)
        self.procs = [env.process(self._copy_engine(i)) for i in range(n_engines)]

    # -- queue operations (called by the layer loop and the prefetcher) ---------------------------------------
    def submit(self, t: Transfer, at: float | None = None) -> None:
        """Queue a transfer. `at` (>= now): the caller's own time, when it runs ahead of the clock and nothing
        is scheduled before `at` (so nobody else can touch the link meanwhile); an idle engine starts it then."""
        (self.high if t.high else self.low).append(t)
        self.pending_bytes += t.nbytes
        env = self.env
        start = env.now if at is None else at
        if self._idle:
            engine, ev = self._idle.pop()
            n = t.chunks_left
            dur = n * t.chunk_s
            t.active = True
            t.t_start = start
            self.n_busy += 1
            self._started[engine] = (t, n, start, dur)
            self._running[engine] = (t, start, n)
            t.final_ev = ev
            # the idle engine's wake-up event fires when this piece is done: one event per piece
            ev._ok = True  # what Event.succeed() does, with a delay (SimPy 4 Environment.schedule)
            ev._value = None
            env.schedule(ev, delay=start - env.now + dur)
        elif t.high:
            self._preempt(start)

    def wait_event(self, t: Transfer):
        """An event that fires once `t` has landed: its last piece's event when that piece is in flight."""
        ev = t.final_ev
        if ev is not None and not ev.processed:
            return ev
        if t.done is None:
            t.done = self.env.event()
        return t.done

    def upgrade(self, t: Transfer, at: float | None = None) -> None:
        """Make a queued/in-flight prefetch a demand load (moved to the back of the high queue)."""
        if t.high or t.finished or t.dropped:
            return
        self.low.remove(t)
        t.high = True
        self.high.append(t)
        self._preempt(self.env.now if at is None else at)

    def drop(self, t: Transfer, at: float | None = None) -> None:
        """Abandon a transfer: its queued chunks are discarded; a chunk in flight still completes (wasted)."""
        if t.finished or t.dropped:
            return
        (self.high if t.high else self.low).remove(t)
        t.dropped = True
        self.pending_bytes -= t.nbytes - t.moved
        if t.active:
            for engine, run in enumerate(self._running):
                if run is not None and run[0] is t:
                    self._cut(engine, self.env.now if at is None else at)

    def busy(self) -> bool:
        return self.n_busy > 0

    # -- preemption at chunk boundaries ------------------------------------------------------------------------
    def _preempt(self, at: float) -> None:
        """A high-priority transfer waits: cut every running piece that it (or another queued one) must not
        wait behind, at the end of the chunk in flight."""
        for engine, run in enumerate(self._running):
            if run is None:
                continue
            t = run[0]
            if not t.high or self._high_ahead(t):
                self._cut(engine, at)

    def _high_ahead(self, t: Transfer) -> bool:
        for x in self.high:
            if x is t:
                return False
            if not x.active:
                return True
        return False

    def _cut(self, engine: int, at: float) -> None:
        t, start, n = self._running[engine]
        self._running[engine] = None
        if n <= 1:
            return  # one chunk: it is never preempted anyway
        t.final_ev = None  # this piece no longer lands the transfer
        self._cut_at[engine] = at
        self.procs[engine].interrupt("preempted at a chunk boundary")

    # -- the copy engine process ---------------------------------------------------------------------------------
    def _pick(self) -> Transfer | None:
        for q in (self.high, self.low):
            for t in q:
                if not t.active:
                    return t
        return None

    def _copy_engine(self, engine: int):
        """One copy engine. A piece is all remaining chunks of a transfer, moved with one timeout; a transfer
        that must give way (a demand load arrives) is cut at the end of the chunk in flight."""
        env = self.env
        while True:
            t = self._pick()
            cut = False
            if t is None:
                ev = env.event()
                self._idle.append((engine, ev))
                try:
                    yield ev
                except simpy.Interrupt:
                    cut = True
                started = self._started[engine]
                if started is None:
                    continue
                self._started[engine] = None
                t, n, start, dur = started
            else:
                n = t.chunks_left
                dur = n * t.chunk_s
                t.active = True
                start = env.now
                if t.t_start is None:
                    t.t_start = start
                self.n_busy += 1
                ev = env.timeout(dur)
                t.final_ev = ev
                self._running[engine] = (t, start, n)
                try:
                    yield ev
                except simpy.Interrupt:
                    cut = True
            if cut:  # finish the chunk in flight at the time of the preemption request, then give way
                x = (max(self._cut_at[engine], env.now) - start) / t.chunk_s
                j = round(x)
                k = j if (abs(x - j) < 1e-9 and j >= 1) else int(x) + 1
                k = min(max(k, 1), n)
                n, dur = k, k * t.chunk_s
                if start + dur > env.now:
                    yield env.timeout(start + dur - env.now)
            else:
                self._running[engine] = None
            self.n_busy -= 1
            t.active = False
            self.busy_s += dur
            before = t.nbytes * (t.n_chunks - t.chunks_left) // t.n_chunks
            t.chunks_left -= n
            after = t.nbytes * (t.n_chunks - t.chunks_left) // t.n_chunks
            moved = after - before
            t.moved += moved
            self.bytes += moved
            if t.speculative:
                self.bytes_prefetch += moved
            else:
                self.bytes_demand += moved
            if self.record is not None:
                self.record.append((t, start, dur, engine))
            if t.dropped:
                continue
            self.pending_bytes -= moved
            if t.chunks_left == 0:
                (self.high if t.high else self.low).remove(t)
                t.finished = True
                t.t_end = env.now
                self.on_complete(t)
