"""Cross-layer transitions: P(expert j at layer l+d | expert i at layer l), counted on the training split."""

from __future__ import annotations

import numpy as np

from predictors.base import Prediction, Predictor, rank_counts
from predictors.registry import register_predictor
from predictors.split import training_sequences


def transition_counts(experts: np.ndarray, layer: int, distance: int, n_experts: int) -> np.ndarray:
    """[E, E] counts of (expert i at `layer`, expert j at `layer + distance`) over the rows of `experts`
    ([N, L, k]) that have both layers."""
    src = experts[:, layer].astype(np.int64)
    dst = experts[:, layer + distance].astype(np.int64)
    ok = (src[:, 0] >= 0) & (dst[:, 0] >= 0)
    src, dst = src[ok], dst[ok]
    valid = (src[:, :, None] >= 0) & (dst[:, None, :] >= 0)
    pairs = (src[:, :, None] * n_experts + dst[:, None, :])[valid]
    return np.bincount(pairs, minlength=n_experts * n_experts).reshape(n_experts, n_experts).astype(np.float64)


@register_predictor("cross_layer")
class CrossLayerPredictor(Predictor):
    """score(j) = sum over the batch's experts i at layer l of P(j at l+d | i at l), with add-`alpha` smoothing.

    Fit for every distance in `distances` at once (default 1, 2, 3)."""

    trainable = True

    def __init__(self, distances=(1, 2, 3), alpha: float = 0.01, **params):
        super().__init__(distances=list(distances), alpha=alpha, **params)
        self.distances = [int(d) for d in distances]
        self.alpha = float(alpha)
        self._prob: dict[int, np.ndarray] = {}  # distance -> float32 [L, E, E]

    def fit(self, trace, sequences) -> None:
        meta = trace.meta
        seqs = training_sequences(trace, sequences)
        experts = np.concatenate([s.experts for s in seqs]) if seqs else np.empty((0, meta.n_layers, meta.top_k))
        for d in self.distances:
            prob = np.zeros((meta.n_layers, meta.n_experts, meta.n_experts), dtype=np.float32)
            for layer in range(meta.n_layers - d):
                c = transition_counts(experts, layer, d, meta.n_experts) + self.alpha
                prob[layer] = c / c.sum(axis=1, keepdims=True)
            self._prob[d] = prob

    def get_state(self):
        return {f"prob_d{d}": p for d, p in self._prob.items()}

    def set_state(self, state):
        self._prob = {int(k[len("prob_d"):]): np.asarray(v) for k, v in state.items() if k.startswith("prob_d")}

    def predict(self, view, distance, future=None) -> Prediction:
        if distance not in self._prob:
            raise ValueError(f"cross_layer was fit for distances {sorted(self._prob)}, not {distance} "
                             "(fit it first, or with distances=[...] including this one)")
        ids = view.current[:, view.layer]
        ids = ids[ids >= 0].astype(np.int64)
        if ids.size == 0:
            return Prediction(np.empty(0, dtype=np.int64), np.empty(0))
        scores = self._prob[distance][view.layer][ids].sum(axis=0).astype(np.float64)
        return rank_counts(scores)
