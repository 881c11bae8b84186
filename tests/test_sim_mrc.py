"""sim.mrc: one-pass curves equal ExpertCache simulated at each size (issue 3, correctness (d) and (e))."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sim import mrc
from sim.access import LookupStream, lookup_stream
from sim.cache import ExpertCache

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "data" / "traces"
QWEN = TRACES / "qwen3-30b-a3b"
GEMMA = TRACES / "gemma-4-26b-a4b"
need_public = pytest.mark.skipif(not (QWEN.exists() and GEMMA.exists()), reason="embedded public traces missing")
MIB = 1 << 20


def stream_of(layers, experts, n_layers, n_experts, sizes):
    n = len(layers)
    return LookupStream(np.asarray(layers, np.int32), np.asarray(experts, np.int32), np.arange(n, dtype=np.int64),
                        np.ones(n, np.int8), n_layers, n_experts, list(sizes))


def hits_at(curve_entry, capacity, n):
    return round(mrc.hit_rate_at(curve_entry, capacity) * n)


# -- kernels: compiled and reference versions agree; curves equal simulation on random streams ----------------
random_streams = st.integers(1, 3).flatmap(lambda L: st.tuples(
    st.just(L),
    st.lists(st.tuples(st.integers(0, L - 1), st.integers(0, 7)), min_size=1, max_size=150),
    st.lists(st.integers(1, 4), min_size=L, max_size=L),
))


@settings(max_examples=40, deadline=None)
@given(random_streams)
def test_kernels_agree(data):
    n_layers, lookups, sizes = data
    ids = np.array([layer * 8 + e for layer, e in lookups], dtype=np.int64)
    uniq, cls = np.unique(np.asarray(sizes)[ids // 8], return_inverse=True)
    a = mrc.lru_hit_capacity_py(ids, cls.astype(np.int64), uniq.astype(np.int64), n_layers * 8)
    b = mrc.lru_hit_capacity(ids, cls.astype(np.int64), uniq.astype(np.int64), n_layers * 8)
    assert a.tolist() == b.tolist()
    nu = mrc.next_use(ids)
    ref = mrc.opt_hit_capacity_py(ids, nu, n_layers * 8)
    assert ref.tolist() == mrc.opt_hit_capacity(ids, nu, n_layers * 8).tolist()


@settings(max_examples=40, deadline=None)
@given(random_streams, st.sampled_from(["global", "per_layer"]), st.sampled_from(["experts", "bytes"]))
@example(data=(2, [(0, 1), (0, 0), (0, 0)], [1, 2]), scope="global", unit="bytes")  # steps below the largest size
def test_curves_equal_simulation_random(data, scope, unit):
    n_layers, lookups, sizes = data
    s = stream_of([a for a, _ in lookups], [b for _, b in lookups], n_layers, 8, sizes)
    out = mrc.compute_mrc(s, ["lru", "belady"], scope=scope, unit=unit)
    top = mrc.saturation_capacity(s, scope, unit)
    big = max(sizes) if unit == "bytes" else 1
    for policy in ("lru", "belady"):
        entry = out["policies"][policy]
        caps = set(entry["capacity"]) | {0, top}
        for c in sorted(caps):
            if scope == "global" and unit == "bytes" and 0 < c < big:
                continue  # not on the byte curve (the largest expert does not fit)
            want = mrc.simulate_hits(s, policy, c, scope=scope, unit=unit)
            if entry["exact"]:
                assert hits_at(entry, c, len(s)) == want, (policy, c)


def test_opt_stack_hand_example():
    # a b c a d a b c with 2 slots: Belady hits a, a (see test_sim_cache)
    ids = np.array([0, 1, 2, 0, 3, 0, 1, 2])
    h = mrc.opt_hit_capacity(ids, mrc.next_use(ids), 4)
    assert int((h <= 2).sum()) == 2 and int((h <= 1).sum()) == 0
    assert int((h <= 4).sum()) == 4  # every re-reference hits with 4 slots


# -- the public traces: curve at sizes == ExpertCache ---------------------------------------------------------
@need_public
@pytest.mark.parametrize("trace", [QWEN, GEMMA], ids=["qwen", "gemma"])
def test_public_curves_equal_expertcache(trace):
    s = lookup_stream(trace)
    n = len(s)
    out = mrc.compute_mrc(s, ["lru", "belady"])
    for c in (64, 700, 2500):
        for policy in ("lru", "belady"):
            assert hits_at(out["policies"][policy], c, n) == mrc.simulate_hits(s, policy, c), (policy, c)
    per = mrc.compute_mrc(s, ["lru", "belady"], scope="per_layer", unit="bytes")
    for mib in (1500,):
        for policy in ("lru", "belady"):
            want = mrc.simulate_hits(s, policy, mib * MIB, scope="per_layer", unit="bytes")
            assert hits_at(per["policies"][policy], mib * MIB, n) == want
    glob = mrc.compute_mrc(s, ["lru"], unit="bytes")
    for mib in (1000, 3000):
        assert hits_at(glob["policies"]["lru"], mib * MIB, n) == mrc.simulate_hits(s, "lru", mib * MIB, unit="bytes")


# -- (e): global LRU, 4000 MiB, DESIGN.md semantics, with the running batch pinned ----------------------------
LRU_4000MIB = {"qwen": (29596, 39526), "gemma": (18862, 24578)}  # hits, lookups (computed by this code)


def replay_pinned(stream: LookupStream, capacity_bytes: int, policy: str = "lru") -> ExpertCache:
    """Each (batch, layer) group: look up every expert, load the misses, all pinned while the layer runs."""
    cache = ExpertCache(n_layers=stream.n_layers, n_experts=stream.n_experts, expert_bytes=stream.expert_bytes,
                        capacity_bytes=capacity_bytes, policy=policy)
    keys = stream.key_tuples()
    bounds = list(stream.group_starts()) + [len(keys)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        group = keys[a:b]
        for k in group:
            cache.pin(k)
            if not cache.lookup(k):
                assert cache.insert(k) is not None
        for k in group:
            assert k in cache.resident  # every expert resident when it computes
            cache.unpin(k)
    return cache


@need_public
@pytest.mark.parametrize("name,trace", [("qwen", QWEN), ("gemma", GEMMA)])
def test_lru_4000mib_pinned(name, trace):
    s = lookup_stream(trace)
    cap = ExpertCache.resolve_capacity_bytes(expert_bytes=s.expert_bytes, n_experts=s.n_experts, capacity_mib=4000)
    cache = replay_pinned(s, cap)
    assert (cache.stats.hits, cache.stats.lookups) == LRU_4000MIB[name]
    assert cache.used_bytes <= cap
    curve = mrc.compute_mrc(s, ["lru"], unit="bytes")["policies"]["lru"]
    assert hits_at(curve, cap, len(s)) == LRU_4000MIB[name][0]


# -- command line ------------------------------------------------------------------------------------------
@need_public
def test_cli_json(capsys):
    assert mrc.main([str(GEMMA), "--policies", "lru,belady,fifo", "--points", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unit"] == "experts"
    assert set(out["policies"]) == {"lru", "belady", "fifo"}
    for entry in out["policies"].values():
        assert len(entry["capacity"]) == len(entry["hit_rate"]) >= 2
        assert all(0 <= h <= 1 for h in entry["hit_rate"])
        assert entry["hit_rate"] == sorted(entry["hit_rate"])  # LRU, OPT: inclusion; FIFO here too
    assert mrc.main([str(GEMMA), "--policies", "lru", "--scope", "per_layer", "--unit", "bytes"]) == 0
    assert "capacity" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    from traces.errors import run_cli

    assert run_cli(mrc.main, [str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    if QWEN.exists():
        assert run_cli(mrc.main, [str(QWEN), "--policies", "lru,nope"]) == 2
        assert "unknown cache policy 'nope'" in capsys.readouterr().err
