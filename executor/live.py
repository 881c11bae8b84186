"""Live mode (skeleton): the small trained HF MoE model running with its own routing through the offloaded slab.

Plan (to finish once the small model's checkpoint lands in data/small_moe/model, see executor.geometry):

1. Load the model with transformers (`AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)`); move the
   dense part (embeddings, attention, norms, routers, lm head) to the GPU; copy every expert's weights into a
   `HostExpertStore` laid out as the replay store (gate, up, down per expert; the model's fused gate_up tensors
   split), then free the model's own expert tensors.
2. Replace each MoE block's expert computation by a hook that receives the router's top-k ids and weights (the
   same hook points `traces.record` uses to trace routing) and runs the offloaded layer step: the gate-time
   lookups, early preemption, prefetch issue and the expert loop of `executor.runtime.OffloadedRuntime`, with the
   token rows taken from the live router output instead of a trace. That needs the runtime's per-layer step split
   out of `run()` (`OffloadedRuntime.layer_step(layer, h, rows, weights, batch_view)`), which is the next step.
3. The predictor sees live hidden states (the learned predictor's input) through the same `BatchView`; routing
   seen so far is accumulated per sequence as the prefetcher's `past`.
4. Greedy decoding on the held-out prompts (data/small_moe/prompts.jsonl); the run also records its routing as a
   trace (traces.record's format), so the simulator replays exactly what the live run did.
5. Correctness: the offloaded model's logits equal the plain HF model's on the CPU (tiny config), as the replay
   tests do for the replay model.
"""

from __future__ import annotations

from executor.geometry import small_moe_dir


def run_live(ex: dict, cfg, profile, *, device=None) -> dict:
    d = small_moe_dir()
    where = f"model at {d}" if d else "no model yet (data/small_moe/model)"
    raise NotImplementedError(f"live mode is not implemented yet ({where}); see executor/live.py for the plan")
