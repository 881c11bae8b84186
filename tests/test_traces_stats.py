"""traces.stats against hand-computed values on tiny traces, a brute-force LRU, and the embedded traces."""

import json
import math
from collections import OrderedDict

import numpy as np
import pytest

from traces import Trace, TraceMeta, write_trace
from traces.errors import run_cli
from traces.stats import CACHE_RATES, Dense, compute, lookup_distances, lookup_groups, main


def make(tmp_path, rows, *, L, E, k, name="t"):
    """rows: (sequence, phase, position, layer, experts)."""
    meta = TraceMeta(model="tiny", source="test", n_layers=L, n_experts=E, top_k=k, expert_bytes=[10] * L,
                     license="l", attribution="a")
    seq, phase, pos, lay, ex = zip(*rows)
    write_trace(tmp_path / name, meta, sequence=seq, phase=phase, position=pos, layer=lay, experts=ex,
                weights=np.full((len(rows), k), 1.0 / k), check=True)
    return Trace(tmp_path / name)


def decode_rows(seq, experts_by_pos, phase="decode", layer=0):
    return [(seq, phase, p, layer, e) for p, e in experts_by_pos.items()]


def test_consecutive_overlap_by_hand(tmp_path):
    rows = [(0, "prefill", p, 0, [0, 1]) for p in range(5)]  # prefill is not counted
    rows += decode_rows(0, {5: [0, 1], 6: [1, 2], 7: [3, 4], 9: [3, 4]})  # 7 -> 9 is not consecutive
    rows += decode_rows(1, {0: [0, 1], 1: [1, 0]})
    s = compute(make(tmp_path, rows, L=1, E=8, k=2))
    # pairs: (5,6) 1/2, (6,7) 0, seq 1 (0,1) 2/2
    assert s["consecutive_overlap"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert s["consecutive_overlap_pairs"] == 3 and s["consecutive_overlap_phase"] == "decode"
    assert s["consecutive_overlap_random"] == pytest.approx(2 / 8)
    assert s["tokens"] == {"prefill": 5, "decode": 6}


def test_consecutive_overlap_falls_back_to_teacher_forced(tmp_path):
    rows = decode_rows(0, {0: [0, 1], 1: [0, 2]}, phase="teacher_forced")
    rows += decode_rows(0, {0: [0, 1], 1: [2, 3]}, phase="teacher_forced", layer=1)
    s = compute(make(tmp_path, rows, L=2, E=4, k=2))
    assert s["consecutive_overlap_phase"] == "teacher_forced"
    assert s["consecutive_overlap_per_layer"] == [0.5, 0.0]
    assert s["consecutive_overlap"] == pytest.approx(0.25)


def test_popularity_entropy_by_hand(tmp_path):
    rows = [(0, "decode", p, 0, [p]) for p in range(4)]  # uniform over 4 experts: 1
    rows += [(0, "decode", p, 1, [0]) for p in range(4)]  # one expert: 0
    rows += [(0, "decode", p, 2, [[0], [0], [1], [2]][p]) for p in range(4)]  # 1/2, 1/4, 1/4
    s = compute(make(tmp_path, rows, L=3, E=4, k=1))
    want = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(4)
    assert s["popularity_entropy"] == pytest.approx([1.0, 0.0, want])
    assert want == pytest.approx(0.75)
    assert s["popularity_entropy_mean"] == pytest.approx((1 + 0 + 0.75) / 3)
    assert s["popularity_top10pct_share"] == pytest.approx([0.25, 1.0, 0.5])  # ceil(0.4) = 1 expert


def test_cross_layer_precision_perfect_mapping(tmp_path):
    # 5 sequences: the 5th is held out; layer 1 = layer 0 + 1 (mod 4) always
    rows = []
    for s in range(5):
        for p in range(4):
            rows += [(s, "decode", p, 0, [p]), (s, "decode", p, 1, [(p + 1) % 4])]
    st = compute(make(tmp_path, rows, L=2, E=4, k=1))
    assert st["cross_layer_precision"] == 1.0
    assert st["cross_layer_split"].startswith("sequences")
    assert (st["cross_layer_train_tokens"], st["cross_layer_test_tokens"]) == (16, 4)
    # popularity is uniform, ties go to the lowest id: expert 0 is right for 1 of the 4 held-out tokens
    assert st["cross_layer_precision_popularity"] == pytest.approx(0.25)


def test_cross_layer_precision_counts_by_hand(tmp_path):
    # train: {0,1} -> {2,3} three times, {0,1} -> {0,2} once; held out (5th sequence): {0,1} -> {2,0}
    l1 = [[2, 3], [2, 3], [3, 2], [0, 2], [2, 0]]
    rows = []
    for s in range(5):
        rows += [(s, "decode", 0, 0, [0, 1]), (s, "decode", 0, 1, l1[s])]
    st = compute(make(tmp_path, rows, L=2, E=4, k=2))
    # scores for layer 1: e2 = 4+4, e3 = 3+3, e0 = 1+1 -> predict {2, 3}; true {2, 0}: precision 1/2
    assert st["cross_layer_precision"] == pytest.approx(0.5)
    assert st["cross_layer_precision_popularity"] == pytest.approx(0.5)


def test_cross_layer_position_split(tmp_path):
    rows = []
    for p in range(10):
        rows += [(0, "decode", p, 0, [p % 3]), (0, "decode", p, 1, [p % 3])]
    st = compute(make(tmp_path, rows, L=2, E=3, k=1))
    assert st["cross_layer_split"].startswith("positions")
    assert (st["cross_layer_train_tokens"], st["cross_layer_test_tokens"]) == (8, 2)
    assert st["cross_layer_precision"] == 1.0


def test_reuse_distance_by_hand(tmp_path):
    t = make(tmp_path, decode_rows(0, {p: [e] for p, e in enumerate([0, 1, 0, 2, 1])}), L=1, E=4, k=1)
    dg, dl, truncated = lookup_distances(Dense(t))
    assert dg.tolist() == [-1, -1, 1, -1, 2] and dl.tolist() == dg.tolist() and not truncated
    rd = compute(t)["reuse_distance"]
    assert (rd["lookups"], rd["global"]["cold"], rd["global"]["warm"]) == (5, 3, 2)
    assert rd["global"]["mean"] == 1.5
    assert rd["global"]["histogram"]["edges"] == [0, 1, 2, 4] and rd["global"]["histogram"]["counts"] == [0, 1, 1]
    # capacity 2 (rate 0.5 of 4 keys): only the lookup at distance 1 hits
    assert rd["lru_hit_rate_global"]["0.5"] == pytest.approx(1 / 5)
    assert rd["lru_hit_rate_global"]["0.25"] == 0.0


def test_reuse_distance_within_a_batch(tmp_path):
    # {0,1} then {1,0}: key 1 reused at distance 0, key 0 at distance 1 (key 1 came between)
    t = make(tmp_path, decode_rows(0, {0: [0, 1], 1: [1, 0]}), L=1, E=4, k=2)
    assert lookup_distances(Dense(t))[0].tolist() == [-1, -1, 0, 1]


def test_prefill_is_one_batch_of_unique_experts(tmp_path):
    rows = [(0, "prefill", 0, 0, [0, 1]), (0, "prefill", 1, 0, [1, 2]), (0, "decode", 2, 0, [1, 3])]
    t = make(tmp_path, rows, L=1, E=4, k=2)
    groups = [(lay, ids.tolist()) for lay, ids in lookup_groups(Dense(t))]
    assert groups == [(0, [0, 1, 2]), (0, [1, 3])]
    assert lookup_distances(Dense(t))[0].tolist() == [-1, -1, -1, 1, -1]
    # first-occurrence order inside a batch; teacher_forced sequences are one batch too
    rows = [(0, "teacher_forced", 0, 0, [2, 1]), (0, "teacher_forced", 1, 0, [0, 2]),
            (1, "teacher_forced", 0, 0, [3, 2])]
    t = make(tmp_path, rows, L=1, E=4, k=2, name="tf")
    assert [ids.tolist() for _, ids in lookup_groups(Dense(t))] == [[2, 1, 0], [3, 2]]


def test_global_and_per_layer_scope(tmp_path):
    rows = [(0, "decode", 0, 0, [0]), (0, "decode", 0, 1, [0]), (0, "decode", 1, 0, [0]), (0, "decode", 1, 1, [1])]
    dg, dl, _ = lookup_distances(Dense(make(tmp_path, rows, L=2, E=2, k=1)))
    assert dg.tolist() == [-1, -1, 1, -1] and dl.tolist() == [-1, -1, 0, -1]


def lru_hits(stream, capacity):
    cache, hits = OrderedDict(), 0
    for key in stream:
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            cache[key] = True
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lru_hit_rate_matches_a_brute_force_lru(tmp_path, seed):
    rng = np.random.default_rng(seed)
    L, E, k = 3, 8, 2
    rows = []
    for s in range(2):
        for p in range(12):
            phase = "prefill" if p < 4 else "decode"
            for lay in range(L):
                skewed = rng.choice(E, size=k, replace=False, p=np.r_[[0.3, 0.2], [0.5 / (E - 2)] * (E - 2)])
                rows.append((s, phase, p, lay, skewed.tolist()))
    t = make(tmp_path, rows, L=L, E=E, k=k)
    rd = compute(t)["reuse_distance"]
    groups = list(lookup_groups(Dense(t)))
    stream = [lay * E + int(e) for lay, ids in groups for e in ids]
    assert rd["lookups"] == len(stream)
    for r in CACHE_RATES:
        assert rd["lru_hit_rate_global"][str(r)] == pytest.approx(lru_hits(stream, int(r * L * E)) / len(stream))
        per_layer = sum(lru_hits([key for key in stream if key // E == lay], int(r * E)) for lay in range(L))
        assert rd["lru_hit_rate_per_layer"][str(r)] == pytest.approx(per_layer / len(stream))


def test_lookup_stream_equals_the_simulators(embedded_traces):
    """One definition of a lookup: the stream behind reuse_distance is sim.access's stream at batch size 1."""
    access = pytest.importorskip("sim.access")
    for name in ("qwen3-30b-a3b", "flame-moe-290m-decoder"):
        t = Trace(embedded_traces / name)
        d = Dense(t)
        ours = np.concatenate([lay * d.E + ids.astype(np.int64) for lay, ids in lookup_groups(d)])
        theirs = access.lookup_stream(t, phase="both", batch_size=1).keys
        np.testing.assert_array_equal(ours, theirs)


def test_cli(tmp_path, capsys):
    make(tmp_path, decode_rows(0, {0: [0, 1], 1: [1, 2]}), L=1, E=4, k=2)
    assert run_cli(main, [str(tmp_path / "t"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    for key in ("n_layers", "n_experts", "top_k", "tokens", "consecutive_overlap", "cross_layer_precision",
                "popularity_entropy", "reuse_distance"):
        assert key in s
    assert run_cli(main, [str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "consecutive   overlap 0.500 on decode tokens" in out
    assert run_cli(main, [str(tmp_path)]) == 2
    assert "not a trace directory" in capsys.readouterr().err
    meta = TraceMeta(model="m", source="s", n_layers=1, n_experts=4, top_k=1, expert_bytes=[1], license="l",
                     attribution="a")
    write_trace(tmp_path / "bad", meta, sequence=[0, 0], phase=["decode"] * 2, position=[0, 1], layer=[0, 0],
                experts=[[1], [4]], weights=[[1.0], [1.0]])
    assert run_cli(main, [str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 1" in err[0] and "expert id outside 0..3" in err[0]


def test_embedded_figures(embedded_traces):
    """Pinned figures of the embedded traces: a change to the data, an importer or a statistic shows here."""
    q = compute(Trace(embedded_traces / "qwen3-30b-a3b"))
    assert q["consecutive_overlap"] == pytest.approx(0.3795, abs=1e-3)
    assert q["cross_layer_precision"] == pytest.approx(0.516, abs=2e-3)
    assert q["cross_layer_precision"] > q["cross_layer_precision_popularity"] > 6 / 128
    assert q["popularity_entropy_mean"] == pytest.approx(0.777, abs=2e-3)
    assert q["reuse_distance"]["lookups"] == 39526
    f = compute(Trace(embedded_traces / "flame-moe-290m-encoder"))
    assert f["consecutive_overlap_phase"] == "teacher_forced"
    assert f["consecutive_overlap"] == pytest.approx(0.105, abs=2e-3)
    assert f["popularity_entropy_mean"] > 0.99
    assert f["reuse_distance"]["lookups"] == 16150  # 32 one-batch sequences x 8 layers x ~63 unique experts
