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
`target` is what the networks learn to score: "topk" (the normalized k-hot of the experts layer l+d chose),
"router" (layer l+d's router softmax over every expert, on that layer's own input hidden state of the same
training token, at `temperature`: distillation from the router, 32 probabilities per row instead of 4 ones),
"mixed" (the average of the two), or "auto" (the default: "router" where the trace has router weights, else
"topk"; the fit report says which ran). `temperature` (default "auto": the one at which the router's own top-k
hold `TOPK_MASS` of the target's mass; the fit report lists each network's). Only the training rows' later
layers are read, as for the top-k labels; at prediction time the network still sees layer l's hidden state
alone. On the small MoE's in-trace split the router target gives 0.829 against 0.789 at d = 1 and 0.777 against
0.748 at d = 2 (docs/predictors.md).
`past_input` (default off: ProMoE's input alone) widens the input with the hidden state entering layer l+d at the
sequence's previous position (`view.past_hidden`: from the trace, or kept by the executor's live mode): in decode
the previous token's, computed one step earlier, so a server has it at layer l's gate; zeros in a prompt batch,
where no earlier position exists. Training rows get the same (the previous position's row for generated
positions, zeros for prompt positions). On the small MoE's in-trace split it adds 2.1 / 2.5 / 3.1 points at
d = 1 / 2 / 3, most at the first source layer, whose input is the bare token embedding (docs/predictors.md).
Measured alternatives are in docs/predictors.md.
"""

from __future__ import annotations

import numpy as np

from predictors import _torchfit
from predictors.base import Prediction, Predictor, rank_counts
from predictors.registry import register_predictor
from predictors.split import training_sequences
from predictors.views import gather_rows

TARGETS = ("auto", "topk", "router", "mixed")
TOPK_MASS = 0.6  # auto temperature: the share of the soft target's mass left on the router's own top-k


def auto_temperature(logits: np.ndarray, k: int, mass: float = TOPK_MASS) -> float:
    """The softmax temperature at which the router's top-k experts hold `mass` of the probability, on average
    over the rows (bisection on log2 T in [1/8, 32]; higher T, flatter target). Why: the router's own softmax
    taught the small MoE's networks best at T = 1 (top-4 mass 0.62; T = 0.5 and 2 lost 0.7 and 0.5 points), a
    synthetic trace's much sharper routers at T = 4 (top-2 mass 0.58; T = 1 lost 7 points): one mass fits both."""
    if len(logits) == 0:
        return 1.0
    k = max(1, min(int(k), logits.shape[1]))
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    lo, hi = -3.0, 5.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        m = np.take_along_axis(_softmax(logits / 2.0 ** mid), top, axis=1).sum(axis=1).mean()
        lo, hi = (mid, hi) if m > mass else (lo, mid)
    return float(2.0 ** (0.5 * (lo + hi)))


