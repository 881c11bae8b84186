"""Train / evaluation splits and the restricted trace a predictor is fit on.

Two kinds of split (`make_split`):

- "sequences" (traces with 2+ sequences): the sequence ids are shuffled with `seed` and the first
  round(fraction * n) are the training set, the rest the evaluation set (at least one of each). With
  `folds=K, fold=i` the shuffled ids are cut into K nearly equal parts and part i is held out (K-fold
  cross-validation: every sequence is evaluated exactly once, always by a predictor that never saw it).
- "positions" (a trace with one sequence, like the bigmoeonedge captures of one prompt): the predictor is fit
  on the prompt and the first `fraction` of the generated (non-prefill) positions; the evaluation scores the
  remaining positions. The evaluation still replays the sequence from its start, so online predictors observe
  the earlier positions exactly as a server would, but only held-out positions are scored. The seed plays no
  part here.

- "all" (`fraction` 1.0): every sequence and position is training data and nothing is held out. Used to fit on
  a separate training trace (`python -m predictors.train TRACE --split 1.0`); such an artifact is scored on all
  sequences of ANOTHER trace (`evaluate_split`), never on the one it was fit on.

`TrainingTrace` wraps a `traces.Trace` and exposes only the training part: asking it for a held-out sequence
raises, and a position split truncates each sequence before its first held-out position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from predictors.views import SequenceRouting, load_sequences


@dataclass(frozen=True)
class Split:
    kind: str  # "sequences" | "positions" | "all"
    fraction: float
    seed: int
    train: tuple[int, ...]  # sequence ids the predictor may be fit on
    eval: tuple[int, ...]  # sequence ids scored by the evaluation
    cut: dict[int, int] | None = None  # positions split: sequence -> index of its first held-out position
    folds: int = 1
    fold: int = 0

    def describe(self) -> dict:
        d = asdict(self)
        d["train"] = list(self.train)
        d["eval"] = list(self.eval)
        d["cut"] = None if self.cut is None else {str(k): int(v) for k, v in self.cut.items()}
        return d

    def scored_from(self, sequence: int) -> int:
        """Index (into the sequence's time-ordered positions) of the first position the evaluation scores."""
        if self.cut is None:
            return 0
        return int(self.cut[sequence])


def make_split(trace, fraction: float = 0.9, seed: int = 0, *, folds: int = 1, fold: int = 0,
               sequences: list[SequenceRouting] | None = None) -> Split:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"split fraction must be in (0, 1], got {fraction}")
    ids = [int(s) for s in trace.sequences()]
    if fraction == 1.0:
        if folds > 1:
            raise ValueError("--split 1.0 (fit on everything) and cross-validation folds exclude each other")
        return Split("all", 1.0, seed, tuple(sorted(ids)), (), None)
    if len(ids) >= 2:
        rng = np.random.default_rng(seed)
        shuffled = [ids[i] for i in rng.permutation(len(ids))]
        if folds > 1:
            if not 0 <= fold < folds:
                raise ValueError(f"fold {fold} out of range for {folds} folds")
            if folds > len(ids):
                raise ValueError(f"{folds} folds but only {len(ids)} sequences")
            parts = np.array_split(np.arange(len(ids)), folds)
            held = set(parts[fold].tolist())
            train = [s for i, s in enumerate(shuffled) if i not in held]
            ev = [s for i, s in enumerate(shuffled) if i in held]
        else:
            n_train = min(max(int(round(fraction * len(ids))), 1), len(ids) - 1)
            train, ev = shuffled[:n_train], shuffled[n_train:]
        return Split("sequences", fraction, seed, tuple(sorted(train)), tuple(sorted(ev)), None, folds, fold)
    if folds > 1:
        raise ValueError("cross-validation folds need a trace with several sequences; this one has one")
    seqs = sequences if sequences is not None else load_sequences(trace)
    (seq,) = seqs
    gen = np.flatnonzero(seq.phases != "prefill")
    if len(gen) < 2:
        raise ValueError(f"sequence {seq.sequence} has {len(gen)} generated positions: too few to hold some out")
    n_train_gen = min(max(int(round(fraction * len(gen))), 1), len(gen) - 1)
    cut = int(gen[n_train_gen])
    return Split("positions", fraction, seed, (seq.sequence,), (seq.sequence,), {seq.sequence: cut})


class TrainingTrace:
    """A trace seen through a split: only training sequences (and training positions) are readable."""

    def __init__(self, trace, split: Split, sequences: list[SequenceRouting] | None = None):
        self.trace = trace
        self.split = split
        self.meta = trace.meta
        self.path = trace.path
        self._allowed = set(split.train)
        self._seqs = sequences

    def sequences(self) -> list[int]:
        return list(self.split.train)

    def _check(self, sequence: int) -> None:
        if int(sequence) not in self._allowed:
            raise PermissionError(f"sequence {sequence} is held out for evaluation; fit may not read it")

    def load(self) -> list[SequenceRouting]:
        """The training sequences, time-ordered, truncated before their first held-out position."""
        if self._seqs is None:
            self._seqs = load_sequences(self.trace, self.split.train)
        out = []
        for s in self._seqs:
            if s.sequence not in self._allowed:
                continue
            if self.split.cut is not None:
                s = s.truncated(self.split.cut[s.sequence])
            out.append(s)
        return out

    def hidden_states(self, layer: int) -> np.ndarray:
        """The layer's hidden-state array; index it only with rows of `load()` (those are training rows)."""
        return self.trace.hidden_states(layer)

    def router_weights(self, layer: int) -> np.ndarray:
        return self.trace.router_weights(layer)


def training_sequences(trace, sequences=None) -> list[SequenceRouting]:
    """What a predictor's fit(trace, sequences) reads: the given sequences of a TrainingTrace (truncated by a
    position split) or of a plain Trace."""
    if isinstance(trace, TrainingTrace):
        seqs = trace.load()
    else:
        seqs = load_sequences(trace, sequences)
    if sequences is not None:
        wanted = {int(s) for s in sequences}
        seqs = [s for s in seqs if s.sequence in wanted]
    return seqs


def evaluate_split(trace, sequences: list[SequenceRouting] | None = None) -> Split:
    """Every sequence of `trace` scored, none fit on: for an artifact fit on a separate training trace."""
    ids = [int(s) for s in trace.sequences()] if sequences is None else [s.sequence for s in sequences]
    return Split("separate", 1.0, 0, (), tuple(sorted(ids)), None)


def fit_summary(split, seqs) -> dict:
    """What a fit on `split` reads: sequences, token positions, routing rows (positions x present layers)."""
    allowed = set(split.train)
    n_seq = n_tok = n_rows = 0
    for s in seqs:
        if s.sequence not in allowed:
            continue
        if split.cut is not None:
            s = s.truncated(split.cut[s.sequence])
        n_seq += 1
        n_tok += s.n_positions
        n_rows += int((s.experts[:, :, 0] >= 0).sum())
    return {"sequences": n_seq, "tokens": n_tok, "rows": n_rows}
