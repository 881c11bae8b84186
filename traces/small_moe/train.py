"""Train the small fine-grained MoE on the tokenized corpus (one command, time-boxed), evaluate, save.

    python -m traces.small_moe.train --data build/small_moe --out /tmp/small-moe --time-budget 420

Architecture: Hugging Face Qwen3-MoE (`Qwen3MoeForCausalLM`), every layer sparse, with a load-balancing
auxiliary loss so routing does not collapse: transformers' own (`router_aux_loss_coef`, pooled over layers; the
default, which trained the committed trace's model) or one computed per layer (`--balance per-layer`). Mixed
precision: float32 master weights, bf16 autocast. The learning rate follows linear warm-up then a cosine over
the wall-clock budget, and the checkpoint with the best loss on the first half of the held-out tokens is kept;
figures are reported on the second half, never used for selection. The report (train_report.json in --out)
holds held-out perplexity, the unigram baseline's perplexity on the same tokens, and per-layer expert-usage
entropy. `--reserve-docs PCT` leaves a deterministic subset of the TRAINING split's documents out of training
(rule in traces.small_moe.train_prompts.reserved_mask; recorded under "reserved_documents" in the report), so
that the predictors' training trace can be recorded on text the model has not seen.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

MODEL = dict(
    hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256, intermediate_size=1024,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=1024,
    router_aux_loss_coef=0.01, tie_word_embeddings=False, rope_theta=10000.0,
)
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=256,
    router_aux_loss_coef=0.01, tie_word_embeddings=False,
)


def make_config(vocab_size: int, eot_id: int, pad_id: int, tiny: bool = False):
    from transformers import Qwen3MoeConfig

    kw = dict(TINY if tiny else MODEL)
    rope_theta = kw.pop("rope_theta", 10000.0)
    cfg = Qwen3MoeConfig(vocab_size=vocab_size, bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=pad_id,
                         output_router_logits=False, **kw)
    if getattr(cfg, "rope_parameters", None) is not None:
        cfg.rope_parameters = {**cfg.rope_parameters, "rope_theta": rope_theta}
    return cfg


def per_layer_balance_loss(router_logits, top_k: int):
    """Switch-style load-balancing loss computed per layer and averaged (1.0 when perfectly balanced).

    transformers' own load_balancing_loss_func pools all layers into one count, so an expert that is dead in one
    layer can hide behind busy ones in another; this version balances every layer on its own.
    """
    import torch

    total = 0.0
    for logits in router_logits:
        logits = logits.reshape(-1, logits.shape[-1]).float()
        probs = torch.softmax(logits, dim=-1)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
        f = chosen.mean(0) / top_k
        total = total + logits.shape[-1] * (f * probs.mean(0)).sum()
    return total / len(router_logits)


def unigram_perplexity(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    """Add-one smoothed unigram model from the training tokens, evaluated on the held-out tokens."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[val[1:]].mean()))


