"""The executor's own host costs, measured by running it: what `executor.calibrate` adds to the kernel tables.

Isolated kernel timings miss what the runtime pays around them on the host: per expert the slot lookup, the
completion polling and the launches of the gather/scatter; per layer the gate synchronisation bubble, the cache
lookups and pins, the compute order; per copy the host's work to issue it (cache insert, slot, the copy and its
events, issued by the main thread) and the link's idle time between two pumps. At batch size 1 these are most of
a decode step. They are measured here with the runtime itself, so the simulator charges what the executor really
spends:

- `runtime_layer_costs`: the real `OffloadedRuntime` replays a synthetic decode trace (one token per batch) whose
  experts are all resident (a warm-up pass loads them; the cache holds every expert; no prefetch): top-1, top-K
  with every expert computed on its own, and top-K with the resident experts computed as one group (the runtime's
  default at batch size 1), in interleaved rounds (medians of the rounds' figures). Per layer step: time(K,
  eager) = base + K x per_expert, so per_expert = (time(K, eager) - time(1)) / (K - 1) and base = time(1) -
  per_expert (one expert is never grouped); the group's cost per expert = (time(K, grouped) - base) / K.
- `runtime_transfer_costs`: host time per demand load and per prefetch the runtime issues (cache insert, slot, the
  copies and their events), measured where it is spent (the runtime's perf_counter accounting,
  `host_demand_issue_ms` / `host_prefetch_issue_ms`) in all-miss and all-prefetch cycle-trace runs, and the
  prefetcher's cost per call (ranking the prediction, refreshing what is resident) in an all-resident run where
  every call issues nothing: a call's cost is then charged once per call, not spread over the copies it issues.
  `executor.calibrate` runs it for every geometry (a copy's host cost depends on the expert's size).
- `runtime_predictor_costs`: host time per predictor call, as the runtime accounts it (`host_predict_ms`: the
  view, the hidden states fetched and converted, observe and predict) over the calls it counts
  (`predict_calls`), in all-resident replays of the small-MoE trace (held-out sequences): its decode batches (1
  token per call) and its prompts as prefill batches (the whole prompt per call), fit as call + token x tokens.
- `transfer_issue_overhead_us`: the runtime's `TransferEngine` (CUDA backend: the main thread issues the copies,
  `lookahead` groups ahead) moving a queue of single-chunk expert copies back to back while the main thread
  launches expert kernels between pumps (as it does in a run): (wall time - bytes / table bandwidth) / groups.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# How a host cost is taken from its rounds (`--host-stat` of executor.calibrate). The host's speed drifts between
# rounds (CPU steal, other tenants): it only ever adds time, so the fastest round is the machine's own cost and
# the least noisy figure; the median round keeps a typical share of the interference. The validation compares
# with the real runs taken the same way (`executor.validate --real-stat`).
HOST_STATS = {"median": statistics.median, "min": min}


def host_stat(name: str):
    if name not in HOST_STATS:
        raise ValueError(f"host statistic {name!r}: one of {', '.join(HOST_STATS)}")
    return HOST_STATS[name]


def cycle_trace(dst, *, n_layers: int, n_experts: int, top_k: int, decode_len: int, expert_bytes: int,
                hidden: int, prompt_len: int = 1) -> Path:
    """A one-sequence trace whose token t uses experts (t k + j) mod E at every layer: every expert is touched
    within the first E / k tokens, so a warm-up of that many batches makes the rest all hits."""
    from traces.format import TraceMeta
    from traces.writer import write_trace

    rows = {k: [] for k in ("sequence", "phase", "position", "layer", "experts", "weights")}
    for p in range(prompt_len + decode_len):
        phase = "prefill" if p < prompt_len else "decode"
        for layer in range(n_layers):
            rows["sequence"].append(0)
            rows["phase"].append(phase)
            rows["position"].append(p)
            rows["layer"].append(layer)
            rows["experts"].append([(p * top_k + j) % n_experts for j in range(top_k)])
            rows["weights"].append([1.0 / top_k] * top_k)
    meta = TraceMeta(model="calibration-cycle", source="executor.calibrate_runtime", n_layers=n_layers,
                     n_experts=n_experts, top_k=top_k, expert_bytes=[expert_bytes] * n_layers, hidden_size=hidden,
                     dtype="bf16", license="CC0", attribution="synthetic")
    return write_trace(dst, meta, overwrite=True, sequence=rows["sequence"], phase=np.array(rows["phase"]),
                       position=rows["position"], layer=rows["layer"], experts=np.array(rows["experts"]),
                       weights=np.array(rows["weights"], dtype=np.float32))


def _decode_runs(geom, device, top_k: int, *, n_layers: int, n_experts: int, tokens: int, repeats: int,
                 extra: dict | None = None, warm: int | None = None, lookahead: int = 1,
                 group_resident: bool = True, models: dict | None = None) -> list[dict]:
    """The runtime's metrics of `repeats` decode runs of a cycle trace (config `extra`, dotted keys, on top of an
    LRU cache holding every expert). `models`: a host store and model kept between calls (executor.replay
    `build_runtime`)."""
    from executor.replay import build_runtime, prepare
    from sim.config import build_config, set_dotted

    warm = -(-n_experts // top_k) + 1 if warm is None else warm
    out = []
    with tempfile.TemporaryDirectory() as d:
        trace = cycle_trace(Path(d) / f"k{top_k}", n_layers=n_layers, n_experts=n_experts, top_k=top_k,
                            decode_len=warm + tokens, expert_bytes=geom.expert_bytes, hidden=geom.hidden)
        raw = {"trace": str(trace), "phase": "decode", "warmup_batches": warm,
               "cache": {"policy": "lru", "scope": "global", "cache_rate": 1.0}}
        for k, v in (extra or {}).items():
            set_dotted(raw, k, v)
        cfg = build_config(raw)
        setup = prepare(cfg, geom.first_layers(n_layers))
        models = {} if models is None else models
        for _ in range(repeats):
            rt = build_runtime(cfg, setup, device=device, models=models, lookahead=lookahead,
                               group_resident=group_resident)
            rt.warmup()
            out.append(rt.run())
    return out


def _layer_step_ms(geom, device, top_k: int, *, n_layers: int, n_experts: int, tokens: int, repeats: int,
                   group_resident: bool = True, models: dict | None = None) -> float:
    """Median over `repeats` runs of the runtime's mean decode layer-step time, every expert resident."""
    out = []
    for m in _decode_runs(geom, device, top_k, n_layers=n_layers, n_experts=n_experts, tokens=tokens,
                          repeats=repeats, group_resident=group_resident, models=models):
        if m["misses"]:
            raise RuntimeError(f"calibration run had {m['misses']} misses after its warm-up")
        out.append(m["tpot_ms"] / n_layers)
    return statistics.median(out)


