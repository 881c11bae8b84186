"""Record a large trace within a time budget: `traces.record`, batch after batch, until the prompts run out or
the next batch would overrun `--time-budget` seconds; the trace then holds the prompts recorded so far (whole
batches only) and its meta says how many.

    python -m traces.small_moe.record_many --time-budget 120 --model build/small_moe_model \
        --prompts /tmp/train_prompts.jsonl --max-prompt-tokens 24 --max-new-tokens 128 --batch-size 1024 \
        --temperature 0.8 --seed 1 --hidden-states --device cuda --name small-moe-qwen3moe-e32k4 --out /tmp/train

Every other flag is `python -m traces.record`'s, with the same meaning (the recording loop is the same:
traces.tracer.generate.trace_batch per batch, rows written through traces.writer.TraceWriter).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from traces.errors import run_cli


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--time-budget", type=float, default=0.0, help="seconds of recording (0 = no limit)")
    mine, rest = own.parse_known_args(argv)
    import torch

    from traces import record as rec
    from traces.tracer.capture import RouterCapture
    from traces.tracer.generate import sorted_columns, trace_batch
    from traces.tracer.routers import find_routers
    from traces.writer import TraceWriter

    args = rec.parse_args(rest)
    if args.router_logits:
        raise SystemExit("error: --router-logits is not supported here (use python -m traces.record)")
    t0 = time.perf_counter()
    model, note = rec.load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    tok_spec = args.tokenizer
    if tok_spec is None and Path(args.model).is_dir() and (Path(args.model) / "tokenizer.json").exists():
        tok_spec = args.model
    tokenizer = rec.load_tokenizer(tok_spec)
    sites = find_routers(model)
    if not args.prompts:
        raise SystemExit("error: --prompts is required")
    prompts = rec.read_prompts(args.prompts, tokenizer, args.max_prompt_tokens)[: args.max_prompts]
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else (
        config.pad_token_id if config.pad_token_id is not None else 0)
    eos_id = tokenizer.eos_token_id if tokenizer is not None else config.eos_token_id
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.temperature > 0 else None
    n_batches = math.ceil(len(prompts) / args.batch_size)
    done, batch_s = 0, []
    with TraceWriter(args.out, rec.build_meta(model, sites, args, note, len(prompts)),
                     overwrite=args.overwrite) as w, RouterCapture(model, hidden=args.hidden_states,
                                                                   sites=sites) as cap:
        for b, start in enumerate(range(0, len(prompts), args.batch_size)):
            elapsed = time.perf_counter() - t0
            if mine.time_budget and batch_s and elapsed + max(batch_s) > mine.time_budget:
                print(f"time budget: stopping after {b} of {n_batches} batches ({elapsed:.0f} s)", file=sys.stderr)
                break
            ts = time.perf_counter()
            batch = prompts[start: start + args.batch_size]
            rows = trace_batch(model, cap, batch, max_new_tokens=args.max_new_tokens, pad_id=pad_id, eos_id=eos_id,
                               stop_at_eos=args.stop_at_eos, temperature=args.temperature, generator=gen)
            cols, extras = sorted_columns(rows, seq_offset=start)
            w.add(hidden=extras.get("hidden"), **cols)
            done += len(batch)
            batch_s.append(time.perf_counter() - ts)
            print(f"batch {b + 1}/{n_batches}: {len(cols['sequence'])} rows in {batch_s[-1]:.1f} s", file=sys.stderr)
        if args.router_weights:
            for s in sites:
                w.set_router_weights(s.layer, s.module.weight.detach().float().cpu().numpy())
        # the meta is written at close: say how many prompts were recorded
        w.meta = rec.build_meta(model, sites, args, note, done)
        import shlex

        w.meta = w.meta.model_copy(update={
            "source": "python -m traces.small_moe.record_many " + " ".join(shlex.quote(a) for a in argv),
            "extra": {**w.meta.extra, "recorded_prompts": done, "offered_prompts": len(prompts)}})
        rows_total = w.rows
    print(json.dumps({"out": str(args.out), "rows": rows_total, "sequences": done, "offered": len(prompts),
                      "batches": len(batch_s), "batch_seconds": [round(x, 2) for x in batch_s],
                      "seconds": round(time.perf_counter() - t0, 1),
                      "tokens": int(rows_total // max(1, len(sites)))}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
