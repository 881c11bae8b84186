"""Measure this machine into a hardware profile: `python -m executor.calibrate --out PROFILE.yaml`.

What it measures (each figure the median of `--repeats` runs, 20 by default; GPU times with CUDA events; the
runtime's host costs (calibrate_runtime) in rounds, each taken from its fastest round by default, `--host-stat`):

- `h2d.pinned` / `h2d.pageable`: host-to-device bandwidth by transfer size (64 KiB .. 1 GiB, x4 steps) from a
  pinned (resp. pageable) host buffer on a dedicated copy stream, the copy queued behind a short GPU sleep so that
  its events time the link alone and not the host's launch of the copy (the runtime's host costs are measured
  on their own, and a copy queued behind another starts without that launch); `h2d.streaming` (documentary):
  16 copies of each size up to 64 MiB queued back to back; `latency_us`: a 4 KiB copy;
  `copy_engines`: 2 if two streams copying at once move more than 1.3x one stream's bytes, else 1;
  `chunk_overhead_us`: (time of one expert copied in 3 chunks - in 1 piece) / 2, floored at 0.
- `expert_compute`: one table per geometry (`--geometries`, default the validation ones): the time of one
  expert, as the runtime runs it (gather the routed tokens, SwiGLU/GeGLU, weight, scatter), by tokens routed to it
  (1 .. 8192), averaged over 8 different experts' weights launched back to back. The table is the launch mode
  the executor uses (`--launch eager`, default; `graph` = CUDA-graph replay); the CUDA-graph figures are also
  the table's `kernel_ms` (the GPU's time alone). `expert_launch_floor_ms` = the smallest entry. With the
  runtime's costs (calibrate_runtime) an entry is floored at the runtime's per-expert cost, and `group_ms` is its
  cost per expert of a resident group, and `demand_transfer_host_us`, `prefetch_transfer_host_us`,
  `prefetch_call_host_us` the geometry's own runtime_transfer_costs (the host cost per copy depends on the
  expert's size); the profile's top-level three are the first geometry's, the fallback for other geometries.
- `dense_compute`: everything of the runtime's layer step but the experts (`layer_skeleton`: the dense stand-in
  of executor.model, the gate synchronisation and its launch bubble, the norm, the combine buffer), by batch
  tokens, keyed by the geometry's dense bytes (one table per distinct layer size); `default_dense` = the first.
  Not in it: the runtime's host-side bookkeeping at the gate (lookups, predictor), which the GPU waits for.
- `predictor_cost_us`: host time of one predictor call per predictor (`--predictors`) as the runtime accounts it
  (calibrate_runtime.runtime_predictor_costs: `host_predict_ms` / calls in all-resident replays of the
  small-MoE trace: view, hidden states, observe, predict): `{call, token}` fit through its decode (1 token per
  call) and prefill (whole prompts) figures, a plain number per call where only decode was measured; without the
  runtime's costs, or for a predictor that trace cannot feed, the observe + predict call alone on batches of an
  embedded trace (`measure_predictors`). The notes keep every measured figure.
- `copy_compute_overlap`: 2 - (expert time while a large copy runs / expert time alone), clipped to [0, 1]
  (1 = they do not slow each other; sim.hardware applies it).

On a machine without CUDA it runs as a dry run: host memcpy instead of H2D and CPU matmuls, with fewer sizes
(`--quick` is implied), and the profile is named `cpu-dry-run` with provenance saying it is NOT a GPU profile.
The output validates against `sim.hardware.HardwareProfile` before it is written (atomically).

    python -m executor.calibrate --out profiles/h200.yaml --machine "H200 GPU machine" [--geometries ...]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

from executor.calibrate_runtime import (
    HOST_STATS,
    runtime_layer_costs,
    runtime_predictor_costs,
    runtime_transfer_costs,
    transfer_issue_overhead_us,
)
from traces.atomic import atomic_write
from traces.errors import TraceError, run_cli

DEFAULT_GEOMETRIES = ("qwen3-30b-a3b", "gemma-4-26b-a4b", "small-moe", "mixtral-8x7b", "flame-moe-290m")
DEFAULT_PREDICTORS = ("none", "oracle", "previous_token", "learned_mlp")
SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
QUICK_SIZES = [64 << 10, 1 << 20, 16 << 20]
QUICK_TOKENS = [1, 8, 64]
QUEUE_SLEEP_CYCLES = 200_000  # ~0.1 ms of GPU clock: longer than the host needs to launch a copy


class Timer:
    """Median wall time of a callable: CUDA events on the device, perf_counter on the CPU."""

    def __init__(self, device, repeats: int, warmup: int = 2):
        import torch

        self.torch = torch
        self.cuda = torch.device(device).type == "cuda"
        self.repeats = repeats
        self.warmup = warmup

    def ms(self, fn, stream=None, queued: bool = False, before=None, sleep_cycles: int = QUEUE_SLEEP_CYCLES) -> float:
        """`queued`: the start event and fn's work are queued behind a GPU sleep (`sleep_cycles`, longer than the
        host needs to launch fn's work), so the events time the GPU's work alone (not the host's launch of it).
        `before`: called untimed before each timed call."""
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for _ in range(self.repeats):
            if before is not None:
                before()
            if self.cuda:
                s = torch.cuda.Event(enable_timing=True)
                e = torch.cuda.Event(enable_timing=True)
                st = stream or torch.cuda.current_stream()
                if queued:
                    with torch.cuda.stream(st):
                        torch.cuda._sleep(sleep_cycles)
                s.record(st)
                fn()
                e.record(st)
                e.synchronize()
                out.append(s.elapsed_time(e))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(out)


# -- host to device ----------------------------------------------------------------------------------------------
def measure_h2d_best(device, sizes, timer: Timer, *, pinned: bool, passes: int = 2) -> tuple[list[dict], list]:
    """`measure_h2d` `passes` times, the sizes in alternating order (ascending, descending, ...), each size keeping
    its fastest pass: the link's own speed, as the validation compares each config's fastest run. Also returns each
    pass's GB/s, in `sizes` order. Why: one session-12 instance measured 32-35 GB/s for every size from 4 to 256 MiB
    and 55 GB/s at 1 GiB right after (47-55 GB/s on three other instances): a slow spell of some minutes, which one
    pass in ascending order took for the link's speed."""
    runs = [{pt["size"]: pt["gbps"] for pt in measure_h2d(device, sizes if p % 2 == 0 else sizes[::-1], timer,
                                                          pinned=pinned)} for p in range(max(1, passes))]
    per_pass = [[run[int(size)] for size in sizes] for run in runs]
    return [{"size": int(size), "gbps": max(run[int(size)] for run in runs)} for size in sizes], per_pass


def measure_h2d(device, sizes, timer: Timer, *, pinned: bool) -> list[dict]:
    import torch

    cuda = torch.device(device).type == "cuda"
    stream = torch.cuda.Stream() if cuda else None
    pts = []
    for size in sizes:
        src = torch.empty(size, dtype=torch.uint8, pin_memory=pinned and cuda)
        src.fill_(1)
        dst = torch.empty(size, dtype=torch.uint8, device=device)

        def copy(src=src, dst=dst):
            if cuda:
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=pinned)
            else:
                dst.copy_(src)

        ms = timer.ms(copy, stream, queued=cuda)
        pts.append({"size": int(size), "gbps": round(size / (ms * 1e-3) / 1e9, 3)})
    return pts


