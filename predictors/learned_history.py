"""A learned predictor from routing history only (for traces without hidden states).

Per layer l and distance d, a two-layer MLP (`hidden_units` 128; 0 gives softmax regression) over the
multi-hot encoding of:
  - the current token's experts at layers l, l-1, ..., l-`depth`+1 (what the gates have chosen so far), and
  - in decode, the previous position's experts at the target layer l+d and at layer l (zeros in prefill: the
    previous prompt token is in the same batch and has not reached layer l+d yet),
scoring layer l+d's experts. Trained offline (torch, imported only inside fit; all source layers of one distance
at once as one batched network, `_torchfit.train_many`, each with its own early stopping on the last tenth of
its training rows; `patience`, `schedule`, `warmup`, `threads` as in learned_mlp), numpy inference. The features
are built the same way at training and prediction time, from what a BatchView holds.
"""

from __future__ import annotations

import numpy as np

from predictors import _torchfit
from predictors.base import Prediction, Predictor, past_of, rank_counts
from predictors.registry import register_predictor
from predictors.split import training_sequences


def _hot(out: np.ndarray, col0: int, experts: np.ndarray, n_experts: int) -> None:
    """Set out[i, col0 + e] = 1 for the ids e >= 0 in experts[i] (experts: int [N, k])."""
    rows, cols = np.nonzero(experts >= 0)
    out[rows, col0 + experts[rows, cols].astype(np.int64)] = 1.0


def features(cur: np.ndarray, prev: np.ndarray | None, layer: int, target: int, depth: int,
             n_experts: int) -> np.ndarray:
    """cur: int [N, >= layer+1, k] current tokens' experts; prev: int [N, L, k] previous positions' (or None).
    Returns float32 [N, (depth + 2) * n_experts]."""
    n = cur.shape[0]
    out = np.zeros((n, (depth + 2) * n_experts), dtype=np.float32)
    for j in range(depth):
        lay = layer - j
        if lay >= 0:
            _hot(out, j * n_experts, cur[:, lay], n_experts)
    if prev is not None:
        _hot(out, depth * n_experts, prev[:, target], n_experts)
        _hot(out, (depth + 1) * n_experts, prev[:, layer], n_experts)
    return out


@register_predictor("learned_history")
class LearnedHistoryPredictor(Predictor):
    trainable = True

    def __init__(self, distances=(1, 2, 3), depth: int = 3, hidden_units: int = 128, epochs: int = 60,
                 lr: float = 1e-2, weight_decay: float = 1e-3, batch_size: int = 128, seed: int = 0,
                 device: str = "cpu", patience: int = 4, schedule: str = "constant", warmup: float = 0.0,
                 threads: int = 1, **params):
        super().__init__(distances=list(distances), depth=depth, hidden_units=hidden_units, epochs=epochs, lr=lr,
                         weight_decay=weight_decay, batch_size=batch_size, seed=seed, device=device,
                         patience=patience, schedule=schedule, warmup=warmup, threads=threads, **params)
        self.distances = [int(d) for d in distances]
        self._nets: dict[str, dict[str, np.ndarray]] = {}
        self.fit_report: dict = {}  # what each distance's fit did (_torchfit.train_many's report)

    def fit(self, trace, sequences) -> None:
        meta = trace.meta
        p = self.params
        seqs = training_sequences(trace, sequences)
        cur_all, prev_all, has_prev = [], [], []
        for s in seqs:
            cur_all.append(s.experts)
            prev = np.full_like(s.experts, -1)
            prev[1:] = s.experts[:-1]
            decode = s.phases != "prefill"
            decode[0] = False
            prev[~decode] = -1  # in prefill the previous token's later layers are not known yet
            prev_all.append(prev)
            has_prev.append(decode)
        cur = np.concatenate(cur_all)
        prev = np.concatenate(prev_all)
        for d in self.distances:
            names, xs, ys = [], [], []
            for layer in range(meta.n_layers - d):
                t = layer + d
                ok = np.flatnonzero((cur[:, layer, 0] >= 0) & (cur[:, t, 0] >= 0))
                if ok.size == 0:
                    continue
                names.append(f"l{layer}_d{d}")
                xs.append(features(cur[ok], prev[ok], layer, t, p["depth"], meta.n_experts))
                ys.append(_torchfit.multi_hot(cur[ok, t], meta.n_experts))
            if not xs:
                continue
            rep: dict = {}
            nets = _torchfit.train_many(
                xs, ys, hidden_units=p["hidden_units"], seed=p["seed"] + d, standardize=False, report=rep,
                **_torchfit.shared_options(p))
            self._nets.update(zip(names, nets))
            self.fit_report[f"d{d}"] = {**rep, "networks": names}

    def get_state(self):
        return _torchfit.pack(self._nets)

    def set_state(self, state):
        self._nets = _torchfit.unpack(state)

    def predict(self, view, distance, future=None) -> Prediction:
        net = self._nets.get(f"l{view.layer}_d{distance}")
        if net is None:
            if not self._nets:
                raise ValueError("learned_history has no trained networks: fit it or load an artifact first")
            if not any(name.endswith(f"_d{distance}") for name in self._nets):
                raise ValueError(f"learned_history was trained for distances {self.distances}, not {distance}")
            return Prediction(np.empty(0, dtype=np.int64), np.empty(0))
        t = view.layer + distance
        prev = None
        if view.phase != "prefill":
            empty = np.full((view.meta.n_layers, view.meta.top_k), -1, dtype=np.int16)
            pasts = [past_of(view, s) for s in view.sequences]
            prev = np.stack([p[-1] if p.shape[0] else empty for p in pasts])
        x = features(view.current, prev, view.layer, t, self.params["depth"], view.meta.n_experts)
        logits = _torchfit.forward(net, x)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return rank_counts((z / z.sum(axis=1, keepdims=True)).sum(axis=0).astype(np.float64))