def evaluate(model, val, seq_len: int, batch: int, device, max_tokens: int | None = None) -> dict:
    """Held-out loss (every token of val once, windows of seq_len) and per-layer expert usage."""
    import torch

    from traces.tracer import RouterCapture

    model.eval()
    n_win = (len(val) - 1) // seq_len
    if max_tokens:
        n_win = min(n_win, max(1, max_tokens // seq_len))
    data = torch.as_tensor(val[: n_win * seq_len + 1].astype(np.int64))
    total, count = 0.0, 0
    usage = None
    with torch.no_grad(), RouterCapture(model) as cap:
        for s in range(0, n_win, batch):
            e = min(n_win, s + batch)
            x = torch.stack([data[i * seq_len: (i + 1) * seq_len + 1] for i in range(s, e)]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                     x[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += x[:, 1:].numel()
            caps = cap.pop()
            if usage is None:
                usage = np.zeros((len(caps), cap.sites[0].n_experts), dtype=np.int64)
            for layer, c in caps.items():
                usage[layer] += np.bincount(c.ids.reshape(-1).cpu().numpy(), minlength=usage.shape[1])
    model.train()
    p = usage / usage.sum(1, keepdims=True)
    ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(1) / math.log(usage.shape[1])
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count,
            "usage_entropy": [round(float(x), 4) for x in ent],
            "max_expert_share": [round(float(x), 4) for x in p.max(1)],
            "unused_experts": [int(x) for x in (usage == 0).sum(1)],
            "min_expert_share": [round(float(x), 5) for x in p.min(1)]}


def train(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    info = json.loads((args.data / "corpus.json").read_text())
    train_tok = np.load(args.data / "train.npy")
    from traces.small_moe.train_prompts import reservation

    train_tok, reserved = reservation(train_tok, int(info["eot_id"]), args.reserve_docs)
    if reserved["reserved_documents"]:
        print(f"reserved {reserved['reserved_documents']} of {reserved['documents']} training documents "
              f"({reserved['reserved_tokens']} tokens; {reserved['rule']}): not trained on", flush=True)
    val_all = np.load(args.data / "val.npy")
    # first half of the held-out tokens picks the checkpoint, the second half is only ever used for the report
    val_tok, test_tok = val_all[: len(val_all) // 2], val_all[len(val_all) // 2:]
    cfg = make_config(info["vocab_size"], info["eot_id"], info["pad_id"], tiny=args.tiny)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation=args.experts_impl,
                                             attn_implementation="sdpa").to(device)
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = n_params - expert_params + expert_params * cfg.num_experts_per_tok // cfg.num_experts
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    if args.balance == "per-layer":  # out.loss is then the LM loss alone; the per-layer balance loss is added below
        model.router_aux_loss_coef = 0.0
    fwd = torch.compile(model) if args.compile else model
    data = torch.as_tensor(train_tok.astype(np.int64), device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    span = args.seq_len + 1
    coef = args.aux_coef
    best = {"loss": float("inf")}
    best_state = None
    history = []
    step = 0
    t0 = time.perf_counter()
    train_time = 0.0
    tokens_seen = 0
    print(f"params {n_params / 1e6:.1f}M (experts {expert_params / 1e6:.1f}M, active/token {active / 1e6:.1f}M); "
          f"train tokens {len(train_tok)}, val tokens {len(val_tok)}", flush=True)
    model.train()
    while True:
        elapsed = train_time
        if args.max_steps and step >= args.max_steps:
            break
        if not args.max_steps and elapsed >= args.time_budget:
            break
        frac = min(1.0, elapsed / args.time_budget) if not args.max_steps else step / args.max_steps
        warm = min(1.0, (step + 1) / args.warmup)
        lr = args.lr * warm * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        ts = time.perf_counter()
        starts = torch.randint(0, len(data) - span, (args.batch_size,), device=device, generator=gen)
        x = data[starts[:, None] + torch.arange(args.seq_len, device=device)[None, :]]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = fwd(input_ids=x, labels=x, output_router_logits=True)
            if args.balance == "per-layer":
                aux = per_layer_balance_loss(out.router_logits, cfg.num_experts_per_tok)
                loss = out.loss + coef * aux
                lm = out.loss
            else:  # transformers' own loss, pooled over layers, already added to out.loss with the config's coef
                aux = out.aux_loss
                loss = out.loss
                lm = out.loss - cfg.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        if step % args.log_every == 0 or step == 1:
            lv, av = lm.item(), aux.item()
            print(f"step {step} lr {lr:.2e} loss {lv:.4f} aux {av:.4f} "
                  f"tok/s {tokens_seen / max(train_time + time.perf_counter() - ts, 1e-9):.0f} "
                  f"t {train_time:.0f}s", flush=True)
        if device.type == "cuda" and step % 10 == 0:
            torch.cuda.synchronize()
        train_time += time.perf_counter() - ts
        if step % args.eval_every == 0:
            ev = evaluate(model, val_tok, args.seq_len, args.batch_size, device, max_tokens=args.eval_tokens)
            history.append({"step": step, "train_time_s": round(train_time, 1), "val_loss": round(ev["loss"], 4)})
            print(f"eval step {step}: val loss {ev['loss']:.4f} ppl {ev['perplexity']:.2f} "
                  f"entropy {ev['usage_entropy']}", flush=True)
            if ev["loss"] < best["loss"]:
                best = {"loss": ev["loss"], "step": step}
                best_state = copy.deepcopy({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    wall = time.perf_counter() - t0
    final = evaluate(model, val_tok, args.seq_len, args.batch_size, device, max_tokens=args.eval_tokens)
    if best_state is not None and best["loss"] < final["loss"]:
        model.load_state_dict(best_state)
        kept = best["step"]
    else:
        kept = step
    full = evaluate(model, test_tok, args.seq_len, args.batch_size, device, max_tokens=args.test_tokens or None)
    report = {
        "model": "Qwen3MoeForCausalLM", "config": {k: v for k, v in (TINY if args.tiny else MODEL).items()},
        "vocab_size": info["vocab_size"], "params": n_params, "expert_params": expert_params,
        "active_params_per_token": active, "steps": step, "kept_step": kept, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "tokens_seen": tokens_seen, "epochs": round(tokens_seen / len(train_tok), 2),
        "train_time_s": round(train_time, 1), "wall_time_s": round(wall, 1),
        "tokens_per_s": round(tokens_seen / max(train_time, 1e-9)), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "experts_implementation": args.experts_impl, "compile": args.compile,
        "reserved_documents": reserved,
        "balance": args.balance, "aux_coef": args.aux_coef if args.balance == "per-layer" else cfg.router_aux_loss_coef,
        "held_out": {"tokens": full["tokens"], "loss": round(full["loss"], 4),
                     "perplexity": round(full["perplexity"], 2),
                     "unigram_perplexity": round(unigram_perplexity(train_tok, test_tok, info["vocab_size"]), 2),
                     "selection_loss": round(best["loss"] if best_state is not None else final["loss"], 4),
                     "usage_entropy_normalized": full["usage_entropy"],
                     "max_expert_share": full["max_expert_share"], "min_expert_share": full["min_expert_share"],
                     "unused_experts": full["unused_experts"]},
        "history": history, "args": {k: str(v) for k, v in vars(args).items()},
    }
    return model, report


def save(model, report, out: Path, tokenizer_dir: Path) -> None:
    import torch

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, tmp / f.name)
    (tmp / "train_report.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m traces.small_moe.train", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("build/small_moe"), help="output of traces.small_moe.corpus")
    ap.add_argument("--tokenizer-dir", type=Path, default=Path("data/small_moe/tokenizer"))
    ap.add_argument("--out", type=Path, required=True, help="model directory to write (save_pretrained)")
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds of training steps")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps instead (tests)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--balance", choices=["pooled", "per-layer"], default="pooled",
                    help="load-balancing loss: transformers' own (pooled over layers, router_aux_loss_coef 0.01) "
                         "or per_layer_balance_loss with --aux-coef")
    ap.add_argument("--aux-coef", type=float, default=0.01, help="weight of the per-layer load-balancing loss")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-tokens", type=int, default=131072, help="held-out tokens per periodic evaluation")
    ap.add_argument("--test-tokens", type=int, default=0,
                    help="report on only this many held-out tokens (0 = all; dry runs)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--experts-impl", default="grouped_mm", choices=["eager", "grouped_mm", "batched_mm"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU tests)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reserve-docs", type=float, default=0.0, metavar="PCT",
                    help="leave out every round(100/PCT)-th training document (traces.small_moe.train_prompts: "
                         "prompts for the predictors' training trace come from them); 0 = train on all (default)")
    args = ap.parse_args(argv)
    if not (args.data / "corpus.json").exists():
        print(f"error: {args.data}: no corpus.json (run python -m traces.small_moe.corpus first)", file=sys.stderr)
        return 2
    model, report = train(args)
    save(model, report, args.out, args.tokenizer_dir)
    print(json.dumps({k: report[k] for k in ("steps", "kept_step", "tokens_seen", "epochs", "train_time_s",
                                             "tokens_per_s", "held_out")}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
