"""Prefill plus real autoregressive decoding (KV cache, one token per sequence per step) with router capture.

Prompts are left-padded to the batch's longest; padded positions are run (the batch needs them) but never
recorded. Every generated token is fed back through the model once, so a sequence of P prompt tokens and N new
tokens yields P prefill positions (0..P-1) and N decode positions (P..P+N-1), each with routing for every MoE
layer. The token_id of a row is the token entering the model at that position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from traces.tracer.capture import RouterCapture

PREFILL, DECODE = 0, 1


@dataclass
class BatchRows:
    """Recorded rows of one batch, per trace layer, in the order they were produced."""

    seq: list = field(default_factory=list)  # per step: np int [n]
    phase: list = field(default_factory=list)
    position: list = field(default_factory=list)
    token: list = field(default_factory=list)
    per_layer: dict = field(default_factory=dict)  # layer -> {"ids"|"weights"|"hidden"|"logits": [per step]}
    generated: list = field(default_factory=list)  # per sequence: list of generated token ids


def _add_step(rows: BatchRows, caps, valid, seq, phase, position, token) -> None:
    import torch

    sel = torch.as_tensor(valid).to(next(iter(caps.values())).ids.device)
    rows.seq.append(np.asarray(seq)[valid])
    rows.phase.append(np.full(int(valid.sum()), phase, dtype=np.int8))
    rows.position.append(np.asarray(position)[valid])
    rows.token.append(np.asarray(token)[valid])
    for layer, cap in caps.items():
        d = rows.per_layer.setdefault(layer, {"ids": [], "weights": [], "hidden": [], "logits": []})
        d["ids"].append(cap.ids[sel].cpu().numpy())
        d["weights"].append(cap.weights[sel].cpu().numpy())
        if cap.hidden is not None:
            d["hidden"].append(cap.hidden[sel].cpu().numpy())
        if cap.logits is not None:
            d["logits"].append(cap.logits[sel].to(torch.float16).cpu().numpy())


def trace_batch(
    model,
    capture: RouterCapture,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None = None,
    stop_at_eos: bool = False,
    temperature: float = 0.0,
    generator=None,
) -> BatchRows:
    """Run one batch: prefill, then max_new_tokens decode steps. Returns the captured rows (CPU numpy)."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    if (lengths == 0).any():
        raise ValueError("empty prompt")
    s = int(lengths.max())
    ids = torch.full((b, s), pad_id, dtype=torch.long)
    mask = torch.zeros((b, s), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, s - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = BatchRows(generated=[[] for _ in range(b)])
    seq_idx = np.arange(b)

    def pick(logits):
        logits = logits[:, -1, :].float()
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        caps = capture.pop()
        valid = mask.flatten().numpy().astype(bool)
        _add_step(rows, caps, valid, np.repeat(seq_idx, s), PREFILL, pos.flatten().numpy(), ids.flatten().numpy())
        nxt = pick(out.logits)
        active = np.ones(b, dtype=bool)
        for t in range(max_new_tokens):
            tok = nxt.cpu()
            for i in range(b):
                if active[i]:
                    rows.generated[i].append(int(tok[i]))
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
            step_pos = (lengths + t)[:, None]
            out = model(
                input_ids=tok[:, None].to(device), attention_mask=mask.to(device), position_ids=step_pos.to(device),
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )
            caps = capture.pop()
            _add_step(rows, caps, active.copy(), seq_idx, DECODE, step_pos[:, 0].numpy(), tok.numpy())
            if stop_at_eos and eos_id is not None:
                active &= tok.numpy() != eos_id
                if not active.any():
                    break
            nxt = pick(out.logits)
    return rows


def sorted_columns(rows: BatchRows, seq_offset: int):
    """Flatten a batch into writer columns sorted by (sequence, phase, position, layer), plus per-row extras."""
    seq = np.concatenate(rows.seq).astype(np.int64) + seq_offset
    phase = np.concatenate(rows.phase)
    position = np.concatenate(rows.position).astype(np.int64)
    token = np.concatenate(rows.token).astype(np.int64)
    layers = sorted(rows.per_layer)
    n = len(seq)
    L = len(layers)
    col = {
        "sequence": np.tile(seq, L), "phase": np.tile(phase, L), "position": np.tile(position, L),
        "token_id": np.tile(token, L), "layer": np.repeat(np.asarray(layers, dtype=np.int64), n),
    }
    ids = np.concatenate([np.concatenate(rows.per_layer[la]["ids"]) for la in layers])
    weights = np.concatenate([np.concatenate(rows.per_layer[la]["weights"]) for la in layers])
    order = np.lexsort((col["layer"], col["position"], col["phase"], col["sequence"]))
    out = {k: v[order] for k, v in col.items()}
    out["experts"] = ids[order]
    out["weights"] = weights[order]
    extras = {}
    for name in ("hidden", "logits"):
        if rows.per_layer[layers[0]][name]:
            arr = np.concatenate([np.concatenate(rows.per_layer[la][name]) for la in layers])
            extras[name] = arr[order]
    out["phase"] = np.where(out["phase"] == PREFILL, "prefill", "decode")
    return out, extras
