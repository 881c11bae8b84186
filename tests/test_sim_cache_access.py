"""sim.access: the demand lookup stream (one lookup per unique expert per (layer, batch))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sim.access import dedupe_batches, lookup_stream
from traces.format import TraceMeta
from traces.reader import Trace

ROOT = Path(__file__).resolve().parents[1]
QWEN = ROOT / "data" / "traces" / "qwen3-30b-a3b"


def test_dedupe_first_occurrence_order():
    # 2 batches, 2 layers, 2 tokens x k=2 each (flattened scan order); -1 = absent
    e = np.array([
        [[5, 3, 3, 7], [1, -1, -1, -1]],
        [[2, 2, 2, 2], [-1, -1, -1, -1]],
    ])
    g, layer, expert = dedupe_batches(e, n_experts=8)
    assert list(zip(g.tolist(), layer.tolist(), expert.tolist())) == [
        (0, 0, 5), (0, 0, 3), (0, 0, 7), (0, 1, 1), (1, 0, 2)]


def _write_trace(tmp_path, rows):
    """rows: list of (sequence, phase, position, layer, experts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from traces.format import routing_schema

    k = len(rows[0][4])
    meta = TraceMeta(model="toy", source="test", n_layers=2, n_experts=8, top_k=k, expert_bytes=[10, 20],
                     license="n/a", attribution="n/a")
    (tmp_path / "meta.json").write_text(meta.dump())
    cols = {
        "sequence": [r[0] for r in rows], "phase": [r[1] for r in rows], "position": [r[2] for r in rows],
        "layer": [r[3] for r in rows], "token_id": [None] * len(rows), "experts": [r[4] for r in rows],
        "weights": [[1.0 / k] * k for _ in rows], "hidden_row": [None] * len(rows),
    }
    schema = routing_schema(k)
    arrays = [pa.array(cols[f.name], type=f.type) if f.name != "phase"
              else pa.array(cols["phase"]).dictionary_encode().cast(f.type) for f in schema]
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), tmp_path / "routing.parquet")
    return Trace(tmp_path)


@pytest.fixture
def toy(tmp_path):
    rows = []
    # sequence 0: prefill of 2 positions, then 2 decode positions
    for layer, (a, b) in enumerate([((1, 2), (2, 3)), ((4, 5), (5, 4))]):
        rows += [(0, "prefill", 0, layer, list(a)), (0, "prefill", 1, layer, list(b))]
    rows += [(0, "decode", 2, 0, [1, 6]), (0, "decode", 2, 1, [7, 4]),
             (0, "decode", 3, 0, [6, 1]), (0, "decode", 3, 1, [4, 0])]
    # sequence 1: prefill of 1 position, 1 decode position
    rows += [(1, "prefill", 0, 0, [3, 2]), (1, "prefill", 0, 1, [0, 1]),
             (1, "decode", 1, 0, [1, 6]), (1, "decode", 1, 1, [2, 3])]
    return _write_trace(tmp_path, rows)


def triples(s):
    return list(zip(s.batch.tolist(), s.layer.tolist(), s.expert.tolist()))


def test_batch_size_one(toy):
    s = lookup_stream(toy)
    assert triples(s) == [
        (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 4), (0, 1, 5),  # prefill = one batch, unique per layer
        (1, 0, 1), (1, 0, 6), (1, 1, 7), (1, 1, 4),  # decode position 2
        (2, 0, 6), (2, 0, 1), (2, 1, 4), (2, 1, 0),  # decode position 3
        (3, 0, 3), (3, 0, 2), (3, 1, 0), (3, 1, 1),  # sequence 1 prefill
        (4, 0, 1), (4, 0, 6), (4, 1, 2), (4, 1, 3),
    ]
    assert s.phase.tolist() == [0] * 5 + [1] * 8 + [0] * 4 + [1] * 4
    assert s.keys.tolist()[:3] == [1, 2, 3] and s.keys.tolist()[3] == 8 + 4
    assert s.sizes.tolist()[:5] == [10, 10, 10, 20, 20]
    assert s.group_starts().tolist() == [0, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert triples(lookup_stream(toy, phase="decode"))[:2] == [(0, 0, 1), (0, 0, 6)]
    assert len(lookup_stream(toy, phase="prefill")) == 9


def test_batch_size_two(toy):
    s = lookup_stream(toy, batch_size=2)
    assert triples(s) == [
        (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 4), (0, 1, 5),  # prefill seq 0
        (1, 0, 3), (1, 0, 2), (1, 1, 0), (1, 1, 1),  # prefill seq 1
        (2, 0, 1), (2, 0, 6), (2, 1, 7), (2, 1, 4), (2, 1, 2), (2, 1, 3),  # decode step 0 of both
        (3, 0, 6), (3, 0, 1), (3, 1, 4), (3, 1, 0),  # decode step 1: only sequence 0 left
    ]


def test_bad_arguments(toy):
    with pytest.raises(ValueError, match="phase"):
        lookup_stream(toy, phase="nope")
    with pytest.raises(ValueError, match="batch_size"):
        lookup_stream(toy, batch_size=0)


@pytest.mark.skipif(not QWEN.exists(), reason="embedded Qwen3 trace not present")
def test_public_qwen_stream_counts():
    s = lookup_stream(QWEN)
    meta = Trace(QWEN).meta
    assert len(s) == 39526 and s.n_batches == 1 + 128
    # decode: every (layer, position) row has top-k distinct experts
    assert int((s.phase == 1).sum()) == 128 * meta.n_layers * meta.top_k
    # within each (batch, layer) group the keys are unique
    g = s.batch * meta.n_layers + s.layer
    pairs = g * meta.n_experts + s.expert
    assert len(np.unique(pairs)) == len(pairs)


@pytest.mark.skipif(not QWEN.exists(), reason="embedded Qwen3 trace not present")
@pytest.mark.parametrize("phase,batch_size", [("both", 1), ("decode", 1), ("prefill", 1)])
def test_engine_schedule_uses_the_same_lookups(phase, batch_size):
    """One definition of a lookup: the SimPy engine's demand stream equals sim.access's."""
    schedule = pytest.importorskip("sim.engine.schedule")
    trace = Trace(QWEN)
    seqs = schedule.load_sequences(trace, phase, None, None)
    assert schedule.demand_lookups(seqs, phase, batch_size) == lookup_stream(
        trace, phase=phase, batch_size=batch_size).key_tuples()


@pytest.mark.parametrize("phase", ["both", "decode", "prefill"])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_engine_schedule_same_lookups_toy(toy, phase, batch_size):
    schedule = pytest.importorskip("sim.engine.schedule")
    seqs = schedule.load_sequences(toy, phase, None, None)
    assert schedule.demand_lookups(seqs, phase, batch_size) == lookup_stream(
        toy, phase=phase, batch_size=batch_size).key_tuples()
