"""Static hot set: a fixed set of experts, chosen once, is cached and never evicted; every other expert is never
cached (insert returns None for it, so it is loaded for the layer and dropped: a streaming buffer outside this
cache's budget is the driver's business).

The hot set is either given explicitly (`hot=[(layer, expert), ...]`, admitted in that order while it fits) or
fitted from a profile (`profile=[(layer, expert), ...]`, a demand lookup stream, e.g. `sim.access` on a training
trace): the most often looked-up experts, most popular first (ties: smaller (layer, expert) first), taken greedily
while their bytes fit the partition (the whole cache in global scope, the layer's share in per_layer scope).
Fitting on the very trace being evaluated makes it an oracle static set; say so when reporting it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence

from sim.policies.base import Key, Policy, register_policy


@register_policy("static")
class Static(Policy):
    def __init__(
        self,
        hot: Iterable[Sequence[int]] | None = None,
        profile: Iterable[Sequence[int]] | None = None,
        *,
        partition_capacity_bytes: int | None = None,
        expert_bytes: Sequence[int] | None = None,
        layer: int | None = None,
    ) -> None:
        if (hot is None) == (profile is None):
            raise ValueError("static policy: give exactly one of hot=[...] or profile=[...]")
        if hot is not None:
            keys = [(int(a), int(b)) for a, b in hot]
            self.hot = {k: None for k in keys if layer is None or k[0] == layer}
        else:
            if partition_capacity_bytes is None or expert_bytes is None:
                raise ValueError("static policy: profile= needs partition_capacity_bytes and expert_bytes")
            counts = Counter((int(a), int(b)) for a, b in profile)
            ranked = sorted((k for k in counts if layer is None or k[0] == layer), key=lambda k: (-counts[k], k))
            self.hot = {}
            used = 0
            for k in ranked:
                size = expert_bytes[k[0]]
                if used + size <= partition_capacity_bytes:
                    self.hot[k] = None
                    used += size
        self.hot_set = frozenset(self.hot)

    def admit(self, key: Key) -> bool:
        return key in self.hot_set

    def victim(self, candidates: Collection[Key]) -> Key | None:
        return None  # hot experts are never evicted
