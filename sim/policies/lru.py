"""LRU: evict the least recently used candidate. A hit and a touch (prefetch of a resident key) refresh recency."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from sim.policies.base import Key, Policy, register_policy


@register_policy("lru")
class LRU(Policy):
    touch_replaces_hit = True  # a hit and a touch both move the key to the end

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()  # least recent first
        # the hooks below, bound straight to the OrderedDict's own (C) methods: the same effect, no Python frame
        self.on_hit = self.on_touch = self._order.move_to_end
        self.on_insert = self._order.setdefault  # (a new key: sets it last, value None)
        self.on_evict = self._order.__delitem__
        self.eviction_order = self._order.__iter__

    def on_hit(self, key: Key) -> None:
        self._order.move_to_end(key)

    on_touch = on_hit

    def on_insert(self, key: Key) -> None:
        self._order[key] = None

    def on_evict(self, key: Key) -> None:
        del self._order[key]

    def eviction_order(self) -> Iterator[Key]:
        return iter(self._order)