def measure_h2d_streaming(device, sizes, timer: Timer, *, n: int = 16) -> list[dict]:
    """Host-to-device bandwidth of `n` pinned copies of each size queued back to back on one stream (all issued
    before the first starts, behind a GPU sleep), as the runtime's chunks and demand loads move when several wait:
    a queued copy's setup overlaps the one before it, so it moves faster than the same copy on an idle link
    (measure_h2d). {"size", "gbps"} per size: n x size / the events' time."""
    import torch

    stream = torch.cuda.Stream()
    pts = []
    for size in sizes:
        src = torch.empty(n, size, dtype=torch.uint8, pin_memory=True)
        src.fill_(1)
        dst = torch.empty(n, size, dtype=torch.uint8, device=device)

        def copies(src=src, dst=dst):
            with torch.cuda.stream(stream):
                for i in range(n):
                    dst[i].copy_(src[i], non_blocking=True)

        ms = timer.ms(copies, stream, queued=True, sleep_cycles=40 * QUEUE_SLEEP_CYCLES)
        pts.append({"size": int(size), "gbps": round(n * size / (ms * 1e-3) / 1e9, 3)})
    return pts


def measure_copy_engines(device, size: int, timer: Timer) -> int:
    import torch

    if torch.device(device).type != "cuda":
        return 1
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    srcs = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    dsts = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2)]

    def one():
        with torch.cuda.stream(s1):
            dsts[0].copy_(srcs[0], non_blocking=True)
        torch.cuda.current_stream().wait_stream(s1)

    def two():
        for s, a, b in ((s1, srcs[0], dsts[0]), (s2, srcs[1], dsts[1])):
            with torch.cuda.stream(s):
                b.copy_(a, non_blocking=True)
        torch.cuda.current_stream().wait_stream(s1)
        torch.cuda.current_stream().wait_stream(s2)

    t1, t2 = timer.ms(one), timer.ms(two)
    return 2 if (2 * size / t2) > 1.3 * (size / t1) else 1


