"""Building `BatchView`s exactly as a serving system sees them; shared by evaluation and the simulator.

A real system runs one sequence as

    prefill: ONE batch holding every prompt position (phase "prefill" rows of the trace);
    decode:  one batch per generated position, one token per sequence ("decode" rows).

Rows of phase "teacher_forced" (a whole text run through the model at once, as in the FLAME-MoE traces) are
by default replayed as decode steps, one position per batch (`teacher_forced="decode"`): the model is causal, so
the routing of position p is the one decoding token p would have produced, and replaying them one by one is what
a generating server would do, and what makes ProMoE's per-token accuracy measurable. `teacher_forced="prefill"`
replays them as one batch per sequence, as they were captured (sim.engine.schedule's choice, for its "prefill"
phase selection).

Within one batch the engine walks the layers in order; at each layer l, after l's gate has run:

    view = batch.view(l)                          # routing before this batch + this batch up to layer l
    predictor.observe(view)                       # online predictors update here
    if l + d < n_layers:
        pred = predictor.predict(view, d, future=batch.future if predictor.reads_future else None)
        ... prefetch pred.top(budget) for layer l + d ...

`replay()` below is that loop; the simulator's prefetcher should call `Batch.view` in the same order (observe
before predict, once per (layer, batch)). Predictions are only needed where they are used, so `replay` can skip
`predict` (never `observe`) on batches that are not scored: predict() must have no side effects.

What a view contains, and nothing more (tests/test_predictors_future.py checks it):
    view.current   int16 [T, l + 1, k]   the batch's experts at layers 0..l (read-only)
    view.past      {sequence: int16 [P, L, k]}  every EARLIER position of that sequence, all layers (read-only)
    view.hidden    float32 [T, hidden]   input of layer l for the batch tokens (only when asked for)
    view.past_hidden(m)  float32 [T, hidden]  input of layer m at each token's sequence's last position before the
                   batch (zeros in a prompt batch; only when asked for)
    view.router_weights  layer -> [n_experts, hidden]: model parameters, not data
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from predictors.base import BatchView, Prediction, Predictor
from traces.format import PHASES

_PHASE_ORDER = {p: i for i, p in enumerate(PHASES)}


@dataclass
class SequenceRouting:
    """All phases of one sequence, concatenated in time order (prompt first, then generated positions)."""

    sequence: int
    positions: np.ndarray  # int64 [P]
    phases: np.ndarray  # object [P]: "prefill" | "decode" | "teacher_forced"
    experts: np.ndarray  # int16 [P, L, k], read-only, -1 = row absent
    hidden_rows: np.ndarray  # int64 [P, L], -1 = no hidden state stored
    token_ids: np.ndarray  # int64 [P], -1 = unknown

    @property
    def n_positions(self) -> int:
        return len(self.positions)

    @property
    def n_prompt(self) -> int:
        """Number of prefill positions (0 when the sequence has none)."""
        return int(np.count_nonzero(self.phases == "prefill"))

    def truncated(self, stop: int) -> SequenceRouting:
        """The first `stop` positions (used for position splits)."""
        return SequenceRouting(self.sequence, self.positions[:stop], self.phases[:stop], self.experts[:stop],
                               self.hidden_rows[:stop], self.token_ids[:stop])


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def merge_phases(parts: list) -> SequenceRouting:
    """Merge the per-phase `traces.Routing` objects of one sequence into one time-ordered SequenceRouting."""
    parts = sorted(parts, key=lambda r: _PHASE_ORDER.get(r.phase, 99))
    positions = np.concatenate([r.positions.astype(np.int64) for r in parts])
    phases = np.concatenate([np.full(r.n_positions, r.phase, dtype=object) for r in parts])
    order = np.argsort(positions, kind="stable")  # phases are concatenated in PHASES order, so ties keep it
    experts = np.concatenate([r.experts for r in parts])[order]
    hidden_rows = np.concatenate([r.hidden_rows for r in parts])[order]
    token_ids = np.concatenate([r.token_ids for r in parts])[order]
    return SequenceRouting(
        sequence=int(parts[0].sequence),
        positions=_readonly(positions[order]),
        phases=_readonly(phases[order]),
        experts=_readonly(np.ascontiguousarray(experts)),
        hidden_rows=_readonly(hidden_rows),
        token_ids=_readonly(token_ids),
    )


def load_sequences(trace, sequences: Iterable[int] | None = None) -> list[SequenceRouting]:
    """Read the given sequences (all when None) of a trace in one streaming pass, in trace order."""
    wanted = None if sequences is None else {int(s) for s in sequences}
    by_seq: dict[int, list] = {}
    order: list[int] = []
    for routing in trace.iter_routing():
        sid = int(routing.sequence)
        if wanted is not None and sid not in wanted:
            continue
        if sid not in by_seq:
            by_seq[sid] = []
            order.append(sid)
        by_seq[sid].append(routing)
    return [merge_phases(by_seq[s]) for s in order]


# up to this many rows, all present, are read in the caller's order (a decode batch's: one or a few rows; a
# predictor reads them at every gate, where sorting and the zero-filled buffer cost more than the read)
DIRECT_ROWS = 16


def gather_rows(hidden: np.ndarray, rows: np.ndarray, dtype) -> np.ndarray:
    """hidden[rows] as `dtype`, read from the memory-mapped file in file order (sorted rows), returned in `rows`'
    order; zeros where a row is -1 (no hidden state)."""
    if len(rows) == 1 and rows[0] >= 0:  # a decode step's one row, at every gate: a slice, copied
        r = int(rows[0])
        return hidden[r: r + 1].astype(dtype)
    if len(rows) <= DIRECT_ROWS and (len(rows) == 0 or rows.min() >= 0):
        return hidden[rows].astype(dtype, copy=False)  # (fancy indexing copies: never a view of the file)
    out = np.zeros((len(rows), hidden.shape[1]), dtype=dtype)
    ok = np.flatnonzero(rows >= 0)
    order = ok[np.argsort(rows[ok])]
    out[order] = hidden[rows[order]]
    return out


class HiddenSource:
    """Loads hidden states and router weights of a trace lazily (memory-mapped, cached per layer)."""

    def __init__(self, trace):
        self.trace = trace
        self._hidden: dict[int, np.ndarray] = {}
        self._router: dict[int, np.ndarray] = {}

    def hidden(self, layer: int, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), hidden], read-only: the states entering `layer` at `rows` (zeros where -1)."""
        h = self._hidden.get(layer)
        if h is None:
            # a plain ndarray over the mapping: np.memmap's subclass makes every indexing cost tens of us more
            h = self._hidden[layer] = np.asarray(self.trace.hidden_states(layer))
        return _readonly(gather_rows(h, np.asarray(rows, dtype=np.int64), np.float32))

    def router_weights(self, layer: int) -> np.ndarray:
        if layer not in self._router:
            w = np.asarray(self.trace.router_weights(layer), dtype=np.float32)
            self._router[layer] = _readonly(w)
        return self._router[layer]


