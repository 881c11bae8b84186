"""`python -m traces.record`: run a Hugging Face transformers MoE model and record its routing as a trace.

Forward hooks on the model's router modules capture, for the prefill and for every real decode step (greedy or
sampled, KV cache, one token per sequence per step), each MoE layer's top-k expert ids in the router's rank
order and their weights, optionally the MoE layer's input hidden state (float16), the full router logits and
the router weight matrices. Prompts are left-padded per batch; padded positions are not recorded.

--model takes: a directory saved with save_pretrained (config.json + weights); a config.json (or a directory
holding only one), which is initialised with random weights (--seed); or `tiny:FAMILY` (a tiny random model,
see traces/tracer/tiny.py).

--prompts takes a text file (one prompt per line) or JSONL ({"text": ...} or {"ids": [...]} per line). Without
it, --num-prompts random prompts of random length up to --prompt-len are drawn (seeded).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from traces.errors import TraceError, run_cli

LOGITS_DIR = "router_logits"


# -- model and prompts -------------------------------------------------------------------------------------------
def load_model(spec: str, *, device: str, dtype: str | None, seed: int):
    """(model, note) where note says whether the weights are trained or random."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    ]
    if spec.startswith("tiny:"):
        from traces.tracer.tiny import tiny_model

        try:
            model = tiny_model(spec.split(":", 1)[1], seed=seed, dtype=torch_dtype)
        except ValueError as exc:
            raise TraceError(str(exc), where="--model") from None
        return model.to(device), f"tiny random-weight {spec[5:]} model (seed {seed})"
    path = Path(spec)
    if not path.exists():
        raise TraceError("no such file or directory", path=path, where="--model")
    cfg_path = path if path.is_file() else path / "config.json"
    if not cfg_path.exists():
        raise TraceError("no config.json (expected a saved model directory or a config.json)", path=path)
    has_weights = path.is_dir() and any(path.glob("*.safetensors")) or (path.is_dir() and any(path.glob("*.bin")))
    try:
        if has_weights:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
            note = f"trained weights from {path}"
        else:
            torch.manual_seed(seed)
            config = AutoConfig.from_pretrained(cfg_path.parent if cfg_path.name == "config.json" else cfg_path)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
            note = f"random weights from the config {cfg_path} (seed {seed})"
    except (OSError, ValueError, KeyError) as exc:
        raise TraceError(f"cannot load the model: {exc}", path=path) from None
    return model.to(device).eval(), note


def load_tokenizer(spec: str | None):
    if spec is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise TraceError(f"cannot load a tokenizer: {exc}", path=spec) from None


def read_prompts(path: str, tokenizer, max_prompt_tokens: int | None) -> list[list[int]]:
    p = Path(path)
    if not p.exists():
        raise TraceError("no such file", path=p, where="--prompts")
    prompts: list[list[int]] = []
    jsonl = p.suffix == ".jsonl"
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"invalid JSON: {exc.msg}", path=p, where=f"line {lineno}") from None
            if "ids" in obj:
                ids = [int(x) for x in obj["ids"]]
            elif "text" in obj:
                text = obj["text"]
                ids = None
            else:
                raise TraceError("expected a 'text' or 'ids' key", path=p, where=f"line {lineno}")
        else:
            text, ids = line, None
        if ids is None:
            if tokenizer is None:
                raise TraceError("text prompts need a tokenizer (--tokenizer, or a model directory holding one)",
                                 path=p, where=f"line {lineno}")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens:
            ids = ids[:max_prompt_tokens]
        if not ids:
            raise TraceError("empty prompt", path=p, where=f"line {lineno}")
        prompts.append(ids)
    if not prompts:
        raise TraceError("no prompts in file", path=p)
    return prompts


