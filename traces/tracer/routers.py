"""Find the router (gate) modules of a Hugging Face transformers MoE model and decode their outputs.

transformers 5.x gives every MoE family a router module (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``,
``DeepseekV3TopkRouter``, ``GptOssTopKRouter``, ``GraniteMoeTopKRouter``, ...) that returns three tensors:
router logits [T, E], top-k weights [T, k] and top-k ids [T, k]. The tuple order differs by family
(Granite-MoE returns ids first), so outputs are told apart by dtype and shape, not position. Capturing these
outputs records exactly what the model itself picked; nothing is recomputed, except the rank order of routers
that call ``torch.topk(..., sorted=False)`` (DeepSeek-V3 and its relatives), which is restored from the
router's own choice scores (sigmoid(logits) + e_score_correction_bias) without changing the chosen set.

How each family routes (read from transformers 5.17's modeling files):

- Mixtral (MixtralTopKRouter): top-k of softmax(logits), weights renormalised over the k.
- Qwen2-MoE, Qwen3-MoE, OLMoE, FlexOlmo, Qwen3-Next (*TopKRouter): top-k of softmax(logits), weights
  renormalised if config.norm_topk_prob.
- DeepSeek-V3 (DeepseekV3TopkRouter): choice score sigmoid(logits) + e_score_correction_bias; keep the best
  topk_group of n_group groups (group score = sum of its top-2 choice scores); top-k of the rest, unsorted;
  weights = sigmoid(logits) of the chosen (no bias), renormalised if norm_topk_prob, times routed_scaling_factor.
- GPT-OSS (GptOssTopKRouter): top-k of logits (linear with bias), weights = softmax over the k.
- Granite-MoE and Granite-MoE-Shared (GraniteMoe*TopKRouter): top-k of logits, softmax over the k; returns
  (ids, weights, logits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ROUTER_CLASS = re.compile(r"Top[kK]Router$")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass
class RouterSite:
    """One MoE layer's router: `layer` is the trace's layer id (0..n-1), `model_layer` the model's own index."""

    layer: int
    model_layer: int
    name: str
    module: object
    n_experts: int
    top_k: int
    rank_by: str  # "output" (already in rank order) or "sigmoid_bias" (DeepSeek-V3 style, unsorted top-k)


def _n_experts(module) -> int:
    for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    return int(module.weight.shape[0])


def _top_k(module, config) -> int:
    for attr in ("top_k", "num_experts_per_tok"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
    return int(config.num_experts_per_tok)


def find_routers(model) -> list[RouterSite]:
    """Router modules in model order. Raises ValueError when the model has none we recognise."""
    found = []
    for name, module in model.named_modules():
        if not _ROUTER_CLASS.search(type(module).__name__):
            continue
        m = _LAYER_INDEX.search(name)
        if m is None:
            continue
        rank_by = "sigmoid_bias" if hasattr(module, "e_score_correction_bias") else "output"
        found.append((int(m.group(1)), name, module, rank_by))
    if not found:
        raise ValueError(
            f"no router modules (class names ending in TopKRouter) found in {type(model).__name__}; "
            "this model family is not supported by the tracer"
        )
    found.sort(key=lambda t: t[0])
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return [
        RouterSite(i, ml, name, mod, _n_experts(mod), _top_k(mod, text_config), rank_by)
        for i, (ml, name, mod, rank_by) in enumerate(found)
    ]


def split_router_output(output, n_experts: int, top_k: int):
    """(logits [T, E], weights [T, k], ids [T, k]) from a router's output tuple, whatever its order."""
    import torch

    if not isinstance(output, (tuple, list)):
        raise ValueError(f"router returned {type(output).__name__}, expected a tuple of tensors")
    tensors = [t for t in output if isinstance(t, torch.Tensor)]
    ints = [t for t in tensors if not t.is_floating_point()]
    floats = [t for t in tensors if t.is_floating_point()]
    if len(ints) != 1 or len(floats) != 2:
        raise ValueError("router output is not (logits, weights, ids) in any order")
    ids = ints[0]
    a, b = floats
    if a.shape[-1] == n_experts and b.shape[-1] == top_k and n_experts != top_k:
        logits, weights = a, b
    elif b.shape[-1] == n_experts and a.shape[-1] == top_k and n_experts != top_k:
        logits, weights = b, a
    else:  # ambiguous shapes: the order of the float tensors is logits, weights except in Granite's (ids first)
        logits, weights = (b, a) if output[0] is ids else (a, b)
    return logits, weights, ids


def rank_order(site: RouterSite, logits, weights, ids):
    """Put ids and weights in the router's rank order (best first) where the router left them unsorted."""
    import torch

    if site.rank_by != "sigmoid_bias":
        return weights, ids
    scores = torch.sigmoid(logits.float()) + site.module.e_score_correction_bias.float()
    choice = scores.gather(1, ids.long())
    order = torch.argsort(choice, dim=1, descending=True, stable=True)
    return weights.gather(1, order), ids.gather(1, order)
