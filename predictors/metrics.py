"""Prediction quality: ProMoE's accuracy, precision and recall at other budgets, per layer and overall; GoodPred.

One record per (batch, target layer) where the predictor was asked for layer t = l + d. With A the distinct
experts the batch really activated at t (rows absent from the trace are ignored; a record with empty A is
skipped) and P the predictor's ranked list:

- accuracy (ProMoE): the predictor picks as many experts as were activated, |A| (= the model's top-k for a
  one-token decode batch); accuracy = sum |P[:|A|] & A| / sum |A|, micro-averaged over records. For a single
  token this is exactly "share of the activated experts that were predicted" with top-k predictions.
- precision@b = sum |P[:b] & A| / sum min(b, |P|): share of fetched experts that were used (a predictor that
  proposes fewer than b experts fetches fewer). null when nothing was predicted at all.
- recall@b = sum |P[:b] & A| / sum |A|: share of the activated experts that were prefetched.

The headline figures (`accuracy`, `precision`, `recall` at b = top-k) are over one-token batches (decode, and
teacher-forced positions replayed as decode), as ProMoE reports them; prefill batches (all prompt tokens at
once) are summarized separately under `prefill`. A trace with no one-token batch reports its prefill figures as
the headline. `n_eval` counts the token positions scored in the headline set.
"""

from __future__ import annotations

import math

import numpy as np


def goodpred(accuracy: float, fetch_rate: float) -> float:
    """ProMoE's GoodPred = accuracy x fetch rate.

    fetch_rate is the share of predicted (prefetched) experts that arrived before the layer needed them; it is
    a property of the schedule, not of the predictor, so it comes from a simulation run (the simulator's metrics)
    or a real replay. Both arguments are fractions in [0, 1].
    """
    for name, v in (("accuracy", accuracy), ("fetch_rate", fetch_rate)):
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    return float(accuracy) * float(fetch_rate)


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


class Scorer:
    """Accumulates prediction records and summarizes them (see the module docstring for the definitions)."""

    def __init__(self, n_layers: int, top_k: int, budgets: list[int] | None = None):
        self.n_layers = n_layers
        self.top_k = top_k
        self.budgets = sorted(set(budgets or [top_k]) | {top_k})
        self._layer: list[int] = []
        self._single: list[bool] = []
        self._tokens: list[int] = []
        self._n_actual: list[int] = []
        self._hits_acc: list[int] = []
        self._n_pred: list[int] = []
        self._hits: list[list[int]] = []
        self._scored_tokens = {True: set(), False: set()}

    def add(self, target_layer: int, actual: np.ndarray, predicted: np.ndarray, *, decode: bool,
            token_keys: list[tuple[int, int]] | None = None) -> None:
        """actual: the batch's expert ids at the target layer (any shape, -1 ignored); predicted: ranked ids."""
        a = np.unique(np.asarray(actual).ravel())
        a = a[a >= 0]
        if a.size == 0:
            return
        p = np.asarray(predicted, dtype=np.int64).ravel()
        hit = np.isin(p, a)
        cum = np.cumsum(hit)

        def hits_at(b: int) -> int:
            return int(cum[min(b, len(p)) - 1]) if b > 0 and len(p) else 0

        self._layer.append(int(target_layer))
        self._single.append(bool(decode))
        self._n_actual.append(int(a.size))
        self._hits_acc.append(hits_at(int(a.size)))
        self._n_pred.append(len(p))
        self._hits.append([hits_at(b) for b in self.budgets])
        if token_keys is not None:
            self._scored_tokens[bool(decode)].update(token_keys)

    def __len__(self) -> int:
        return len(self._layer)

    def _summary(self, mask: np.ndarray) -> dict:
        n_actual = np.asarray(self._n_actual)[mask]
        hits_acc = np.asarray(self._hits_acc)[mask]
        n_pred = np.asarray(self._n_pred)[mask]
        hits = np.asarray(self._hits).reshape(-1, len(self.budgets))[mask]
        out = {"accuracy": _ratio(hits_acc.sum(), n_actual.sum()), "n_predictions": int(mask.sum())}
        per_budget = {}
        for j, b in enumerate(self.budgets):
            per_budget[str(b)] = {
                "precision": _ratio(hits[:, j].sum(), np.minimum(n_pred, b).sum()),
                "recall": _ratio(hits[:, j].sum(), n_actual.sum()),
            }
        k = str(self.top_k)
        out["precision"] = per_budget[k]["precision"]
        out["recall"] = per_budget[k]["recall"]
        out["budgets"] = per_budget
        return out

    def summary(self) -> dict:
        layer = np.asarray(self._layer, dtype=np.int64)
        single = np.asarray(self._single, dtype=bool)
        headline_single = bool(single.any()) or not len(single)
        head = single if headline_single else ~single
        out = self._summary(head)
        out["headline_batches"] = "decode" if headline_single else "prefill"
        out["n_eval"] = len(self._scored_tokens[headline_single])
        out["per_layer"] = []
        for t in range(self.n_layers):
            m = head & (layer == t)
            if m.any():
                s = self._summary(m)
                out["per_layer"].append({"layer": t, "accuracy": s["accuracy"], "precision": s["precision"],
                                         "recall": s["recall"], "n_predictions": s["n_predictions"]})
        pre = ~single
        if headline_single and pre.any():
            s = self._summary(pre)
            s["n_tokens"] = len(self._scored_tokens[False])
            out["prefill"] = s
        return out


def clean(obj):
    """JSON-safe copy: NaN -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