def measure_chunk_overhead_us(device, nbytes: int, timer: Timer) -> float:
    import torch

    from executor.buffers import chunk_ranges

    cuda = torch.device(device).type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream() if cuda else None

    def copy(n):
        def fn():
            ctx = torch.cuda.stream(stream) if cuda else _null()
            with ctx:
                for a, b in chunk_ranges(nbytes, n):
                    dst[a:b].copy_(src[a:b], non_blocking=cuda)
        return fn

    t1, t3 = timer.ms(copy(1), stream), timer.ms(copy(3), stream)
    return max(0.0, (t3 - t1) / 2 * 1e3)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# -- compute ---------------------------------------------------------------------------------------------------
def _expert_bench(geom, device, n_tokens: int, n_experts: int = 8):
    """A callable running the runtime's per-expert path for `n_experts` experts of `n_tokens` tokens each."""
    import numpy as np
    import torch

    from executor.model import activation, expert_into, layer_rows, split_expert

    dt = geom.torch_dtype() if torch.device(device).type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    flats = [torch.randn(geom.expert_numel, generator=g, device=device).mul_(0.02).to(dt) for _ in range(n_experts)]
    mats = [split_expert(f, geom) for f in flats]
    T = max(n_tokens, 1)
    h = torch.randn(T, geom.hidden, generator=g, device=device).to(dt)
    out2d = torch.zeros(T, geom.hidden, dtype=dt, device=device)
    rows = layer_rows(np.zeros((T, 1), dtype=np.int64), torch.ones(T, 1, dtype=dt, device=device), device)[0]
    act = activation(geom)

    def run():
        for m in mats:
            expert_into(out2d, m, h, rows, act)

    return run, n_experts


def _graphed(fn, device):
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure_expert_table(geom, device, tokens, timer: Timer, launch: str) -> dict:
    import torch

    cuda = torch.device(device).type == "cuda"
    eager, graph = [], []
    for n in tokens:
        fn, per = _expert_bench(geom, device, n)
        eager.append(round(timer.ms(fn) / per, 5))
        if cuda:
            try:
                graph.append(round(timer.ms(_graphed(fn, device)) / per, 5))
            except Exception as exc:  # graph capture can fail on odd setups: keep the eager table
                graph.append(None)
                print(f"warning: CUDA graph capture failed for {geom.name} at {n} tokens: {exc}", file=sys.stderr)
        if cuda:
            torch.cuda.empty_cache()
    if launch == "graph" and cuda:  # a failed capture falls back to the eager figure
        graph = [g if g is not None else e for g, e in zip(graph, eager)]
    main, other, other_name = (graph, eager, "eager") if (launch == "graph" and cuda) else (eager, graph, "graph")
    note = f"measured, {geom.dtype if cuda else 'fp32 (CPU dry run)'} {geom.activation}, {launch if cuda else 'cpu'}"
    if other and any(v is not None for v in other):
        note += f"; {other_name}_ms: {other}"
    table = {"name": f"{geom.name}-{geom.hidden}x{geom.moe_intermediate}-{geom.dtype}", "hidden": geom.hidden,
             "intermediate": geom.moe_intermediate, "dtype_bytes": geom.dtype_bytes, "tokens": list(tokens),
             "ms": main, "note": note}
    if cuda and graph:  # the GPU's time alone (a failed capture: the eager figure, an upper bound)
        table["kernel_ms"] = [g if g is not None else e for g, e in zip(graph, eager)]
    return table


