"""The layer step's decisions, as pure device-agnostic functions: the ONE definition that both the SimPy engine
(`sim.engine.core.Simulation._gpu_stream`) and the real executor (`executor.runtime.OffloadedRuntime`) call.

Nothing here knows about time, SimPy or torch. The arguments are the shared state both drivers keep:

- `ready`: set of keys cached and fully copied;
- `inflight`: dict key -> transfer object (cached, queued or copying) with the attributes `speculative`, `used`,
  `high`, `seq`, `t_start` (None until its first chunk starts) and `key`;
- `unused_pf`: set of keys of landed prefetches not yet looked up;
- `c`: a `sim.engine.metrics.Counters`.

Per (layer, batch), in this order: `classify_lookups` at the gate; with early preemption
`early_preemption_plan` (upgrade / drop the layer's queued speculation) and `gate_demand_loads`; `compute_order`;
at the layer's end `touch_in_use_order` (recency = order of first use in the batch, DESIGN.md), then the pins go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache

NOT_STARTED = (4, 0)
RESIDENT = (0, 0)


@lru_cache(maxsize=8)
def key_table(n_layers: int, n_experts: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """`key_table(L, E)[layer][e] is (layer, e)`: one shared tuple per expert key. Keys taken from it (e.g.
    `[table[layer][e] for e in ids]`) are the same objects wherever they are stored, so dict and set
    lookups match them by identity instead of comparing tuples; equal tuples made elsewhere still work."""
    return tuple(tuple((la, e) for e in range(n_experts)) for la in range(n_layers))


def expert_state(key, ready, inflight) -> tuple:
    """Rank of an expert for reordered inference: resident (0), copying (1, by start time then issue order), queued
    high (2, by issue order), queued low (3, by issue order), not started (4)."""
    if key in ready:
        return RESIDENT
    t = inflight.get(key)
    if t is None:
        return NOT_STARTED
    if t.t_start is not None:
        return (1, t.t_start, t.seq)
    return (2 if t.high else 3, t.seq)


def compute_order(layer: int, ids: list[int], *, reordered: bool, any_missing: bool,
                  state: Callable[[tuple], tuple]) -> list[int]:
    """Order in which a layer's experts are computed: ascending id; with reordered inference (and at least one
    expert not resident at the gate) by `state` (stable, so ties keep ascending id): resident, then in flight,
    then not started."""
    order = sorted(ids) if len(ids) > 1 else list(ids)
    if reordered and any_missing:
        order.sort(key=lambda e: state((layer, e)))
    return order


def early_preemption_plan(layer: int, low_queue: Iterable) -> tuple[list, list]:
    """At the gate of `layer` with early preemption (every gate, whether or not the layer missed): of the queued
    low-priority speculative transfers of this layer, those whose expert the layer needs (`used`, set by
    `classify_lookups`) are raised to high priority, the others dropped. Returns (upgrade, drop) in queue order."""
    up: list = []
    drop: list = []
    for t in low_queue:
        if t.key[0] == layer and t.speculative:
            (up if t.used else drop).append(t)
    return up, drop


def classify_lookups(layer: int, ids: list[int], ready, inflight, unused_pf, c,
                     keys: list | None = None) -> list[int] | None:
    """The gate's lookups, classified. The driver also makes them in the cache: `ExpertCache.lookup_layer(keys)`,
    one lookup per unique expert in the given (first-occurrence) order, after this call or before it (the
    classification reads only `ready` and `inflight`, which lookups do not change). hit = resident and fully
    copied (a landed prefetch looked up for the first time counts as prefetched-and-used); a prefetch still queued
    or copying is a late prefetch (a miss; marked `used`); anything else is a demand miss (a background copy of a
    CPU-computed miss is not a prefetch).
    Updates the counters `lookups`, `hits`, `misses`, `demand_misses`, `prefetched_used`, `n_prefetch_late`.
    Returns the missing experts in lookup order, or None when every expert is resident.
    `keys`: the keys (layer, e) of `ids`, if the caller has them."""
    if keys is None:
        keys = [(layer, e) for e in ids]
    n_ids = len(keys)
    c.lookups += n_ids
    if ready.issuperset(keys):  # all resident (the common case): set operations
        if unused_pf:
            used = unused_pf.intersection(keys)
            if used:
                unused_pf.difference_update(used)
                c.prefetched_used += len(used)
        c.hits += n_ids
        return None
    missing = []
    for e, key in zip(ids, keys):
        if key in ready:
            if unused_pf and key in unused_pf:
                unused_pf.discard(key)
                c.prefetched_used += 1
        else:
            t = inflight.get(key)
            if t is None or not t.speculative:
                c.demand_misses += 1
            elif not t.used:
                t.used = True
                c.prefetched_used += 1
                c.n_prefetch_late += 1
            missing.append(e)
    n_miss = len(missing)
    c.misses += n_miss
    c.hits += n_ids - n_miss
    return missing


def gate_demand_loads(layer: int, order: list[int], ready, inflight) -> list[int]:
    """With early preemption, the experts whose demand load is enqueued at the gate, in compute order: those
    neither resident nor in flight."""
    return [e for e in order if (layer, e) not in ready and (layer, e) not in inflight]


def touch_hooks(cache) -> list[Callable] | None:
    """Per layer, the `on_touch` hook of the policy instance that holds the layer's experts, or None when no
    policy of this cache reacts to a touch (only recency-keeping ones do: LRU, libCacheSim adapters). For a
    resident key, `hooks[key[0]](key)` is exactly `ExpertCache.touch(key)`, one call cheaper."""
    from sim.policies import Policy

    pols = cache.policies
    if all(type(p).on_touch is Policy.on_touch for p in pols):
        return None
    if len(pols) == 1:
        return [pols[0].on_touch] * cache.n_layers
    return [p.on_touch for p in pols]


def touch_in_use_order(hooks: list[Callable], resident, layer: int, ids: list[int], keys: list | None = None) -> None:
    """At the end of a layer (after its misses were inserted, before its pins go): touch its resident experts in
    first-occurrence order (`ExpertCache.touch`; `hooks` from `touch_hooks`, `resident` = `cache.resident`), so
    their recency is the order of first use in the batch whichever of them hit or missed (DESIGN.md; `sim.mrc`'s
    gate semantics). `keys`: the keys (layer, e) of `ids`, if the caller has them."""
    on_touch = hooks[layer]
    if keys is None:
        keys = [(layer, e) for e in ids]
    for key in keys:
        if key in resident:
            on_touch(key)