def previous_rows(seq) -> np.ndarray:
    """[P, L] hidden rows of each position's previous position as a server has it (predictors.views: the input
    at the sequence's last position before the batch): the previous position's for generated positions, -1 for
    prompt positions (one batch: nothing before it)."""
    prev = np.full_like(seq.hidden_rows, -1)
    gen = np.flatnonzero(seq.phases != "prefill")
    gen = gen[gen > 0]
    prev[gen] = seq.hidden_rows[gen - 1]
    return prev


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
                 threads: int = 1, weights_dtype: str = "float16", target: str = "auto",
                 temperature: float | str = "auto", past_input: bool = False, **params):
        if target not in TARGETS:
            raise ValueError(f"learned_mlp target must be one of {TARGETS}, got {target!r}")
        if temperature != "auto":
            try:
                ok = float(temperature) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"learned_mlp temperature must be > 0 or 'auto', got {temperature!r}")
        super().__init__(distances=list(distances), target_params=target_params, min_units=min_units,
                         max_units=max_units, epochs=epochs, lr=lr, weight_decay=weight_decay,
                         batch_size=batch_size, max_rows=max_rows, seed=seed, device=device, loss=loss,
                         dropout=dropout, patience=patience, skip=bool(skip), schedule=schedule, warmup=warmup,
                         min_epochs=min_epochs, threads=threads, weights_dtype=weights_dtype, target=target,
                         temperature=temperature,
                         # (recorded only when on: the default fit's params and artifacts stay as they were)
                         **({"past_input": True} if past_input else {}), **params)
        self.distances = [int(d) for d in distances]
        self._nets: dict[str, dict[str, np.ndarray]] = {}
        self.fit_report: dict = {}  # what each distance's fit did (_torchfit.train_many's report)

    def fit(self, trace, sequences) -> None:
        self.check_trace(trace.meta)
        meta = trace.meta
        p = self.params
        target = p.get("target", "topk")
        if target == "auto":
            target = "router" if meta.has_router_weights else "topk"
        elif target != "topk" and not meta.has_router_weights:
            raise ValueError(f"learned_mlp target={target!r} trains on layer l+d's router weights, which trace of "
                             f"{meta.model!r} lacks (record one with --router-weights)")
        self.fit_report["target"] = target
        seqs = training_sequences(trace, sequences)
        experts = np.concatenate([s.experts for s in seqs])
        rows = np.concatenate([s.hidden_rows for s in seqs])
        prev = np.concatenate([previous_rows(s) for s in seqs]) if p.get("past_input") else None
        rng = np.random.default_rng(p["seed"])
        for d in self.distances:
            names, xs, ys = [], [], []
            for layer in range(meta.n_layers - d):
                keep = (rows[:, layer] >= 0) & (experts[:, layer + d, 0] >= 0)
                if target != "topk":  # the target's router input too
                    keep &= rows[:, layer + d] >= 0
                ok = np.flatnonzero(keep)
                if ok.size == 0:
                    continue
                if ok.size > p["max_rows"]:
                    ok = np.sort(rng.choice(ok, p["max_rows"], replace=False))
                hidden = trace.hidden_states(layer)
                # float32 for a CPU fit; on a GPU the stored dtype (float16) travels and is converted there
                dtype = np.float32 if p["device"] == "cpu" else hidden.dtype
                x = gather_rows(hidden, rows[ok, layer], dtype)
                if prev is not None:  # the target layer's input at the previous position (zeros in a prompt)
                    x = np.concatenate([x, gather_rows(trace.hidden_states(layer + d), prev[ok, layer + d], dtype)],
                                       axis=1)
                names.append(f"l{layer}_d{d}")
                xs.append(x)
                y = _torchfit.multi_hot(experts[ok, layer + d], meta.n_experts)
                if target != "topk":
                    y, temp = self._router_target(trace, rows[ok, layer + d], layer + d, y, target, p)
                    self.fit_report.setdefault("temperature", {})[names[-1]] = round(temp, 4)
                ys.append(y)
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

    @staticmethod
    def _router_target(trace, target_rows: np.ndarray, target_layer: int, topk: np.ndarray, target: str,
                       p: dict) -> tuple[np.ndarray, float]:
        """The training target from layer l+d's own router: its softmax over every expert at a temperature, on
        the hidden state entering layer l+d of the same training token (`router`), or that averaged with the
        normalized top-k target (`mixed`). Read from the training rows only, like the top-k labels. Returns the
        target and its temperature: `temperature`, or with "auto" the one that leaves `TOPK_MASS` of the target's
        mass, on average, on the k experts the router chose (`auto_temperature`)."""
        w = np.asarray(trace.router_weights(target_layer), dtype=np.float32).T
        hidden = trace.hidden_states(target_layer)
        logits = np.empty((len(target_rows), w.shape[1]), dtype=np.float32)
        for a in range(0, len(target_rows), 1 << 16):  # in blocks: a million-row fit needs no GiB-sized temporary
            r = target_rows[a: a + (1 << 16)]
            logits[a: a + len(r)] = gather_rows(hidden, r, np.float32) @ w
        t = p.get("temperature", 1.0)
        k = int(topk.sum(axis=1).max()) if len(topk) else 1
        t = auto_temperature(logits[: 1 << 16], k) if t == "auto" else float(t)
        soft = np.empty_like(logits)
        for a in range(0, len(logits), 1 << 16):
            soft[a: a + (1 << 16)] = _softmax(logits[a: a + (1 << 16)] / t)
        if target == "router":
            return soft, t
        hard = topk / np.maximum(topk.sum(axis=1, keepdims=True), 1.0)
        return (0.5 * (soft + hard)).astype(np.float32), t

    def get_state(self):
        return _torchfit.pack(self._nets, self.params.get("weights_dtype", "float32"))

    def set_state(self, state):
        self._nets = _torchfit.unpack(state)

    def n_params(self) -> dict[str, int]:
        return {name: _torchfit.n_params(net) for name, net in self._nets.items()}

    def predict(self, view, distance, future=None) -> Prediction:
        net = self.net_for(view.layer, distance)
        if net is None:
            return Prediction(np.empty(0, dtype=np.int64), np.empty(0))  # layer without training rows
        return rank_counts(self.mlp_scores(net, view, distance).astype(np.float64))

    def net_for(self, layer: int, distance: int) -> dict | None:
        """The network that predicts layer + distance from layer's input, or None for a layer without training
        rows (an error when no network of that distance exists)."""
        net = self._nets.get(f"l{layer}_d{distance}")
        if net is None:
            if not self._nets:
                raise ValueError("learned_mlp has no trained networks: fit it or load an artifact first")
            if not any(name.endswith(f"_d{distance}") for name in self._nets):
                raise ValueError(f"learned_mlp was trained for distances {self.distances}, not {distance}")
        return net

    def mlp_input(self, view, distance: int) -> np.ndarray:
        """The networks' input rows for the view's tokens: layer l's input, and with `past_input` layer l+d's input
        at the previous position beside it."""
        if view.hidden is None:
            raise ValueError("learned_mlp needs view.hidden (build views with_hidden=True)")
        x = view.hidden
        if self.params.get("past_input"):
            if view.past_hidden is None:
                raise ValueError("learned_mlp with past_input needs the previous position's hidden states "
                                 "(view.past_hidden), which this caller does not provide")
            x = np.concatenate([x, view.past_hidden(view.layer + distance)], axis=1)
        return x

    def mlp_scores(self, net: dict, view, distance: int) -> np.ndarray:
        """The network's softmax over layer l+d's experts, summed over the batch's tokens."""
        return softmax_sum(_torchfit.forward(net, self.mlp_input(view, distance)))


def softmax_sum(logits: np.ndarray) -> np.ndarray:
    """_softmax(logits).sum(axis=0), in place (the logits are the caller's scratch)."""
    z = logits
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z[0] if len(z) == 1 else z.sum(axis=0)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