def layer_skeleton(x, w1, w2, top_k: int, cuda: bool):
    """Everything of one runtime layer step but the experts: the dense stand-in, the gate synchronisation (the
    host waits for the GPU, then has to launch what follows: a bubble), the norm, the combine buffer and its sum."""
    import torch

    from executor.model import dense_forward, rms_norm

    x = dense_forward(x, w1, w2)
    if cuda:
        ev = torch.cuda.Event()
        ev.record()
        ev.synchronize()
    h = rms_norm(x)
    out = torch.zeros((x.shape[0], top_k, x.shape[1]), dtype=x.dtype, device=x.device)
    return x + out.sum(dim=1) + 0 * h[:, :1]


def measure_dense_tables(geom, device, tokens, timer: Timer) -> list[dict]:
    """The layer skeleton (`layer_skeleton`: dense stand-in + gate sync + norm + combine) by batch tokens, one
    table per distinct dense size of the geometry; the simulator charges it as the dense part of a layer."""
    import torch

    from executor.model import make_dense_weights

    cuda = torch.device(device).type == "cuda"
    dt = geom.torch_dtype() if cuda else torch.float32
    out = []
    seen = set()
    for layer, nbytes in enumerate(geom.dense_bytes):
        if nbytes in seen or nbytes <= 0:
            continue
        seen.add(nbytes)
        g = torch.Generator(device=device).manual_seed(layer)
        w1, w2 = make_dense_weights(geom, layer, device=device, dtype=dt, generator=g)
        ms = []
        for n in tokens:
            x = torch.randn(n, geom.hidden, generator=g, device=device).to(dt)
            ms.append(round(timer.ms(lambda x=x, w1=w1, w2=w2: layer_skeleton(x, w1, w2, geom.top_k, cuda)), 5))
        suffix = "" if len(seen) == 1 else f"-layer{layer}"
        out.append({"name": f"{geom.name}-dense{suffix}", "dense_bytes": int(nbytes), "tokens": list(tokens),
                    "ms": ms, "note": "executor layer skeleton: dense stand-in (2 matmuls of the layer's dense "
                                      "bytes; no KV-cache attention) + gate sync + norm + combine"
                                      + ("" if cuda else "; CPU dry run")})
    return out


def measure_overlap(geom, device, timer: Timer) -> float:
    """2 - (expert compute time while a copy runs on another stream / alone), both timed on the compute stream
    with the work queued behind a GPU sleep (the GPU's time, not the host's launches: the host is not slowed by
    a copy in flight, and timing the launches made this figure swing between 0.03 and 0.66 from one machine to
    the next); the copy is sized to outlast the compute."""
    import torch

    if torch.device(device).type != "cuda":
        return 1.0
    fn, _per = _expert_bench(geom, device, 64)
    alone = timer.ms(fn, queued=True)
    size = 1 << 30
    src = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    s = torch.cuda.Stream()

    def start_copy():
        torch.cuda.synchronize()
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)  # ~20 ms at 55 GB/s: longer than the compute timed after it

    concurrent = timer.ms(fn, queued=True, before=start_copy)
    torch.cuda.synchronize()  # (the last copy, before its buffers go)
    return float(min(1.0, max(0.0, 2.0 - concurrent / alone)))


