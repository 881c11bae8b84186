"""Small synthetic traces with known structure, for tests and sanity checks (figures from them are SYNTHETIC).

kinds:
  "router"      routing is a real function of hidden states: each token carries a hidden state that drifts a
                little from layer to layer (a residual stream), and layer l's experts are the top-k of a random
                linear router W_l applied to it. Hidden states and router weights are stored, so gate_reuse and
                learned_mlp can be tested on the CPU.
  "cross_layer" layer l+1's experts are a fixed permutation of layer l's (layer 0 random): cross-layer structure
                that is exact at every distance.
  "repeat"      every position of a sequence repeats the sequence's first routing (previous_token is exact).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from traces.format import TraceMeta
from traces.writer import write_trace


def make_trace(dst: str | Path, kind: str = "router", *, n_sequences: int = 12, prompt_len: int = 6,
               gen_len: int = 20, n_layers: int = 6, n_experts: int = 16, top_k: int = 2, hidden_size: int = 32,
               drift: float = 0.3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n_pos = prompt_len + gen_len
    n_tok = n_sequences * n_pos
    experts = np.zeros((n_tok, n_layers, top_k), dtype=np.int16)
    hidden = None
    routers = None
    if kind == "router":
        routers = [rng.standard_normal((n_experts, hidden_size)).astype(np.float32) for _ in range(n_layers)]
        hidden = np.zeros((n_tok, n_layers, hidden_size), dtype=np.float32)
        h = rng.standard_normal((n_tok, hidden_size)).astype(np.float32)
        for layer in range(n_layers):
            if layer:
                h = h + drift * rng.standard_normal(h.shape).astype(np.float32)
            hidden[:, layer] = h
            logits = h @ routers[layer].T
            experts[:, layer] = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    elif kind == "cross_layer":
        perms = [rng.permutation(n_experts) for _ in range(n_layers)]
        first = np.stack([rng.choice(n_experts, top_k, replace=False) for _ in range(n_tok)])
        experts[:, 0] = first
        for layer in range(1, n_layers):
            experts[:, layer] = perms[layer][experts[:, layer - 1]]
    elif kind == "repeat":
        for s in range(n_sequences):
            base = np.stack([rng.choice(n_experts, top_k, replace=False) for _ in range(n_layers)])
            experts[s * n_pos: (s + 1) * n_pos] = base
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}")

    seq = np.repeat(np.arange(n_sequences), n_pos * n_layers)
    pos = np.tile(np.repeat(np.arange(n_pos), n_layers), n_sequences)
    lay = np.tile(np.arange(n_layers), n_tok)
    phase = np.where(pos < prompt_len, "prefill", "decode")
    weights = np.full((n_tok * n_layers, top_k), 1.0 / top_k, dtype=np.float32)
    meta = TraceMeta(model=f"synthetic-{kind}", source="predictors.synthetic", n_layers=n_layers,
                     n_experts=n_experts, top_k=top_k, expert_bytes=[1 << 20] * n_layers,
                     hidden_size=hidden_size if kind == "router" else None, license="CC0-1.0",
                     attribution="synthetic", capture=f"predictors.synthetic.make_trace(kind={kind!r}, seed={seed})")
    return write_trace(
        dst, meta, sequence=seq, phase=phase, position=pos, layer=lay, experts=experts.reshape(-1, top_k),
        weights=weights, token_id=np.zeros(len(seq), dtype=np.int64),
        hidden=None if hidden is None else hidden.reshape(-1, hidden_size),
        router_weights=None if routers is None else dict(enumerate(routers)),
    )
