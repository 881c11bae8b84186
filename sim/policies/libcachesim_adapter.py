"""Any libCacheSim eviction algorithm as a policy: `make_policy("libcachesim", algo="S3FIFO", **algo_params)` or
the shorthand name `lcs:S3FIFO` (case-insensitive algorithm names: the cache classes `libcachesim` exports, e.g.
LRU, FIFO, LFU, ARC, Sieve, S3FIFO, Clock, SLRU, TwoQ, LIRS, LHD, LeCaR, Cacheus, LFUDA, GDSF, MQ, LRUK).

How our hooks map onto libCacheSim's Python cache object (a mirror holding exactly our resident keys, sized to our
partition's capacity in bytes; object id = layer * n_experts + expert + 1, object size = expert bytes):

    on_lookup(key)      find(req, update_cache=True) for every demand lookup, hit or miss, as libCacheSim's own
                        get() does first (ghost-based algorithms such as ARC/S3FIFO/LIRS learn from misses here)
    on_touch(key)       find(req, update_cache=True) (a prefetch of a resident key is an access)
    victim(candidates)  to_evict(req): libCacheSim's next victim, if the algorithm implements it and that key is
                        a candidate (not pinned); otherwise (pinned victim, or no to_evict) the candidate least
                        recently inserted/accessed according to the adapter's own bookkeeping (documented fallback)
    on_evict(key)       evict(req) when libCacheSim would evict that very key (so ghosts are recorded), else
                        remove(obj_id)
    on_insert(key)      insert(req)

Without pins this reproduces libCacheSim's own get() for algorithms whose to_evict() is pure and deterministic
(LRU, FIFO, LFU, ARC, Sieve, Clock, SLRU, LHD, LFUDA, GDSF, MQ, LRUK, ...); tests/test_sim_libcachesim*.py checks
LRU, FIFO, LFU, ARC, Sieve and Clock against libCacheSim's own simulator. Algorithms without a usable to_evict()
(S3FIFO, TwoQ, LIRS, WTinyLFU in libcachesim 0.3.5: it returns nothing) cannot be asked for a victim without
changing their state, so the adapter refuses them (ValueError) unless `fallback=True`, which takes the recency
order for every victim (then it is NOT that algorithm). To get their hit rates on a lookup stream, run
libCacheSim's own simulator with `sim.mrc.run_libcachesim`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Collection, Sequence

from sim.policies.base import Key, Policy, register_policy

# algorithms whose to_evict() returns nothing in libcachesim 0.3.5 (checked by tests/test_sim_libcachesim.py)
NO_TO_EVICT = frozenset({"s3fifo", "twoq", "lirs", "wtinylfu"})


def libcachesim_algorithms() -> dict[str, type]:
    """lower-case name -> libcachesim cache class."""
    import libcachesim
    from libcachesim.cache import CacheBase

    return {
        name.lower(): cls
        for name, cls in vars(libcachesim).items()
        if inspect.isclass(cls) and issubclass(cls, CacheBase) and cls is not CacheBase and name != "PluginCache"
    }


def make_libcachesim_cache(algo: str, cache_size: int, *, n_objects: int = 1 << 16, **params):
    """A libcachesim cache object by (case-insensitive) algorithm name, with a hash table sized for n_objects.

    Guards the configurations that make libCacheSim abort the process instead of raising.
    """
    algos = libcachesim_algorithms()
    cls = algos.get(algo.lower())
    if cls is None:
        raise ValueError(f"unknown libCacheSim algorithm {algo!r}; known: {', '.join(sorted(algos))}")
    if cache_size <= 0:
        raise ValueError(f"libCacheSim cache size must be > 0, got {cache_size}")
    ratio = params.get("small_size_ratio", 0.1 if algo.lower() == "s3fifo" else None)
    if ratio is not None and int(cache_size * ratio) <= 0:
        raise ValueError(f"libCacheSim {algo}: cache of {cache_size} too small for small_size_ratio {ratio}")
    hashpower = params.pop("hashpower", max(10, math.ceil(math.log2(max(2, n_objects))) + 1))
    try:
        return cls(cache_size=int(cache_size), hashpower=hashpower, **params)
    except TypeError as exc:
        raise TypeError(f"libCacheSim {algo}: {exc}") from None


@register_policy("libcachesim")
class LibCacheSimPolicy(Policy):
    def __init__(
        self,
        algo: str = "LRU",
        *,
        partition_capacity_bytes: int,
        expert_bytes: Sequence[int],
        n_experts: int,
        fallback: bool = False,
        **algo_params,
    ) -> None:
        from libcachesim import Request

        if algo.lower() in NO_TO_EVICT and not fallback:
            raise ValueError(
                f"libCacheSim {algo} offers no to_evict(), so it cannot choose victims for ExpertCache; "
                "use sim.mrc.run_libcachesim for its hit rate, or fallback=True for recency-order victims"
            )
        self._Request = Request
        self.fallback = fallback
        self.algo = algo
        self._n_experts = n_experts
        self._sizes = list(expert_bytes)
        self._lcs = make_libcachesim_cache(
            algo, max(1, partition_capacity_bytes), n_objects=len(expert_bytes) * n_experts, **algo_params
        )
        self._order: dict[Key, None] = {}  # fallback recency order (least recent first)

    def _req(self, key: Key):
        return self._Request(obj_id=key[0] * self._n_experts + key[1] + 1, obj_size=self._sizes[key[0]])

    def _key(self, obj_id: int) -> Key:
        return divmod(obj_id - 1, self._n_experts)

    def _refresh(self, key: Key) -> None:
        if key in self._order:
            del self._order[key]
            self._order[key] = None

    def on_lookup(self, key: Key, index: int) -> None:
        self._lcs.find(self._req(key), True)
        self._refresh(key)

    def on_touch(self, key: Key) -> None:
        self._lcs.find(self._req(key), True)
        self._refresh(key)

    def on_insert(self, key: Key) -> None:
        self._lcs.insert(self._req(key))
        self._order[key] = None

    def _lcs_choice(self, key: Key) -> Key | None:
        obj = self._lcs.to_evict(self._req(key))
        return None if obj is None else self._key(obj.obj_id)

    def victim(self, candidates: Collection[Key]) -> Key | None:
        choice = self._lcs_choice((0, 0))
        if choice is not None and choice in candidates:
            return choice
        if choice is None and self._order and not self.fallback:
            raise RuntimeError(f"libCacheSim {self.algo}: to_evict() gave no victim (pass fallback=True to allow "
                               "recency-order victims)")
        for key in self._order:
            if key in candidates:
                return key
        return None

    def on_evict(self, key: Key) -> None:
        del self._order[key]
        req = self._req(key)
        if self._lcs_choice(key) == key:
            self._lcs.evict(req)
            if self._lcs.find(req, False) is None:
                return
        self._lcs.remove(req.obj_id)
