"""Differential checks against libCacheSim (issue 3, correctness (c)).

Same lookup semantics on both sides: the demand stream of sim.access (one lookup per unique expert per (layer,
batch), the prompt as one prefill batch, then decode), global scope, one lookup at a time (sim.mrc's "sequential"
semantics, which is what a trace simulator does). Ours: ExpertCache (lookup, insert on a miss).
libCacheSim's: its own C simulator (TraceReader + process_trace) on the same stream. LFU: libCacheSim's LFU keeps
one FIFO queue per frequency, i.e. among the least frequent it evicts the one that reached that frequency first;
our LFU documents and implements the same tie-break, so the counts must be identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sim import mrc
from sim.access import lookup_stream
from sim.cache import ExpertCache
from sim.policies.libcachesim_adapter import NO_TO_EVICT, libcachesim_algorithms, make_libcachesim_cache

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "data" / "traces"
QWEN = TRACES / "qwen3-30b-a3b"
GEMMA = TRACES / "gemma-4-26b-a4b"
pytestmark = pytest.mark.skipif(not (QWEN.exists() and GEMMA.exists()), reason="embedded public traces missing")
MIB = 1 << 20


@pytest.fixture(scope="module", params=[QWEN, GEMMA], ids=["qwen", "gemma"])
def stream(request):
    return lookup_stream(request.param)


@pytest.mark.parametrize("ours,theirs", [("lru", "LRU"), ("fifo", "FIFO"), ("lfu", "LFU"), ("belady", "Belady")])
def test_hit_counts_equal_libcachesim_experts(stream, ours, theirs):
    for capacity in (200, 900, 2000):
        want = mrc.run_libcachesim(stream, theirs, capacity)["hits"]
        assert mrc.simulate_hits(stream, ours, capacity, semantics="sequential") == want, (ours, capacity)


def test_byte_lru_equals_libcachesim_sized_objects(stream):
    """libCacheSim supports sized objects: object size = the expert's bytes, capacity in bytes."""
    curve = mrc.compute_mrc(stream, ["lru"], unit="bytes", semantics="sequential")["policies"]["lru"]
    for mib in (700, 2500, 4000):
        want = mrc.run_libcachesim(stream, "LRU", mib * MIB, unit="bytes")["hits"]
        assert mrc.simulate_hits(stream, "lru", mib * MIB, unit="bytes", semantics="sequential") == want
        assert round(mrc.hit_rate_at(curve, mib * MIB) * len(stream)) == want


def test_lru_curve_equals_libcachesim_at_sizes(stream):
    curve = mrc.compute_mrc(stream, ["lru"], semantics="sequential")["policies"]["lru"]
    for capacity in (100, 1000, 3000):
        want = mrc.run_libcachesim(stream, "LRU", capacity)["hits"]
        assert round(mrc.hit_rate_at(curve, capacity) * len(stream)) == want


def test_per_layer_scope_equals_libcachesim(stream):
    capacity = 40 * stream.n_layers
    for ours, theirs in (("lru", "LRU"), ("fifo", "FIFO")):
        want = mrc.run_libcachesim(stream, theirs, capacity, scope="per_layer")["hits"]
        assert mrc.simulate_hits(stream, ours, capacity, scope="per_layer", semantics="sequential") == want


@pytest.mark.parametrize("algo", ["LRU", "FIFO", "LFU", "ARC", "Sieve", "Clock"])
def test_adapter_reproduces_libcachesim(stream, algo):
    """The lcs:NAME adapter inside ExpertCache gives libCacheSim's own hit count (no pins)."""
    capacity = 900
    want = mrc.run_libcachesim(stream, algo, capacity)["hits"]
    assert mrc.simulate_hits(stream, f"lcs:{algo}", capacity, semantics="sequential") == want


def test_adapter_respects_pins():
    c = ExpertCache(n_layers=1, n_experts=8, expert_bytes=[1], capacity_bytes=2, policy="lcs:LRU")
    for k in [(0, 0), (0, 1)]:
        c.lookup(k)
        c.insert(k)
    c.pin((0, 0))
    assert c.insert((0, 2)) == [(0, 1)]  # libCacheSim's LRU victim (0, 0) is pinned: fall back to the next
    c.pin((0, 2))
    assert c.insert((0, 3)) is None


def test_adapter_names_and_guards():
    algos = libcachesim_algorithms()
    assert {"lru", "s3fifo", "arc", "lfu", "fifo"} <= set(algos)
    with pytest.raises(ValueError, match="unknown libCacheSim algorithm"):
        make_libcachesim_cache("nope", 10)
    with pytest.raises(ValueError, match="too small"):
        make_libcachesim_cache("S3FIFO", 3)  # libCacheSim would abort the process


def test_bench_mrc_keys():
    out = mrc.bench_mrc(GEMMA, repeats=1)
    for key in ("mrc_accesses_per_s", "libcachesim_accesses_per_s", "mrc_speedup_vs_libcachesim"):
        assert np.isfinite(out[key]) and out[key] > 0
    assert out["mrc_agrees_with_libcachesim"]


def test_algorithms_without_to_evict_are_refused():
    import libcachesim

    for name in NO_TO_EVICT:  # the list is right: these give no victim
        lcs = make_libcachesim_cache(name, 1000, n_objects=64)
        for i in range(1, 60):
            lcs.get(libcachesim.Request(obj_id=i, obj_size=1))
        assert lcs.to_evict(libcachesim.Request(obj_id=999, obj_size=1)) is None, name
    with pytest.raises(ValueError, match="no to_evict"):
        ExpertCache(n_layers=1, n_experts=8, expert_bytes=[1], capacity_bytes=20, policy="lcs:S3FIFO")
    c = ExpertCache(n_layers=1, n_experts=8, expert_bytes=[1], capacity_bytes=20, policy="lcs:S3FIFO",
                    policy_params={"fallback": True})
    for e in range(8):
        c.lookup((0, e))
        c.insert((0, e))
    assert len(c.resident) == 8


def test_mrc_lcs_policies_use_libcachesim(stream):
    out = mrc.compute_mrc(stream, ["lru", "lcs:LRU", "lcs:S3FIFO"], capacities=[3, 900], semantics="sequential")
    lcs_lru, s3 = out["policies"]["lcs:LRU"], out["policies"]["lcs:S3FIFO"]
    assert lcs_lru["method"] == "libcachesim" and lcs_lru["hit_rate"] == out["policies"]["lru"]["hit_rate"]
    assert s3["capacity"] == [900]  # 3 is too small for S3FIFO's 10% small queue: left off, not crashed
    assert s3["hit_rate"][0] * len(stream) == pytest.approx(mrc.run_libcachesim(stream, "S3FIFO", 900)["hits"])
