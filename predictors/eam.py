"""MoE-Infinity's expert-activation matrix (EAM) matching.

An EAM is an [L, E] matrix counting, per layer, how often each expert was activated over a sequence (a
request). fit() stores one EAM per training sequence; sequences longer than `window` positions (e.g. a
single long generation) are cut into windows of `window` positions, each stored as its own EAM. At prediction
time the current EAM is built from what a server knows: the last `window` earlier positions of each sequence in
the batch plus the batch's own experts at layers 0..l. It is matched to the stored EAMs by cosine similarity;
the target layer's row of the `n_matches` best matches, each normalized and weighted by its similarity, ranks
the experts. With no stored EAM similar at all (an empty current EAM), nothing is predicted.
"""

from __future__ import annotations

import numpy as np

from predictors.base import Prediction, Predictor, past_of, rank_counts
from predictors.registry import register_predictor
from predictors.split import training_sequences


def eam_of(experts: np.ndarray, n_layers: int, n_experts: int) -> np.ndarray:
    """[L, E] activation counts of the rows of `experts` ([N, L', k], L' <= L; -1 ignored)."""
    n, lp, k = experts.shape
    layer_idx = np.broadcast_to(np.arange(lp)[None, :, None], experts.shape)
    ok = experts >= 0
    flat = layer_idx[ok].astype(np.int64) * n_experts + experts[ok].astype(np.int64)
    return np.bincount(flat, minlength=n_layers * n_experts).reshape(n_layers, n_experts).astype(np.float32)


@register_predictor("eam")
class EAMPredictor(Predictor):
    trainable = True

    def __init__(self, window: int = 64, n_matches: int = 4, **params):
        super().__init__(window=window, n_matches=n_matches, **params)
        self.window = int(window)
        self.n_matches = int(n_matches)
        self._stored: np.ndarray | None = None  # float32 [N, L, E]
        self._stored_unit: np.ndarray | None = None  # float32 [N, L*E], rows of unit norm
        self._cache: tuple | None = None

    def fit(self, trace, sequences) -> None:
        meta = trace.meta
        mats = []
        for s in training_sequences(trace, sequences):
            for a in range(0, max(s.n_positions, 1), self.window):
                chunk = s.experts[a: a + self.window]
                if chunk.shape[0]:
                    mats.append(eam_of(chunk, meta.n_layers, meta.n_experts))
        self._set(np.stack(mats) if mats else np.zeros((0, meta.n_layers, meta.n_experts), np.float32))

    def _set(self, stored: np.ndarray) -> None:
        self._stored = stored.astype(np.float32)
        flat = self._stored.reshape(len(stored), -1)
        norm = np.linalg.norm(flat, axis=1, keepdims=True)
        self._stored_unit = flat / np.maximum(norm, 1e-12)
        # each stored EAM's rows normalized to sum 1, so every match votes with the same weight per layer
        rows = self._stored.sum(axis=2, keepdims=True)
        self._stored_rows = self._stored / np.maximum(rows, 1e-12)

    def get_state(self):
        return {"eams": self._stored}

    def set_state(self, state):
        self._set(np.asarray(state["eams"]))

    def reset(self) -> None:
        self._cache = None

    def _past_eam(self, view) -> np.ndarray:
        key = tuple((int(s), past_of(view, s).shape[0]) for s in np.unique(view.sequences))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        m = np.zeros((view.meta.n_layers, view.meta.n_experts), np.float32)
        for s in np.unique(view.sequences):
            past = past_of(view, s)
            if past.shape[0]:
                m += eam_of(past[-self.window:], view.meta.n_layers, view.meta.n_experts)
        self._cache = (key, m)
        return m

    def predict(self, view, distance, future=None) -> Prediction:
        if self._stored is None:
            raise ValueError("eam predictor has no stored activation matrices: fit it (or load an artifact) first")
        cur = self._past_eam(view) + eam_of(view.current, view.meta.n_layers, view.meta.n_experts)
        norm = np.linalg.norm(cur)
        if norm == 0 or len(self._stored_unit) == 0:
            return Prediction(np.empty(0, dtype=np.int64), np.empty(0))
        sims = self._stored_unit @ (cur.reshape(-1) / norm)
        n = min(self.n_matches, len(sims))
        best = np.argpartition(-sims, n - 1)[:n]
        w = np.maximum(sims[best], 0.0)
        if w.sum() == 0:
            return Prediction(np.empty(0, dtype=np.int64), np.empty(0))
        scores = (w[:, None] * self._stored_rows[best, view.layer + distance]).sum(axis=0).astype(np.float64)
        return rank_counts(scores)
