"""The host-to-device link: copy engines serving a two-level priority queue of transfers, on the SimPy event queue.

- Demand loads (`high`) go before prefetches (`low`); FIFO within a level. An idle engine starts a submitted
  transfer at once (a demand submitted later in the same instant waits for that piece, as on real hardware).
- A transfer is split into chunks (one chunk unless chunked prefetch is on). A chunk in flight is never
  preempted: a high-priority arrival waits for at most the chunk in progress, and with `lookahead` L > 1 (the
  profile's `h2d.lookahead`: the executor keeps L chunk groups queued on its copy stream to hide its host round
  trip) for L - 1 more chunks already committed. Approximation: the committed chunks are the rest of the same
  piece only; when that piece has fewer left, it simply completes, and chunks the stream would have committed of
  the next transfer in pick order are not modelled (the waiting demand load goes next). L = 1 is the exact
  chunk-by-chunk model.
- Chunk groups: the executor hands a high-priority transfer's remaining chunks to its copy stream as one group
  and a low-priority one's one chunk at a time (executor.transfer), and the profile's `h2d.issue_overhead_us`
  (link time lost per chunk group, `issue_s`) is in every chunk's time (`Transfer.chunk_s`). A piece started at
  high priority is one group: it pays the issue overhead once, k chunks cost k * chunk_s - (k - 1) * issue_s.
  A low-priority piece upgraded while it moves is cut (its chunk in flight and committed ones finish) so that
  its rest goes as one high group, as in the executor.
- For speed a copy engine moves all remaining chunks of a transfer with one event (a "piece"); when a demand
  load must not wait behind it, the engine is interrupted (an urgent event at the request) and stops at the
  end of the chunk in flight (exactly what chunk-by-chunk copying gives). One event per piece, none per chunk,
  no process per transfer; a waiter waits for the event of the piece that lands its transfer.

The engines are callbacks on bare SimPy events (`Call`: a SimPy event without the Event machinery, pushed on the
environment's own queue with the same (time, priority, id) key a Timeout would get, and processed by
`Environment.step`). They used to be SimPy processes (one generator per engine); the callbacks do what the
process did, at the same simulated instants and in the same event order, without a process switch per piece.
"""

from __future__ import annotations

from collections import deque
from heapq import heappush

import simpy
from simpy.events import NORMAL, URGENT


def _run(ev) -> None:
    ev.fn(*ev.args)


_RUN = (_run,)  # every Call's callbacks until it is processed or cancelled (shared: nothing appends to them)


class Call:
    """A bare SimPy event that runs `fn(*args)` when the environment processes it. `callbacks is None` once
    processed (as simpy.Event.processed); setting `callbacks = []` before then cancels it. Nothing may wait on
    one by appending a callback (no process yields it). (No reference cycles: the garbage collector never has
    to find these.)"""

    __slots__ = ("callbacks", "fn", "args")
    _ok = True  # (what SimPy's step reads of an event: it succeeded, with no value)
    _value = None

    def __init__(self, fn, args: tuple = ()):
        self.callbacks = _RUN
        self.fn = fn
        self.args = args


def call_in(env: simpy.Environment, delay: float, fn, args: tuple = (), priority: int = NORMAL) -> Call:
    """Schedule `fn(*args)` after `delay` (what `env.timeout(delay).callbacks.append(...)` does: the same time,
    priority and event id, without the Timeout object)."""
    ev = Call(fn, args)
    heappush(env._queue, (env._now + delay, priority, next(env._eid), ev))
    return ev


class Transfer:
    __slots__ = ("key", "nbytes", "n_chunks", "chunks_left", "chunk_s", "high", "speculative", "cached", "done",
                 "finished", "used", "dropped", "active", "moved", "seq", "t_start", "final_ev", "prepaid")

    def __init__(self, key, nbytes: int, n_chunks: int, chunk_s: float, high: bool, speculative: bool,
                 cached: bool, seq: int):
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
        self.t_start: float | None = None
        self.final_ev: Call | None = None  # the event of the piece that lands it, once that piece runs
        self.prepaid = 0  # chunk groups whose host issue was charged when it was submitted (Link.submit)


