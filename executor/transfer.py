"""The host-to-device transfer engine: the simulator's link semantics (sim/engine/link.py) with real copies.

Semantics, the same as `sim.engine.link.Link`:

- two FIFO queues, `high` (demand loads and upgraded prefetches) before `low` (speculative prefetches);
- a transfer is split into chunks (1, or `chunks` when chunked prefetch is on; 3 = the expert's three
  matrices). A copy worker takes the first transfer with chunks left, high queue first: all remaining chunks of
  a high transfer at once, one chunk of a low one, then picks again. A chunk in flight is never preempted: a
  demand load that arrives waits for at most the chunks already handed to the copy stream;
- `upgrade(t)` moves a queued prefetch to the back of the high queue; `drop(t)` abandons a transfer: its
  queued chunks are discarded, chunks already in flight complete (wasted bytes, counted);
- `pending_bytes`: bytes of live transfers not yet moved (the prefetcher's in-flight bound reads it).

Backends:

- `cuda` (the default on a GPU): no thread. The main thread issues the copies: a chunk group is one
  `cuMemcpyHtoDAsync` per chunk from pinned memory on the copy stream (`torch.cuda.Stream`; `copy_api="torch"`:
  `Tensor.copy_(non_blocking=True)` under that stream, the former path) between two CUDA events, and at most
  `lookahead` groups are on the stream at a time (1 = exactly the simulator's "at most one chunk ahead"; 2 keeps
  the link busy across the host's gaps, at the price of a demand load waiting for up to two committed chunks:
  the simulator's `h2d.lookahead`). The stream is refilled wherever the runtime touches the engine: on submit,
  after every expert launch (`pump`), while the host waits for the GPU to reach a gate (`feed_until`: polls the
  copy events and refills until the gate's event completes) and while it waits for a copy (`wait`: blocks on the
  oldest group's event, retires it, refills). Completion is seen by polling events (`poll`). Copies into a slot
  first wait for the slot's guard events (the last kernel that read it, the last copy that wrote it).
  Issuing from the main thread replaced a copy worker thread: a worker woken by a landed copy had to take the
  interpreter lock from the main thread, which holds it while it launches kernels, so the link idled for
  tens to hundreds of microseconds per chunk and a run varied by tens of percent.
- `cuda-thread`: the former design, kept for comparison: one worker thread per copy stream (`copy_engines` of
  them) enqueues chunk groups and waits on their events.
- `thread`: the worker on the CPU; chunks are `Tensor.copy_` (a CPU stand-in with the same queue semantics; real
  concurrency, so timing-dependent counts vary run to run).
- `pump`: no thread; with the CPU copier chunks move only when the caller pumps (`pump(n)`, or `wait(t)`, which
  pumps in priority order until `t` is done): deterministic, used by the CPU tests to exercise late prefetches,
  drops and upgrades reproducibly. With an asynchronous stand-in copier (tests) it is the `cuda` backend's logic.

Only the main thread touches the ExpertCache: the engine reports finished transfers through `poll()` and the
runtime does the cache bookkeeping (the simulator's `_landed`).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque

import torch

BACKENDS = ("cuda", "cuda-thread", "thread", "pump")
THREADED = ("cuda-thread", "thread")


class Transfer:
    """One expert copy. Fields mirror sim.engine.link.Transfer; plus the buffers and the completion handles."""

    __slots__ = ("key", "nbytes", "n_chunks", "chunks_done", "enqueued", "ranges", "high", "speculative", "cached",
                 "finished", "used", "dropped", "moved", "seq", "t_start", "target", "src", "dst", "slot", "guards",
                 "owner", "last_handle", "group_handle", "all_enqueued", "reaped")

    def __init__(self, key, src: torch.Tensor, dst: torch.Tensor, nbytes: int, ranges, *, high: bool,
                 speculative: bool, cached: bool, seq: int, slot=None, guards=(), target=None):
        self.key = key
        self.src = src
        self.dst = dst
        self.nbytes = nbytes
        self.ranges = ranges
        self.n_chunks = len(ranges)
        self.chunks_done = 0
        self.enqueued = 0
        self.high = high
        self.speculative = speculative
        self.cached = cached
        self.finished = False
        self.used = False
        self.dropped = False
        self.moved = 0
        self.seq = seq
        self.t_start = None  # order in which transfers started copying (a counter, comparable like a time)
        self.target = target
        self.slot = slot
        self.guards = list(guards)
        self.owner = None
        self.last_handle = None
        self.group_handle = None  # the latest chunk group handed to the copy stream
        self.all_enqueued = False
        self.reaped = False

    @property
    def chunks_left(self) -> int:
        return self.n_chunks - self.chunks_done


class _CpuCopier:
    timing = "perf_counter"

    def copy_group(self, worker: int, t: Transfer, c0: int, c1: int):
        t0 = time.perf_counter()
        a, b = t.ranges[c0][0], t.ranges[c1 - 1][1]
        t.dst[a:b].copy_(t.src[a:b])
        return (t0, time.perf_counter())

    def wait(self, handle) -> None:
        pass

    def done(self, handle) -> bool:
        return True

    def span_s(self, handle) -> float:
        return handle[1] - handle[0]

    def wait_event(self, handle):
        return None


def cuda_device(device) -> torch.device:
    """A CUDA device with an explicit index (torch.cuda.set_device in a worker thread needs one)."""
    dev = torch.device(device if device is not None else "cuda")
    return torch.device("cuda", torch.cuda.current_device()) if dev.index is None else dev


COPY_APIS = ("driver", "torch")


def driver_memcpy():
    """`cuMemcpyHtoDAsync` from the CUDA driver library torch has loaded, through ctypes, or None without one.

    Why: `Tensor.copy_(non_blocking=True)` costs the host about 10 to 30 us a chunk on the H200 machine (argument
    parsing, dispatch, the pinned-memory allocator's event) and the stream switch around it more; the session-7
    check measured 71 to 125 us of host time per chunk group, two thirds of a Qwen3 demand load's host cost. The
    driver call, addresses included, took 6 us a chunk there (`executor.issue_bench`: 27 us for `copy_`).
    Streams and events are the runtime's handles (a cudaStream_t is a CUstream), and the main thread runs in the
    primary context torch made current."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuMemcpyHtoDAsync_v2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def issue_chunk_copies(memcpy, t: Transfer, c0: int, c1: int, stream_handle) -> None:
    """Chunks c0..c1-1 of `t` as one `memcpy(dst_address, src_address, nbytes, stream)` each (one DMA per chunk,
    as the simulator models). `memcpy` returns 0 on success (a CUresult)."""
    src, dst = t.src, t.dst
    if c0 == 0 and not (src.is_contiguous() and dst.is_contiguous() and src.dtype == dst.dtype):
        raise ValueError(f"expert {t.key}: a raw copy needs contiguous buffers of one dtype")
    elem = src.element_size()
    s0, d0 = src.data_ptr(), dst.data_ptr()
    for c in range(c0, c1):
        a, b = t.ranges[c]
        r = memcpy(d0 + a * elem, s0 + a * elem, (b - a) * elem, stream_handle)
        if r:
            raise RuntimeError(f"host-to-device copy of expert {t.key} chunk {c} failed (CUresult {r})")


class _CudaCopier:
    timing = "cuda_events"

    def __init__(self, device, n_streams: int, threaded: bool = True, api: str = "driver"):
        """`api`: "driver" issues each chunk with the driver's cuMemcpyHtoDAsync (main-thread issue only; falls
        back to "torch" where the driver library cannot be loaded), "torch" with `Tensor.copy_` under the copy
        stream (the threaded backend always; kept for comparison: `TransferEngine(copy_api=...)`)."""
        if api not in COPY_APIS:
            raise ValueError(f"copy api must be one of {COPY_APIS}, got {api!r}")
        self.device = cuda_device(device)
        self.streams = [torch.cuda.Stream(device=self.device) for _ in range(n_streams)]
        self.handles = [s.cuda_stream for s in self.streams]
        # a worker thread must select the device; the main thread already has (and the context costs microseconds)
        self._device_ctx = (lambda: torch.cuda.device(self.device)) if threaded else contextlib.nullcontext
        self.memcpy = driver_memcpy() if api == "driver" and not threaded else None
        self.api = "driver" if self.memcpy is not None else "torch"

    def copy_group(self, worker: int, t: Transfer, c0: int, c1: int):
        s = self.streams[worker]
        if c0 == 0:
            for ev in t.guards:
                s.wait_event(ev)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(s)
        if self.memcpy is not None:
            issue_chunk_copies(self.memcpy, t, c0, c1, self.handles[worker])
        else:
            with self._device_ctx(), torch.cuda.stream(s):
                for c in range(c0, c1):  # one copy per chunk: each chunk is a separate DMA, as the simulator models
                    a, b = t.ranges[c]
                    t.dst[a:b].copy_(t.src[a:b], non_blocking=True)
        end.record(s)
        return (start, end)

    def wait(self, handle) -> None:
        handle[1].synchronize()

    def done(self, handle) -> bool:
        return handle[1].query()

    def span_s(self, handle) -> float:
        return handle[0].elapsed_time(handle[1]) * 1e-3

    def wait_event(self, handle):
        return handle[1]


class TransferEngine:
    def __init__(self, backend: str = "pump", *, device=None, copy_engines: int = 1, lookahead: int = 1,
                 copier=None, copy_api: str = "driver"):
        """`copier`: a stand-in for the CUDA copier in tests (asynchronous copies completing later, with
        `copy_group`, `wait`, `done`, `span_s`, `wait_event` and `asynchronous = True`). `copy_api`: how the
        cuda backend issues a chunk (`_CudaCopier`)."""
        if backend not in BACKENDS:
            raise ValueError(f"transfer backend must be one of {BACKENDS}, got {backend!r}")
        if backend.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"transfer backend {backend!r} needs a CUDA device")
        self.backend = backend
        self.threaded = backend in THREADED
        self.copy_engines = max(1, int(copy_engines)) if self.threaded else 1
        if copier is None:
            if backend.startswith("cuda"):
                copier = _CudaCopier(device, self.copy_engines, threaded=self.threaded, api=copy_api)
            else:
                copier = _CpuCopier()
        self.copier = copier
        # asynchronous copies: a group completes when its event does, not when copy_group returns
        # (a CPU copy completes when it returns: more than one group ahead would only delay its completion)
        self.asynchronous = backend.startswith("cuda") or bool(getattr(copier, "asynchronous", False))
        # the main thread issues asynchronous copies itself: refill the stream whenever it touches the engine
        self.main_pump = self.asynchronous and not self.threaded
        self.lookahead = max(1, int(lookahead)) if self.asynchronous else 1
        self.high: deque[Transfer] = deque()
        self.low: deque[Transfer] = deque()
        self.cond = threading.Condition()
        self.completed: list[Transfer] = []
        self.outstanding = [deque() for _ in range(self.copy_engines)]
        self.spans: list = []  # copier handles of every chunk group (busy time, computed at the end)
        self.bytes = 0
        self.bytes_demand = 0
        self.bytes_prefetch = 0
        self.pending_bytes = 0
        self.chunk_groups = 0
        # main-thread issue of chunk groups (pump backends): host seconds in copy_group + bookkeeping, and how many;
        # wherever the issue happens (submit on an idle link, the pumps after launches, the waits). On the CPU the
        # copier copies inside copy_group, so there it holds the copy too
        self.issue_host_s = 0.0
        self.issues = 0
        # of which inside submit() (an idle link started by the submitting call), by kind: the part of a demand
        # load's or a prefetch's own issue cost that is the copy issue (calibration separates the two)
        self.submit_issue_s = {"demand": 0.0, "prefetch": 0.0}
        self._start_counter = itertools.count()
        self._closed = False
        self._error: BaseException | None = None
        self.workers: list[threading.Thread] = []
        if self.threaded:
            for i in range(self.copy_engines):
                th = threading.Thread(target=self._worker, args=(i,), name=f"h2d-copy-{i}", daemon=True)
                th.start()
                self.workers.append(th)

    # -- queue operations (main thread; take the lock) ------------------------------------------------------------
    def submit(self, t: Transfer) -> None:
        with self.cond:
            (self.high if t.high else self.low).append(t)
            self.pending_bytes += t.nbytes
            self.cond.notify_all()
            if self.main_pump:  # an idle link starts it at once
                i0 = self.issue_host_s
                self._fill()
                self.submit_issue_s["prefetch" if t.speculative else "demand"] += self.issue_host_s - i0

    def issue_totals(self) -> dict:
        """The copy-issue accounting so far, as the runtime reports it (metric name -> cumulative value)."""
        return {"host_copy_issue_ms": self.issue_host_s * 1e3, "copy_issues": self.issues,
                "host_copy_issue_demand_submit_ms": self.submit_issue_s["demand"] * 1e3,
                "host_copy_issue_prefetch_submit_ms": self.submit_issue_s["prefetch"] * 1e3}

    def upgrade(self, t: Transfer) -> None:
        """A queued or copying prefetch becomes a demand load (back of the high queue)."""
        with self.cond:
            if t.high or t.finished or t.dropped:
                return
            self.low.remove(t)
            t.high = True
            self.high.append(t)
            self.cond.notify_all()
            if self.main_pump:
                self._fill()

    def drop(self, t: Transfer) -> bool:
        """Abandon `t`; returns False when it had already finished (then nothing changes)."""
        with self.cond:
            if t.finished or t.dropped:
                return False
            (self.high if t.high else self.low).remove(t)
            t.dropped = True
            self.pending_bytes -= t.nbytes - t.moved
            return True

    def low_snapshot(self) -> list[Transfer]:
        with self.cond:
            return list(self.low)

    # -- copying ------------------------------------------------------------------------------------------------
    def _pick(self, worker: int):
        for q in (self.high, self.low):
            for t in q:
                if t.enqueued < t.n_chunks and t.owner in (None, worker):
                    c0 = t.enqueued
                    c1 = t.n_chunks if t.high else c0 + 1
                    t.enqueued = c1
                    t.owner = worker
                    if t.t_start is None:
                        t.t_start = next(self._start_counter)
                    return t, c0, c1
        return None

    def _complete(self, t: Transfer, c0: int, c1: int, handle) -> None:
        """A chunk group landed (lock held)."""
        self.chunk_groups += 1
        self.spans.append(handle)
        moved = t.nbytes * c1 // t.n_chunks - t.nbytes * c0 // t.n_chunks
        t.moved += moved
        t.chunks_done = c1
        self.bytes += moved
        if t.speculative:
            self.bytes_prefetch += moved
        else:
            self.bytes_demand += moved
        if t.dropped:
            return
        self.pending_bytes -= moved
        if c1 == t.n_chunks:
            (self.high if t.high else self.low).remove(t)
            t.finished = True
            self.completed.append(t)
        self.cond.notify_all()

    def _enqueued(self, worker: int, t: Transfer, c0: int, c1: int, handle) -> None:
        self.outstanding[worker].append((t, c0, c1, handle))
        t.group_handle = handle
        if c1 == t.n_chunks:
            t.last_handle = handle
            t.all_enqueued = True
        self.cond.notify_all()

    def _worker(self, i: int) -> None:
        if self.backend == "cuda-thread":
            torch.cuda.set_device(self.copier.device)
        out = self.outstanding[i]
        try:
            while True:
                with self.cond:
                    while True:
                        pick = self._pick(i) if len(out) < self.lookahead else None
                        if pick is not None or out:
                            break
                        if self._closed:
                            return
                        self.cond.wait()
                    head = out[0] if pick is None else None
                if pick is not None:
                    t, c0, c1 = pick
                    handle = self.copier.copy_group(i, t, c0, c1)
                    with self.cond:
                        self._enqueued(i, t, c0, c1, handle)
                else:
                    self.copier.wait(head[3])
                    with self.cond:
                        if out and out[0] is head:
                            out.popleft()
                            self._complete(*head)
        except BaseException as exc:  # surface copy errors to the main thread instead of hanging it
            with self.cond:
                self._error = exc
                self.cond.notify_all()

    def _retire(self) -> None:
        """Complete the groups whose copies have landed (asynchronous copier; lock held)."""
        for out in self.outstanding:
            while out and self.copier.done(out[0][3]):
                self._complete(*out.popleft())

    def _step_pump(self) -> bool:
        """Pump backends: issue one chunk group now (priority order) if the stream has room; with the CPU copier
        it lands at once. False when nothing was issued (nothing queued, or `lookahead` groups on the stream)."""
        out = self.outstanding[0]
        if self.asynchronous:
            self._retire()
            if len(out) >= self.lookahead:
                return False
        pick = self._pick(0)
        if pick is None:
            return False
        t, c0, c1 = pick
        t0 = time.perf_counter()
        handle = self.copier.copy_group(0, t, c0, c1)
        self._enqueued(0, t, c0, c1, handle)
        self.issue_host_s += time.perf_counter() - t0
        self.issues += 1
        if not self.asynchronous:
            out.popleft()
            self._complete(t, c0, c1, handle)
        return True

    def _fill(self) -> int:
        """Main-thread pump: issue groups until the stream holds `lookahead` of them or nothing is queued."""
        n = 0
        while self._step_pump():
            n += 1
        return n

    def _retire_oldest(self) -> bool:
        """Block until the oldest group on the stream lands, then complete it (lock held; the event wait releases
        the interpreter lock). False when nothing is on the stream."""
        out = self.outstanding[0]
        if not out:
            return False
        self.copier.wait(out[0][3])
        self._complete(*out.popleft())
        return True

    def pump(self, n: int = 1) -> int:
        """Pump backends: with the CPU copier move up to n chunk groups; with an asynchronous one refill the
        stream (up to `lookahead` groups; n = 0: nothing). Returns how many groups were issued; a no-op for
        threaded backends."""
        if self.threaded or n <= 0:
            return 0
        moved = 0
        with self.cond:
            if self.main_pump:
                return self._fill()
            while moved < n and self._step_pump():
                moved += 1
        return moved

    def has_work(self) -> bool:
        """Chunks queued and not yet issued (what a main-thread pump still has to feed to the stream)."""
        return any(t.enqueued < t.n_chunks for q in (self.high, self.low) for t in q)

    def feed_until(self, done) -> None:
        """Main-thread pump: keep the stream fed until `done()` (e.g. the gate's CUDA event has completed);
        returns at once when nothing is left to issue (the caller then blocks on its own event)."""
        if not self.main_pump:
            return
        with self.cond:
            while not done() and self.has_work():
                self._fill()  # (retires the landed groups first)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"transfer worker failed: {self._error!r}") from self._error

    def wait(self, t: Transfer):
        """Block until `t` can be consumed. Returns a CUDA event the compute stream must wait on (cuda) or None.

        cuda: returns once t's last chunk is on the copy stream (the GPU-side wait is the caller's); others: once
        t's bytes are in place.
        """
        with self.cond:
            if not self.threaded:
                while not (t.finished or (self.asynchronous and t.all_enqueued)):
                    if t.dropped:
                        raise RuntimeError(f"waiting for dropped transfer {t.key}")
                    if not self._step_pump() and not (self.asynchronous and self._retire_oldest()):
                        raise RuntimeError(f"transfer {t.key} cannot finish: nothing queued")
                return self.copier.wait_event(t.last_handle) if self.asynchronous else None
            while not (t.finished or (self.asynchronous and t.all_enqueued)):
                self._raise_if_failed()
                if t.dropped:
                    raise RuntimeError(f"waiting for dropped transfer {t.key}")
                self.cond.wait(timeout=1.0)
            return self.copier.wait_event(t.last_handle) if self.asynchronous else None

    def poll(self) -> list[Transfer]:
        """Finished transfers not reported before (main thread). cuda: completes groups whose events are done."""
        with self.cond:
            self._raise_if_failed()
            if self.main_pump:
                self._fill()  # retires the landed groups, then refills the stream
            elif self.asynchronous:
                self._retire()
            done, self.completed = self.completed, []
            return done

    def close(self) -> None:
        """Drop what is queued and not started; let started transfers finish; stop the workers."""
        with self.cond:
            for q in (self.high, self.low):
                for t in list(q):
                    if t.enqueued == 0:
                        q.remove(t)
                        t.dropped = True
                        self.pending_bytes -= t.nbytes - t.moved
            if not self.threaded:
                while self._step_pump() or (self.asynchronous and self._retire_oldest()):
                    pass
            while self.workers and (any(self.outstanding) or self.has_work()):
                self._raise_if_failed()
                self.cond.wait(timeout=0.05)
            self._closed = True
            self.cond.notify_all()
        for th in self.workers:
            th.join(timeout=30)
        self.workers = []

    def busy_s(self) -> float:
        """Sum of chunk-group copy times (call after the device is synchronized)."""
        return sum(self.copier.span_s(h) for h in self.spans)
