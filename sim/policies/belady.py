"""Belady's MIN (offline optimal for equal sizes): evict the candidate whose next demand lookup is farthest in the
future; candidates never looked up again go first (ties among them: the smallest key first... any choice gives
the same hit count).

It reads the demand lookup sequence (`future`, the keys the driver will pass to `lookup`, in order). Every demand
lookup must follow it: lookup number i must be future[i], otherwise ValueError. Inserting a key that was not
just looked up (a prefetch) is allowed: its next use is its first occurrence at or after the cursor.

This is demand MIN: a missed key is always inserted (the incoming key is not itself a candidate), which is what
the OPT stack algorithm in `sim.mrc` computes for every size at once. With unequal sizes, farthest-next-use is a
heuristic, not optimal (byte-optimal caching is NP-hard).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Collection, Sequence

from sim.policies.base import Key, Policy, register_policy

NEVER = 1 << 62


@register_policy("belady")
class Belady(Policy):
    needs_future = True

    def __init__(self, future: Sequence[Key], layer: int | None = None) -> None:
        """`layer`: the partition's layer in per_layer scope (only its keys are indexed), None in global scope."""
        self._future = future  # not copied: a per_layer cache holds one instance per layer
        self._positions: dict[Key, list[int]] = {}
        for i, (a, b) in enumerate(future):
            if layer is None or a == layer:
                self._positions.setdefault((int(a), int(b)), []).append(i)
        self._cursor = 0  # index of the next demand lookup
        self._next: dict[Key, int] = {}  # resident key -> index of its next demand lookup
        self._heap: list[tuple[int, Key]] = []  # (-next use, key), lazily invalidated

    def next_use(self, key: Key) -> int:
        pos = self._positions.get(key)
        if not pos:
            return NEVER
        i = bisect_left(pos, self._cursor)
        return pos[i] if i < len(pos) else NEVER

    def on_lookup(self, key: Key, index: int) -> None:
        f = self._future[index] if index < len(self._future) else None
        if f is None or (int(f[0]), int(f[1])) != key:
            expected = tuple(f) if f is not None else "end of the future sequence"
            raise ValueError(f"belady: demand lookup #{index} is {key}, but the future sequence has {expected}")
        self._cursor = index + 1

    def _set(self, key: Key) -> None:
        nu = self.next_use(key)
        self._next[key] = nu
        heapq.heappush(self._heap, (-nu, key))

    def on_hit(self, key: Key) -> None:
        self._set(key)

    def on_insert(self, key: Key) -> None:
        self._set(key)

    def on_evict(self, key: Key) -> None:
        del self._next[key]

    def victim(self, candidates: Collection[Key]) -> Key | None:
        heap, nxt = self._heap, self._next
        skipped = []
        found = None
        while heap:
            neg, key = heap[0]
            if nxt.get(key) != -neg:  # stale entry
                heapq.heappop(heap)
                continue
            if key in candidates:
                found = key
                break
            skipped.append(heapq.heappop(heap))
        for item in skipped:
            heapq.heappush(heap, item)
        return found
