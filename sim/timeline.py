"""Optional outputs of one run: a per-batch (per-token in decode) timeline as Parquet, and a Chrome trace JSON
(load it in https://ui.perfetto.dev or chrome://tracing) of the GPU compute stream, the CPU expert worker and
the host-to-device copy engines. Both are written to a temporary name and renamed."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from traces.atomic import atomic_write


def write_timeline(sim, path) -> Path:
    """One row per batch: batch, phase, tokens, sequences, positions, start/end/duration/stall (ms), lookups,
    hits, cumulative bytes host-to-device."""
    rows = sim.batch_rows or []
    table = pa.Table.from_pylist(rows) if rows else pa.table({"batch": pa.array([], pa.int64())})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def chrome_events(sim) -> list[dict]:
    us = 1e6
    ev: list[dict] = [
        {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "simulated GPU node"}},
        {"ph": "M", "name": "thread_name", "pid": 0, "tid": 0, "args": {"name": "GPU compute stream"}},
        {"ph": "M", "name": "thread_name", "pid": 0, "tid": 1, "args": {"name": "CPU experts"}},
    ]
    for e in range(sim.cost.copy_engines):
        ev.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": 10 + e, "args": {"name": f"H2D copy engine {e}"}})
    for kind, what, batch, start, dur in sim.spans or []:
        if kind == "dense":
            name, args = f"L{what} dense", {"batch": batch, "layer": what}
        else:
            name, args = f"L{what[0]} E{what[1]}", {"batch": batch, "layer": what[0], "expert": what[1]}
        ev.append({"name": name, "cat": kind, "ph": "X", "ts": start * us, "dur": dur * us, "pid": 0,
                   "tid": 1 if kind == "cpu" else 0, "args": args})
    for t, start, dur, engine in sim.link_spans or []:
        kind = "prefetch" if t.speculative else "demand"
        ev.append({"name": f"{kind} L{t.key[0]} E{t.key[1]}", "cat": kind, "ph": "X", "ts": start * us,
                   "dur": dur * us, "pid": 0, "tid": 10 + engine,
                   "args": {"layer": t.key[0], "expert": t.key[1], "bytes": t.nbytes, "chunks": t.n_chunks,
                            "high_priority": t.high, "dropped": t.dropped}})
    return ev


def write_chrome_trace(sim, path) -> Path:
    doc = {"traceEvents": chrome_events(sim), "displayTimeUnit": "ms",
           "otherData": {"clock": "simulated time (us)"}}
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc)))
