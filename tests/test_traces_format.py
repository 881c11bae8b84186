"""Trace format: writer/reader round trip (property-based), streaming, hidden states, atomic writes, meta."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traces import FORMAT_VERSION, Trace, TraceError, TraceMeta, TraceWriter, open_trace, write_trace
from traces.reader import routing_from_table


def meta_for(n_layers, n_experts, top_k, **kw):
    return TraceMeta(model="tiny", source="test", n_layers=n_layers, n_experts=n_experts, top_k=top_k,
                     expert_bytes=[1000] * n_layers, license="Apache-2.0", attribution="test", **kw)


@st.composite
def trace_data(draw):
    L = draw(st.integers(1, 4))
    k = draw(st.integers(1, 3))
    E = draw(st.integers(k, 9))
    n_seq = draw(st.integers(1, 3))
    hidden = draw(st.sampled_from([0, 3]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    rows = {c: [] for c in ("sequence", "phase", "position", "layer", "token_id")}
    for s in draw(st.permutations(range(10, 10 + n_seq))):
        for phase in draw(st.lists(st.sampled_from(["prefill", "decode", "teacher_forced"]), min_size=1, max_size=2,
                                   unique=True)):
            n_pos = draw(st.integers(1, 4))
            start = draw(st.integers(0, 5))
            for p in range(start, start + n_pos):
                tok = int(rng.integers(0, 50))
                for lay in range(L):
                    if lay > 0 and rng.random() < 0.1:  # missing (position, layer) rows are allowed
                        continue
                    for c, v in zip(rows, (s, phase, p, lay, tok)):
                        rows[c].append(v)
    n = len(rows["sequence"])
    experts = np.stack([rng.permutation(E)[:k] for _ in range(n)]) if n else np.zeros((0, k), int)
    weights = rng.random((n, k)).astype(np.float32)
    # (a layer may have no row at all: its hidden-state file is then empty)
    cols = {c: np.asarray(v) for c, v in rows.items()}
    h = rng.standard_normal((n, hidden)).astype(np.float16) if hidden else None
    return L, E, k, cols, experts, weights, h, draw(st.integers(1, 4))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=trace_data(), batch_rows=st.sampled_from([1, 2, 3, 7, 1 << 18]))
def test_round_trip_and_streaming(tmp_path_factory, data, batch_rows):
    L, E, k, cols, experts, weights, hidden, n_chunks = data
    dst = tmp_path_factory.mktemp("rt") / "trace"
    meta = meta_for(L, E, k)
    n = len(cols["sequence"])
    bounds = np.linspace(0, n, n_chunks + 1).astype(int)
    with TraceWriter(dst, meta) as w:  # several add() calls, as the tracer streams them
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                w.add(**{c: v[a:b] for c, v in cols.items()}, experts=experts[a:b], weights=weights[a:b],
                      hidden=hidden[a:b] if hidden is not None else None)
    t = open_trace(dst)
    assert t.meta.has_hidden_states == (hidden is not None)
    table = t.table()
    assert t.n_rows == n
    np.testing.assert_array_equal(table.column("sequence").to_numpy(), cols["sequence"])
    np.testing.assert_array_equal(table.column("position").to_numpy(), cols["position"])
    np.testing.assert_array_equal(table.column("layer").to_numpy(), cols["layer"])
    np.testing.assert_array_equal(table.column("token_id").to_numpy(), cols["token_id"])
    assert table.column("phase").to_pylist() == cols["phase"].tolist()
    got_e = np.stack(table.column("experts").to_pylist())
    np.testing.assert_array_equal(got_e, experts)
    np.testing.assert_array_equal(np.stack(table.column("weights").to_pylist()), weights)

    # streaming hands out the same Routing as the per-sequence reader, in file order
    streamed = list(t.iter_routing(batch_rows=batch_rows))
    # sequences in file order; within a sequence, phases in PHASES order (prefill, decode, teacher_forced)
    from traces import PHASES

    want = sorted(t.keys(), key=lambda kp: (t.sequences().index(kp[0]), PHASES.index(kp[1])))
    assert [(r.sequence, r.phase) for r in streamed] == want
    for r in streamed:
        ref = t.routing(r.sequence, r.phase)
        np.testing.assert_array_equal(r.positions, ref.positions)
        np.testing.assert_array_equal(r.experts, ref.experts)
        np.testing.assert_array_equal(r.weights, ref.weights)
        np.testing.assert_array_equal(r.hidden_rows, ref.hidden_rows)
        # dense arrays agree with the rows written
        sel = (cols["sequence"] == r.sequence) & (cols["phase"] == r.phase)
        p_idx = np.searchsorted(r.positions, cols["position"][sel])
        np.testing.assert_array_equal(r.experts[p_idx, cols["layer"][sel]], experts[sel])
        assert r.present().sum() == sel.sum()
        if hidden is not None:
            for lay in range(L):
                rows = r.hidden_rows[:, lay]
                here = rows >= 0
                want = hidden[sel & (cols["layer"] == lay)]
                got = np.asarray(t.hidden_states(lay))[rows[here]]
                assert got.dtype == np.float16
                np.testing.assert_array_equal(got, want[np.argsort(cols["position"][sel & (cols["layer"] == lay)],
                                                                   kind="stable")])


def test_routing_from_table_missing_rows_are_marked(tmp_path):
    meta = meta_for(2, 4, 2)
    write_trace(tmp_path / "t", meta, sequence=[0, 0, 0], phase=["decode"] * 3, position=[0, 0, 1], layer=[0, 1, 0],
                experts=[[0, 1], [2, 3], [1, 2]], weights=[[0.5, 0.5]] * 3)
    t = Trace(tmp_path / "t")
    r = routing_from_table(t.table(), 2, 2, 0, "decode")
    assert r.present().tolist() == [[True, True], [True, False]]
    assert np.isnan(r.weights[1, 1]).all() and (r.experts[1, 1] == -1).all()
    assert r.token_ids.tolist() == [-1, -1]


def test_writer_is_atomic(tmp_path):
    meta = meta_for(1, 4, 2)
    dst = tmp_path / "t"
    with pytest.raises(RuntimeError):
        with TraceWriter(dst, meta) as w:
            w.add(sequence=[0], phase=["decode"], position=[0], layer=[0], experts=[[0, 1]], weights=[[1, 0]])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    # check=True refuses an invalid trace and leaves nothing behind
    with pytest.raises(TraceError, match="expert id outside"):
        write_trace(dst, meta, check=True, sequence=[0], phase=["decode"], position=[0], layer=[0],
                    experts=[[0, 7]], weights=[[1, 0]])
    assert list(tmp_path.iterdir()) == []
    write_trace(dst, meta, sequence=[0], phase=["decode"], position=[0], layer=[0], experts=[[0, 1]],
                weights=[[1, 0]])
    with pytest.raises(TraceError, match="already exists"):
        write_trace(dst, meta, sequence=[0], phase=["decode"], position=[0], layer=[0], experts=[[0, 1]],
                    weights=[[1, 0]])
    write_trace(dst, meta, overwrite=True, sequence=[0, 0], phase=["decode"] * 2, position=[0, 1], layer=[0, 0],
                experts=[[0, 1], [2, 3]], weights=[[1, 0]] * 2)
    assert Trace(dst).n_rows == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_router_weights_and_unknown_phase(tmp_path):
    meta = meta_for(1, 4, 1)
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    write_trace(tmp_path / "t", meta, router_weights={0: w}, sequence=[0], phase=["decode"], position=[0], layer=[0],
                experts=[[3]], weights=[[1.0]])
    t = Trace(tmp_path / "t")
    np.testing.assert_array_equal(t.router_weights(0), w)
    with pytest.raises(TraceError, match="no hidden states"):
        t.hidden_states(0)
    with pytest.raises(TraceError, match="unknown phase"):
        write_trace(tmp_path / "u", meta, sequence=[0], phase=["generate"], position=[0], layer=[0], experts=[[3]],
                    weights=[[1.0]])
    assert not (tmp_path / "u").exists()


def test_meta_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="expert_bytes has 1 entries"):
        TraceMeta(model="m", source="s", n_layers=2, n_experts=4, top_k=2, expert_bytes=[1], license="l",
                  attribution="a")
    with pytest.raises(ValueError, match="top_k 5 exceeds"):
        meta_for(1, 4, 5)
    write_trace(tmp_path / "t", meta_for(1, 4, 1), sequence=[0], phase=["decode"], position=[0], layer=[0],
                experts=[[3]], weights=[[1.0]])
    raw = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION
    raw["n_experts"] = "many"
    raw["surprise"] = 1
    (tmp_path / "t" / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(TraceError, match=r"meta.json: .*field 'n_experts'.*field 'surprise'"):
        Trace(tmp_path / "t")
    (tmp_path / "t" / "meta.json").write_text("{not json")
    with pytest.raises(TraceError, match=r"meta.json: line 1: invalid JSON"):
        Trace(tmp_path / "t")


def test_not_a_trace(tmp_path):
    with pytest.raises(TraceError, match="no such file"):
        Trace(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(TraceError, match="not a trace directory"):
        Trace(tmp_path / "f")
    (tmp_path / "d").mkdir()
    with pytest.raises(TraceError, match=r"d: not a trace directory \(no meta.json\)"):
        Trace(tmp_path / "d")
    write_trace(tmp_path / "t", meta_for(1, 4, 1), sequence=[0], phase=["decode"], position=[0], layer=[0],
                experts=[[3]], weights=[[1.0]])
    (tmp_path / "t" / "routing.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(TraceError, match="unreadable Parquet"):
        Trace(tmp_path / "t")


def test_embedded_traces_are_valid_and_streamable(embedded_traces):
    from traces.check import check_trace

    names = sorted(p.name for p in embedded_traces.iterdir() if (p / "meta.json").exists())
    public = {"flame-moe-290m-decoder", "flame-moe-290m-encoder", "gemma-4-26b-a4b", "qwen3-30b-a3b"}
    assert public <= set(names)
    for name in names:
        t = Trace(embedded_traces / name)
        check_trace(t)
        assert t.meta.license and t.meta.attribution
        if name in public:
            assert t.meta.license == "Apache-2.0"
        n = sum(int(r.present().sum()) for r in t.iter_routing(batch_rows=1000))
        assert n == t.n_rows == pq.ParquetFile(embedded_traces / name / "routing.parquet").metadata.num_rows


def test_hidden_states_of_a_layer_without_rows(tmp_path):
    """A layer that no row reaches still has its hidden-state file, with no rows (hypothesis found this once)."""
    cols = {"sequence": np.array([0]), "phase": np.array(["decode"]), "position": np.array([0]),
            "layer": np.array([0]), "token_id": np.array([1])}
    with TraceWriter(tmp_path / "t", meta_for(2, 4, 1)) as w:
        w.add(**cols, experts=np.array([[2]]), weights=np.ones((1, 1), np.float32),
              hidden=np.ones((1, 3), np.float16))
    t = open_trace(tmp_path / "t")
    assert t.hidden_states(0).shape == (1, 3) and t.hidden_states(1).shape == (0, 3)
