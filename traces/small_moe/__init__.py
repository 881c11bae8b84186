"""A small fine-grained MoE (Hugging Face Qwen3-MoE architecture) trained on real text, for real traces."""
