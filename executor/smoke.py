"""First thing to run on a GPU machine: `python -m executor.smoke [--device cuda] [--geometry tiny]`.

Runs the offloaded runtime on a small synthetic trace with every invariant check on (`check=True`: capacity,
slot contents equal the host copy for every computed and every landed expert, slab residency = cache residency)
for a few policies and switch sets, with the device's real transfer backend (CUDA streams and events, a copy
worker thread), and compares every batch's output with the all-resident reference on the same device.
Also runs live mode on a tiny random Qwen3-MoE when transformers is installed. Prints one line per case and a
JSON summary; exits non-zero on any mismatch. Takes well under a minute on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

CASES = [
    # (policy, cache rate, predictor, distance, chunked, early preemption, reordered)
    ("lru", 0.25, "none", 1, False, False, False),
    ("lru", 0.25, "oracle", 1, True, True, True),
    ("lfu", 0.5, "previous_token", 2, True, True, True),
    ("fifo", 0.25, "oracle", 2, True, False, False),
    ("belady", 0.5, "previous_token", 1, False, True, True),
    ("lru", 0.0, "oracle", 1, True, True, True),
]


def run(device: str, geometry: str, backend: str | None, lookahead: int, log=print) -> dict:
    import torch

    from executor.geometry import get_geometry
    from executor.model import BatchInputs, TraceWeights
    from executor.replay import build_runtime, prepare
    from sim.config import build_config
    from sim.engine.schedule import iter_batches
    from sim.engine.synthetic import make_trace

    geom = get_geometry(geometry)
    results = []
    with tempfile.TemporaryDirectory() as d:
        trace = make_trace(Path(d) / "syn", n_layers=min(4, geom.n_layers), n_experts=min(16, geom.n_experts),
                           top_k=min(2, geom.top_k), n_sequences=2, prompt_len=12, decode_len=10,
                           expert_bytes=geom.expert_bytes, hidden_size=geom.hidden, seed=1)
        ref = None
        for policy, rate, pred, dist, ck, ep, ro in CASES:
            cfg = build_config({"trace": str(trace), "cache": {"policy": policy, "cache_rate": rate},
                                "prefetch": {"predictor": pred, "distance": dist}, "chunked_prefetch": ck,
                                "early_preemption": ep, "reordered_inference": ro})
            setup = prepare(cfg, geom)
            t0 = time.perf_counter()
            rt = build_runtime(cfg, setup, device=device, keep_outputs=True, check=True,
                               transfer_backend=backend, lookahead=lookahead)
            if ref is None:
                tw = TraceWeights(setup.trace, setup.n_layers)
                ref = [rt.model.reference_forward(BatchInputs(b, tw.for_batch(b), setup.n_layers, rt.device,
                                                              rt.model.dtype)).cpu()
                       for b in iter_batches(setup.sequences, cfg.phase, cfg.batch_size)]
            m = rt.run()
            exact = all(torch.equal(a, b) for a, b in zip(rt.outputs, ref))
            close = all(torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3) for a, b in zip(rt.outputs, ref))
            ok = close and len(rt.outputs) == len(ref) and m["hits"] + m["misses"] == m["lookups"]
            row = {"case": f"{policy}/{rate}/{pred}/d{dist}/ck{int(ck)}ep{int(ep)}ro{int(ro)}", "ok": ok,
                   "exact": exact, "hit_rate": m["hit_rate"], "prefetches": m["prefetches"],
                   "late": m["n_prefetch_late"], "dropped": m["n_prefetch_dropped"], "ttft_ms": m["ttft_ms"],
                   "tpot_ms": m["tpot_ms"], "checks": dict(rt.checks), "timing": m["timing"],
                   "wall_s": round(time.perf_counter() - t0, 2)}
            log(json.dumps(row))
            results.append(row)
    live = run_live_smoke(device)
    if live is not None:
        log(json.dumps(live))
        results.append(live)
    return {"device": device, "geometry": geometry, "cases": len(results),
            "ok": all(r["ok"] for r in results), "exact": all(r.get("exact", True) for r in results)}


def run_live_smoke(device: str) -> dict | None:
    try:
        import transformers
    except ImportError:
        return None
    import copy

    import torch

    from executor.live import LiveOffload
    from predictors.registry import make_predictor

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval().to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
        ids = torch.tensor([[1, 5, 9, 3, 7, 2]], device=device)
        ref = model(input_ids=ids).logits
    live = LiveOffload(copy.deepcopy(model), cache_rate=0.25, predictor=make_predictor("previous_token"),
                       chunked_prefetch=True, early_preemption=True, reordered_inference=True, check=True,
                       device=device)
    out = live.forward(ids, phase="prefill", sequences=[0] * 6, positions=list(range(6)))
    live.generate([[1, 5, 9, 3]], 4)
    m = live.finish()
    ok = bool(torch.allclose(out.logits, ref, rtol=1e-4, atol=1e-4)) and m["hits"] + m["misses"] == m["lookups"]
    return {"case": "live/qwen3-moe-tiny", "ok": ok, "exact": bool(torch.equal(out.logits, ref)),
            "hit_rate": m["hit_rate"], "timing": m["timing"]}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(prog="python -m executor.smoke", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--geometry", default="tiny", help="small preset (tiny, flame-moe-290m) or HF config path")
    ap.add_argument("--backend", default=None, choices=("cuda", "cuda-thread", "thread", "pump"),
                    help="transfer backend")
    ap.add_argument("--lookahead", type=int, default=1)
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(1)
    summary = run(device, args.geometry, args.backend, args.lookahead)
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
