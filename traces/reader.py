"""Trace reader: numpy arrays per (sequence, phase), streaming for traces larger than memory.

Rows of one sequence are contiguous in routing.parquet (the writers guarantee it and `traces.check` verifies
it), so `iter_routing` can stream record batches and hand out whole sequences without loading the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from traces.errors import TraceError
from traces.format import HIDDEN_DIR, META_FILE, PHASES, ROUTER_DIR, ROUTING_FILE, TraceMeta, layer_file


@dataclass
class Routing:
    """Routing of one sequence in one phase, dense over positions x layers.

    experts[p, l] are the top-k ids of position positions[p] at layer l in router-rank order; rows the trace
    lacks (for example the last layer of a llama.cpp prefill) hold -1 ids and NaN weights.
    """

    sequence: int
    phase: str
    positions: np.ndarray  # int32 [P]
    token_ids: np.ndarray  # int64 [P], -1 where unknown
    experts: np.ndarray  # int16 [P, L, k]
    weights: np.ndarray  # float32 [P, L, k]
    hidden_rows: np.ndarray  # int64 [P, L], -1 where no hidden state was stored

    @property
    def n_positions(self) -> int:
        return len(self.positions)

    def present(self) -> np.ndarray:
        """bool [P, L]: whether the trace has a row for (position, layer)."""
        return self.experts[:, :, 0] >= 0


def _column_np(table: pa.Table, name: str, null=-1) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        col = pc.fill_null(col, null)
    return col.to_numpy()


def _fixed_list_np(table: pa.Table, name: str, k: int) -> np.ndarray:
    chunks = [c.flatten().to_numpy(zero_copy_only=False) for c in table.column(name).chunks]
    flat = np.concatenate(chunks) if chunks else np.empty(0)
    return flat.reshape(-1, k)


def routing_from_table(table: pa.Table, n_layers: int, top_k: int, sequence: int, phase: str) -> Routing:
    """Scatter the rows of one (sequence, phase) into dense [P, L, k] arrays without per-row Python."""
    positions = _column_np(table, "position").astype(np.int32)
    layers = _column_np(table, "layer").astype(np.int64)
    uniq, inv = np.unique(positions, return_inverse=True)
    experts = np.full((len(uniq), n_layers, top_k), -1, dtype=np.int16)
    weights = np.full((len(uniq), n_layers, top_k), np.nan, dtype=np.float32)
    hidden_rows = np.full((len(uniq), n_layers), -1, dtype=np.int64)
    token_ids = np.full(len(uniq), -1, dtype=np.int64)
    experts[inv, layers] = _fixed_list_np(table, "experts", top_k)
    weights[inv, layers] = _fixed_list_np(table, "weights", top_k)
    hidden_rows[inv, layers] = _column_np(table, "hidden_row")
    tok = _column_np(table, "token_id")
    token_ids[inv] = tok  # identical for every layer of a position
    return Routing(sequence, phase, uniq, token_ids, experts, weights, hidden_rows)


def _phase_names(table: pa.Table) -> np.ndarray:
    col = table.column("phase").combine_chunks()
    if isinstance(col, pa.DictionaryArray):
        dictionary = np.asarray(col.dictionary.to_pylist(), dtype=object)
        return dictionary[col.indices.to_numpy()]
    return np.asarray(col.to_pylist(), dtype=object)


class Trace:
    """An opened trace directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise TraceError("no such file or directory", path=self.path)
        if not self.path.is_dir():
            raise TraceError("not a trace directory (expected a directory with meta.json and routing.parquet)",
                             path=self.path)
        self.meta = TraceMeta.load(self.path / META_FILE)
        routing = self.path / ROUTING_FILE
        if not routing.exists():
            raise TraceError(f"not a trace directory (no {ROUTING_FILE})", path=self.path)
        try:
            self._file = pq.ParquetFile(routing)
        except (pa.ArrowInvalid, OSError) as exc:
            raise TraceError(f"unreadable Parquet: {exc}", path=routing) from None

    # -- whole-table access -------------------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return self._file.metadata.num_rows

    def table(self, columns: list[str] | None = None) -> pa.Table:
        return self._file.read(columns=columns)

    def iter_batches(self, batch_rows: int = 1 << 18, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        yield from self._file.iter_batches(batch_size=batch_rows, columns=columns)

    @cached_property
    def _index(self) -> pa.Table:
        return self.table(["sequence", "phase", "position", "layer"])

    def keys(self) -> list[tuple[int, str]]:
        """(sequence, phase) pairs in file order."""
        idx = self._index
        seq = idx.column("sequence").to_numpy()
        ph = _phase_names(idx)
        out: list[tuple[int, str]] = []
        seen = set()
        change = np.flatnonzero(np.r_[True, (seq[1:] != seq[:-1]) | (ph[1:] != ph[:-1])])
        for i in change:
            key = (int(seq[i]), str(ph[i]))
            if key not in seen:
                seen.add(key)
                out.append(key)
        return out

    def sequences(self) -> list[int]:
        return list(dict.fromkeys(s for s, _ in self.keys()))

    def phases(self) -> list[str]:
        present = {p for _, p in self.keys()}
        return [p for p in PHASES if p in present]

    # -- per sequence ---------------------------------------------------------------------------------------
    def routing(self, sequence: int, phase: str) -> Routing:
        table = pq.read_table(self.path / ROUTING_FILE, filters=[("sequence", "=", sequence)])
        table = table.filter(pa.array(_phase_names(table) == phase)) if table.num_rows else table
        if table.num_rows == 0:
            raise TraceError(f"no rows for sequence {sequence} phase {phase!r}", path=self.path)
        return routing_from_table(table, self.meta.n_layers, self.meta.top_k, sequence, phase)

    def iter_routing(self, phases: tuple[str, ...] | None = None, batch_rows: int = 1 << 18) -> Iterator[Routing]:
        """Stream Routing objects sequence by sequence, reading the file in record batches."""
        pending: list[pa.Table] = []
        current = None

        def flush(parts: list[pa.Table]) -> Iterator[Routing]:
            table = pa.concat_tables(parts)
            names = _phase_names(table)
            seq = int(table.column("sequence")[0].as_py())
            for phase in PHASES:
                if phases is not None and phase not in phases:
                    continue
                mask = names == phase
                if mask.any():
                    sub = table.filter(pa.array(mask))
                    yield routing_from_table(sub, self.meta.n_layers, self.meta.top_k, seq, phase)

        for batch in self.iter_batches(batch_rows):
            table = pa.Table.from_batches([batch])
            seq = table.column("sequence").to_numpy()
            cuts = np.flatnonzero(seq[1:] != seq[:-1]) + 1
            starts = np.r_[0, cuts]
            ends = np.r_[cuts, len(seq)]
            for s, e in zip(starts, ends):
                part = table.slice(s, e - s)
                sid = int(seq[s])
                if current is not None and sid != current:
                    yield from flush(pending)
                    pending = []
                current = sid
                pending.append(part)
        if pending:
            yield from flush(pending)

    # -- optional arrays ------------------------------------------------------------------------------------
    def hidden_states(self, layer: int) -> np.ndarray:
        """float16 [rows, hidden_size], memory-mapped; index with Routing.hidden_rows[:, layer]."""
        path = self.path / layer_file(HIDDEN_DIR, layer)
        if not self.meta.has_hidden_states or not path.exists():
            raise TraceError(f"trace has no hidden states for layer {layer}", path=self.path)
        return np.load(path, mmap_mode="r")

    def router_weights(self, layer: int) -> np.ndarray:
        path = self.path / layer_file(ROUTER_DIR, layer)
        if not self.meta.has_router_weights or not path.exists():
            raise TraceError(f"trace has no router weights for layer {layer}", path=self.path)
        return np.load(path, mmap_mode="r")


def open_trace(path: str | os.PathLike) -> Trace:
    return Trace(path)