def calibration_inflight_mib(geom, top_k: int) -> int:
    """The in-flight bound of the transfer-cost runs: the suite's 512 MiB, raised to two layers' worth of copies
    where experts are large. The bound counts demand loads too: 512 MiB (under two Mixtral-8x7B experts of 336
    MiB) admitted no prefetch, and the calibration stopped there."""
    return max(512, math.ceil(2 * top_k * geom.expert_bytes / 2**20))


def runtime_transfer_costs(geom, device, top_k: int, *, repeats: int = 5, n_layers: int = 4, tokens: int = 48,
                           chunks: int = 3, lookahead: int = 1, stat: str = "median") -> dict:
    """Host time per transfer the runtime issues, as it accounts it itself (`host_*_issue_ms`):

    - demand: every lookup misses (cycle trace over 2k experts, per-layer capacity k, LRU, no prefetch), so every
      expert is a demand load;
    - call: the oracle predictor at distance 1 with the validation suite's prefetching switches (chunked by
      `chunks`, early preemption, reordering) while every expert is resident: each call ranks k experts and
      issues none, so (host time issuing) / calls is the prefetcher's cost per call;
    - prefetch: the same switches on the demand run's cache: every expert prefetched one layer ahead, k per call;
      per copy = (host time issuing - calls x the call cost) / prefetches.
    The three kinds of run are interleaved round by round (demand, call, prefetch, then again) and a prefetch run
    is paired with its own round's call cost. Over the `repeats` rounds (`stat`: their median, or with "min" the
    lowest round of each figure, HOST_STATS): demand_transfer_us,
    prefetch_call_us, prefetch_transfer_us (per copy) and prefetch_issue_us (per copy with the call cost spread
    over the copies, what profiles held before the split); and the copy issue apart: copy_issue_us (host time per
    chunk group issued, wherever, over both runs: the runtime's host_copy_issue_ms / copy_issues),
    demand_transfer_net_us and prefetch_transfer_net_us (each kind's cost without the groups its own submit
    issued), which the profile holds when it charges copy_issue_host_us."""
    agg = host_stat(stat)
    n_experts = 2 * top_k
    small = {"cache.scope": "per_layer", "cache.cache_rate": 0.5}
    switches = {"prefetch.predictor": "oracle", "prefetch.distance": 1, "prefetch.chunks": chunks,
                "prefetch.max_inflight_mib": calibration_inflight_mib(geom, top_k), "chunked_prefetch": True,
                "early_preemption": True,
                "reordered_inference": True}
    calls = tokens * (n_layers - 1)  # one call per gate with a layer at distance 1 (the measured batches)
    kw = dict(n_layers=n_layers, n_experts=n_experts, tokens=tokens, repeats=1, lookahead=lookahead,
              models={})  # one host store for the three kinds of run (same geometry, layers, experts)

    def run(extra: dict, warm: int | None) -> dict:
        return _decode_runs(geom, device, top_k, extra=extra, warm=warm, **kw)[0]

    # the three runs interleaved round by round (a slow spell of the host falls on one round, not on one kind's
    # repeats), and each prefetch run paired with its own round's call cost
    dem_runs, rounds = [], []  # rounds: (the prefetch run, its round's call cost in us)
    for _ in range(max(1, repeats)):
        dem = run(small, 2)
        idle = run(switches, None)  # every expert resident after the warm-up: the calls issue nothing
        if idle["prefetches"]:
            raise RuntimeError("the all-resident calibration run issued prefetches")
        rounds.append((run({**small, **switches}, 2), idle["host_prefetch_issue_ms"] / calls * 1e3))
        if dem["demand_loads"]:
            dem_runs.append(dem)
    call_us = agg([c for _, c in rounds])
    paired = [(m, c) for m, c in rounds if m["prefetches"]]
    full = [m for m, _ in paired]
    if not dem_runs or not full:
        raise RuntimeError("calibration run issued no demand loads or no prefetches")
    demand = [m["host_demand_issue_ms"] / m["demand_loads"] * 1e3 for m in dem_runs]
    issue = agg([m["host_prefetch_issue_ms"] / m["prefetches"] * 1e3 for m in full])
    copy = agg([max(0.0, m["host_prefetch_issue_ms"] * 1e3 - calls * c) / m["prefetches"] for m, c in paired])
    # the copy issue apart (copy_issue_host_us): host time per chunk group issued over both runs, and each kind's
    # own cost without the groups it issued itself (an idle link started in its submit)
    groups = sum(m["copy_issues"] for m in dem_runs + full)
    copy_issue = sum(m["host_copy_issue_ms"] for m in dem_runs + full) / groups * 1e3 if groups else 0.0
    demand_net = agg([max(0.0, m["host_demand_issue_ms"] - m["host_copy_issue_demand_submit_ms"])
                      / m["demand_loads"] * 1e3 for m in dem_runs])
    copy_net = agg([max(0.0, (m["host_prefetch_issue_ms"] - m["host_copy_issue_prefetch_submit_ms"]) * 1e3
                        - calls * c) / m["prefetches"] for m, c in paired])
    return {"demand_transfer_us": round(agg(demand), 3), "prefetch_call_us": round(call_us, 3),
            "prefetch_transfer_us": round(copy, 3), "prefetch_issue_us": round(issue, 3),
            "copy_issue_us": round(copy_issue, 3), "demand_transfer_net_us": round(demand_net, 3),
            "prefetch_transfer_net_us": round(copy_net, 3)}


