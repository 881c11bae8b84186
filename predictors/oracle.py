"""Reads the trace's future: the upper bound every real predictor is measured against."""

import numpy as np

from predictors.base import Prediction, Predictor, rank_counts
from predictors.registry import register_predictor


def _rank_small(row: list[int]) -> tuple[list[int], dict[int, int]]:
    """The experts of a few tokens, by count (highest first), ties by ascending id (rank_counts' order), and the
    counts."""
    cnt: dict[int, int] = {}
    for x in row:
        if x >= 0:
            cnt[x] = cnt.get(x, 0) + 1
    order = sorted(cnt)
    if len(order) < len(row):
        order.sort(key=cnt.__getitem__, reverse=True)  # stable: ties keep ascending id
    return order, cnt


@register_predictor("oracle")
class OraclePredictor(Predictor):
    reads_future = True

    def predict(self, view, distance, future=None) -> Prediction:
        if future is None:
            raise ValueError("the oracle predictor must be given the future by its caller")
        target = future(view.layer + distance)
        if target.size <= 64:  # a few tokens (decode): counting in Python beats numpy's per-call overhead
            order, cnt = _rank_small(target.ravel().tolist())
            return Prediction(np.array(order, dtype=np.int64), np.array([cnt[e] for e in order], dtype=np.float64))
        ids = target[target >= 0].astype(np.int64)
        if ids.size == 0:
            return Prediction(np.empty(0, dtype=np.int64), np.empty(0))
        return rank_counts(np.bincount(ids, minlength=view.meta.n_experts).astype(np.float64))

    def rank_layers(self, experts: np.ndarray) -> list[list[int]]:
        """Per layer, `predict(...).experts` for a batch whose routing is `experts` [T, L, k], as lists: all of a
        batch's answers at once (the simulator's prefetcher asks once per batch instead of once per layer)."""
        T, L, k = experts.shape
        if T == 1:  # decode, one token: its experts ascending, unless a row repeats an expert or has a hole
            rows = np.sort(experts[0], axis=1)
            if not ((rows[:, 0] < 0).any() or (rows[:, 1:] == rows[:, :-1]).any()):
                return rows.tolist()
            return [_rank_small(r)[0] for r in experts[0].tolist()]
        out = []
        for layer in range(L):
            target = experts[:, layer, :]
            if target.size <= 64:
                out.append(_rank_small(target.ravel().tolist())[0])
                continue
            ids = target[target >= 0].astype(np.int64)
            out.append(rank_counts(np.bincount(ids).astype(np.float64)).experts.tolist() if ids.size else [])
        return out
