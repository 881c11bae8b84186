"""ProMoE's learned predictor combined with the reused gate: the learned MLP's softmax over layer l+d's experts
plus `gate_weight` x the softmax of layer l+d's router applied to the hidden state entering layer l (gate_reuse).

The MLP is trained exactly as `learned_mlp` (same parameters, same artifact layout); the gate term uses the
model's router weights, which a serving system has (they are parameters, not data), so nothing is fit on the
evaluation split. `gate_weight` is fixed at 1.0 (equal weight to two probability distributions), not tuned on
the scored data. Needs hidden states and router weights.
"""

from __future__ import annotations

import numpy as np

from predictors.base import Prediction, rank_counts
from predictors.learned_mlp import LearnedMLPPredictor, _softmax
from predictors.registry import register_predictor


@register_predictor("learned_mlp_gate")
class LearnedMLPGatePredictor(LearnedMLPPredictor):
    needs = frozenset({"hidden_states", "router_weights"})

    def __init__(self, distances=(1, 2, 3), gate_weight: float = 1.0, **params):
        super().__init__(distances=distances, gate_weight=gate_weight, **params)
        self.gate_weight = float(gate_weight)

    def predict(self, view, distance, future=None) -> Prediction:
        net = self.net_for(view.layer, distance)  # (raises without networks or for another distance)
        if net is None:
            return super().predict(view, distance)  # a layer without training rows
        if view.router_weights is None:
            raise ValueError("learned_mlp_gate needs view.router_weights (a trace with router weights)")
        hidden = np.asarray(view.hidden, dtype=np.float32)
        w = np.asarray(view.router_weights(view.layer + distance), dtype=np.float32)  # [E, H]
        scores = self.mlp_scores(net, view, distance)
        scores = scores + self.gate_weight * _softmax(hidden @ w.T).sum(axis=0)
        return rank_counts(scores.astype(np.float64))