SMALL_MOE_TRACE = "data/traces/small-moe-qwen3moe-e32k4"  # the suite's only trace with hidden states


def fit_call_token(points) -> tuple[float, float]:
    """(call, token) of the line cost = call + token x tokens through (tokens, cost per call) points (least squares;
    through both when there are two), both >= 0: a negative slope (timing noise, no growth) gives token 0 and the
    mean cost, a negative intercept call 0 and the slope through the origin."""
    xs = np.array([float(x) for x, _ in points])
    ys = np.array([float(y) for _, y in points])
    if len(xs) < 2 or np.ptp(xs) == 0:
        return float(ys.mean()), 0.0
    token, call = np.polyfit(xs, ys, 1)
    if token < 0:
        return float(ys.mean()), 0.0
    if call < 0:
        return 0.0, float((xs * ys).sum() / (xs * xs).sum())
    return float(call), float(token)


def runtime_predictor_costs(names, device, *, geom=None, trace: str | None = None, distance: int = 1,
                            sequences: int = 2, tokens: int = 32, layers: int | None = None, repeats: int = 3,
                            fit_params: dict | None = None, models: dict | None = None,
                            prefill: bool = True, stat: str = "median") -> dict:
    """Per predictor the runtime's own host time per call in decode: {name: {"us", "calls", "host_predict_ms",
    "prefetches", "tokens_per_call"}} (over `repeats` runs, their median or with `stat` "min" the lowest; prefetches:
    the most any measured pass issued, 0 when all-resident holds; a predictor the trace cannot feed is left out).
    `distance` does not change a call's work (one prediction). With `prefill`, also {"prefill": the same for the
    prompts} and, where both phases made calls, "call_us" and "token_us": the line call + token x tokens through the
    decode point (1 token per call) and the prefill one (fit_call_token): a learned predictor multiplies over the
    batch's tokens, a history predictor builds per-token features, so one number per call under-charges a prompt.

    The runtime replays the small-MoE geometry on its embedded trace (default) as the validation suite's
    small-MoE labels do: batch size 1, the held-out sequences of the trace's 9:1 split (the first `sequences`;
    decode: `tokens` decode positions each; prefill: each prompt as one batch; `layers`: the first N layers), a
    trainable predictor fit on the training split (sim.run's trained_predictor) with its default parameters but
    `fit_params` (default one epoch on at most 2,000 rows per layer: the cost per call depends on the network's
    shape, which those parameters leave as in the suite, not on its weights).

    Every expert is resident: the held-out sequences are replayed twice over a cache holding every expert and
    the first pass is warm-up, so the measured pass has no miss, and every expert a prediction names was named
    (and copied) in the first pass (the predictors here are deterministic given the batch), so the calls issue
    no copy. That isolates the predictor: no copy is issued, waited for or completes on the host between two
    calls (with a copy thread it would also compete for the interpreter), and the predictor's work (which layers,
    which hidden rows) does not depend on the cache, so the cost per call carries over to any configuration.
    `calls` counts the calls with a target layer (the runtime's `predict_calls`: what the simulator charges);
    the last layers' calls, which predict nothing, are in `host_predict_ms` too, so the simulator's total
    matches the runtime's. `tokens_per_call`: the measured batches' tokens (the runtime's batch rows) summed
    over those calls (each batch makes one per layer with a target), over the calls."""
    import dataclasses

    from executor.geometry import REPO_ROOT, get_geometry
    from executor.replay import build_runtime, prepare
    from predictors.registry import make_predictor
    from sim.config import build_config
    from sim.engine.schedule import iter_batches
    from traces.reader import Trace

    agg = host_stat(stat)
    geom = geom if geom is not None else get_geometry("small-moe")
    trace = str(trace or REPO_ROOT / SMALL_MOE_TRACE)
    meta = Trace(trace).meta
    fit_params = {"epochs": 1, "max_rows": 2000} if fit_params is None else fit_params
    models = {} if models is None else models

    def measure(name: str, phase: str, trainable: bool) -> dict:
        raw = {"trace": trace, "phase": phase, "batch_size": 1, "heldout_only": True,
               "cache": {"policy": "lru", "scope": "global", "cache_rate": 1.0},
               "prefetch": {"predictor": name, "distance": distance,
                            "predictor_params": fit_params if trainable else {}}}
        if phase == "decode":
            raw["max_decode_tokens"] = tokens
        cfg = build_config(raw)
        setup = prepare(cfg, geom, layers=layers)
        seqs = setup.sequences[:sequences]
        warm = sum(1 for _ in iter_batches(seqs, phase, 1))
        setup = dataclasses.replace(setup, sequences=seqs + seqs, warmup_batches=warm)
        runs, n_tokens = [], 0
        for _ in range(repeats):
            rt = build_runtime(cfg, setup, device=device, models=models)
            rt.warmup()
            m = rt.run()
            if m["misses"]:
                raise RuntimeError(f"the all-resident predictor run ({name}, {phase}) had {m['misses']} misses")
            per_batch = max(0, rt.L - distance)  # calls with a target layer in each batch
            if m["predict_calls"] not in (0, len(rt.batch_rows) * per_batch):  # (0: predictor "none")
                raise RuntimeError(f"{name} {phase}: {m['predict_calls']} calls counted, expected "
                                   f"{len(rt.batch_rows)} batches x {per_batch}")
            n_tokens = sum(r["tokens"] for r in rt.batch_rows) * per_batch
            runs.append(m)
        calls = runs[0]["predict_calls"]
        us = agg([m["host_predict_ms"] / m["predict_calls"] * 1e3 if m["predict_calls"] else 0.0 for m in runs])
        out = {"us": round(us, 3), "calls": int(calls),
               "host_predict_ms": round(agg([m["host_predict_ms"] for m in runs]), 4),
               "prefetches": int(max(m["prefetches"] for m in runs)),
               "tokens_per_call": round(n_tokens / calls, 4) if calls else 0.0}
        return out

    out = {}
    for name in names:
        pred = make_predictor(name)
        try:
            pred.check_trace(meta)
        except ValueError:
            continue  # (a predictor needing arrays this trace does not have)
        trainable = getattr(pred, "trainable", False)
        res = out[name] = measure(name, "decode", trainable)
        if not prefill:
            continue
        pre = res["prefill"] = measure(name, "prefill", trainable)
        if res["calls"] and pre["calls"] and pre["tokens_per_call"] > 1:
            call, token = fit_call_token([(res["tokens_per_call"], res["us"]), (pre["tokens_per_call"], pre["us"])])
            res["call_us"], res["token_us"] = round(call, 3), round(token, 3)
    return out


