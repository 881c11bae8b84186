"""Atomic trace writer: everything goes into a temporary sibling directory that is renamed at the end.

Rows can be added in several calls (the tracer streams them); hidden states are appended per layer and
their row indices recorded in the routing table's `hidden_row` column.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from traces.errors import TraceError
from traces.format import (
    HIDDEN_DIR,
    META_FILE,
    PHASES,
    ROUTER_DIR,
    ROUTING_FILE,
    TraceMeta,
    layer_file,
    routing_schema,
)


def routing_batch(
    *,
    sequence,
    phase,
    position,
    layer,
    experts,
    weights,
    top_k: int,
    token_id=None,
    hidden_row=None,
) -> pa.RecordBatch:
    """Build one record batch of the routing table from numpy-like columns (no per-row Python)."""
    n = len(sequence)
    experts = np.asarray(experts).reshape(n, top_k)
    weights = np.asarray(weights, dtype=np.float32).reshape(n, top_k)
    phase = np.asarray(phase)
    if phase.dtype.kind in "US" or phase.dtype == object:
        codes = np.full(n, -1, dtype=np.int8)
        for i, name in enumerate(PHASES):
            codes[phase == name] = i
        if (codes < 0).any():
            bad = phase[np.argmax(codes < 0)]
            raise TraceError(f"unknown phase {bad!r}; expected one of {', '.join(PHASES)}", where="field 'phase'")
    else:
        codes = phase.astype(np.int8)
    phase_arr = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()), pa.array(list(PHASES)))

    def opt(values, typ):
        if values is None:
            return pa.nulls(n, typ)
        values = np.asarray(values)
        if values.dtype.kind == "f" or values.dtype == object:  # NaN / None mark missing
            if values.dtype == object:
                mask = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in values], dtype=bool)
            else:
                mask = np.isnan(values)
            filled = np.where(mask, 0, values).astype(np.int64)
            return pa.array(filled, typ, mask=mask)
        return pa.array(values.astype(np.int64), typ)

    schema = routing_schema(top_k)
    cols = [
        pa.array(np.asarray(sequence, dtype=np.int32)),
        phase_arr,
        pa.array(np.asarray(position, dtype=np.int32)),
        pa.array(np.asarray(layer, dtype=np.int16)),
        opt(token_id, pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(experts.astype(np.int16).ravel()), top_k),
        pa.FixedSizeListArray.from_arrays(pa.array(weights.ravel()), top_k),
        opt(hidden_row, pa.int32()),
    ]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


class TraceWriter:
    """Context manager: `with TraceWriter(dst, meta) as w: w.add(...)`. On error nothing is left at dst."""

    def __init__(self, dst: str | os.PathLike, meta: TraceMeta, *, overwrite: bool = False, check: bool = False):
        self.dst = Path(dst)
        self.meta = meta
        self.overwrite = overwrite
        self.check = check  # run traces.check on the temporary directory before the final rename
        if self.dst.exists() and not overwrite:
            raise TraceError("destination already exists (pass --overwrite to replace it)", path=self.dst)
        parent = self.dst.parent if str(self.dst.parent) else Path(".")
        parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=parent))
        self._schema = routing_schema(meta.top_k)
        self._pq = pq.ParquetWriter(self.tmp / ROUTING_FILE, self._schema, compression="zstd")
        self._hidden: dict[int, list[np.ndarray]] = {}
        self._hidden_rows: dict[int, int] = {}
        self._router: dict[int, np.ndarray] = {}
        self.rows = 0
        self._closed = False

    # -- rows -------------------------------------------------------------------------------------------
    def add_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        batch = batch.cast(self._schema)
        self._pq.write_table(batch, row_group_size=1 << 20)
        self.rows += batch.num_rows

    def add(self, *, hidden=None, **columns) -> None:
        """Add rows given as arrays (see routing_batch). `hidden` is [n, hidden_size], one row per routing row."""
        n = len(columns["sequence"])
        if hidden is not None:
            hidden = np.asarray(hidden)
            if hidden.shape[0] != n:
                raise TraceError(f"hidden has {hidden.shape[0]} rows for {n} routing rows")
            layers = np.asarray(columns["layer"])
            hidden_row = np.empty(n, dtype=np.int64)
            for layer in np.unique(layers):
                sel = np.flatnonzero(layers == layer)
                start = self._hidden_rows.get(int(layer), 0)
                hidden_row[sel] = np.arange(start, start + len(sel))
                self._hidden.setdefault(int(layer), []).append(hidden[sel].astype(np.float16))
                self._hidden_rows[int(layer)] = start + len(sel)
            columns["hidden_row"] = hidden_row
        self.add_batch(routing_batch(top_k=self.meta.top_k, **columns))

    def set_router_weights(self, layer: int, weight: np.ndarray) -> None:
        self._router[int(layer)] = np.asarray(weight)

    # -- commit -----------------------------------------------------------------------------------------
    def close(self) -> Path:
        try:
            return self._close()
        except BaseException:
            self.abort()
            raise

    def _close(self) -> Path:
        self._pq.close()
        meta = self.meta
        if self._hidden:
            (self.tmp / HIDDEN_DIR).mkdir()
            width = next(iter(self._hidden.values()))[0].shape[1]
            for layer in range(meta.n_layers):  # a layer without a routing row still gets its (empty) file
                parts = self._hidden.get(layer) or [np.zeros((0, width), dtype=np.float16)]
                np.save(self.tmp / layer_file(HIDDEN_DIR, layer), np.concatenate(parts))
            meta = meta.model_copy(update={"has_hidden_states": True})
        if self._router:
            (self.tmp / ROUTER_DIR).mkdir()
            for layer, w in self._router.items():
                np.save(self.tmp / layer_file(ROUTER_DIR, layer), w)
            meta = meta.model_copy(update={"has_router_weights": True})
        (self.tmp / META_FILE).write_text(meta.dump())
        if self.check:
            from traces.check import check_trace
            from traces.reader import Trace

            try:
                check_trace(Trace(self.tmp))
            except TraceError as exc:  # name the destination, not the temporary directory
                raise TraceError(str(exc).replace(str(self.tmp), str(self.dst))) from None
        if self.dst.exists() and self.overwrite:
            old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
            os.rename(self.dst, old)
            os.rename(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.dst)
        self._closed = True
        return self.dst

    def abort(self) -> None:
        try:
            self._pq.close()
        except Exception:
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_trace(dst, meta: TraceMeta, *, overwrite: bool = False, check: bool = False, hidden=None,
                router_weights=None, **columns) -> Path:
    """Write a whole trace in one call. router_weights: {layer: array}. check: verify invariants before renaming."""
    with TraceWriter(dst, meta, overwrite=overwrite, check=check) as w:
        w.add(hidden=hidden, **columns)
        for layer, weight in (router_weights or {}).items():
            w.set_router_weights(layer, weight)
    return Path(dst)
