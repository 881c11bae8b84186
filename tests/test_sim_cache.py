"""ExpertCache and the policy plug-ins: unit cases and hypothesis invariants (issue 3, correctness (b))."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cache import ExpertCache
from sim.policies import Policy, available_policies, make_policy, register_policy

N_LAYERS, N_EXPERTS = 3, 6
SIZES = [3, 5, 5]


def make(policy="lru", capacity=20, scope="global", sizes=SIZES, **kw):
    return ExpertCache(n_layers=len(sizes), n_experts=N_EXPERTS, expert_bytes=sizes, capacity_bytes=capacity,
                       scope=scope, policy=policy, **kw)


def drive(cache, seq):
    for k in seq:
        if not cache.lookup(k):
            cache.insert(k)


def test_registry_names():
    for name in ("lru", "lfu", "fifo", "static", "belady", "libcachesim"):
        assert name in available_policies()
    with pytest.raises(ValueError, match="unknown cache policy 'nope'"):
        make_policy("nope")
    with pytest.raises(ValueError, match="needs the future"):
        make_policy("belady")


def test_lru_order_and_touch():
    c = make(capacity=3, sizes=[1, 1, 1])
    drive(c, [(0, 0), (0, 1), (0, 2)])
    c.touch((0, 0))  # refresh: (0, 1) is now least recent
    assert c.insert((0, 3)) == [(0, 1)]
    assert c.lookup((0, 0)) and not c.lookup((0, 1))
    assert (c.stats.hits, c.stats.misses, c.stats.lookups) == (1, 4, 5)
    assert c.stats.evictions == 1 and c.stats.insertions == 4


def test_fifo_ignores_hits():
    c = make("fifo", capacity=2, sizes=[1, 1, 1])
    drive(c, [(0, 0), (0, 1), (0, 0), (0, 2)])
    assert set(c.resident) == {(0, 1), (0, 2)}


def test_lfu_tie_break_is_least_recent_of_min_frequency():
    c = make("lfu", capacity=3, sizes=[1, 1, 1])
    drive(c, [(0, 0), (0, 1), (0, 2), (0, 1), (0, 0)])  # freqs: 0:2 1:2 2:1
    assert c.insert((0, 3)) == [(0, 2)]
    drive(c, [(0, 3)])  # freqs 0:2 1:2 3:2; (0,1) reached 2 before (0,0)
    assert c.insert((0, 4)) == [(0, 1)]


def test_byte_capacity_and_multi_victim():
    c = make(capacity=10, sizes=[3, 5, 5])
    drive(c, [(0, 0), (0, 1), (0, 2)])  # 9 bytes
    assert c.insert((1, 0)) == [(0, 0), (0, 1)]  # needs 5: evict two 3-byte experts
    assert c.used_bytes == 8 and c.used_bytes <= c.capacity_bytes


def test_pinned_never_evicted_and_insert_is_atomic():
    c = make(capacity=6, sizes=[3, 5, 5])
    drive(c, [(0, 0), (0, 1)])
    c.pin((0, 0))
    c.pin((0, 1))
    before = (set(c.resident), c.used_bytes)
    assert c.insert((0, 2)) is None
    assert (set(c.resident), c.used_bytes) == before
    c.unpin((0, 1))
    assert c.insert((0, 2)) == [(0, 1)]
    c.pin((0, 2))
    c.pin((0, 0))  # counted pins
    c.unpin((0, 0))
    assert c.insert((0, 3)) is None
    c.unpin((0, 0))
    assert c.insert((0, 3)) == [(0, 0)]
    with pytest.raises(ValueError):
        c.unpin((0, 0))


def test_too_large_and_per_layer_split():
    c = make(capacity=12, scope="per_layer", sizes=[3, 5, 5])  # 4 bytes per layer
    assert c.insert((1, 0)) is None  # 5 > 4
    assert c.insert((0, 0)) == [] and c.insert((0, 1)) == [(0, 0)]
    assert c.free_bytes(0) == 1 and c.free_bytes(1) == 4


def test_resolve_capacity():
    r = ExpertCache.resolve_capacity_bytes
    assert r(expert_bytes=[2, 4], n_experts=8, capacity_mib=1.5) == 1572864
    assert r(expert_bytes=[2, 4], n_experts=8, capacity_experts=5) == 15
    assert r(expert_bytes=[2, 4], n_experts=8, cache_rate=0.5) == 24
    with pytest.raises(ValueError):
        r(expert_bytes=[2, 4], n_experts=8)
    with pytest.raises(ValueError):
        r(expert_bytes=[2, 4], n_experts=8, capacity_mib=1, cache_rate=0.1)


def test_static_hot_set():
    seq = [(0, 1)] * 5 + [(0, 2)] * 3 + [(1, 0)] * 4 + [(2, 5)]
    c = make("static", capacity=8, policy_params={"profile": seq})
    drive(c, seq)
    assert set(c.resident) == {(0, 1), (1, 0)}  # 3 + 5 bytes, most popular first
    assert c.insert((2, 5)) is None and c.stats.evictions == 0
    c2 = make("static", capacity=20, policy_params={"hot": [(2, 5)]})
    assert c2.insert((0, 1)) is None and c2.insert((2, 5)) == []


def test_belady_matches_hand_example():
    seq = [(0, k) for k in (0, 1, 2, 0, 3, 0, 1, 2)]
    c = make("belady", capacity=2, sizes=[1, 1, 1], future=seq)
    drive(c, seq)
    # 0 1 2(evict 1: next at 6 vs 0 at 3) 0(hit) 3(evict 2 or 3..: 2 next 7, 0 next 5 -> evict 2) 0(hit) 1 2
    assert c.stats.hits == 2
    with pytest.raises(ValueError, match="future sequence"):
        c.lookup((0, 0))


def test_custom_policy_plugin():
    @register_policy("test-mru")
    class MRU(Policy):
        def __init__(self):
            self.stack = []

        def on_hit(self, key):
            self.stack.remove(key)
            self.stack.append(key)

        def on_insert(self, key):
            self.stack.append(key)

        def on_evict(self, key):
            self.stack.remove(key)

        def victim(self, candidates):
            return next((k for k in reversed(self.stack) if k in candidates), None)

    c = make("test-mru", capacity=2, sizes=[1, 1, 1])
    drive(c, [(0, 0), (0, 1), (0, 2)])
    assert set(c.resident) == {(0, 0), (0, 2)}


# -- hypothesis invariants ---------------------------------------------------------------------------------
keys = st.tuples(st.integers(0, N_LAYERS - 1), st.integers(0, N_EXPERTS - 1))
ops = st.lists(st.tuples(st.sampled_from(["lookup", "insert", "touch", "pin", "unpin", "remove"]), keys),
               max_size=120)
POLICIES = ["lru", "fifo", "lfu", "belady", "static", "lcs:LRU", "lcs:ARC", "lcs:Sieve"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, capacity=st.integers(0, 40), scope=st.sampled_from(["global", "per_layer"]),
       policy=st.sampled_from(POLICIES))
def test_invariants(ops, capacity, scope, policy):
    future = [k for op, k in ops if op == "lookup"]
    params = {"profile": future} if policy == "static" else None
    c = make(policy, capacity=capacity, scope=scope, future=future, policy_params=params)
    pins: dict = {}
    for op, k in ops:
        if op == "lookup":
            hit = c.lookup(k)
            assert hit == (k in c.resident)
            if not hit:
                out = c.insert(k)
                assert out is None or not any(v in pins for v in out)
        elif op == "insert":
            before = (set(c.resident), c.used_bytes)
            out = c.insert(k)
            if out is None:
                assert (set(c.resident), c.used_bytes) == before
            else:
                assert k in c.resident
                assert not any(v in pins for v in out)
        elif op == "touch":
            c.touch(k)
        elif op == "pin":
            c.pin(k)
            pins[k] = pins.get(k, 0) + 1
        elif op == "unpin" and pins.get(k):
            c.unpin(k)
            pins[k] -= 1
            if not pins[k]:
                del pins[k]
        elif op == "remove" and k not in pins:
            c.remove(k)
        # invariants after every step
        assert c.used_bytes <= c.capacity_bytes
        assert c.used_bytes == sum(SIZES[layer] for layer, _ in c.resident)
        for layer in range(N_LAYERS):
            assert c.free_bytes(layer) >= 0
        assert c.stats.hits + c.stats.misses == c.stats.lookups


def test_hold_and_lookup_layer():
    """lookup_layer holds its layer's keys (not evictable) until the next hold; with `touched`, LRU skips the
    hits' hook and the end-of-layer touch leaves the same order as hit-then-touch."""
    def run(touched):
        c = make(capacity=4, sizes=[1, 1, 1])
        drive(c, [(0, 0), (0, 1), (1, 0), (1, 1)])
        assert c.lookup_layer([(0, 1), (0, 0)], touched, True) == 2
        assert c.is_pinned((0, 0)) and c.is_pinned((0, 1))
        assert c.insert((2, 0)) == [(1, 0)]  # the held layer-0 keys are skipped
        for k in [(0, 1), (0, 0)]:
            c.touch(k)
        c.hold(())
        assert not c.is_pinned((0, 0))
        assert (c.stats.hits, c.stats.lookups) == (2, 6)
        return list(c.policies[0].eviction_order())
    assert run(True) == run(False) == [(1, 1), (2, 0), (0, 1), (0, 0)]
    c = make(capacity=2, sizes=[1, 1, 1])
    drive(c, [(0, 0), (0, 1)])
    c.hold([(0, 0), (0, 1)])
    assert c.insert((1, 0)) is None
    with pytest.raises(ValueError):
        c.remove((0, 0))
