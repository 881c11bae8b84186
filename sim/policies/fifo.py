"""FIFO: evict the candidate inserted first; hits and touches change nothing (as libCacheSim's FIFO)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from sim.policies.base import Key, Policy, register_policy


@register_policy("fifo")
class FIFO(Policy):
    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()  # insertion order, oldest first (O(1) front)
        # the hooks below, bound straight to the OrderedDict's own (C) methods: the same effect, no Python frame
        self.on_insert = self._order.setdefault  # (a new key: sets it last, value None)
        self.on_evict = self._order.__delitem__
        self.eviction_order = self._order.__iter__

    def on_insert(self, key: Key) -> None:
        self._order[key] = None

    def on_evict(self, key: Key) -> None:
        del self._order[key]

    def eviction_order(self) -> Iterator[Key]:
        return iter(self._order)
