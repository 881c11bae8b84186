"""LFU: evict the candidate with the fewest demand lookups.

Frequency is counted on demand lookups only (touches do not count). By default it is "in-cache" LFU, as
libCacheSim's LFU: an inserted key starts at 1 and every hit adds 1; the count is forgotten on eviction.
With `keep_history=True` it is "perfect" LFU: every demand lookup of a key, hit or miss, counts, and the count
survives eviction (an inserted key starts at its lookup count so far, at least 1).

Tie-break (documented, and the same as libCacheSim's LFU, which keeps one FIFO queue per frequency): among the
candidates with the smallest frequency, evict the one that reached that frequency first, i.e. the least recently
looked-up (or inserted) of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from sim.policies.base import Key, Policy, register_policy


@register_policy("lfu")
class LFU(Policy):
    def __init__(self, keep_history: bool = False) -> None:
        self.keep_history = keep_history
        self._freq: dict[Key, int] = {}  # resident keys -> frequency
        self._buckets: dict[int, OrderedDict[Key, None]] = {}  # frequency -> keys in the order they reached it
        self._history: dict[Key, int] = {}  # keep_history: lookups per key

    def _move(self, key: Key, new: int) -> None:
        old = self._freq.get(key)
        if old is not None:
            bucket = self._buckets[old]
            del bucket[key]
            if not bucket:
                del self._buckets[old]
        self._freq[key] = new
        bucket = self._buckets.get(new)
        if bucket is None:
            bucket = self._buckets[new] = OrderedDict()
        bucket[key] = None

    def on_lookup(self, key: Key, index: int) -> None:
        if self.keep_history:
            self._history[key] = self._history.get(key, 0) + 1

    def on_hit(self, key: Key) -> None:
        self._move(key, self._history[key] if self.keep_history else self._freq[key] + 1)

    def on_insert(self, key: Key) -> None:
        self._move(key, max(1, self._history.get(key, 0)) if self.keep_history else 1)

    def on_evict(self, key: Key) -> None:
        f = self._freq.pop(key)
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]

    def eviction_order(self) -> Iterator[Key]:
        for f in sorted(self._buckets):
            yield from self._buckets[f]
