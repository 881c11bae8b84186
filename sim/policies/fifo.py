"""FIFO: evict the candidate inserted first; hits and touches change nothing (as libCacheSim's FIFO)."""

from __future__ import annotations

from collections.abc import Collection

from sim.policies.base import Key, Policy, register_policy


@register_policy("fifo")
class FIFO(Policy):
    def __init__(self) -> None:
        self._order: dict[Key, None] = {}  # insertion order, oldest first

    def on_insert(self, key: Key) -> None:
        self._order[key] = None

    def on_evict(self, key: Key) -> None:
        del self._order[key]

    def victim(self, candidates: Collection[Key]) -> Key | None:
        for key in self._order:
            if key in candidates:
                return key
        return None
