"""Will it fit? Host (pinned) and GPU bytes of a configuration, computed before anything is allocated.

The H200 machine has 128 GB of host memory and 141 GB of GPU memory. Every expert of every replayed layer lives
in pinned host memory, so a large model may not fit: Mixtral-8x7B's experts are 84 GiB in bf16, Qwen3-30B-A3B's
54 GiB, Gemma-4-26B-A4B's 43 GiB. `plan_memory` computes what a run needs; `check_fit` raises `FitError`, whose
message names the numbers and the largest `--layers N` (a model's first N layers) that fits.

Host bytes: experts are packed into pinned arenas of `arena_bytes` (1 GiB, or the next power of two above one
expert), because torch's pinned-memory allocator rounds every allocation up to a power of two: one pinned tensor
per Mixtral expert (336 MiB) would take 512 MiB each. Packing wastes at most one expert per arena (Mixtral: 3 per
GiB, 1.6% waste) plus the tail of the last arena.

GPU bytes: the expert slab (slots x expert bytes), the scratch buffers for demand loads that cannot be cached
(at most the unique experts of one layer and batch), the dense stand-in weights of every layer, and activations
(hidden states, the [tokens, top-k, hidden] combine buffer and each expert's intermediate, x4 for temporaries),
plus the CUDA context margin.

Budgets: host = 100 GiB by default (`--host-budget-gib`); GPU = free memory reported by the driver minus
`gpu_margin_gib` (4 GiB) (`--gpu-budget-gib` to set it). On a CPU-only machine the "device" is the host: GPU
bytes are added to the host bytes and checked against the host budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from executor.geometry import Geometry
from traces.errors import TraceError

GIB = 1 << 30
DEFAULT_HOST_BUDGET = 100 * GIB
DEFAULT_GPU_MARGIN = 4 * GIB
DEFAULT_ARENA = GIB


class FitError(TraceError):
    """The configuration does not fit the memory budget (raised before allocating)."""


def whole_slot_capacity(capacity_bytes: int, expert_bytes: int, n_layers: int, scope: str) -> int:
    """Round a cache budget down to whole expert slots (per layer in `per_layer` scope): what the slab allocates,
    and so the capacity the simulator must be given to model the same run."""
    parts = n_layers if scope == "per_layer" else 1
    return (capacity_bytes // parts // expert_bytes) * parts * expert_bytes


def arena_layout(expert_bytes: int, n_experts_total: int, arena_bytes: int = DEFAULT_ARENA) -> tuple[int, int, int]:
    """(arena bytes, experts per arena, number of arenas) for packing `n_experts_total` experts."""
    arena = max(arena_bytes, 1 << max(0, math.ceil(math.log2(max(1, expert_bytes)))))
    per = max(1, arena // expert_bytes)
    n = math.ceil(n_experts_total / per) if n_experts_total else 0
    # a single small arena is enough for tiny models: shrink it to the next power of two above the payload
    if n == 1:
        arena = 1 << max(0, math.ceil(math.log2(max(1, n_experts_total * expert_bytes))))
    return arena, per, n


@dataclass
class MemoryPlan:
    n_layers: int
    host_expert_bytes: int  # payload
    host_pinned_bytes: int  # with arena rounding
    slab_slots: int
    scratch_slots: int
    slab_bytes: int
    scratch_bytes: int
    dense_bytes: int
    activation_bytes: int
    gpu_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def plan_memory(geom: Geometry, *, n_layers: int, n_experts: int | None = None, slab_slots: int,
                scratch_slots: int, max_tokens: int, top_k: int | None = None,
                arena_bytes: int = DEFAULT_ARENA) -> MemoryPlan:
    e = n_experts if n_experts is not None else geom.n_experts
    k = top_k if top_k is not None else geom.top_k
    eb = geom.expert_bytes
    arena, _per, n_arenas = arena_layout(eb, n_layers * e, arena_bytes)
    payload = n_layers * e * eb
    dense = sum(geom.dense_bytes[:n_layers])
    nb = geom.dtype_bytes
    act = 4 * max_tokens * (geom.hidden * (k + 4) + geom.moe_intermediate * 2) * max(nb, 4)
    slab = slab_slots * eb
    scratch = scratch_slots * eb
    return MemoryPlan(n_layers=n_layers, host_expert_bytes=payload, host_pinned_bytes=arena * n_arenas,
                      slab_slots=slab_slots, scratch_slots=scratch_slots, slab_bytes=slab, scratch_bytes=scratch,
                      dense_bytes=dense, activation_bytes=act, gpu_bytes=slab + scratch + dense + act)


def gpu_budget(device, margin: int = DEFAULT_GPU_MARGIN) -> int | None:
    """Free device memory (the driver's free plus what torch's caching allocator holds unused) minus a margin;
    None on CPU."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return max(0, free + cached - margin)


def _fmt(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def check_fit(plan_for_layers, n_layers: int, *, host_budget: int = DEFAULT_HOST_BUDGET,
              gpu_budget_bytes: int | None = None, what: str = "") -> MemoryPlan:
    """Raise FitError naming the numbers when `plan_for_layers(n_layers)` exceeds a budget.

    `plan_for_layers(n) -> MemoryPlan` recomputes the plan for the first n layers (the slab scales with the
    layers when the capacity is a cache rate), so the message can name the largest N that fits.
    """
    plan = plan_for_layers(n_layers)
    on_cpu = gpu_budget_bytes is None
    host_need = plan.host_pinned_bytes + (plan.gpu_bytes if on_cpu else 0)

    def fits(p: MemoryPlan) -> bool:
        h = p.host_pinned_bytes + (p.gpu_bytes if on_cpu else 0)
        return h <= host_budget and (on_cpu or p.gpu_bytes <= gpu_budget_bytes)

    if fits(plan):
        return plan
    best = 0
    for n in range(n_layers - 1, 0, -1):
        if fits(plan_for_layers(n)):
            best = n
            break
    parts = []
    if host_need > host_budget:
        parts.append(f"host memory: {_fmt(host_need)} needed ({plan.n_layers} layers of experts "
                     f"{_fmt(plan.host_expert_bytes)} in pinned arenas of {_fmt(plan.host_pinned_bytes)}"
                     + (f" + device buffers {_fmt(plan.gpu_bytes)} on this CPU-only machine" if on_cpu else "")
                     + f"), budget {_fmt(host_budget)} (--host-budget-gib)")
    if not on_cpu and plan.gpu_bytes > gpu_budget_bytes:
        parts.append(f"GPU memory: {_fmt(plan.gpu_bytes)} needed (slab {plan.slab_slots} slots = "
                     f"{_fmt(plan.slab_bytes)}, scratch {plan.scratch_slots} slots = {_fmt(plan.scratch_bytes)}, "
                     f"dense {_fmt(plan.dense_bytes)}, activations {_fmt(plan.activation_bytes)}), budget "
                     f"{_fmt(gpu_budget_bytes)} (free memory minus margin; --gpu-budget-gib)")
    hint = (f"; use --layers {best} (the model's first {best} layers fit)" if best else
            "; even one layer does not fit: lower the cache capacity or the batch size")
    raise FitError("configuration does not fit: " + "; ".join(parts) + hint, where=what or None)