def measure_predictors(names, trace_path, repeats: int, max_calls: int = 400,
                       hidden_trace_path: str | None = None) -> dict:
    """Median host time of one observe + predict call per predictor. A predictor that needs hidden states runs on
    `hidden_trace_path` (default: the embedded small-MoE trace, the suite's only model with them); a trainable one
    is fit first on that trace's 9:1 training split with one epoch on at most 2,000 rows per layer (its time
    depends on the network's shape, which the default parameters fix, not on its weights) and timed on held-out
    batches (decode and prefill as they come)."""
    from executor.geometry import REPO_ROOT
    from predictors.evaluate import prepare
    from predictors.registry import make_predictor
    from predictors.views import HiddenSource, iter_batches, load_sequences
    from traces.reader import Trace

    loaded: dict[bool, tuple] = {}  # needs hidden states -> (trace, its sequences), each read once

    def trace_for(hidden: bool) -> tuple:
        if hidden not in loaded:
            tr = Trace(hidden_trace_path or REPO_ROOT / "data" / "traces" / "small-moe-qwen3moe-e32k4"
                       if hidden else trace_path)
            loaded[hidden] = (tr, load_sequences(tr))
        return loaded[hidden]

    out, plain = {}, []
    for name in names:
        pred = make_predictor(name)
        hidden = "hidden_states" in pred.needs
        trace, seqs = trace_for(hidden)
        if getattr(pred, "trainable", False):
            fast = {"epochs": 1, "max_rows": 2000} if name.startswith("learned_") else None
            pred, split = prepare(trace, name, 1, params=fast)
            held = set(split.eval)
            seqs = [s for s in seqs if s.sequence in held]
        seqs = seqs[:2]
        source = HiddenSource(trace) if hidden or trace.meta.has_router_weights else None
        pred.reset()
        times = []
        for batch in iter_batches(seqs, trace.meta, source=source):
            for layer in range(trace.meta.n_layers - 1):
                view = batch.view(layer, with_hidden=hidden)
                t0 = time.perf_counter()
                pred.observe(view)
                if name != "none":
                    pred.predict(view, 1, batch.future if pred.reads_future else None)
                times.append(time.perf_counter() - t0)
                if len(times) >= max_calls:
                    break
            if len(times) >= max_calls:
                break
        out[name] = round(statistics.median(times) * 1e6, 2) if times else 0.0
        if not hidden:
            plain.append(out[name])
    # the fallback for predictors not measured: the dearest of those that read no hidden states
    out["default"] = max(plain or out.values()) if out else 0.0
    return out


def predictor_costs(micro: dict, runtime: dict) -> tuple[dict, str]:
    """The profile's predictor_cost_us and a note: per predictor the runtime's cost (`runtime`, from
    runtime_predictor_costs) where measured: {call, token} where it was fit over decode and prefill, else its
    decode cost per call; else the observe + predict time alone (`micro`, measure_predictors, which misses the
    view, the hidden states' fetch and conversion the runtime pays around the call); `default` as
    measure_predictors sets it: the entry of the dearest predictor (per decode call) that reads no hidden
    states."""
    from predictors.registry import make_predictor

    names = [n for n in micro if n != "default"]
    per_call = {n: runtime[n]["us"] if n in runtime else micro[n] for n in names}
    out = {n: {"call": runtime[n]["call_us"], "token": runtime[n]["token_us"]}
           if "token_us" in runtime.get(n, {}) else per_call[n] for n in names}
    plain = [n for n in names if "hidden_states" not in make_predictor(n).needs] or names
    dear = out[max(plain, key=lambda n: per_call[n])] if plain else 0.0
    out["default"] = dict(dear) if isinstance(dear, dict) else dear  # (a copy: no YAML alias)

    def runtime_note(n: str) -> str:
        r = runtime[n]
        text = f"{n} runtime {r['us']} us ({r['calls']} calls)"
        pre = r.get("prefill")
        if pre is not None and pre["calls"]:
            text += (f" decode, {pre['us']} us per call at {pre['tokens_per_call']} tokens ({pre['calls']} calls)"
                     " prefill")
        if "token_us" in r:
            text += f" -> {r['call_us']} + {r['token_us']} us/token"
        return text + f", observe+predict alone {micro[n]} us"

    parts = [runtime_note(n) if n in runtime else f"{n} observe+predict alone {micro[n]} us (no runtime measurement)"
             for n in names]
    return out, "predictor_cost_us: " + "; ".join(parts)


