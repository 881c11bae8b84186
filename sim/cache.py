"""The expert cache: residency, byte-accurate capacity, pins and statistics, with a pluggable eviction policy.

Plain Python and device-agnostic: the SimPy engine and the real executor drive the same object; only their clocks
differ. Nothing here knows about time, transfers or SimPy.

Semantics (DESIGN.md):
- a key is `(layer, expert)`; its size is `expert_bytes[layer]` (experts of different layers may differ in size,
  so a `global` capacity is byte-accurate, not a count). To count in experts, pass `expert_bytes=[1] * n_layers`
  and the capacity in experts.
- `lookup(key)` is one demand lookup (the driver calls it once per unique expert per (layer, batch)); it counts a
  hit or a miss. It does not insert: on a miss the driver calls `insert(key)` (at once, or when a transfer is
  started, pinning it while the transfer is in flight).
- pinned keys are never evicted (in-flight transfers). Pins are counted. The running layer's experts are held
  instead (`hold`): never evicted either, one call for the whole layer. A driver may also hand over its own
  live container of in-flight keys (`busy=`, e.g. its dict of copies): never evicted, no pin per copy.
- `insert` either makes room and inserts, or changes nothing and returns None (nothing evictable / policy
  declines / key larger than its partition).
- scope `global`: one budget and one policy instance over all layers; `per_layer`: the budget is split evenly
  (`capacity_bytes // n_layers` bytes per layer), one policy instance per layer.
"""

from __future__ import annotations

from collections.abc import Container, Iterator, KeysView, Sequence
from dataclasses import asdict, dataclass

from sim.policies import Key, Policy, make_policy

SCOPES = ("global", "per_layer")
_NOTHING_HELD = ((-1, -1),)  # what `hold(())` holds: a key of no layer


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    lookups: int = 0
    insertions: int = 0
    evictions: int = 0
    rejected: int = 0  # inserts that returned None
    bytes_inserted: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


