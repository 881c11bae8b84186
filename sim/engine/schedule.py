"""The batch schedule: which tokens form each forward pass, in order, from a trace and a run config.

The same semantics as `sim.access.lookup_stream` (one definition of a batch and of a lookup): sequences in
trace order, in groups of `batch_size`; for each group, every prompt is one batch (phase `prefill` rows, then
`teacher_forced` rows, each all positions at once), then decode batches of one token per still-running
sequence. `phase`: "prefill" (prefill and teacher_forced batches), "decode", or "both".
Lookups inside a (layer, batch) are the unique experts in first-occurrence order (tokens in order, each
token's experts in router rank order).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from traces.reader import Trace


@dataclass
class SequenceData:
    sequence: int
    prompts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]  # (phase, experts, positions, hidden_rows)
    gen: np.ndarray  # int16 [G, L, k] decode rows
    gen_positions: np.ndarray
    gen_hidden_rows: np.ndarray | None
    all: np.ndarray  # every position in time order, for the predictor's `past`
    n_before_gen: int  # positions before the first decode row
    # hidden rows [L] of the last position before the first decode row (the prompt's last, simulated or not)
    last_prompt_rows: np.ndarray | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p[1]) for p in self.prompts)


@dataclass
class Batch:
    index: int
    phase: str
    sequences: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    experts: np.ndarray  # int16 [T, L, k]
    past: dict[int, np.ndarray]
    hidden_rows: np.ndarray | None  # [T, L]
    starts: list[int]  # sequences whose first batch this is
    # [T, L]: the hidden rows of each token's sequence's last position before this batch (-1: none, as in a
    # prompt), for predictors reading the previous position's layer inputs; None where the trace has none
    prev_hidden_rows: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return int(self.experts.shape[0])


PHASE_SELECT = {"prefill": ("prefill", "teacher_forced"), "decode": ("decode",),
                "both": ("prefill", "decode", "teacher_forced")}


def load_sequences(trace: Trace, phase: str, max_sequences: int | None,
                   max_decode_tokens: int | None) -> list[SequenceData]:
    by_seq: dict[int, dict] = {}
    order: list[int] = []
    for r in trace.iter_routing():
        if r.sequence not in by_seq:
            if max_sequences is not None and len(order) >= max_sequences:
                break
            by_seq[r.sequence] = {}
            order.append(r.sequence)
        by_seq[r.sequence][r.phase] = r
    wanted = PHASE_SELECT[phase]
    L, k = trace.meta.n_layers, trace.meta.top_k
    out = []
    for s in order:
        parts = by_seq[s]
        prompts = []
        timeline = []
        last_rows = None
        for ph in ("prefill", "teacher_forced"):
            r = parts.get(ph)
            if r is not None:
                timeline.append(r.experts)
                if r.hidden_rows is not None and len(r.hidden_rows):
                    last_rows = r.hidden_rows[-1]
                if ph in wanted:
                    prompts.append((ph, r.experts, r.positions.astype(np.int64), r.hidden_rows))
        dec = parts.get("decode")
        n_before = sum(len(x) for x in timeline)
        if dec is not None:
            gen, gpos, gh = dec.experts, dec.positions.astype(np.int64), dec.hidden_rows
            if max_decode_tokens is not None:
                gen, gpos, gh = gen[:max_decode_tokens], gpos[:max_decode_tokens], gh[:max_decode_tokens]
            timeline.append(gen)
        else:
            gen, gpos, gh = np.full((0, L, k), -1, np.int16), np.zeros(0, np.int64), None
        if "decode" not in wanted:
            gen, gpos, gh = gen[:0], gpos[:0], None
        allrows = np.concatenate(timeline) if timeline else np.full((0, L, k), -1, np.int16)
        out.append(SequenceData(s, prompts, gen, gpos, gh, allrows, n_before, last_rows))
    return out


def iter_batches(seqs: list[SequenceData], phase: str, batch_size: int) -> Iterator[Batch]:
    index = 0
    for g in range(0, len(seqs), batch_size):
        group = seqs[g:g + batch_size]
        started: set[int] = set()
        for sd in group:
            for _ph, experts, positions, hrows in sd.prompts:
                if len(experts):
                    starts = [] if sd.sequence in started else [sd.sequence]
                    started.add(sd.sequence)
                    yield Batch(index, "prefill", np.full(len(experts), sd.sequence, np.int64), positions, experts,
                                {}, hrows, starts, None if hrows is None else np.full_like(hrows, -1))
                    index += 1
        steps = max((len(sd.gen) for sd in group), default=0)
        for i in range(steps):
            live = [sd for sd in group if len(sd.gen) > i]
            experts = np.stack([sd.gen[i] for sd in live]) if len(live) > 1 else live[0].gen[i:i + 1]
            hr = prev = None
            if live[0].gen_hidden_rows is not None:
                hr = np.stack([sd.gen_hidden_rows[i] for sd in live])
                prev = np.stack([sd.gen_hidden_rows[i - 1] if i else
                                 (sd.last_prompt_rows if sd.last_prompt_rows is not None else np.full_like(hr[0], -1))
                                 for sd in live])
            starts = [sd.sequence for sd in live if sd.sequence not in started]
            started.update(starts)
            yield Batch(index, "decode", np.array([sd.sequence for sd in live], np.int64),
                        np.array([sd.gen_positions[i] for sd in live], np.int64), experts,
                        {sd.sequence: sd.all[:sd.n_before_gen + i] for sd in live}, hr, starts, prev)
            index += 1


def layer_sets(experts: np.ndarray) -> list[tuple[list[int], list[int] | None]]:
    """Per layer: (unique expert ids in first-occurrence order, token count of each; None = one token each)."""
    T, L, k = experts.shape
    if T == 1:
        rows = experts[0]
        srt = np.sort(rows, axis=1)
        if k > 1 and (np.count_nonzero(srt[:, 1:] == srt[:, :-1]) or np.count_nonzero(srt[:, 0] < 0)):
            return [(list(dict.fromkeys(x for x in r if x >= 0)), None) for r in rows.tolist()]
        return [(r, None) for r in rows.tolist()]
    out = []
    for layer in range(L):
        e = experts[:, layer, :].ravel()
        e = e[e >= 0]
        u, first, c = np.unique(e, return_index=True, return_counts=True)
        o = np.argsort(first, kind="stable")
        out.append((u[o].tolist(), c[o].tolist()))
    return out


def demand_lookups(seqs: list[SequenceData], phase: str, batch_size: int) -> list[tuple[int, int]]:
    """The demand lookup stream the engine produces: per batch, per layer, unique experts ascending."""
    out: list[tuple[int, int]] = []
    for b in iter_batches(seqs, phase, batch_size):
        for layer, (ids, _) in enumerate(layer_sets(b.experts)):
            out.extend((layer, e) for e in ids)
    return out
