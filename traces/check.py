"""`python -m traces.check TRACE`: verify a trace's invariants and name the first offending row.

Invariants: expert ids in [0, n_experts); k distinct ids per row; finite, non-negative weights; every layer
0..n_layers-1 present; layers within range; rows of a sequence contiguous; (sequence, phase, position, layer)
unique; hidden_row within the stored hidden-state array.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from traces.errors import TraceError, run_cli
from traces.reader import Trace, _column_np, _fixed_list_np


def _first(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if len(idx) else None


def _check_unique(trace: Trace, where_file) -> None:
    """(sequence, phase, position, layer) must be unique; vectorized over the four index columns."""
    idx = trace._index
    phase_code = idx.column("phase").combine_chunks()
    codes = phase_code.indices.to_numpy().astype(np.int64) if hasattr(phase_code, "indices") else np.zeros(len(idx))
    cols = [_column_np(idx, c).astype(np.int64) for c in ("sequence", "position", "layer")]
    order = np.lexsort((cols[2], cols[1], codes, cols[0]))
    keys = np.stack([cols[0], codes, cols[1], cols[2]], axis=1)[order]
    dup = np.flatnonzero((keys[1:] == keys[:-1]).all(axis=1))
    if len(dup):
        row = int(order[dup[0] + 1])
        raise TraceError("duplicate (sequence, phase, position, layer)", path=where_file,
                         where=f"row {row} (sequence {cols[0][row]}, position {cols[1][row]}, layer {cols[2][row]})")


def check_trace(trace: Trace) -> dict:
    """Raise TraceError at the first violation (row numbers are 0-based over the routing table)."""
    meta = trace.meta
    k = meta.top_k
    where_file = trace.path / "routing.parquet"
    seen_layers = np.zeros(meta.n_layers, dtype=bool)
    finished_sequences: set[int] = set()
    last_seq = None
    hidden_len: dict[int, int] = {}
    offset = 0
    for batch in trace.iter_batches():
        import pyarrow as pa

        table = pa.Table.from_batches([batch])
        n = table.num_rows
        seq = _column_np(table, "sequence")
        layer = _column_np(table, "layer").astype(np.int64)
        experts = _fixed_list_np(table, "experts", k).astype(np.int64)
        weights = _fixed_list_np(table, "weights", k)
        pos = _column_np(table, "position")

        def fail(i: int, msg: str, offset=offset, seq=seq, pos=pos, layer=layer):
            raise TraceError(msg, path=where_file, where=f"row {offset + i} (sequence {seq[i]}, position {pos[i]}, "
                                                           f"layer {layer[i]})")

        if (i := _first((layer < 0) | (layer >= meta.n_layers))) is not None:
            fail(i, f"layer {layer[i]} outside 0..{meta.n_layers - 1}")
        if (i := _first(((experts < 0) | (experts >= meta.n_experts)).any(axis=1))) is not None:
            fail(i, f"expert id outside 0..{meta.n_experts - 1}: {experts[i].tolist()}")
        srt = np.sort(experts, axis=1)
        if k > 1 and (i := _first((srt[:, 1:] == srt[:, :-1]).any(axis=1))) is not None:
            fail(i, f"expert ids not distinct: {experts[i].tolist()}")
        if (i := _first((~np.isfinite(weights) | (weights < 0)).any(axis=1))) is not None:
            fail(i, f"weights must be finite and non-negative: {weights[i].tolist()}")
        if (i := _first(pos < 0)) is not None:
            fail(i, f"negative position {pos[i]}")
        # contiguity of sequences
        starts = np.r_[0, np.flatnonzero(seq[1:] != seq[:-1]) + 1]
        for s in starts:
            sid = int(seq[s])
            if sid != last_seq:
                if sid in finished_sequences:
                    fail(int(s), f"rows of sequence {sid} are not contiguous")
                if last_seq is not None:
                    finished_sequences.add(last_seq)
                last_seq = sid
        hrow = _column_np(table, "hidden_row")
        if meta.has_hidden_states:
            for lay in np.unique(layer[hrow >= 0]):
                if int(lay) not in hidden_len:
                    hidden_len[int(lay)] = trace.hidden_states(int(lay)).shape[0]
                sel = (layer == lay) & (hrow >= hidden_len[int(lay)])
                if (i := _first(sel)) is not None:
                    fail(i, f"hidden_row {hrow[i]} beyond the {hidden_len[int(lay)]} stored rows")
        seen_layers[np.unique(layer)] = True
        offset += n
    if trace.n_rows == 0:
        raise TraceError("routing table is empty", path=where_file)
    if not seen_layers.all():
        missing = np.flatnonzero(~seen_layers)
        raise TraceError(f"layer {int(missing[0])} has no rows (every layer 0..{meta.n_layers - 1} must be present)",
                         path=where_file)
    _check_unique(trace, where_file)
    return {"ok": True, "rows": trace.n_rows, "sequences": len(finished_sequences) + (last_seq is not None)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m traces.check", description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    args = ap.parse_args(argv)
    result = check_trace(Trace(args.trace))
    print(f"{args.trace}: ok ({result['rows']} rows, {result['sequences']} sequences)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