@dataclass
class Batch:
    """One forward pass: a prefill of one sequence, or one decode step of one or more sequences."""

    phase: str  # "prefill" or "decode" (teacher_forced rows are replayed as decode)
    parts: list[tuple[SequenceRouting, int, int]]  # (sequence, start index, stop index) into its arrays
    meta: object
    source: HiddenSource | None = None
    sequences: np.ndarray = field(init=False)
    positions: np.ndarray = field(init=False)
    _experts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.sequences = _readonly(np.concatenate(
            [np.full(b - a, s.sequence, dtype=np.int64) for s, a, b in self.parts]))
        self.positions = _readonly(np.concatenate([s.positions[a:b] for s, a, b in self.parts]))
        if len(self.parts) == 1:
            s, a, b = self.parts[0]
            self._experts = s.experts[a:b]  # a read-only view, no copy
        else:
            self._experts = _readonly(np.concatenate([s.experts[a:b] for s, a, b in self.parts]))

    @property
    def n_tokens(self) -> int:
        return len(self.positions)

    def view(self, layer: int, *, with_hidden: bool = False) -> BatchView:
        """What the system knows right after `layer`'s gate ran for this batch."""
        past = {s.sequence: s.experts[:a] for s, a, _ in self.parts}
        hidden = past_hidden = None
        if with_hidden and self.source is not None:
            rows = np.concatenate([s.hidden_rows[a:b, layer] for s, a, b in self.parts])
            hidden = self.source.hidden(layer, rows)
            past_hidden = self._past_hidden
        return BatchView(
            meta=self.meta,
            layer=layer,
            sequences=self.sequences,
            positions=self.positions,
            current=self._experts[:, : layer + 1],
            past=past,
            phase=self.phase,
            hidden=hidden,
            router_weights=self.source.router_weights if self.source is not None else None,
            past_hidden=past_hidden,
        )

    def _past_hidden(self, layer: int) -> np.ndarray:
        """The input of `layer` at each token's sequence's last position before this batch (zeros where none)."""
        rows = np.concatenate([np.full(b - a, s.hidden_rows[a - 1, layer] if a > 0 else -1, dtype=np.int64)
                               for s, a, b in self.parts])
        return self.source.hidden(layer, rows)

    def actual(self, layer: int) -> np.ndarray:
        """int16 [T, k]: the batch's true experts at `layer` (the future, for the oracle and for scoring)."""
        return self._experts[:, layer]

    def future(self, layer: int) -> np.ndarray:
        """FutureFn handed to predictors with reads_future = True (the oracle) only."""
        return self.actual(layer)


