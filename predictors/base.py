"""The predictor plug-in interface, shared by the simulator's prefetcher and the real executor.

A predictor sees a `BatchView`: what a real serving system knows while it computes layer `view.layer` of one
batch (the routing of every earlier position, the batch's own routing up to this layer, the hidden state
entering this layer when the trace has it, and every layer's input at each sequence's previous position). It
returns experts of layer `view.layer + distance` ranked best first. Only predictors with `reads_future = True`
(the oracle) are handed the future, and only by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from traces.format import TraceMeta


@dataclass(frozen=True)
class BatchView:
    meta: TraceMeta
    layer: int  # the layer whose gate has just run
    sequences: np.ndarray  # int [T]: sequence id of each token of the batch
    positions: np.ndarray  # int [T]
    current: np.ndarray  # int16 [T, layer + 1, k]: the batch's experts at layers 0..layer (-1 = row absent)
    past: dict[int, np.ndarray]  # sequence id -> int16 [P, L, k]: earlier positions of that sequence, in order
    phase: str = "decode"
    hidden: np.ndarray | None = None  # [T, hidden_size]: input of `layer` for the batch tokens, if traced
    # layer m -> [T, hidden_size]: the input of layer m at each token's sequence's last position BEFORE this batch
    # (in decode the previous token, computed one step earlier; zeros where there is none: a prompt), if traced
    past_hidden: Callable[[int], np.ndarray] | None = None
    router_weights: Callable[[int], np.ndarray] | None = None  # layer -> [n_experts, hidden]: model parameters


@dataclass(frozen=True)
class Prediction:
    experts: np.ndarray  # int [n]: distinct expert ids of the target layer, best first
    scores: np.ndarray = field(default_factory=lambda: np.empty(0))  # float [n], same order, higher is better

    def top(self, n: int) -> np.ndarray:
        return self.experts[:n]


FutureFn = Callable[[int], np.ndarray]  # target layer -> int16 [T, k] the batch's true experts there


class Predictor:
    """Base class. Override `predict`; `fit` and `observe` are optional hooks."""

    name: str = "base"
    reads_future: bool = False
    needs: frozenset[str] = frozenset()  # trace fields required: "hidden_states", "router_weights"
    trainable: bool = False  # True when fit() learns something (the artifact then holds arrays)

    def __init__(self, **params):
        # constructor parameters, kept so an artifact can rebuild the predictor (make_predictor(name, **params))
        self.params: dict = dict(params)

    def fit(self, trace, sequences: list[int]) -> None:
        """Learn from the given sequences of a trace (never the ones it will be evaluated on).

        `trace` is usually a `predictors.split.TrainingTrace`: the same reading API as `traces.Trace`, restricted
        to the training sequences (and, for a position split, to the training positions of each sequence).
        """

    def get_state(self) -> dict[str, np.ndarray]:
        """Arrays learned by fit(), saved into the artifact (see predictors.artifact)."""
        return {}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what get_state() returned."""

    def reset(self) -> None:
        """Forget per-run online state (called at the start of each simulation/evaluation run)."""

    def observe(self, view: BatchView) -> None:
        """Called once per (layer, batch) after the gate of view.layer ran; online predictors update here."""

    def predict(self, view: BatchView, distance: int, future: FutureFn | None = None) -> Prediction:
        raise NotImplementedError

    def check_trace(self, meta: TraceMeta) -> None:
        """Refuse, with a clear message, a trace that lacks what this predictor needs."""
        missing = []
        if "hidden_states" in self.needs and not meta.has_hidden_states:
            missing.append("hidden states")
        if "router_weights" in self.needs and not meta.has_router_weights:
            missing.append("router weights")
        if missing:
            raise PredictorUnavailable(
                f"predictor '{self.name}' needs {' and '.join(missing)}, which trace of {meta.model!r} lacks "
                "(record one with `python -m traces.record --hidden-states --router-weights`)"
            )


class PredictorUnavailable(ValueError):
    """The predictor cannot run on this trace."""


def past_of(view: BatchView, sequence: int) -> np.ndarray:
    """view.past[sequence], or an empty [0, L, k] array when the caller left the sequence out (no earlier
    positions, e.g. a prompt's prefill batch)."""
    past = view.past.get(int(sequence))
    if past is None:
        return np.empty((0, view.meta.n_layers, view.meta.top_k), dtype=np.int16)
    return past


def rank_counts(counts: np.ndarray) -> Prediction:
    """Experts with a positive score, best first (ties broken by lower id, so results are deterministic)."""
    order = np.argsort(-counts, kind="stable")  # stable: ties keep ascending id
    ranked = counts[order]
    if len(ranked) and not ranked[-1] > 0:  # (sorted best first: only then is anything to drop)
        keep = ranked > 0
        order, ranked = order[keep], ranked[keep]
    return Prediction(order.astype(np.int64, copy=False), ranked.astype(np.float64, copy=False))
