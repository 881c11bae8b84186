"""Replay a trace on the offloaded runtime: `python -m executor.replay CONFIG --geometry NAME [options]`.

CONFIG is the simulator's single-run YAML (sim/config.py: trace, phase, batch size, cache policy and capacity,
predictor, distance, ProMoE switches), so the executor and `python -m sim.run` read the same file. The geometry
(executor.geometry) gives the expert and dense shapes; the routing is forced from the trace. Prints the metrics
(DESIGN.md's names) and the slot count actually allocated; `--json` prints one JSON object.

    python -m executor.replay configs/x.yaml --geometry qwen3-30b-a3b [--layers N] [--set cache.cache_rate=0.5]

Memory is checked before anything is allocated (executor.memory): a configuration that does not fit fails with
the numbers and the largest --layers N that fits.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from executor.geometry import Geometry, parse_geometry_overrides, resolve_geometry
from executor.memory import (
    DEFAULT_GPU_MARGIN,
    DEFAULT_HOST_BUDGET,
    GIB,
    check_fit,
    gpu_budget,
    plan_memory,
    whole_slot_capacity,
)
from traces.errors import TraceError, run_cli


@dataclass
class ReplaySetup:
    geometry: Geometry
    meta: object  # TraceMeta with the geometry's sizes and the replayed layers
    sequences: list
    trace: object
    capacity_bytes: int
    n_layers: int
    predictor: object = None  # a trained predictor (fit on the trace's training split, or from an artifact)
    warmup_batches: int = 0


def prepare(cfg, geom: Geometry, *, layers: int | None = None) -> ReplaySetup:
    """Trace, sequences (first N layers), the meta both sides model, and the cache capacity in bytes."""
    from executor.runtime import truncate_sequences
    from sim.engine.schedule import load_sequences
    from sim.run import cache_capacity_bytes
    from traces.reader import Trace

    trace = Trace(cfg.resolve_trace())
    n = layers if layers is not None else min(trace.meta.n_layers, geom.n_layers)
    if n > geom.n_layers or n < 1:
        raise TraceError(f"--layers {n}: geometry {geom.name} has {geom.n_layers} layers", where="--layers")
    geom = geom.first_layers(n) if n < geom.n_layers else geom
    meta = geom.trace_meta(trace.meta, n)
    seqs = load_sequences(trace, cfg.phase, cfg.max_sequences, cfg.max_decode_tokens)
    predictor, warmup = None, cfg.warmup_batches
    if cfg.prefetch.artifact or getattr(predictor_class(cfg.prefetch.predictor), "trainable", False):
        # exactly what `python -m sim.run` does: fit on the training split (or load the artifact), replay the
        # held-out sequences, the training positions of a one-sequence trace as warm-up
        from sim.run import trained_predictor

        predictor, seqs, warmup = trained_predictor(cfg, trace, seqs)
    elif cfg.heldout_only:
        from sim.run import heldout_part

        seqs, warmup = heldout_part(cfg, trace, seqs)
    if n < trace.meta.n_layers:
        seqs = truncate_sequences(seqs, n)
    capacity = cache_capacity_bytes(cfg, meta)
    capacity = whole_slot_capacity(capacity, meta.expert_bytes[0], n, cfg.cache.scope)
    return ReplaySetup(geom, meta, seqs, trace, capacity, n, predictor, warmup)


def predictor_class(name: str):
    from predictors.registry import _REGISTRY, _load_all

    _load_all()
    return _REGISTRY.get(name)


def build_runtime(cfg, setup: ReplaySetup, *, device=None, seed: int | None = None, transfer_backend=None,
                  host_budget: int = DEFAULT_HOST_BUDGET, gpu_budget_bytes: int | None = None,
                  keep_outputs: bool = False, check: bool = False, lookahead: int = 1, copy_engines: int = 1,
                  models: dict | None = None, copier=None, predict_after_resident: bool = False,
                  sync_misses: bool = True, group_resident: bool = True, copy_api: str = "driver",
                  predictor_backend: str = "auto"):
    """Check memory, allocate the host store, the model and the runtime for one config.

    `models`: a dict reused across calls (executor.validate) that keeps the last host store and replay model, so
    runs of the same geometry, layers and seed do not re-allocate and re-initialise tens of GiB of pinned
    memory. Only one is kept: two large geometries' experts do not fit in host memory together.
    """
    import torch

    from executor.buffers import HostExpertStore
    from executor.model import ReplayModel, TraceWeights
    from executor.runtime import OffloadedRuntime, max_unique_per_layer
    from predictors.registry import make_predictor

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        from executor.transfer import cuda_device

        device = cuda_device(device)
    geom, meta = setup.geometry, setup.meta
    eb = meta.expert_bytes[0]
    scratch = max(1, max_unique_per_layer(setup.sequences, cfg.phase, cfg.batch_size))
    max_tokens = max([len(p[1]) for s in setup.sequences for p in s.prompts] + [cfg.batch_size, 1])
    per_layer_slots = setup.capacity_bytes / eb / setup.n_layers

    def plan(n: int):
        return plan_memory(geom, n_layers=n, n_experts=meta.n_experts, slab_slots=int(per_layer_slots * n),
                           scratch_slots=scratch, max_tokens=max_tokens, top_k=meta.top_k)

    if gpu_budget_bytes is None and device.type == "cuda":
        gpu_budget_bytes = gpu_budget(device, DEFAULT_GPU_MARGIN)
    check_fit(plan, setup.n_layers, host_budget=host_budget, gpu_budget_bytes=gpu_budget_bytes,
              what=f"geometry {geom.name}")
    seed = cfg.seed if seed is None else seed
    key = (geom, setup.n_layers, meta.n_experts, seed, str(device))
    if models is not None and models.get("key") == key:
        model = models["model"]
    else:
        if models is not None:
            models.clear()  # free the previous store before allocating the next one
        store = HostExpertStore(geom, n_layers=setup.n_layers, n_experts=meta.n_experts, seed=seed,
                                pin=device.type == "cuda")
        model = ReplayModel(geom, store, device=device, seed=seed)
        if models is not None:
            models.update(key=key, model=model)
    weights = TraceWeights(setup.trace, setup.n_layers)
    predictor = setup.predictor
    if predictor is None:
        predictor = make_predictor(cfg.prefetch.predictor, **cfg.prefetch.predictor_params)
    predictor.check_trace(setup.trace.meta)
    inflight = cfg.prefetch.max_inflight_mib * (1 << 20) if cfg.prefetch.max_inflight_mib is not None else None
    return OffloadedRuntime(
        model, meta, setup.sequences, weights_fn=weights.for_batch, phase=cfg.phase, batch_size=cfg.batch_size,
        cache_capacity_bytes=setup.capacity_bytes, cache_scope=cfg.cache.scope, cache_policy=cfg.cache.policy,
        policy_params=cfg.cache.policy_params, predictor=predictor, distance=cfg.prefetch.distance,
        top_n=cfg.prefetch.top_n, max_inflight_bytes=inflight, chunked_prefetch=cfg.chunked_prefetch,
        chunks=cfg.prefetch.chunks, early_preemption=cfg.early_preemption,
        reordered_inference=cfg.reordered_inference, cpu_experts=cfg.cpu_experts, trace=setup.trace,
        transfer_backend=transfer_backend, keep_outputs=keep_outputs, check=check, lookahead=lookahead,
        copy_engines=copy_engines, copier=copier, predict_after_resident=predict_after_resident,
        sync_misses=sync_misses, group_resident=group_resident, copy_api=copy_api,
        warmup_batches=setup.warmup_batches, predictor_thread=cfg.prefetch.blocking is False,
        predictor_backend=predictor_backend)


def add_memory_args(ap: argparse.ArgumentParser) -> None:
    from executor.runtime import PREDICTOR_BACKENDS

    ap.add_argument("--geometry", required=True, help="preset name or path to an HF config.json")
    ap.add_argument("--set-geometry", action="append", default=[], metavar="KEY=VALUE",
                    help="override a geometry field (hidden, moe_intermediate, n_layers, n_experts, top_k, dtype, ...)")
    ap.add_argument("--layers", type=int, default=None, help="replay only the model's first N layers")
    ap.add_argument("--host-budget-gib", type=float, default=DEFAULT_HOST_BUDGET / GIB,
                    help="pinned host memory budget (default 100 of the machine's 128 GB)")
    ap.add_argument("--gpu-budget-gib", type=float, default=None,
                    help="GPU memory budget (default: free memory minus 4 GiB)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--lookahead", type=int, default=1,
                    help="chunk groups allowed on the copy stream at once (1 = the simulator's semantics)")
    ap.add_argument("--predict-after-resident", action="store_true",
                    help="launch the layer's resident experts before running the predictor")
    ap.add_argument("--no-group-resident", action="store_true",
                    help="compute every expert on its own (the default groups a decode layer's leading resident "
                         "experts into batched kernels)")
    ap.add_argument("--copy-api", default="driver", choices=("driver", "torch"),
                    help="how a chunk is issued to the copy stream: the CUDA driver's cuMemcpyHtoDAsync (default) or "
                         "Tensor.copy_ (the former path, for comparison)")
    ap.add_argument("--predictor-backend", default="auto", choices=PREDICTOR_BACKENDS,
                    help="where learned_mlp's predictions run: torch on the run's device (a CUDA graph per network on "
                         "a GPU), numpy on the host; auto (default): torch on a GPU")
    ap.add_argument("--no-sync-misses", action="store_true",
                    help="the host acts on a missing expert as soon as it gets there, ahead of the GPU (the default "
                         "waits for the GPU to reach it: the simulator's semantics)")


def main(argv=None) -> int:
    from executor.transfer import BACKENDS
    from sim.config import load_config, parse_sets

    ap = argparse.ArgumentParser(prog="python -m executor.replay", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="single-run YAML config (the simulator's format)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    add_memory_args(ap)
    ap.add_argument("--check", action="store_true", help="check cache/slab invariants and slot contents (slow)")
    ap.add_argument("--backend", default=None, choices=BACKENDS,
                    help="transfer backend (default: cuda on a GPU, the main thread issuing the copies; pump on CPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, parse_sets(args.set))
    geom = resolve_geometry(args.geometry, parse_geometry_overrides(args.set_geometry))
    setup = prepare(cfg, geom, layers=args.layers)
    rt = build_runtime(cfg, setup, device=args.device, host_budget=int(args.host_budget_gib * GIB),
                       gpu_budget_bytes=int(args.gpu_budget_gib * GIB) if args.gpu_budget_gib is not None else None,
                       check=args.check, lookahead=args.lookahead, transfer_backend=args.backend,
                       predict_after_resident=args.predict_after_resident,
                       sync_misses=not args.no_sync_misses, group_resident=not args.no_group_resident,
                       copy_api=args.copy_api, predictor_backend=args.predictor_backend)
    rt.warmup()
    metrics = rt.run()
    out = {"config": cfg.flat(), "geometry": setup.geometry.describe(), "layers": setup.n_layers,
           "device": str(rt.device), "metrics": metrics}
    if args.json:
        print(json.dumps(out, default=str))
    else:
        for k, v in metrics.items():
            print(f"{k:22s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))


