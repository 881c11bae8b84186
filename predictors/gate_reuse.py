"""Mixtral-offloading's speculative loading, ProMoE's "skip-based" baseline: apply layer l+d's router to the
hidden state entering layer l. Needs hidden states and router weights in the trace."""

from __future__ import annotations

import numpy as np

from predictors.base import Prediction, Predictor, rank_counts
from predictors.registry import register_predictor


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@register_predictor("gate_reuse")
class GateReusePredictor(Predictor):
    """Scores are the target router's softmax summed over the batch tokens (for one token: its logits' order)."""

    needs = frozenset({"hidden_states", "router_weights"})

    def predict(self, view, distance, future=None) -> Prediction:
        if view.hidden is None or view.router_weights is None:
            raise ValueError("gate_reuse needs view.hidden and view.router_weights (build views with_hidden=True "
                             "from a trace with hidden states and router weights)")
        w = view.router_weights(view.layer + distance)  # [E, H]
        logits = view.hidden.astype(np.float32) @ np.asarray(w, dtype=np.float32).T  # [T, E]
        return rank_counts(softmax(logits.astype(np.float64)).sum(axis=0))
