"""Reactive baseline: predicts nothing, so every miss is a demand load."""

import numpy as np

from predictors.base import Prediction, Predictor
from predictors.registry import register_predictor


@register_predictor("none")
class NoPredictor(Predictor):
    def predict(self, view, distance, future=None) -> Prediction:
        return Prediction(np.empty(0, dtype=np.int64), np.empty(0))