def random_prompts(n: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(max(1, max_len // 2), max_len + 1, size=n)
    return [rng.integers(3, vocab, size=int(k)).tolist() for k in lens]


# -- metadata ------------------------------------------------------------------------------------------------
def _layer_prefix(name: str) -> str:
    parts = name.split(".")
    i = parts.index("layers")
    return ".".join(parts[: i + 2])


def model_geometry(model, sites) -> dict:
    """Bytes of one expert and of the dense part of each MoE layer, in the dtype the model runs in."""
    expert_bytes, dense_bytes = [], []
    for site in sites:
        moe = model.get_submodule(site.name.rsplit(".", 1)[0])
        experts = getattr(moe, "experts", None)
        if experts is None:
            raise TraceError(f"no 'experts' module beside the router {site.name}")
        e_bytes = sum(p.numel() * p.element_size() for p in experts.parameters())
        layer = model.get_submodule(_layer_prefix(site.name))
        l_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
        expert_bytes.append(int(math.ceil(e_bytes / site.n_experts)))
        dense_bytes.append(int(l_bytes - e_bytes))
    return {"expert_bytes": expert_bytes, "dense_bytes": dense_bytes}


def build_meta(model, sites, args, note: str, n_prompts: int):
    from traces.format import TraceMeta

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    geo = model_geometry(model, sites)
    model_layers = [s.model_layer for s in sites]
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    decoding = "greedy" if args.temperature <= 0 else f"sampling at temperature {args.temperature} (seed {args.seed})"
    capture = (
        f"traces.record: hooks on {type(sites[0].module).__name__} outputs ({note}); {n_prompts} prompts, "
        f"batch size {args.batch_size}, left padding (padded positions not recorded), prefill then "
        f"{args.max_new_tokens} real decode steps with KV cache, {decoding}; every generated token is fed back "
        f"once, so decode rows are positions P..P+N-1; ran in {dtype} on {args.device}"
        + ("; stops recording a sequence after its EOS" if args.stop_at_eos else "")
        + ("; hidden states = the MoE block's input (router input), float16" if args.hidden_states else "")
    )
    extra = {
        "family": config.model_type,
        "router_class": type(sites[0].module).__name__,
        "weights": "the router's own top-k weights as used to mix the expert outputs, in router rank order",
        "prompts": args.prompts or f"random ids, --num-prompts {args.num_prompts} --prompt-len {args.prompt_len}",
        "max_new_tokens": args.max_new_tokens,
    }
    if sites[0].rank_by == "sigmoid_bias":
        extra["rank_order"] = "router uses unsorted top-k; ids sorted by sigmoid(logits)+e_score_correction_bias"
    if args.router_logits:
        extra["router_logits"] = (
            f"{LOGITS_DIR}/layer_NNN.npy: float16 [rows_of_layer, n_experts], the router's logits (pre-softmax/"
            "sigmoid); row i belongs to the i-th routing row of that layer in file order (the same rows "
            "hidden_row indexes when hidden states are stored)"
        )
    biases = {}
    for s in sites:
        for attr in ("bias", "e_score_correction_bias"):
            t = getattr(s.module, attr, None)
            if t is not None and hasattr(t, "detach"):
                biases.setdefault(attr, []).append(t.detach().float().cpu().numpy().round(6).tolist())
    if biases:
        extra["router_biases"] = biases
    try:
        return TraceMeta(
            model=args.name or getattr(config, "_name_or_path", "") or config.model_type,
            source="python -m traces.record " + " ".join(shlex.quote(a) for a in args.argv),
            n_layers=len(sites),
            n_experts=sites[0].n_experts,
            top_k=sites[0].top_k,
            expert_bytes=geo["expert_bytes"],
            dense_bytes=geo["dense_bytes"],
            hidden_size=int(config.hidden_size),
            dtype=dtype,
            layer_ids=model_layers if model_layers != list(range(len(sites))) else None,
            license=args.license,
            attribution=args.attribution,
            capture=capture,
            extra=extra,
        )
    except ValueError as exc:
        raise TraceError(f"cannot describe this model as a trace: {exc}") from None


# -- recording -----------------------------------------------------------------------------------------------
def record(model, prompts, dst, meta, sites, *, args, tokenizer=None, meta_for=None) -> dict:
    """Record `prompts` batch by batch into `dst`. With `args.time_budget` (seconds, 0 = none) it stops before a
    batch that would overrun the budget (whole batches only); then the meta is `meta_for(n)` for the n prompts
    recorded, with extra recorded_prompts / offered_prompts."""
    import torch

    from traces.tracer.capture import RouterCapture
    from traces.tracer.generate import sorted_columns, trace_batch
    from traces.writer import TraceWriter

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    pad_id = (tokenizer.pad_token_id if tokenizer is not None else None)
    pad_id = pad_id if pad_id is not None else (config.pad_token_id if config.pad_token_id is not None else 0)
    eos_id = tokenizer.eos_token_id if tokenizer is not None else config.eos_token_id
    if isinstance(eos_id, list):
        eos_id = eos_id[0]
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.temperature > 0 else None
    generated = []
    logits_parts: dict[int, list[np.ndarray]] = {}
    budget = getattr(args, "time_budget", 0.0) or 0.0
    n_batches = math.ceil(len(prompts) / args.batch_size)
    t0 = time.perf_counter()
    done, batch_s = 0, []
    with TraceWriter(dst, meta, overwrite=args.overwrite) as w, RouterCapture(
        model, hidden=args.hidden_states, logits=args.router_logits, sites=sites
    ) as cap:
        for start in range(0, len(prompts), args.batch_size):
            elapsed = time.perf_counter() - t0
            if budget and batch_s and elapsed + max(batch_s) > budget:
                print(f"time budget: stopping after {len(batch_s)} of {n_batches} batches ({elapsed:.0f} s)",
                      file=sys.stderr)
                break
            ts = time.perf_counter()
            batch = prompts[start: start + args.batch_size]
            rows = trace_batch(model, cap, batch, max_new_tokens=args.max_new_tokens, pad_id=pad_id, eos_id=eos_id,
                               stop_at_eos=args.stop_at_eos, temperature=args.temperature, generator=gen)
            cols, extras = sorted_columns(rows, seq_offset=start)
            w.add(hidden=extras.get("hidden"), **cols)
            if "logits" in extras:
                for layer in np.unique(cols["layer"]):
                    logits_parts.setdefault(int(layer), []).append(extras["logits"][cols["layer"] == layer])
            generated.extend(rows.generated)
            done += len(batch)
            batch_s.append(time.perf_counter() - ts)
            if not args.quiet:
                print(f"batch {len(batch_s)}/{n_batches}: {len(cols['sequence'])} rows in {batch_s[-1]:.1f} s",
                      file=sys.stderr)
        if args.router_weights:
            for s in sites:
                w.set_router_weights(s.layer, s.module.weight.detach().float().cpu().numpy())
        if logits_parts:  # extra arrays go into the writer's temporary directory, so the rename stays atomic
            (w.tmp / LOGITS_DIR).mkdir()
            for layer, parts in logits_parts.items():
                np.save(w.tmp / LOGITS_DIR / f"layer_{layer:03d}.npy", np.concatenate(parts))
        if budget:  # the meta (written at close) says how many prompts were recorded
            m = meta_for(done) if meta_for is not None else w.meta
            w.meta = m.model_copy(update={"extra": {**m.extra, "recorded_prompts": done,
                                                    "offered_prompts": len(prompts)}})
        rows_total = w.rows
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(g) for g in generated[:3]]
    return {"out": str(dst), "rows": rows_total, "sequences": done, "offered": len(prompts),
            "generated_tokens": sum(map(len, generated)), "batches": len(batch_s),
            "batch_seconds": [round(x, 2) for x in batch_s], "seconds": round(time.perf_counter() - t0, 1),
            "samples": texts}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m traces.record", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="saved model directory, config.json, or tiny:FAMILY")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model directory when it holds one)")
    ap.add_argument("--out", required=True, help="trace directory to write")
    ap.add_argument("--prompts", help="text file (one prompt a line) or .jsonl with 'text' or 'ids'")
    ap.add_argument("--num-prompts", type=int, default=8, help="random prompts when --prompts is not given")
    ap.add_argument("--prompt-len", type=int, default=16, help="longest random prompt")
    ap.add_argument("--max-prompt-tokens", type=int, help="truncate prompts to this many tokens")
    ap.add_argument("--max-prompts", type=int, help="use only the first N prompts of --prompts")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds of recording: stop before a batch that would overrun it (whole batches; the "
                         "meta says how many prompts were recorded); 0 = record every prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--stop-at-eos", action="store_true", help="stop recording a sequence after it emits EOS")
    ap.add_argument("--hidden-states", action="store_true", help="store MoE-layer input hidden states (float16)")
    ap.add_argument("--router-weights", action="store_true", help="store each layer's router weight matrix")
    ap.add_argument("--router-logits", action="store_true", help=f"store full router logits under {LOGITS_DIR}/")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, else float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", help="model name for the trace's meta")
    ap.add_argument("--license", default="unspecified", help="license of the recorded model/data, for meta")
    ap.add_argument("--attribution", default="recorded with traces.record", help="attribution, for meta")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.batch_size < 1 or args.max_new_tokens < 0:
        raise TraceError("--batch-size must be >= 1 and --max-new-tokens >= 0")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise TraceError("--device cuda asked for, but torch sees no CUDA device")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    model, note = load_model(args.model, device=args.device, dtype=args.dtype, seed=args.seed)
    tok_spec = args.tokenizer
    if tok_spec is None and Path(args.model).is_dir() and (Path(args.model) / "tokenizer.json").exists():
        tok_spec = args.model
    tokenizer = load_tokenizer(tok_spec)
    from traces.tracer.routers import find_routers

    try:
        sites = find_routers(model)
    except ValueError as exc:
        raise TraceError(str(exc), where="--model") from None
    if args.prompts:
        prompts = read_prompts(args.prompts, tokenizer, args.max_prompt_tokens)[: args.max_prompts]
    else:
        vocab = model.config.get_text_config().vocab_size
        prompts = random_prompts(args.num_prompts, args.prompt_len, vocab, args.seed)
    meta = build_meta(model, sites, args, note, len(prompts))
    summary = record(model, prompts, args.out, meta, sites, args=args, tokenizer=tokenizer,
                     meta_for=lambda n: build_meta(model, sites, args, note, n))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['out']}: {summary['rows']} rows, {summary['sequences']} sequences, "
              f"{summary['generated_tokens']} generated tokens")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