def runtime_layer_costs(geom, device, *, repeats: int = 5, n_layers: int = 4, tokens: int = 48,
                        stat: str = "median") -> dict:
    """The runtime's decode layer step split into a per-layer base, a per-expert part (an expert computed on its
    own) and the per-expert cost inside a resident group (see the module docstring): per_expert_ms,
    layer_base_ms, group_expert_ms, the three measured steps (medians) and top_k.

    The three steps are measured in `repeats` interleaved rounds (top-1, top-K, top-K grouped, then again), and
    each figure is the median of its per-round values: a slow spell of the host then slows one round's three
    steps alike instead of one whole step's repeats. Session 8's calibration, measured step after step, charged
    Gemma-4 a per-expert host cost of 0.177 ms against 0.116 in session 6 and simulated its LRU decode 52 % too
    slow. With `stat` "min", each step's fastest round instead (the split then made from those three: the
    lowest per-round difference would pair a fast top-K round with a slow top-1 one)."""
    fastest = host_stat(stat) is min
    k = max(2, min(geom.top_k, 8))
    models: dict = {}  # the three steps share one host store (same geometry, layers, experts)
    kw = dict(n_layers=n_layers, n_experts=2 * k, tokens=tokens, repeats=1, models=models)

    def split(t1: float, tk: float, tg: float) -> tuple:
        """(per expert, base, group cost per expert, t1, tk, tg) of one set of the three steps."""
        per_expert = max(0.0, (tk - t1) / (k - 1))
        base = max(0.0, t1 - per_expert)
        return per_expert, base, max(0.0, tg - base) / k, t1, tk, tg

    steps = [(_layer_step_ms(geom, device, 1, **kw), _layer_step_ms(geom, device, k, group_resident=False, **kw),
              _layer_step_ms(geom, device, k, group_resident=True, **kw)) for _ in range(max(1, repeats))]
    if fastest:
        pe, base, group, t1, tk, tg = split(*(min(col) for col in zip(*steps)))
    else:
        pe, base, group, t1, tk, tg = (statistics.median(col) for col in zip(*(split(*s) for s in steps)))
    return {"per_expert_ms": round(pe, 5), "layer_base_ms": round(base, 5),
            "group_expert_ms": round(group, 5), "layer_ms_top1": round(t1, 5),
            f"layer_ms_top{k}": round(tk, 5), f"layer_ms_top{k}_grouped": round(tg, 5), "top_k": k,
            "rounds": len(steps), "stat": stat}