# -- the profile ---------------------------------------------------------------------------------------------------
def add_runtime_costs(expert_table: dict, dense_tables: list[dict], rc: dict) -> None:
    """Fold the runtime's measured host costs (executor.calibrate_runtime) into one geometry's tables: an expert
    costs at least the runtime's per-expert host time (the host launches experts one by one after the gate
    synchronisation, so the GPU waits for whichever is slower: max(kernel, host)); the layer skeleton gains the
    runtime's per-layer bookkeeping beyond the skeleton (lookups, pins, order, reaping), a constant; `group_ms` is
    the runtime's cost per expert of a resident group (batch-size-1 decode)."""
    pe = rc["per_expert_ms"]
    expert_table["ms"] = [None if v is None else round(max(v, pe), 5) for v in expert_table["ms"]]
    expert_table["note"] += f"; floored at the runtime's per-expert host cost {pe} ms"
    if rc.get("group_expert_ms") is not None:
        expert_table["group_ms"] = rc["group_expert_ms"]
    for dt in dense_tables:
        extra = max(0.0, rc["layer_base_ms"] - dt["ms"][0])
        dt["ms"] = [round(v + extra, 5) for v in dt["ms"]]
        dt["note"] += f"; + {round(extra, 5)} ms of the runtime's per-layer host bookkeeping (measured)"


def add_transfer_host(expert_table: dict, th: dict) -> None:
    """Write one geometry's runtime_transfer_costs into its expert table (CostModel uses them for traces of
    exactly this geometry: the host cost per copy issued depends on the expert's size)."""
    net = "copy_issue_us" in th  # the copy issue measured apart: the transfer costs without it
    expert_table["demand_transfer_host_us"] = th["demand_transfer_net_us" if net else "demand_transfer_us"]
    expert_table["prefetch_transfer_host_us"] = th["prefetch_transfer_net_us" if net else "prefetch_transfer_us"]
    expert_table["prefetch_call_host_us"] = th["prefetch_call_us"]
    if net:
        expert_table["copy_issue_host_us"] = th["copy_issue_us"]


