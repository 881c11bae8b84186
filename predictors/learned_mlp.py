"""ProMoE's learned predictor: per layer l and distance d, a two-layer MLP on the hidden state entering MoE
layer l that scores layer l+d's experts; it predicts as many experts as asked (top-k for ProMoE's accuracy).

Trained offline (torch, imported only inside fit) on the training split's tokens; inference is numpy on the
saved weights (one [H] x [H, U] and one [U] x [U, E] product per call). The hidden width U is chosen so a network
has about `target_params` (2M, ProMoE's size) parameters, clamped to [min_units, max_units]; the input is
standardized with the training rows' mean and deviation.

All source layers' networks of one distance are fit together as one batched network (`_torchfit.train_many`:
weights stacked along a layer dimension, batched matrix products, one optimizer step trains every layer), each
with its own early stopping on the LAST tenth of its training rows (later sequences of the training data; the
evaluation split is never seen).

Training options (`--set key=value`): `loss` "softmax" (default: cross-entropy between softmax(scores) and the
normalized k-hot target, a classifier over experts as in ProMoE) or "bce" (independent sigmoid per expert,
multi-label), `dropout` (between the two layers), `patience` (epochs without validation improvement before
early stopping), `epochs`, `min_epochs`, `schedule` ("constant" or "cosine": lr decays to lr/100 over `epochs`
after `warmup` epochs of linear warm-up), `lr`, `weight_decay`, `max_units`, `max_rows`, `batch_size`, `device`
("cuda" trains on a GPU), `threads` (CPU threads for the fit), and `skip` (default off): a linear path from the
standardized hidden state straight to the scores beside the MLP (artifact key `ws`), so the network can at
least represent the reused gate (layer l+d's router on this hidden state, which is linear in it) and learns the
rest as a correction; still one small network per layer on the hidden state, ProMoE's idea. `time_limit`
(seconds after which no new epoch starts; 0 = none, the default: only a safety net for time-boxed runs),
`weights_dtype` ("float16", the default: the weight matrices are rounded to float16 after the fit and stored so,
halving the artifact; inference still runs in float32 numpy; "float32" keeps them; artifacts written before
this option have float32 weights and load as before).
Measured alternatives are in docs/predictors.md.
"""

from __future__ import annotations

import numpy as np

from predictors import _torchfit
from predictors.base import Prediction, Predictor, rank_counts
from predictors.registry import register_predictor
from predictors.split import training_sequences


def hidden_width(hidden_size: int, n_experts: int, target_params: int, min_units: int, max_units: int) -> int:
    return int(np.clip(round(target_params / (hidden_size + n_experts + 1)), min_units, max_units))


@register_predictor("learned_mlp")
class LearnedMLPPredictor(Predictor):
    needs = frozenset({"hidden_states"})
    trainable = True

    def __init__(self, distances=(1, 2, 3), target_params: int = 2_000_000, min_units: int = 64,
                 max_units: int = 1024, epochs: int = 30, lr: float = 1e-3, weight_decay: float = 1e-4,
                 batch_size: int = 256, max_rows: int = 200_000, seed: int = 0,
                 device: str = "cpu", loss: str = "softmax", dropout: float = 0.0, patience: int = 4,
                 skip: bool = False, schedule: str = "constant", warmup: float = 0.0, min_epochs: int = 0,
                 threads: int = 1, weights_dtype: str = "float16", **params):
        super().__init__(distances=list(distances), target_params=target_params, min_units=min_units,
                         max_units=max_units, epochs=epochs, lr=lr, weight_decay=weight_decay,
                         batch_size=batch_size, max_rows=max_rows, seed=seed, device=device, loss=loss,
                         dropout=dropout, patience=patience, skip=bool(skip), schedule=schedule, warmup=warmup,
                         min_epochs=min_epochs, threads=threads, weights_dtype=weights_dtype, **params)
        self.distances = [int(d) for d in distances]
        self._nets: dict[str, dict[str, np.ndarray]] = {}
        self.fit_report: dict = {}  # what each distance's fit did (_torchfit.train_many's report)

    def fit(self, trace, sequences) -> None:
        self.check_trace(trace.meta)
        meta = trace.meta
        p = self.params
        seqs = training_sequences(trace, sequences)
        experts = np.concatenate([s.experts for s in seqs])
        rows = np.concatenate([s.hidden_rows for s in seqs])
        rng = np.random.default_rng(p["seed"])
        for d in self.distances:
            names, xs, ys = [], [], []
            for layer in range(meta.n_layers - d):
                ok = np.flatnonzero((rows[:, layer] >= 0) & (experts[:, layer + d, 0] >= 0))
                if ok.size == 0:
                    continue
                if ok.size > p["max_rows"]:
                    ok = np.sort(rng.choice(ok, p["max_rows"], replace=False))
                hidden = trace.hidden_states(layer)
                src = rows[ok, layer]
                order = np.argsort(src)  # memory-mapped reads in file order
                # float32 for a CPU fit; on a GPU the stored dtype (float16) travels and is converted there
                x = np.empty((len(ok), hidden.shape[1]), dtype=np.float32 if p["device"] == "cpu" else hidden.dtype)
                x[order] = hidden[src[order]]
                names.append(f"l{layer}_d{d}")
                xs.append(x)
                ys.append(_torchfit.multi_hot(experts[ok, layer + d], meta.n_experts))
            if not xs:
                continue
            units = hidden_width(xs[0].shape[1], meta.n_experts, p["target_params"], p["min_units"], p["max_units"])
            rep: dict = {}
            nets = _torchfit.train_many(
                xs, ys, hidden_units=units, seed=p["seed"] + d, loss=p["loss"], dropout=p["dropout"],
                skip=bool(p.get("skip", False)), report=rep, **_torchfit.shared_options(p))
            self._nets.update((n, _torchfit.round_weights(net, p.get("weights_dtype", "float32")))
                              for n, net in zip(names, nets))
            self.fit_report[f"d{d}"] = {**rep, "networks": names}
            del xs, ys

    def get_state(self):
        return _torchfit.pack(self._nets, self.params.get("weights_dtype", "float32"))

    def set_state(self, state):
        self._nets = _torchfit.unpack(state)

    def n_params(self) -> dict[str, int]:
        return {name: _torchfit.n_params(net) for name, net in self._nets.items()}

    def predict(self, view, distance, future=None) -> Prediction:
        net = self._nets.get(f"l{view.layer}_d{distance}")
        if net is None:
            if not self._nets:
                raise ValueError("learned_mlp has no trained networks: fit it or load an artifact first")
            if not any(name.endswith(f"_d{distance}") for name in self._nets):
                raise ValueError(f"learned_mlp was trained for distances {self.distances}, not {distance}")
            return Prediction(np.empty(0, dtype=np.int64), np.empty(0))  # layer without training rows
        if view.hidden is None:
            raise ValueError("learned_mlp needs view.hidden (build views with_hidden=True)")
        scores = _softmax(_torchfit.forward(net, view.hidden)).sum(axis=0)
        return rank_counts(scores.astype(np.float64))


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
