"""Per-layer popularity so far: how often each expert of the target layer has been activated in this run."""

from __future__ import annotations

import numpy as np

from predictors.base import Prediction, Predictor, rank_counts
from predictors.registry import register_predictor


@register_predictor("frequency")
class FrequencyPredictor(Predictor):
    """Online: counts grow in observe(); nothing is fit, so reset() forgets everything."""

    def __init__(self, **params):
        super().__init__(**params)
        self._counts: np.ndarray | None = None

    def reset(self) -> None:
        self._counts = None

    def observe(self, view) -> None:
        if self._counts is None:
            self._counts = np.zeros((view.meta.n_layers, view.meta.n_experts), dtype=np.float64)
        ids = view.current[:, view.layer]
        ids = ids[ids >= 0].astype(np.int64)
        if ids.size:
            self._counts[view.layer] += np.bincount(ids, minlength=view.meta.n_experts)

    def predict(self, view, distance, future=None) -> Prediction:
        if self._counts is None:
            return Prediction(np.empty(0, dtype=np.int64), np.empty(0))
        return rank_counts(self._counts[view.layer + distance].copy())