def iter_batches(sequences: list[SequenceRouting], meta, *, batch_size: int = 1,
                 source: HiddenSource | None = None, teacher_forced: str = "decode") -> Iterator[Batch]:
    """Batches in the order a server runs them.

    Sequences are taken `batch_size` at a time (in the given order). Each sequence's prompt is one prefill batch;
    then the group decodes in lock step, one position per sequence per batch, sequences dropping out as they end.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if teacher_forced not in ("decode", "prefill"):
        raise ValueError(f"teacher_forced must be 'decode' or 'prefill', got {teacher_forced!r}")
    for g in range(0, len(sequences), batch_size):
        group = sequences[g: g + batch_size]
        starts = []
        for s in group:
            prompt = s.phases == "prefill"
            if teacher_forced == "prefill":
                prompt = prompt | (s.phases == "teacher_forced")
            n = int(np.count_nonzero(prompt))
            if n and not prompt[:n].all():
                raise ValueError(f"sequence {s.sequence}: prompt positions are not the first ones")
            if n:
                yield Batch("prefill", [(s, 0, n)], meta, source)
            starts.append(n)
        step = 0
        while True:
            parts = [(s, st + step, st + step + 1) for s, st in zip(group, starts) if st + step < s.n_positions]
            if not parts:
                break
            yield Batch("decode", parts, meta, source)
            step += 1


def replay(
    predictor: Predictor,
    batches: Iterable[Batch],
    distance: int,
    *,
    score: Callable[[Batch], bool] | None = None,
    on_prediction: Callable[[Batch, int, Prediction], None] | None = None,
) -> None:
    """The canonical loop: for every batch and layer, observe() then predict(layer + distance).

    `score(batch)` says whether the batch's predictions are wanted (default: all); `on_prediction(batch,
    target_layer, prediction)` receives them. The caller resets the predictor before a run.
    """
    with_hidden = "hidden_states" in predictor.needs
    for batch in batches:
        wanted = score is None or score(batch)
        n_layers = batch.meta.n_layers
        for layer in range(n_layers):
            view = batch.view(layer, with_hidden=with_hidden)
            predictor.observe(view)
            target = layer + distance
            if wanted and target < n_layers:
                future = batch.future if predictor.reads_future else None
                pred = predictor.predict(view, distance, future=future)
                if on_prediction is not None:
                    on_prediction(batch, target, pred)
