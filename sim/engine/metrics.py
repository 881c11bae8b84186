"""Per-run metrics. Names are DESIGN.md's (JSON keys and Parquet columns); counts come along."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

METRIC_NAMES = ("hit_rate", "ttft_ms", "tpot_ms", "total_ms", "stall_ms", "bytes_h2d", "pcie_busy_frac",
                "prefetch_precision", "prefetch_recall", "prefetch_late", "prefetch_unused")
COUNT_NAMES = ("lookups", "hits", "misses", "demand_misses", "demand_loads", "cpu_experts_computed", "prefetches",
               "prefetched_used", "n_prefetch_late", "n_prefetch_unused", "n_prefetch_dropped", "layer_steps",
               "batches", "prefill_batches", "decode_batches", "tokens", "bytes_demand", "bytes_prefetch",
               "n_prefetch_not_issued")


@dataclass
class Counters:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    demand_misses: int = 0
    demand_loads: int = 0
    cpu_experts_computed: int = 0
    prefetches: int = 0
    prefetched_used: int = 0
    n_prefetch_late: int = 0
    n_prefetch_unused: int = 0
    n_prefetch_dropped: int = 0
    # predicted experts never issued (ready after their target layer's gate, the in-flight bound reached, no
    # evictable slot) that the batch then missed at that gate: correct predictions that ended as demand loads
    # (the simulator counts them; the executor does not)
    n_prefetch_not_issued: int = 0
    layer_steps: int = 0
    batches: int = 0
    prefill_batches: int = 0
    decode_batches: int = 0
    tokens: int = 0
    stall_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    # host time the simulator charged on the compute stream, by the executor's categories (HOST_METRICS): the
    # predictor's calls (blocking mode), issuing prefetches (per call and per copy), issuing demand loads
    host_predict_s: float = 0.0
    host_prefetch_issue_s: float = 0.0
    host_demand_issue_s: float = 0.0
    host_copy_issue_s: float = 0.0  # issuing chunk groups (copy_issue_host_us), where not hidden by a copy wait


def count_unused_at_end(c: Counters, unused_pf, inflight) -> None:
    """At the end of a run: prefetches never looked up count as unused (landed and still cached, or still queued
    or copying and never needed)."""
    c.n_prefetch_unused += len(unused_pf) + sum(1 for t in inflight.values() if t.speculative and not t.used)


def snapshot(c: Counters) -> Counters:
    """A copy of the counters (at the end of the warm-up batches)."""
    return dataclasses.replace(c)


def subtract(c: Counters, c0: Counters) -> Counters:
    """`c - c0` field by field, in place (leaves the warm-up batches out); returns `c`."""
    for f in dataclasses.fields(Counters):
        setattr(c, f.name, getattr(c, f.name) - getattr(c0, f.name))
    return c


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def finalize(c: Counters, *, total_s: float, busy_s: float, bytes_h2d: int, bytes_demand: int,
             bytes_prefetch: int) -> dict:
    """The metrics of one run.

    hit_rate            hits / lookups. A lookup is one unique expert of one (layer, batch), made at gate time;
                        a hit is an expert resident and fully copied at that moment.
    ttft_ms             mean duration of a prefill batch (the whole prompt of one sequence), ms; None if no prefill
    tpot_ms             mean duration of a decode batch (one token for each running sequence), ms; None if none
    total_ms            simulated time from the first batch's start to the last batch's end, ms
    stall_ms            time the GPU compute stream waited for expert copies (or for CPU-computed experts), ms
    bytes_h2d           bytes moved host-to-device (demand loads, prefetches, and chunks of dropped prefetches)
    pcie_busy_frac      time at least one copy engine was copying / total time (a sum over engines if several)
    prefetch_precision  prefetched_used / prefetches: share of issued speculative transfers whose expert was
                        looked up before leaving the cache (dropped or evicted ones count against it)
    prefetch_recall     prefetched_used / (prefetched_used + demand_misses): share of the lookups that needed a
                        copy which a prefetch covered (whether or not it arrived in time)
    prefetch_late       n_prefetch_late / prefetched_used: share of the useful prefetches still queued or
                        copying at the lookup
    prefetch_unused     n_prefetch_unused / prefetches: share of issued prefetches evicted, dropped (early
                        preemption) or still unused at the end of the run; precision + unused = 1
    Counts: lookups = hits + misses; misses = demand_misses + n_prefetch_late (a late prefetch is a miss);
    demand_loads (copies issued on demand; demand misses minus those computed on the CPU, cpu_experts_computed);
    layer_steps = batches x layers; n_prefetch_not_issued: predicted experts the prefetcher did not issue (ready
    too late, in-flight bound, no evictable slot) that were then demand misses at their target gate (GoodPred's
    fetch rate = (prefetched_used - n_prefetch_late) / (prefetched_used + n_prefetch_not_issued)).
    """
    out = {
        "hit_rate": _ratio(c.hits, c.lookups),
        "ttft_ms": _ratio(c.prefill_s * 1e3, c.prefill_batches),
        "tpot_ms": _ratio(c.decode_s * 1e3, c.decode_batches),
        "total_ms": total_s * 1e3,
        "stall_ms": c.stall_s * 1e3,
        "bytes_h2d": int(bytes_h2d),
        "pcie_busy_frac": _ratio(busy_s, total_s) if total_s > 0 else 0.0,
        "prefetch_precision": _ratio(c.prefetched_used, c.prefetches),
        "prefetch_recall": _ratio(c.prefetched_used, c.prefetched_used + c.demand_misses),
        "prefetch_late": _ratio(c.n_prefetch_late, c.prefetched_used),
        "prefetch_unused": _ratio(c.n_prefetch_unused, c.prefetches),
    }
    for name in COUNT_NAMES:
        if name == "bytes_demand":
            out[name] = int(bytes_demand)
        elif name == "bytes_prefetch":
            out[name] = int(bytes_prefetch)
        else:
            out[name] = getattr(c, name)
    return out
