"""The cache-policy plug-in interface (ChampSim/gem5 style: a handful of optional hooks) and its registry.

A policy only ranks and admits; `sim.cache.ExpertCache` owns residency, byte accounting, pins and statistics.
The cache calls the hooks in this order:

    lookup(key):  on_lookup(key, index)   every demand lookup, hit or miss; index = 0, 1, 2, ... (demand order)
                  on_hit(key)             then, if the key was resident
    touch(key):   on_touch(key)           a non-demand access of a resident key (default: nothing)
    insert(key):  admit(key)              False = don't cache this key at all (default: True)
                  eviction_order()        if the policy has one: its resident keys, best victim first; the cache
                                          takes the first unpinned ones it needs (fast path; no victim() calls)
                  victim(candidates)      otherwise, zero or more times, until the new key fits; must not change
                                          state, because the insert may still be abandoned (then nothing changes)
                  on_evict(victim)        for each chosen victim, once the insert goes ahead
                  on_insert(key)
    remove(key):  on_evict(key)           any departure of a resident key

`candidates` is a set-like view (supports `in`, iteration and len) of the resident keys of the key's partition
(the whole cache in `global` scope, the key's layer in `per_layer` scope) minus pinned keys and minus victims
already chosen for this insert. Return one of them, or None to decline (then the insert is abandoned).
A policy instance serves exactly one partition.

`touch_replaces_hit = True` declares that on_hit(key) followed by on_touch(key), the key resident and not
evictable in between, leaves the policy as the touch alone would (pure recency: the last access wins, as LRU).
A driver that touches a layer's keys again at the layer's end (`ExpertCache.lookup_layer(..., touched=True)`)
then skips that layer's on_hit calls.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import ClassVar

Key = tuple[int, int]  # (layer, expert)

_REGISTRY: dict[str, type[Policy]] = {}


class Policy:
    """Base class: every hook is optional. The default is 'evict the first candidate' and 'admit everything'."""

    name: ClassVar[str] = ""
    #: set by policies that read the demand lookup sequence (Belady); the cache then passes `future=`.
    needs_future: ClassVar[bool] = False
    #: a later touch of a held key replaces its hit (see the module docstring)
    touch_replaces_hit: ClassVar[bool] = False

    def on_lookup(self, key: Key, index: int) -> None:
        pass

    def on_hit(self, key: Key) -> None:
        pass

    def on_touch(self, key: Key) -> None:
        pass

    def admit(self, key: Key) -> bool:
        return True

    def on_insert(self, key: Key) -> None:
        pass

    def on_evict(self, key: Key) -> None:
        pass

    def eviction_order(self) -> Iterable[Key] | None:
        """An iterator over this partition's resident keys, best victim first, or None (then victim() is used).
        The cache does not change the policy while it iterates."""
        return None

    def victim(self, candidates: Collection[Key]) -> Key | None:
        order = self.eviction_order()
        for key in candidates if order is None else order:
            if key in candidates:
                return key
        return None


def register_policy(name: str) -> Callable[[type[Policy]], type[Policy]]:
    """Class decorator: make the policy constructible by name through `make_policy`."""

    def deco(cls: type[Policy]) -> type[Policy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"cache policy {name!r} is registered twice")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    if name.startswith("lcs:"):
        return _REGISTRY["libcachesim"]
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown cache policy {name!r}; known: {', '.join(available_policies())} "
            "(or 'lcs:<libCacheSim algorithm>', e.g. lcs:S3FIFO)"
        ) from None


def make_policy(name: str, *, future: Sequence[Key] | None = None, **params) -> Policy:
    """Construct a registered policy. `lcs:ALGO` is shorthand for `libcachesim` with `algo=ALGO`.

    `future` (the demand lookup sequence) is passed only to policies that declare `needs_future`.
    Unknown parameters raise TypeError naming the policy.
    """
    cls = policy_class(name)
    if name.startswith("lcs:"):
        params = {"algo": name[4:], **params}
    if cls.needs_future:
        if future is None:
            raise ValueError(f"cache policy {name!r} needs the future demand lookup sequence (future=...)")
        params["future"] = future
    try:
        return cls(**params)
    except TypeError as exc:
        raise TypeError(f"cache policy {name!r}: {exc}") from None
