"""The host-to-device link: copy engines as SimPy processes serving a two-level priority queue of transfers.

- Demand loads (`high`) go before prefetches (`low`); FIFO within a level.
- A transfer is split into chunks (one chunk unless chunked prefetch is on). A chunk in flight is never
  preempted: a high-priority arrival waits for at most the chunk in progress.
- For speed a copy engine moves all remaining chunks of a high-priority transfer in one timeout (nothing can
  preempt it), and a low-priority transfer chunk by chunk. An idle engine sleeps on an event; no process per
  transfer or per chunk.
"""

from __future__ import annotations

from collections import deque

import simpy


class Transfer:
    __slots__ = ("key", "nbytes", "n_chunks", "chunks_left", "chunk_s", "high", "speculative", "cached", "done",
                 "finished", "used", "dropped", "active", "moved", "seq", "t_enqueue", "t_start", "t_end", "target")

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


class Link:
    """H2D copy engines. `on_complete(transfer)` is called when the last chunk of a live transfer lands."""

    def __init__(self, env: simpy.Environment, n_engines: int, on_complete, record=None):
        self.env = env
        self.high: deque[Transfer] = deque()
        self.low: deque[Transfer] = deque()
        self.on_complete = on_complete
        self.record = record  # list to append (name, start_s, dur_s, engine) chunk spans to, or None
        self._idle: list[simpy.Event] = []
        self.busy_s = 0.0
        self.bytes = 0
        self.bytes_demand = 0
        self.bytes_prefetch = 0
        self.n_busy = 0
        self.pending_bytes = 0  # bytes of live transfers not yet moved (the in-flight bound reads it)
        self.procs = [env.process(self._copy_engine(i)) for i in range(n_engines)]

    # -- queue operations (called by the layer loop and the prefetcher) ---------------------------------------
    def submit(self, t: Transfer) -> None:
        (self.high if t.high else self.low).append(t)
        self.pending_bytes += t.nbytes
        if self._idle:
            self._idle.pop().succeed()

    def upgrade(self, t: Transfer) -> None:
        """Make a queued/in-flight prefetch a demand load (moved to the back of the high queue)."""
        if t.high or t.finished or t.dropped:
            return
        self.low.remove(t)
        t.high = True
        self.high.append(t)

    def drop(self, t: Transfer) -> None:
        """Abandon a transfer: its queued chunks are discarded; a chunk in flight still completes (wasted)."""
        if t.finished or t.dropped:
            return
        (self.high if t.high else self.low).remove(t)
        t.dropped = True
        self.pending_bytes -= t.nbytes - t.moved

    def busy(self) -> bool:
        return self.n_busy > 0

    # -- the copy engine process ---------------------------------------------------------------------------------
    def _pick(self) -> Transfer | None:
        for q in (self.high, self.low):
            for t in q:
                if not t.active:
                    return t
        return None

    def _copy_engine(self, engine: int):
        env = self.env
        while True:
            t = self._pick()
            if t is None:
                ev = env.event()
                self._idle.append(ev)
                yield ev
                continue
            n = t.chunks_left if t.high else 1
            dur = n * t.chunk_s
            t.active = True
            start = env.now
            if t.t_start is None:
                t.t_start = start
            self.n_busy += 1
            yield env.timeout(dur)
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