class Link:
    """H2D copy engines. `on_complete(transfer)` is called when the last chunk of a live transfer lands."""

    def __init__(self, env: simpy.Environment, n_engines: int, on_complete, record=None, lookahead: int = 1,
                 issue_s: float = 0.0, issue_host_s: float = 0.0):
        if lookahead < 1:
            raise ValueError(f"h2d.lookahead must be >= 1, got {lookahead}")
        self.env = env
        self.lookahead = lookahead  # chunks a preempted piece still moves: the one in flight + (lookahead - 1)
        self.issue_s = issue_s  # the issue overhead in each chunk's time, paid once per high-priority piece
        # the host's time to issue one chunk group (the executor issues every group from its main thread): a
        # transfer that an idle engine starts at submit has its first group issued by the submitting call
        # (`submit_debt`, paid by that caller at once); every other group a moved piece held (one at high
        # priority, one per chunk at low) goes to `issue_debt`, paid by the compute stream at its next sync
        # (sim.engine.core), or dropped while it waits for a copy (the executor issues them in that wait); 0 = not
        # modelled
        self.issue_host_s = issue_host_s
        self.issue_debt = 0.0
        self.submit_debt = 0.0
        self.high: deque[Transfer] = deque()
        self.low: deque[Transfer] = deque()
        self.on_complete = on_complete
        self.record = record  # list to append (transfer, start_s, dur_s, engine) piece spans to, or None
        # idle engines, a stack (the last one to go idle is used first)
        self._idle: list[int] = list(range(n_engines))
        # per engine, the event of the piece it moves (its args: engine, transfer, start, chunks, duration), or None
        self._running: list[Call | None] = [None] * n_engines
        self._cut_at: list[float] = [0.0] * n_engines
        self.busy_s = 0.0
        self.bytes_demand = 0
        self.bytes_prefetch = 0
        self.n_busy = 0
        self.pending_bytes = 0  # bytes of live transfers not yet moved (the in-flight bound reads it)
        self._queue = env._queue  # SimPy 4 internals: a heap of (time, priority, event id, event)
        self._eid = env._eid
        self._finish_fn = self._finish  # (bound once)

    @property
    def bytes(self) -> int:
        """Bytes moved (demand loads, prefetches, chunks of dropped prefetches)."""
        return self.bytes_demand + self.bytes_prefetch

    # -- queue operations (called by the layer loop and the prefetcher) ---------------------------------------
    def submit(self, t: Transfer, at: float | None = None) -> None:
        """Queue a transfer. `at` (>= now): the caller's own time, when it runs ahead of the clock and nothing
        is scheduled before `at` (so nobody else can touch the link meanwhile); an idle engine starts it then."""
        (self.high if t.high else self.low).append(t)
        self.pending_bytes += t.nbytes
        idle = self._idle
        if idle:  # an idle engine starts it
            now = self.env._now
            start = now if at is None else at
            t.t_start = start
            if self.issue_host_s:
                t.prepaid = 1
                self.submit_debt += self.issue_host_s
            self._start(idle.pop(), t, start, start - now)
        elif t.high:
            self._preempt(self.env._now if at is None else at)

    def _start(self, engine: int, t: Transfer, start: float, ahead: float) -> None:
        """Engine `engine` moves all remaining chunks of `t` from `start` (= now + ahead) on, as one piece."""
        n = t.chunks_left
        hi = t.high
        dur = self._piece_s(t, n, hi)
        t.active = True
        self.n_busy += 1
        t.final_ev = self._running[engine] = ev = Call(self._finish_fn, (engine, t, start, n, dur, hi))
        heappush(self._queue, (self.env._now + (ahead + dur), NORMAL, next(self._eid), ev))

    def _piece_s(self, t: Transfer, k: int, hi: bool) -> float:
        """Link time of k chunks of `t` moved as one piece: one chunk group per chunk at low priority, one group
        (one issue overhead) at high priority."""
        if hi and k > 1:
            return k * t.chunk_s - (k - 1) * self.issue_s
        return k * t.chunk_s

    def wait_event(self, t: Transfer):
        """An event that fires once `t` has landed: its last piece's event when that piece is in flight."""
        ev = t.final_ev
        if ev is not None and ev.callbacks is not None:
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
        self._preempt(self.env._now if at is None else at)

    def drop(self, t: Transfer, at: float | None = None) -> None:
        """Abandon a transfer: its queued chunks are discarded; a chunk in flight (and lookahead - 1 committed
        ones) still completes (wasted)."""
        if t.finished or t.dropped:
            return
        (self.high if t.high else self.low).remove(t)
        t.dropped = True
        self.pending_bytes -= t.nbytes - t.moved
        if t.active:
            for engine, run in enumerate(self._running):
                if run is not None and run.args[1] is t:
                    self._cut(engine, self.env._now if at is None else at)

    def busy(self) -> bool:
        return self.n_busy > 0

    # -- preemption at chunk boundaries ------------------------------------------------------------------------
    def _preempt(self, at: float) -> None:
        """A high-priority transfer waits: cut every running piece that it (or another queued one) must not
        wait behind, at the end of the chunk in flight."""
        for engine, run in enumerate(self._running):
            if run is None:
                continue
            t = run.args[1]
            # a low piece is cut (also one of a prefetch upgraded meanwhile: its rest goes as one high group)
            if not run.args[5] or self._high_ahead(t):
                self._cut(engine, at)

    def _high_ahead(self, t: Transfer) -> bool:
        for x in self.high:
            if x is t:
                return False
            if not x.active:
                return True
        return False

    def _cut(self, engine: int, at: float) -> None:
        ev = self._running[engine]
        self._running[engine] = None
        if ev.args[3] <= 1:
            return  # one chunk: it is never preempted anyway
        ev.args[1].final_ev = None  # this piece no longer lands the transfer
        self._cut_at[engine] = at
        # the interrupt: an urgent event now (as a SimPy process interrupt)
        call_in(self.env, 0, self._interrupted, (ev,), URGENT)

    def _interrupted(self, ev: Call) -> None:
        """Finish the chunk in flight at the time of the preemption request (and lookahead - 1 more committed
        chunks of the piece), then give way."""
        engine, t, start, n, _dur, hi = ev.args
        ev.callbacks = []  # the piece's own end no longer means anything
        now = self.env._now
        elapsed = max(self._cut_at[engine], now) - start
        if hi:  # one group: the issue overhead once, then the chunks
            x = (elapsed - self.issue_s) / (t.chunk_s - self.issue_s)
        else:
            x = elapsed / t.chunk_s
        j = round(x)
        k = j if (abs(x - j) < 1e-9 and j >= 1) else int(x) + 1
        k = min(max(k, 1) + self.lookahead - 1, n)
        dur = self._piece_s(t, k, hi)
        if start + dur > now:
            call_in(self.env, start + dur - now, self._finish, (engine, t, start, k, dur, hi))
        else:
            self._finish(engine, t, start, k, dur, hi)

    # -- a piece is done ---------------------------------------------------------------------------------------
    def _finish(self, engine: int, t: Transfer, start: float, n: int, dur: float, hi: bool = False) -> None:
        self._running[engine] = None  # (already None if the piece was cut)
        self.n_busy -= 1
        if self.issue_host_s:
            groups = (1 if hi else n) - t.prepaid
            t.prepaid = 0
            if groups > 0:
                self.issue_debt += groups * self.issue_host_s
        t.active = False
        t.final_ev = None  # processed (or cut): no reference cycle transfer -> event -> transfer
        self.busy_s += dur
        # bytes moved by this piece: of nbytes * (chunks done) // n_chunks so far, t.moved were counted before
        left = t.chunks_left = t.chunks_left - n
        moved = (t.nbytes if left == 0 else t.nbytes * (t.n_chunks - left) // t.n_chunks) - t.moved
        t.moved += moved
        if t.speculative:
            self.bytes_prefetch += moved
        else:
            self.bytes_demand += moved
        if self.record is not None:
            self.record.append((t, start, dur, engine))
        high = self.high
        low = self.low
        if not t.dropped:
            self.pending_bytes -= moved
            if left == 0:
                (high if t.high else low).remove(t)
                t.finished = True
                self.on_complete(t)
        # the next piece: the first transfer not already moving, demand loads first
        if high or low:
            now = self.env._now
            for q in (high, low):
                for nxt in q:
                    if not nxt.active:
                        if nxt.t_start is None:
                            nxt.t_start = now
                        self._start(engine, nxt, now, 0.0)
                        return
        self._idle.append(engine)
