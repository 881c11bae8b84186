"""Small synthetic traces for tests and examples (a Zipf-skewed router with some token-to-token reuse)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from traces.format import TraceMeta
from traces.writer import write_trace


def make_trace(dst, *, n_layers: int = 4, n_experts: int = 16, top_k: int = 2, n_sequences: int = 2,
               prompt_len: int = 8, decode_len: int = 16, expert_bytes: int = 9_437_184, hidden_size: int = 2048,
               dense_bytes: int | None = None, seed: int = 0, skew: float = 1.0, overwrite: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_experts + 1) ** skew
    rows = {k: [] for k in ("sequence", "phase", "position", "layer", "experts", "weights")}
    for s in range(n_sequences):
        perms = [rng.permutation(n_experts) for _ in range(n_layers)]
        phases = (("prefill", range(prompt_len)), ("decode", range(prompt_len, prompt_len + decode_len)))
        for phase, positions in phases:
            for p in positions:
                for layer in range(n_layers):
                    w = pop[perms[layer]]
                    ids = rng.choice(n_experts, size=top_k, replace=False, p=w / w.sum())
                    rows["sequence"].append(s)
                    rows["phase"].append(phase)
                    rows["position"].append(p)
                    rows["layer"].append(layer)
                    rows["experts"].append(ids)
                    rows["weights"].append(np.full(top_k, 1.0 / top_k))
    meta = TraceMeta(model="synthetic", source="sim.engine.synthetic", n_layers=n_layers, n_experts=n_experts,
                     top_k=top_k, expert_bytes=[expert_bytes] * n_layers,
                     dense_bytes=[dense_bytes] * n_layers if dense_bytes else None, hidden_size=hidden_size,
                     dtype="bf16", license="CC0", attribution="synthetic")
    return write_trace(dst, meta, overwrite=overwrite, sequence=rows["sequence"], phase=np.array(rows["phase"]),
                       position=rows["position"], layer=rows["layer"], experts=np.array(rows["experts"]),
                       weights=np.array(rows["weights"]))
