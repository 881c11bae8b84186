"""Tiny random-weight configurations of each supported MoE family, for tests and `--model tiny:FAMILY`."""

from __future__ import annotations

_COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

TINY = {
    "mixtral": dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=32,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1),
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=24, num_experts=16, num_experts_per_tok=4,
                      norm_topk_prob=True, head_dim=8),
    "olmoe": dict(intermediate_size=24, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False),
    "deepseek_v3": dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                        n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True,
                        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
    "gpt_oss": dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "granitemoe": dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
}

# Further families the generic router hooks also handle (tested against the experts' own inputs only).
TINY_EXTRA = {
    "flex_olmo": dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2),
    "glm4_moe": dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                     n_group=2, topk_group=1, first_k_dense_replace=1, head_dim=8),
    "granitemoeshared": dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                             shared_intermediate_size=16),
    "ernie4_5_moe": dict(intermediate_size=24, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
                         moe_layer_start_index=0),
}


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    known = {**TINY, **TINY_EXTRA}
    if family not in known:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(sorted(known))}")
    kw = {**_COMMON, **known[family], **overrides}
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str, seed: int = 0, dtype=None, **overrides):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)
    _randomize_router_extras(model)
    return model.eval()


def _randomize_router_extras(model) -> None:
    """Random init leaves some router tensors at zero (biases); give them values so tests exercise them."""
    import torch

    from traces.tracer.routers import find_routers

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for site in find_routers(model):
            m = site.module
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.abs().sum() == 0:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
            for name in ("bias", "e_score_correction_bias"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
