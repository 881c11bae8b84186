"""The demand lookup stream of a trace, with DESIGN.md's semantics, as numpy arrays.

- A batch is one forward pass. The prefill of a sequence is ONE batch (all its prompt positions at once); a
  `teacher_forced` sequence is also one batch (all positions at once, as in training). In decode each forward
  pass computes one position of each of `batch_size` sequences: with batch_size 1 every decode position is a
  batch; with B > 1 the sequences are taken in file order in groups of B (static batching): the group's prefills
  run first, one batch per sequence, then decode step j batches the j-th decode position of every sequence of the
  group that has one (the batch shrinks as sequences finish).
- One lookup per UNIQUE expert per (layer, batch). Order inside a (layer, batch): first occurrence when the
  batch's tokens are scanned in order (sequence of the group, then position) and each token's experts in router
  rank order (rank 0 first). Batches are in time order and, within a batch, layers 0..L-1.
- Rows the trace lacks (expert id -1, e.g. llama.cpp's last layer of a prefill) contribute nothing.

`phase` selects the batches: "prefill" (prefill and teacher_forced batches), "decode", or "both".
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from traces.reader import Routing, Trace

PHASE_CODES = {"prefill": 0, "decode": 1, "teacher_forced": 2}
PHASE_SELECT = {"prefill": ("prefill", "teacher_forced"), "decode": ("decode",),
                "both": ("prefill", "decode", "teacher_forced")}


@dataclass
class LookupStream:
    """Demand lookups in order. Key code = layer * n_experts + expert."""

    layer: np.ndarray  # int32 [N]
    expert: np.ndarray  # int32 [N]
    batch: np.ndarray  # int64 [N], forward-pass id, 0.. in time order
    phase: np.ndarray  # int8 [N], PHASE_CODES
    n_layers: int
    n_experts: int
    expert_bytes: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.layer)

    @property
    def keys(self) -> np.ndarray:
        """int64 [N]: layer * n_experts + expert."""
        return self.layer.astype(np.int64) * self.n_experts + self.expert

    @property
    def sizes(self) -> np.ndarray:
        """int64 [N]: bytes of each looked-up expert."""
        return np.asarray(self.expert_bytes, dtype=np.int64)[self.layer]

    @property
    def n_batches(self) -> int:
        return int(self.batch[-1]) + 1 if len(self.batch) else 0

    def key_tuples(self) -> list[tuple[int, int]]:
        """[(layer, expert), ...] for ExpertCache / Belady's `future`."""
        return list(zip(self.layer.tolist(), self.expert.tolist()))

    def group_starts(self) -> np.ndarray:
        """Indices where a new (batch, layer) group starts."""
        n = len(self.layer)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        change = (self.batch[1:] != self.batch[:-1]) | (self.layer[1:] != self.layer[:-1])
        return np.flatnonzero(np.r_[True, change])


def dedupe_batches(experts: np.ndarray, n_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """experts [G, L, R] (G batches, R slots per (batch, layer) in scan order, -1 = absent) ->
    (batch g, layer, expert) of the unique lookups, in (g, layer, first occurrence) order. Vectorized."""
    g_n, l_n, r_n = experts.shape
    flat = experts.reshape(-1).astype(np.int64)
    valid = flat >= 0
    group = np.repeat(np.arange(g_n * l_n, dtype=np.int64), r_n)
    code = group[valid] * n_experts + flat[valid]
    _, first = np.unique(code, return_index=True)
    code = code[np.sort(first)]
    grp, expert = np.divmod(code, n_experts)
    g, layer = np.divmod(grp, l_n)
    return g, layer, expert


def _batched_rows(routings: list[Routing]) -> np.ndarray:
    """[B sequences' decode routings] -> [steps, L, B*k] with -1 where a sequence has no such step."""
    steps = max(r.n_positions for r in routings)
    _, n_layers, k = routings[0].experts.shape
    out = np.full((steps, n_layers, len(routings), k), -1, dtype=np.int16)
    for b, r in enumerate(routings):
        out[: r.n_positions, :, b, :] = r.experts
    return out.reshape(steps, n_layers, len(routings) * k)


def lookup_stream(
    trace: Trace | str | os.PathLike, *, phase: str = "both", batch_size: int = 1, max_sequences: int | None = None
) -> LookupStream:
    """The demand lookup stream of a trace (see the module docstring for the exact semantics)."""
    if phase not in PHASE_SELECT:
        raise ValueError(f"phase must be one of {sorted(PHASE_SELECT)}, got {phase!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(trace, Trace):
        trace = Trace(trace)
    meta = trace.meta
    wanted = PHASE_SELECT[phase]
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []  # (g, layer, expert, phase code)
    n_batches = 0

    def emit(experts: np.ndarray, ph: str) -> None:
        nonlocal n_batches
        g, layer, expert = dedupe_batches(experts, meta.n_experts)
        parts.append((g + n_batches, layer, expert, PHASE_CODES[ph]))
        n_batches += experts.shape[0]

    def run_group(group: list[dict[str, Routing]]) -> None:
        for seq in group:
            for ph in ("prefill", "teacher_forced"):
                r = seq.get(ph)
                if r is not None and ph in wanted:
                    p, n_layers, k = r.experts.shape
                    emit(r.experts.transpose(1, 0, 2).reshape(1, n_layers, p * k), ph)
        decodes = [seq["decode"] for seq in group if "decode" in seq]
        if decodes and "decode" in wanted:
            emit(_batched_rows(decodes), "decode")

    group: list[dict[str, Routing]] = []
    current: dict[str, Routing] | None = None
    current_seq = None
    n_seq = 0
    for r in trace.iter_routing(phases=wanted):
        if r.sequence != current_seq:
            if max_sequences is not None and n_seq >= max_sequences:
                break
            current = {}
            current_seq = r.sequence
            group.append(current)
            n_seq += 1
            if len(group) > batch_size:
                run_group(group[:-1])
                group = group[-1:]
        current[r.phase] = r
    if group:
        run_group(group)
    return _concat(parts, meta.n_layers, meta.n_experts, list(meta.expert_bytes))


def _concat(parts: Iterable, n_layers: int, n_experts: int, expert_bytes: list[int]) -> LookupStream:
    parts = list(parts)
    if not parts:
        z = np.zeros(0, dtype=np.int32)
        return LookupStream(z, z.copy(), np.zeros(0, np.int64), np.zeros(0, np.int8), n_layers, n_experts,
                            expert_bytes)
    return LookupStream(
        layer=np.concatenate([p[1] for p in parts]).astype(np.int32),
        expert=np.concatenate([p[2] for p in parts]).astype(np.int32),
        batch=np.concatenate([p[0] for p in parts]).astype(np.int64),
        phase=np.concatenate([np.full(len(p[0]), p[3], dtype=np.int8) for p in parts]),
        n_layers=n_layers,
        n_experts=n_experts,
        expert_bytes=expert_bytes,
    )
