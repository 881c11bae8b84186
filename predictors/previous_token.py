"""The same layer's experts of the previous token of the same sequence (token-level temporal locality)."""

from __future__ import annotations

import numpy as np

from predictors.base import Prediction, Predictor, past_of, rank_counts
from predictors.registry import register_predictor


def last_present(past: np.ndarray, layer: int) -> np.ndarray | None:
    """The experts at `layer` of the most recent earlier position that has a row there (router-rank order)."""
    if past.shape[0] == 0:
        return None
    if past[-1, layer, 0] >= 0:  # the common case: the previous position has the row
        return past[-1, layer]
    col = past[:, layer, 0]
    idx = np.flatnonzero(col >= 0)
    if idx.size == 0:
        return None
    return past[idx[-1], layer]


@register_predictor("previous_token")
class PreviousTokenPredictor(Predictor):
    """For each sequence of the batch, the previous position's experts at the target layer; votes are summed
    over the batch's sequences and ties broken by router rank. Nothing for a sequence's first batch (its prompt
    tokens' target layer is not computed yet when the prediction is made)."""

    def predict(self, view, distance, future=None) -> Prediction:
        target = view.layer + distance
        n_exp = view.meta.n_experts
        k = view.meta.top_k
        if len(view.sequences) == 1:
            # one token (batch-size-1 decode, every layer of every token: the executor pays this on its host):
            # the previous position's row in router-rank order, scored as the general path scores it (a row's
            # experts are distinct, so there are no votes to add up)
            row = last_present(past_of(view, view.sequences[0]), target)
            if row is None:
                return rank_counts(np.zeros(n_exp))
            ok = row >= 0
            return Prediction(row[ok].astype(np.int64), 1.0 + (k - np.arange(k)[ok]) / (k + 1) * 1e-3)
        return self.votes(view, target)

    @staticmethod
    def votes(view, target: int) -> Prediction:
        """The general path: each sequence's previous row votes, ties broken by router rank."""
        n_exp = view.meta.n_experts
        k = view.meta.top_k
        scores = np.zeros(n_exp, dtype=np.float64)
        for seq in np.unique(view.sequences):
            row = last_present(past_of(view, seq), target)
            if row is None:
                continue
            ok = row >= 0
            scores[row[ok].astype(np.int64)] += 1.0 + (k - np.arange(k)[ok]) / (k + 1) * 1e-3
        return rank_counts(scores)