def calibrate(*, device, geometries, predictors, repeats: int, quick: bool, launch: str, machine: str,
              trace_for_predictors: str, pageable: bool = True, runtime_costs: bool = True, lookahead: int = 2,
              host_stat: str = "min", log=print) -> dict:
    import torch

    from executor.geometry import get_geometry
    from sim.hardware import HardwareProfile, LinkTable

    cuda = torch.device(device).type == "cuda"
    if not cuda:
        quick = True
    sizes = QUICK_SIZES if quick else SIZES
    tokens = QUICK_TOKENS if quick else TOKENS
    timer = Timer(device, repeats)
    geoms = [get_geometry(g) for g in geometries]
    if not cuda:  # tiny stand-ins of the shapes keep a CPU dry run short
        geoms = [g.replace(hidden=min(g.hidden, 256), moe_intermediate=min(g.moe_intermediate, 128),
                           dense_params=(min(g.dense_params[0], 2 * 256 * 256),), dtype="fp32",
                           name=f"{g.name}-cpu-mini") for g in geoms]
    log(f"h2d pinned: {len(sizes)} sizes")
    pinned_pts, pinned_passes = measure_h2d_best(device, sizes, timer, pinned=True, passes=2 if cuda else 1)
    pageable_pts = measure_h2d(device, sizes, timer, pinned=False) if (pageable and cuda) else None
    streaming_pts = measure_h2d_streaming(device, [s for s in sizes if s <= 64 << 20], timer) if cuda else None
    lat_ms = timer.ms(lambda: None) if not cuda else None
    small = measure_h2d(device, [4096], timer, pinned=True)[0]
    latency_us = 4096 / (small["gbps"] * 1e9) * 1e6 if lat_ms is None else 0.0
    engines = measure_copy_engines(device, 64 << 20, timer)
    chunk_us = measure_chunk_overhead_us(device, geoms[0].expert_bytes, timer) if cuda else 0.0
    log("predictor cost: observe + predict alone")
    micro = measure_predictors(predictors, trace_for_predictors, repeats)
    expert_tables, dense_tables, host = [], [], {}
    for g in geoms:
        log(f"expert and dense compute: {g.name}")
        et = measure_expert_table(g, device, tokens, timer, launch)
        dts = measure_dense_tables(g, device, tokens, timer)
        if runtime_costs:
            log(f"runtime layer step: {g.name}")
            rc = runtime_layer_costs(g, device, repeats=max(3, repeats // 4), stat=host_stat)
            host[g.name] = rc
            add_runtime_costs(et, dts, rc)
        expert_tables.append(et)
        dense_tables.extend(dts)
    table = LinkTable(points=pinned_pts)
    issue_us = 0.0
    if runtime_costs and cuda:
        log("copy issue overhead")
        # the main thread issues the copies and launches expert kernels between pumps, as in a run
        busy, _ = _expert_bench(geoms[0], device, 1, n_experts=2)
        issue_us = transfer_issue_overhead_us(geoms[0], device, table.seconds, busy=busy, lookahead=lookahead,
                                              stat=host_stat)
        host["issue_overhead_us"] = round(issue_us, 3)
        host["issue_overhead_us_idle_host"] = round(
            transfer_issue_overhead_us(geoms[0], device, table.seconds, lookahead=lookahead), 3)
        host["issue_overhead_us_copy_thread"] = round(
            transfer_issue_overhead_us(geoms[0], device, table.seconds, busy=busy, backend="cuda-thread"), 3)
    overlap = measure_overlap(geoms[0], device, timer) if cuda else 1.0
    transfer_host = {"demand_transfer_us": 0.0, "prefetch_transfer_us": 0.0, "prefetch_call_us": 0.0}
    runtime_pred: dict = {}
    if runtime_costs:
        # (a CPU dry run: short runs and replays)
        runs = {"repeats": max(3, repeats // 4), "stat": host_stat} if cuda else {"repeats": 1, "tokens": 8}
        # per geometry: a copy's host cost depends on the expert's size (the top-level values, the first
        # geometry's, stay as the fallback for traces of other geometries)
        per_geom = {}
        for g, et in zip(geoms, expert_tables, strict=True):
            log(f"runtime transfer host costs: {g.name}")
            per_geom[g.name] = runtime_transfer_costs(g, device, host[g.name]["top_k"], **runs, lookahead=lookahead)
            add_transfer_host(et, per_geom[g.name])
        transfer_host = per_geom[geoms[0].name]
        host["transfer_host"] = per_geom
        log("runtime predictor costs: small-moe")
        try:
            replay = runs if cuda else {**runs, "sequences": 1}
            runtime_pred = runtime_predictor_costs(predictors, device, **replay)
        except TraceError as exc:  # no small-MoE config or trace here: observe + predict alone
            log(f"runtime predictor costs not measured: {exc}")
    pcost, pnote = predictor_costs(micro, runtime_pred)
    gpu = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python -m executor.calibrate " + " ".join(sys.argv[1:])
    prof = {
        "name": "cpu-dry-run" if not cuda else (machine or gpu).lower().replace(" ", "-"),
        "provenance": (f"measured by `{cmd}` on {machine or platform.node()} ({gpu}), torch {torch.__version__}, "
                       f"{when}; median of {repeats}, {'CUDA events' if cuda else 'perf_counter'}; the runtime's "
                       f"host costs: the {'fastest' if host_stat == 'min' else 'median'} of their rounds")
        if cuda else ("NOT A GPU PROFILE: CPU dry run of executor.calibrate (host memcpy as 'h2d', CPU fp32 matmuls "
                      f"on reduced shapes), {platform.node()}, torch {torch.__version__}, {when}"),
        "notes": (f"expert tables: {launch if cuda else 'cpu'} launch"
                  + (", floored at the runtime's measured per-expert host cost" if runtime_costs else "")
                  + "; dense tables: the executor's dense stand-in"
                  + (" + the runtime's measured per-layer host cost" if runtime_costs else "")
                  + (f"; runtime layer-step measurements: {host}" if host else "") + f"; {pnote}"
                  + (f"; pinned h2d GB/s by pass (ascending, then descending sizes; each size's fastest is kept): "
                     f"{pinned_passes}" if len(pinned_passes) > 1 else "")),
        "h2d": {"pinned": {"points": pinned_pts}, "latency_us": round(latency_us, 3), "copy_engines": engines,
                "chunk_overhead_us": round(chunk_us, 3), "issue_overhead_us": round(issue_us, 3),
                "lookahead": int(lookahead)},  # the chunk groups the runtime keeps on the copy stream
        "expert_compute": expert_tables,
        "expert_launch_floor_ms": round(min(min(v for v in t["ms"] if v is not None) for t in expert_tables), 5),
        "dense_compute": dense_tables,
        "default_dense": dense_tables[0]["name"],
        "dense_launch_floor_ms": round(min(min(t["ms"]) for t in dense_tables), 5),
        "predictor_cost_us": pcost,
        "copy_compute_overlap": round(overlap, 3),
    }
    add_transfer_host(prof, transfer_host)  # top level: the first geometry's (net of the copy issue if measured)
    if pageable_pts:
        prof["h2d"]["pageable"] = {"points": pageable_pts}
    if streaming_pts:
        prof["h2d"]["streaming"] = {"points": streaming_pts}

    hw = HardwareProfile.model_validate(prof)  # the simulator must be able to read it
    if runtime_costs and cuda and "small-moe" in [g.name for g in geoms]:
        from executor.live import measure_live_dense, small_model_for_timing

        log("live layer: small-moe (Hugging Face attention, random weights)")
        try:
            prof["live_dense_compute"] = [measure_live_dense(small_model_for_timing(device), hw, name="small-moe",
                                                             device=device)]
        except ImportError as exc:  # no transformers: live runs keep the dense stand-in
            log(f"live layer not measured: {exc}")
        HardwareProfile.model_validate(prof)
    return prof


def write_profile(prof: dict, out: Path) -> None:
    header = f"# {prof['provenance']}\n# regenerate: python -m executor.calibrate --out {out}\n"

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(header)
            yaml.safe_dump(prof, f, sort_keys=False, default_flow_style=None, width=120)

    atomic_write(out, write)


def main(argv=None) -> int:
    from executor.geometry import REPO_ROOT

    ap = argparse.ArgumentParser(prog="python -m executor.calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="profile YAML to write")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu (dry run)")
    ap.add_argument("--geometries", default=",".join(DEFAULT_GEOMETRIES), help="comma-separated presets")
    ap.add_argument("--predictors", default=",".join(DEFAULT_PREDICTORS), help="comma-separated predictor names")
    ap.add_argument("--trace", default=str(REPO_ROOT / "data" / "traces" / "qwen3-30b-a3b"),
                    help="trace whose batches feed the predictor timing")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--host-stat", choices=tuple(HOST_STATS), default="min",
                    help="the runtime's host costs from their rounds: the fastest (default; the host's interference "
                         "only adds time) or the median round; compare with executor.validate --real-stat to match")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and token counts")
    ap.add_argument("--launch", choices=("eager", "graph"), default="eager",
                    help="which launch mode the expert tables hold (the other goes in each table's note)")
    ap.add_argument("--machine", default="", help="machine name recorded in the profile")
    ap.add_argument("--no-pageable", action="store_true")
    ap.add_argument("--no-runtime-costs", action="store_true",
                    help="kernel tables only: leave out the runtime's measured host costs (executor.calibrate_runtime)")
    ap.add_argument("--lookahead", type=int, default=2,
                    help="chunk groups the runtime keeps on the copy stream (measured with; written as h2d.lookahead)")
    args = ap.parse_args(argv)
    if args.lookahead < 1:
        raise TraceError("must be at least 1", where="--lookahead")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise TraceError("CUDA is not available on this machine (use --device cpu for a dry run)", where="--device")
    if torch.device(device).type != "cuda":
        print("note: no CUDA device: CPU dry run, NOT a GPU profile", file=sys.stderr)
        torch.set_num_threads(1)
    prof = calibrate(device=device, geometries=[g for g in args.geometries.split(",") if g],
                     predictors=[p for p in args.predictors.split(",") if p], repeats=args.repeats,
                     quick=args.quick, launch=args.launch, machine=args.machine, trace_for_predictors=args.trace,
                     pageable=not args.no_pageable, runtime_costs=not args.no_runtime_costs,
                     lookahead=args.lookahead, host_stat=args.host_stat, log=lambda m: print(m, file=sys.stderr))
    write_profile(prof, Path(args.out))
    print(f"wrote {args.out} ({prof['name']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