class _Candidates:
    """Set-like view of the evictable keys of one partition: resident there, not pinned, not held, not already
    chosen."""

    __slots__ = ("_members", "_cache", "_chosen")

    def __init__(self, members: dict[Key, int], cache: ExpertCache, chosen: set[Key]):
        self._members = members
        self._cache = cache
        self._chosen = chosen

    def __contains__(self, key: object) -> bool:
        return key in self._members and not self._cache.is_pinned(key) and key not in self._chosen

    def __iter__(self) -> Iterator[Key]:
        pinned, chosen = self._cache.is_pinned, self._chosen
        return (k for k in self._members if not pinned(k) and k not in chosen)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ExpertCache:
    def __init__(
        self,
        *,
        n_layers: int,
        n_experts: int,
        expert_bytes: Sequence[int],
        capacity_bytes: int,
        scope: str = "global",
        policy: str = "lru",
        policy_params: dict | None = None,
        future: Sequence[Key] | None = None,
        busy: Container[Key] | None = None,
    ):
        """`busy`: the driver's live container of keys being copied into their slots (not evictable, as pinned;
        cheaper than a pin and an unpin per copy)."""
        if scope not in SCOPES:
            raise ValueError(f"cache scope must be one of {SCOPES}, got {scope!r}")
        if len(expert_bytes) != n_layers:
            raise ValueError(f"expert_bytes has {len(expert_bytes)} entries, expected n_layers={n_layers}")
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.n_layers = n_layers
        self.n_experts = n_experts
        self.expert_bytes = [int(b) for b in expert_bytes]
        self.capacity_bytes = int(capacity_bytes)
        self.scope = scope
        self.policy_name = policy
        n_parts = n_layers if scope == "per_layer" else 1
        self._part_capacity = [self.capacity_bytes // n_parts] * n_parts
        self._part_used = [0] * n_parts
        self._part_members: list[dict[Key, int]] = [{} for _ in range(n_parts)]  # key -> bytes, per partition
        params = dict(policy_params or {})
        if scope == "per_layer":
            params.setdefault("partition_capacity_bytes", self._part_capacity[0])
        else:
            params.setdefault("partition_capacity_bytes", self.capacity_bytes)
        params["expert_bytes"] = self.expert_bytes
        params["n_experts"] = n_experts
        self.policies: list[Policy] = [
            make_policy(policy, future=future, **_accepted(policy, params, layer=(i if n_parts > 1 else None)))
            for i in range(n_parts)
        ]
        self._per_layer = n_parts > 1
        # hot-path hooks, bound once; on_lookup is skipped for policies that do not override it
        self._on_lookup = [pol.on_lookup if type(pol).on_lookup is not Policy.on_lookup else None
                           for pol in self.policies]
        self._on_hit = [pol.on_hit if type(pol).on_hit is not Policy.on_hit else None for pol in self.policies]
        # on_hit when the driver touches the layer's keys again at its end (lookup_layer's `touched`): None where
        # that touch replaces the hit (Policy.touch_replaces_hit)
        self._on_hit_touched = [None if pol.touch_replaces_hit else hit
                                for pol, hit in zip(self.policies, self._on_hit)]
        # no lookup runs a hook (without, with `touched`): lookups of resident keys only count
        no_lookup = all(h is None for h in self._on_lookup)
        self._silent = (no_lookup and all(h is None for h in self._on_hit),
                        no_lookup and all(h is None for h in self._on_hit_touched))
        self._admit = [pol.admit if type(pol).admit is not Policy.admit else None for pol in self.policies]
        # insert's per-layer constants, one tuple: (partition, expert bytes, partition capacity, admit hook,
        # policy, members)
        self._insert_info = [(p, self.expert_bytes[la], self._part_capacity[p], self._admit[p], self.policies[p],
                              self._part_members[p])
                             for la in range(n_layers) for p in [la if n_parts > 1 else 0]]
        # every valid key, for insert's range check (one hash lookup)
        self._valid = frozenset((la, e) for la in range(n_layers) for e in range(n_experts))
        # all resident keys -> bytes (global scope: its one partition's members, the same dict)
        self._size: dict[Key, int] = self._part_members[0] if n_parts == 1 else {}
        self._pins: dict[Key, int] = {}
        self._busy = busy
        self._held: Sequence[Key] = _NOTHING_HELD  # the running layer's keys (hold)
        self.stats = CacheStats()

    # -- capacity helpers -----------------------------------------------------------------------------------
    @staticmethod
    def resolve_capacity_bytes(
        *,
        expert_bytes: Sequence[int],
        n_experts: int,
        capacity_mib: float | None = None,
        capacity_experts: float | None = None,
        cache_rate: float | None = None,
    ) -> int:
        """Bytes for exactly one of: MiB, a number of experts, or a fraction of all experts (ProMoE's cache rate).

        Experts are counted at the average expert size over layers, so `capacity_experts=n` holds n experts
        exactly when all layers have the same expert size.
        """
        given = [v is not None for v in (capacity_mib, capacity_experts, cache_rate)]
        if sum(given) != 1:
            raise ValueError("give exactly one of capacity_mib, capacity_experts, cache_rate")
        if not expert_bytes:
            raise ValueError("expert_bytes is empty")
        if capacity_mib is not None:
            if capacity_mib < 0:
                raise ValueError(f"capacity_mib must be >= 0, got {capacity_mib}")
            return int(round(capacity_mib * (1 << 20)))
        avg = sum(expert_bytes) / len(expert_bytes)
        if capacity_experts is not None:
            if capacity_experts < 0:
                raise ValueError(f"capacity_experts must be >= 0, got {capacity_experts}")
            return int(round(capacity_experts * avg))
        if not 0 <= cache_rate <= 1:
            raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate}")
        return int(round(cache_rate * n_experts * sum(expert_bytes)))

    # -- queries ---------------------------------------------------------------------------------------------
    @property
    def resident(self) -> KeysView[Key]:
        """Live set-like view of the resident keys."""
        return self._size.keys()

    def __len__(self) -> int:
        return len(self._size)

    @property
    def used_bytes(self) -> int:
        """Bytes resident (summed over the partitions when asked: insert keeps only the partitions' sums)."""
        return sum(self._part_used)

    def contains(self, key: Key) -> bool:
        return key in self._size

    __contains__ = contains

    def size_of(self, key: Key) -> int:
        return self.expert_bytes[key[0]]

    def is_pinned(self, key: Key) -> bool:
        """Pinned or held: not evictable."""
        held = self._held
        return (key in self._pins or (self._busy is not None and key in self._busy)
                or (key[0] == held[0][0] and key in held))

    def free_bytes(self, layer: int = 0) -> int:
        """Free bytes of the partition that holds `layer`'s experts (the whole cache in global scope)."""
        p = layer if self._per_layer else 0
        return self._part_capacity[p] - self._part_used[p]

    def partition_capacity_bytes(self, layer: int = 0) -> int:
        return self._part_capacity[layer if self._per_layer else 0]

    # -- demand and non-demand accesses ----------------------------------------------------------------------
    def lookup(self, key: Key) -> bool:
        """One demand lookup: counts a hit or a miss. Does not insert on a miss."""
        st = self.stats
        p = key[0] if self._per_layer else 0
        on_lookup = self._on_lookup[p]
        if on_lookup is not None:
            on_lookup(key, st.lookups)
        st.lookups += 1
        if key in self._size:
            st.hits += 1
            on_hit = self._on_hit[p]
            if on_hit is not None:
                on_hit(key)
            return True
        st.misses += 1
        return False

    def lookup_layer(self, keys: Sequence[Key], touched: bool = False, resident: bool = False) -> int:
        """The gate of a layer: `lookup(key)` for each key of `keys` (keys of one layer), in that order (the same
        hooks in the same order and the same statistics, in one call), and `hold(keys)`: the running layer's
        experts. Returns the number of hits.

        `touched`: the caller touches every key still resident at the layer's end
        (`sim.engine.decisions.touch_in_use_order`) before it holds another layer; where that touch replaces a
        hit (`Policy.touch_replaces_hit`: LRU) the hits run no hook. `resident`: the caller knows every key is
        resident; with no hook to run, only the statistics change then."""
        self._held = keys if keys else _NOTHING_HELD  # (hold(keys), one call fewer)
        st = self.stats
        n = len(keys)
        if resident and self._silent[touched]:
            st.lookups += n
            st.hits += n
            return n
        if not n:
            return 0
        p = keys[0][0] if self._per_layer else 0
        on_lookup = self._on_lookup[p]
        size = self._size
        on_hit = (self._on_hit_touched if touched else self._on_hit)[p]
        if on_lookup is None:
            misses = 0  # (counted instead of the hits: the rarer case)
            if on_hit is not None:
                for key in keys:
                    if key in size:
                        on_hit(key)
                    else:
                        misses += 1
            elif not resident:
                for key in keys:
                    if key not in size:
                        misses += 1
            st.lookups += n
            st.hits += n - misses
            st.misses += misses
            return n - misses
        hits = 0
        for key in keys:
            on_lookup(key, st.lookups)
            st.lookups += 1
            if key in size:
                st.hits += 1
                hits += 1
                if on_hit is not None:
                    on_hit(key)
            else:
                st.misses += 1
        return hits

    def touch(self, key: Key) -> None:
        """A non-demand access of a resident key (a prefetch that finds it resident). No statistics."""
        if key in self._size:
            self.policies[key[0] if self._per_layer else 0].on_touch(key)

    # -- residency changes ----------------------------------------------------------------------------------
    def insert(self, key: Key, pin: bool = False) -> list[Key] | None:
        """Make room (evicting unpinned victims the policy chooses) and insert `key`.

        Returns the evicted keys (possibly empty), or None when the key cannot be cached (it is larger than its
        partition, everything evictable is pinned, or the policy declines); then nothing has changed.
        Inserting a resident key is a no-op that returns [].
        `pin=True`: then `pin(key)` unless None is returned (a copy's slot, held until the copy lands; one call).
        """
        sizes = self._size
        if key in sizes:
            if pin:
                self.pin(key)
            return []
        if key not in self._valid:
            raise KeyError(f"expert key {key} outside {self.n_layers} layers x {self.n_experts} experts")
        p, size, cap, admit, policy, members = self._insert_info[key[0]]
        if size > cap or (admit is not None and not admit(key)):
            self.stats.rejected += 1
            return None
        part_used = self._part_used
        need = part_used[p] + size - cap
        victims: list[Key] = []
        st = self.stats
        freed = 0
        if need > 0:
            order = policy.eviction_order()
            if order is not None:  # fast path: walk the policy's order, skip pinned and held keys
                pins = self._pins
                busy = self._busy
                held = self._held
                held_layer = held[0][0]
                for v in order:
                    if v in pins or (busy is not None and v in busy) or (v[0] == held_layer and v in held):
                        continue
                    victims.append(v)
                    need -= members[v]
                    if need <= 0:
                        break
                if need > 0:
                    st.rejected += 1
                    return None
            else:
                chosen: set[Key] = set()
                cands = _Candidates(members, self, chosen)
                victim = policy.victim
                while need > 0:
                    v = victim(cands)
                    if v is None:
                        st.rejected += 1
                        return None
                    if v not in cands:
                        raise RuntimeError(f"policy {self.policy_name!r} chose {v}, not an eviction candidate")
                    chosen.add(v)
                    victims.append(v)
                    need -= members[v]
            on_evict = policy.on_evict
            for v in victims:
                freed += members.pop(v)
                on_evict(v)
            if members is not sizes:  # (per_layer scope)
                for v in victims:
                    del sizes[v]
            st.evictions += len(victims)
        members[key] = size
        if members is not sizes:
            sizes[key] = size
        part_used[p] += size - freed
        st.insertions += 1
        st.bytes_inserted += size
        policy.on_insert(key)
        if pin:
            pins = self._pins
            pins[key] = pins.get(key, 0) + 1
        return victims

    def _drop(self, key: Key, p: int) -> None:
        members = self._part_members[p]
        size = members.pop(key)
        if members is not self._size:
            del self._size[key]
        self._part_used[p] -= size

    def remove(self, key: Key) -> None:
        """Take a resident, unpinned key out (not counted as an eviction). Absent keys are ignored."""
        if key not in self._size:
            return
        if self.is_pinned(key):
            raise ValueError(f"cannot remove pinned expert {key}")
        p = key[0] if self._per_layer else 0
        self._drop(key, p)
        self.policies[p].on_evict(key)

    def pin(self, key: Key) -> None:
        """Protect `key` from eviction (counted: n pins need n unpins). A key may be pinned before it is inserted."""
        self._pins[key] = self._pins.get(key, 0) + 1

    def hold(self, keys: Sequence[Key]) -> None:
        """The running layer's experts (`keys`, all of one layer, distinct; `()`: none): not evictable until the
        next `hold` (or `lookup_layer`). One call for the layer instead of a pin and an unpin per key: most
        layers insert nothing, and the eviction walk tests the layer before the keys."""
        self._held = keys if keys else _NOTHING_HELD

    def unpin(self, key: Key) -> None:
        pins = self._pins
        n = pins.pop(key, 0)
        if n != 1:  # (the common case, one pin, is the pop alone)
            if n <= 0:
                raise ValueError(f"unpin of expert {key}, which is not pinned")
            pins[key] = n - 1

    def __repr__(self) -> str:
        return (f"ExpertCache(policy={self.policy_name!r}, scope={self.scope!r}, used={self.used_bytes}/"
                f"{self.capacity_bytes} bytes, resident={len(self._size)}, stats={self.stats})")


# Parameters the cache offers to every policy; a policy receives only those its constructor accepts.
_OFFERED = ("partition_capacity_bytes", "expert_bytes", "n_experts", "layer")


def _accepted(policy: str, params: dict, layer: int | None) -> dict:
    """Drop the offered parameters the policy's constructor does not name (explicit user parameters stay)."""
    import inspect

    from sim.policies import policy_class

    names = inspect.signature(policy_class(policy).__init__).parameters
    return {k: v for k, v in {**params, "layer": layer}.items() if k not in _OFFERED or k in names}