def transfer_issue_overhead_us(geom, device, link_seconds, *, n: int = 24, repeats: int = 5, busy=None,
                               lookahead: int = 1, backend: str = "cuda", stat: str = "median") -> float:
    """Link time lost per chunk group between copies (see the module docstring). `link_seconds`: bytes -> seconds
    from the bandwidth table just measured; `busy`: a callable launching some GPU work from the main thread (the
    runtime's expert launches), run between pumps while the copies move."""
    import torch

    from executor.transfer import Transfer, TransferEngine

    numel = geom.expert_numel
    dt = geom.torch_dtype()
    src = torch.empty(numel, dtype=dt, pin_memory=True)
    src.fill_(1)
    dst = [torch.empty(numel, dtype=dt, device=device) for _ in range(2)]
    nbytes = numel * src.element_size()
    per_group = []
    for _ in range(repeats):
        eng = TransferEngine(backend, device=device, lookahead=lookahead)
        ts = [Transfer((0, i), src, dst[i % 2], nbytes, [(0, numel)], high=False, speculative=True, cached=True,
                       seq=i) for i in range(n)]
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for t in ts:
            eng.submit(t)
        while not all(t.finished for t in ts):
            if busy is not None:
                busy()
            eng.pump()
            eng.poll()
            if busy is None and eng.threaded:
                time.sleep(20e-6)
        wall = time.perf_counter() - t0
        eng.close()
        per_group.append((wall - n * link_seconds(nbytes)) / n * 1e6)
    return max(0.0, host_stat(stat)(per_group))
