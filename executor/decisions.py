"""Scheduling decisions shared with the simulator, as pure functions.

These mirror pieces of `sim.engine.core.Simulation._gpu_stream` that are today written inline in the SimPy
process (so the executor cannot import them). They are meant to move to `sim/engine/decisions.py` and be
called by both; until then each docstring names the simulator code it mirrors, and
tests/test_executor_decisions.py pins the behaviour on the cases the simulator's tests use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def expert_state(key, ready, inflight) -> tuple:
    """Rank of an expert for reordered inference: resident (0), copying (1, by start), queued high (2), queued low
    (3), not started (4). Mirrors `Simulation._state` (sim/engine/core.py)."""
    if key in ready:
        return (0, 0)
    t = inflight.get(key)
    if t is None:
        return (4, 0)
    if t.t_start is not None:
        return (1, t.t_start, t.seq)
    return (2 if t.high else 3, t.seq)


def compute_order(layer: int, ids: list[int], *, reordered: bool, any_missing: bool,
                  state: Callable[[tuple], tuple]) -> list[int]:
    """Order in which a layer's experts are computed: ascending id; with reordered inference (and at least one
    expert not resident) by `state` (stable, so ties keep ascending id). Mirrors the `order = sorted(ids)` /
    `sorted(order, key=self._state)` lines of `_gpu_stream`."""
    order = sorted(ids) if len(ids) > 1 else list(ids)
    if reordered and any_missing:
        order = sorted(order, key=lambda e: state((layer, e)))
    return order


def early_preemption_plan(layer: int, low_queue: Iterable) -> tuple[list, list]:
    """At the gate of `layer` with early preemption (every gate, whether or not the layer missed): of the queued
    speculative transfers of this layer, those whose expert the layer needs (`used`, set by the lookups) are
    raised to high priority, the others dropped. Returns (upgrade, drop). Mirrors the
    `if ep and link.low: for t in [t for t in link.low if t.key[0] == layer and t.speculative]` block."""
    up, drop = [], []
    for t in low_queue:
        if t.key[0] == layer and t.speculative:
            (up if t.used else drop).append(t)
    return up, drop


def gate_demand_loads(layer: int, order: list[int], ready, inflight) -> list[int]:
    """With early preemption, the experts whose demand load is enqueued at the gate (in compute order): those
    neither resident nor in flight. Mirrors the `if ep: for e in order: ... start_transfer(key,
    speculative=False)` block."""
    return [e for e in order if (layer, e) not in ready and (layer, e) not in inflight]
