"""FLAME-MoE-Traces `.pt` files (a folder of per-layer files) -> trace, read without torch.

Two layouts, told apart by each file's own fields (docs/trace-format.md, "flame"):

* stream files (`num_sequences`, `sequence_length`, `num_tokens`): one file per MoE layer holding N tokens
  in order; token i is sequence i // sequence_length, position i % sequence_length.
* per-position files (`token_position`): one file per (layer, position) holding that position of every
  sequence; row j is sequence j. Sub-folder names (1st, 2nd, ...) are only cross-checked.

Both are forward passes over training text, so the phase is `teacher_forced` and token ids come from
`samples`. The model's own layer ids (2..9 for FLAME-MoE-290M) are kept in meta.layer_ids; the trace numbers
the MoE layers 0..n-1 in increasing model order. `scores` are softmax probabilities over all routed experts,
stored as the weights unchanged (not renormalized over the top-k).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from traces.errors import TraceError
from traces.format import Irregularity
from traces.importers._common import add_common_arguments, build_meta, finish_meta, missing_layer_irregularities, write
from traces.importers.ptfile import load_pt

# Published FLAME-MoE configurations. Source: the FLAME-MoE release script scripts/release/flame-moe-290m.sh
# (github.com/cmu-flame/FLAME-MoE): NUM_LAYERS=9, HIDDEN_SIZE=1024, MOE_FFN_HIDDEN_SIZE=704,
# MOE_LAYER_FREQ="[0]*1+[1]*8", TRAIN_ITERS=5473 (the files' epoch5473 is this final checkpoint); the model
# arguments in scripts/training/flame-moe.sh: SwiGLU, no linear biases, 16 attention heads, 64 experts,
# shared-expert intermediate size 2 * MOE_FFN_HIDDEN_SIZE, bf16 weights.
FLAME_CONFIGS = {
    "flame-moe-290m": {
        "hidden_size": 1024,
        "moe_ffn_hidden_size": 704,
        "shared_expert_intermediate_size": 2 * 704,
        "num_layers": 9,
        "moe_layer_ids": list(range(2, 10)),  # Megatron numbers layers from 1; layer 1 is dense
        "n_experts": 64,
        "top_k": 6,
        "source": "github.com/cmu-flame/FLAME-MoE scripts/release/flame-moe-290m.sh and "
                  "scripts/training/flame-moe.sh",
    },
}
BF16 = 2


def expert_bytes_of(cfg: dict) -> int:
    """A SwiGLU expert has gate, up and down projections: 3 * hidden * ffn weights, bf16."""
    return 3 * cfg["hidden_size"] * cfg["moe_ffn_hidden_size"] * BF16


def dense_bytes_of(cfg: dict) -> int:
    """Per MoE layer, what stays resident besides the routed experts: attention (Q, K, V, O, no GQA:
    4 * hidden^2), the shared experts (SwiGLU, 3 * hidden * shared_intermediate), the router (n_experts * hidden)
    and two RMSNorm vectors, all bf16. An estimate from the published shapes, not a measured size."""
    h = cfg["hidden_size"]
    return (4 * h * h + 3 * h * cfg["shared_expert_intermediate_size"] + cfg["n_experts"] * h + 2 * h) * BF16


DEFAULT_SOURCE = ("github.com/Akash-N-Pai/DynaNDE-Simulator commit f274466, a sample of the Hugging Face dataset "
                  "CMU-FLAME/FLAME-MoE-Traces")
DEFAULT_LICENSE = "Apache-2.0"
DEFAULT_ATTRIBUTION = ("FLAME-MoE-Traces, CMU FLAME (Hao Kang, Zichun Yu, Chenyan Xiong; FLAME-MoE, "
                       "arXiv:2505.20225), Apache-2.0; sample files from github.com/Akash-N-Pai/DynaNDE-Simulator")
_ORDINAL = re.compile(r"^(\d+)(st|nd|rd|th)$")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_common_arguments(ap)
    ap.add_argument("--expert-bytes", type=int, help="bytes of one expert (required for models not in the "
                                                     "built-in FLAME-MoE table)")
    ap.add_argument("--dense-bytes", type=int, help="bytes of the dense part of one MoE layer")
    ap.add_argument("--n-experts", type=int, help="routed experts per layer (default: from the model's config)")


def _field(d: dict, name: str, path: Path):
    if name not in d:
        raise TraceError(f"missing field '{name}'", path=path)
    return d[name]


def _int_field(d: dict, name: str, path: Path) -> int:
    value = _field(d, name, path)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise TraceError(f"field '{name}' must be an integer, got {type(value).__name__}", path=path)
    return int(value)


def _load(path: Path) -> dict:
    d = load_pt(path)
    if not isinstance(d, dict):
        raise TraceError(f"expected a dict at the top of the pickle, got {type(d).__name__}", path=path)
    samples = _field(d, "samples", path)
    indices = _field(d, "indices", path)
    scores = _field(d, "scores", path)
    for name, arr, ndim in (("samples", samples, 1), ("indices", indices, 2), ("scores", scores, 2)):
        if not isinstance(arr, np.ndarray) or arr.ndim != ndim:
            raise TraceError(f"field '{name}' must be a {ndim}-d tensor", path=path)
    if samples.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
        raise TraceError("fields 'samples' and 'indices' must be integer tensors", path=path)
    if scores.dtype.kind != "f":
        raise TraceError("field 'scores' must be a float tensor", path=path)
    if not (len(samples) == indices.shape[0] == scores.shape[0]) or indices.shape != scores.shape:
        raise TraceError(f"shapes disagree: samples {list(samples.shape)}, indices {list(indices.shape)}, "
                         f"scores {list(scores.shape)}", path=path)
    if indices.shape[0] == 0 or indices.shape[1] == 0:
        raise TraceError(f"no routing rows (indices shape {list(indices.shape)})", path=path)
    d["layer"] = _int_field(d, "layer", path)
    return d


def _validate_rows(d: dict, path: Path, n_experts: int) -> None:
    idx, sc = d["indices"], d["scores"]
    bad = ((idx < 0) | (idx >= n_experts)).any(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(f"expert id outside 0..{n_experts - 1}: {idx[i].tolist()}", path=path,
                         where=f"field 'indices' row {i}")
    srt = np.sort(idx, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
    if dup.any():
        i = int(np.argmax(dup))
        raise TraceError(f"expert ids not distinct: {idx[i].tolist()}", path=path, where=f"field 'indices' row {i}")
    bad = (~np.isfinite(sc) | (sc < 0)).any(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(f"scores must be finite and non-negative: {sc[i].tolist()}", path=path,
                         where=f"field 'scores' row {i}")


def run(src, dst, args: argparse.Namespace) -> Path:
    src = Path(src)
    if not src.is_dir():
        raise TraceError("expected a folder of per-layer FLAME .pt files, got a file", path=src)
    files = sorted(p for p in src.rglob("*.pt") if p.is_file())
    if not files:
        raise TraceError("no .pt files in this folder (expected FLAME-MoE per-layer trace files)", path=src)
    loaded = [(p, _load(p)) for p in files]
    positional = [(p, d) for p, d in loaded if "token_position" in d]
    streams = [(p, d) for p, d in loaded if "token_position" not in d]
    if positional and streams:
        raise TraceError(f"mixes stream files (e.g. {streams[0][0].relative_to(src)}) and per-position files "
                         f"(e.g. {positional[0][0].relative_to(src)}); import each folder separately", path=src)
    models = {str(d.get("model", "")) for _, d in loaded}
    if len(models) > 1:
        raise TraceError(f"files of different models: {sorted(models)}", path=src, where="field 'model'")
    model = models.pop() or src.name
    ks = {d["indices"].shape[1] for _, d in loaded}
    if len(ks) > 1:
        raise TraceError(f"files disagree on top-k: {sorted(ks)}", path=src, where="field 'indices'")
    k = ks.pop()
    cfg = FLAME_CONFIGS.get(model.lower())
    n_experts = args.n_experts or (cfg["n_experts"] if cfg else None)
    if n_experts is None:
        n_experts = int(max(d["indices"].max() for _, d in loaded)) + 1
    for p, d in loaded:
        _validate_rows(d, p, n_experts)
    irregularities: list[Irregularity] = []

    if streams:
        layout = "stream"
        by_layer: dict[int, tuple[Path, dict]] = {}
        for p, d in streams:
            if d["layer"] in by_layer:
                raise TraceError(f"two files for model layer {d['layer']}: {by_layer[d['layer']][0].name} and "
                                 f"{p.name}", path=src)
            n_seq = _int_field(d, "num_sequences", p)
            seq_len = _int_field(d, "sequence_length", p)
            n = len(d["samples"])
            if n_seq * seq_len != n or n_seq <= 0:
                raise TraceError(f"num_sequences {n_seq} x sequence_length {seq_len} != {n} rows", path=p,
                                 where="field 'num_sequences'")
            if "num_tokens" in d and _int_field(d, "num_tokens", p) != n:
                raise TraceError(f"num_tokens {d['num_tokens']} != {n} rows", path=p, where="field 'num_tokens'")
            by_layer[d["layer"]] = (p, d)
        model_layers = sorted(by_layer)
        p0, d0 = by_layer[model_layers[0]]
        for lay in model_layers[1:]:
            p, d = by_layer[lay]
            if len(d["samples"]) != len(d0["samples"]) or d["sequence_length"] != d0["sequence_length"]:
                raise TraceError(f"layer {lay} has {len(d['samples'])} tokens in sequences of "
                                 f"{d['sequence_length']}, layer {model_layers[0]} has {len(d0['samples'])} in "
                                 f"{d0['sequence_length']}", path=p)
            if not np.array_equal(d["samples"], d0["samples"]):
                i = int(np.argmax(d["samples"] != d0["samples"]))
                raise TraceError(f"token ids differ from {p0.name} (same tokens expected in every layer)", path=p,
                                 where=f"field 'samples' row {i}")
        seq_len = int(d0["sequence_length"])
        n = len(d0["samples"])
        parts = []
        for li, lay in enumerate(model_layers):
            d = by_layer[lay][1]
            i = np.arange(n)
            parts.append((i // seq_len, i % seq_len, np.full(n, li), d["samples"], d["indices"], d["scores"]))
        facts = {"num_sequences": int(d0["num_sequences"]), "sequence_length": seq_len, "num_tokens": n}
    else:
        layout = "per_position"
        by_key: dict[tuple[int, int], tuple[Path, dict]] = {}
        for p, d in positional:
            pos = _int_field(d, "token_position", p)
            if pos < 0:
                raise TraceError(f"negative token_position {pos}", path=p, where="field 'token_position'")
            key = (d["layer"], pos)
            if key in by_key:
                raise TraceError(f"two files for model layer {key[0]} position {key[1]}: "
                                 f"{by_key[key][0].relative_to(src)} and {p.relative_to(src)}", path=src)
            by_key[key] = (p, d)
            m = _ORDINAL.match(p.parent.name)
            if m and int(m.group(1)) != pos + 1:
                irregularities.append(Irregularity(
                    kind="folder_name_mismatch",
                    detail=f"{p.relative_to(src)} is in folder {p.parent.name!r} but its token_position is {pos}; "
                           f"the file's own field is used"))
        model_layers = sorted({lay for lay, _ in by_key})
        positions = sorted({pos for _, pos in by_key})
        n_seq = {len(d["samples"]) for _, d in by_key.values()}
        if len(n_seq) > 1:
            raise TraceError(f"per-position files disagree on the number of sequences: {sorted(n_seq)}", path=src,
                             where="field 'samples'")
        n = n_seq.pop()
        for pos in positions:
            ref = None
            for lay in model_layers:
                if (lay, pos) not in by_key:
                    continue
                p, d = by_key[(lay, pos)]
                if ref is None:
                    ref = (p, d)
                elif not np.array_equal(d["samples"], ref[1]["samples"]):
                    i = int(np.argmax(d["samples"] != ref[1]["samples"]))
                    raise TraceError(f"token ids differ from {ref[0].relative_to(src)} at the same position",
                                     path=p, where=f"field 'samples' row {i}")
        parts = []
        for (lay, pos), (_p, d) in sorted(by_key.items()):
            li = model_layers.index(lay)
            parts.append((np.arange(n), np.full(n, pos), np.full(n, li), d["samples"], d["indices"], d["scores"]))
        facts = {"num_sequences": n, "token_positions": positions}
        missing = [(lay, pos) for lay in model_layers for pos in positions if (lay, pos) not in by_key]
        if missing:
            irregularities.append(Irregularity(
                kind="missing_files", count=len(missing),
                detail=f"no file for {len(missing)} (model layer, position) pairs, first {missing[0]}; those rows "
                       f"are absent"))

    # identical routing in two layers: the original repository had byte-identical copies of layers 2..9
    layer_routing: dict[int, list[np.ndarray]] = {}
    for part in parts:
        layer_routing.setdefault(int(part[2][0]), []).append(part[4])
    first_seen: dict[bytes, int] = {}
    for li in sorted(layer_routing):
        digest = np.concatenate(layer_routing[li]).tobytes()
        if digest in first_seen:
            irregularities.append(Irregularity(
                kind="identical_layers",
                detail=f"model layer {model_layers[li]} routes exactly like model layer "
                       f"{model_layers[first_seen[digest]]} (copied file?); kept as is"))
        else:
            first_seen[digest] = li
    if cfg and model_layers != cfg["moe_layer_ids"]:
        irregularities.append(Irregularity(
            kind="layer_ids",
            detail=f"files cover model layers {model_layers}; the published config has MoE layers "
                   f"{cfg['moe_layer_ids']}"))

    if args.expert_bytes is not None:
        if args.expert_bytes <= 0:
            raise TraceError("--expert-bytes must be positive", where="--expert-bytes")
        eb, size_note = args.expert_bytes, "expert_bytes given on the command line"
    elif cfg:
        eb = expert_bytes_of(cfg)
        size_note = (f"expert_bytes = 3 * hidden {cfg['hidden_size']} * moe_ffn_hidden {cfg['moe_ffn_hidden_size']} "
                     f"* 2 bytes (SwiGLU expert, bf16); config from {cfg['source']}")
    else:
        raise TraceError(f"model {model!r} is not in the built-in FLAME-MoE table ({', '.join(FLAME_CONFIGS)}): "
                         f"pass --expert-bytes N", where="--expert-bytes")
    db = args.dense_bytes if args.dense_bytes is not None else (dense_bytes_of(cfg) if cfg else None)

    seq, position, layer, token, experts, weights = (np.concatenate([p[i] for p in parts]) for i in range(6))
    L = len(model_layers)
    irregularities += missing_layer_irregularities(seq, np.full(len(seq), "teacher_forced"), position, layer, L)
    sums = weights.sum(axis=1)
    first = loaded[0][1]
    fields = {
        "model": model,
        "source": f"{DEFAULT_SOURCE}; folder {src.name}",
        "n_layers": L,
        "n_experts": n_experts,
        "top_k": k,
        "expert_bytes": [eb] * L,
        "dense_bytes": [db] * L if db is not None else None,
        "hidden_size": cfg["hidden_size"] if cfg else None,
        "dtype": "bfloat16" if cfg else None,
        "layer_ids": model_layers,
        "license": DEFAULT_LICENSE,
        "attribution": DEFAULT_ATTRIBUTION,
        "capture": ("FLAME-MoE forward passes over pretraining text (teacher-forced: token ids are the dataset's "
                    "text, not generated). weights are the router's softmax probabilities over all "
                    f"{n_experts} routed experts for the top-{k} chosen ones, stored unchanged (NOT renormalized "
                    f"over the top-k; rows sum to {sums.min():.2f}..{sums.max():.2f}). The always-active shared "
                    "experts are not in the files (their bytes are counted in dense_bytes). Trace layers 0..n-1 "
                    "are the model's MoE layers in meta.layer_ids."),
        "irregularities": irregularities,
        "extra": {
            "importer": "flame",
            "layout": layout,
            "weights": "softmax probabilities over all routed experts (pre-top-k), not renormalized",
            "sizes": size_note + ("; dense_bytes = bf16 attention (4*h*h) + shared experts (3*h*2*ffn) + router "
                                  "(E*h) + 2 RMSNorm (h), an estimate from the config" if db is not None and
                                  args.dense_bytes is None else ""),
            "runid": first.get("runid"),
            "epoch": first.get("epoch"),
            "shards": first.get("shards"),
            **facts,
        },
    }
    meta = build_meta(finish_meta(fields, args), src)
    columns = {"sequence": seq, "phase": np.full(len(seq), "teacher_forced"), "position": position, "layer": layer,
               "experts": experts, "weights": weights.astype(np.float32), "token_id": token}
    return write(dst, meta, columns, overwrite=args.overwrite, src=src)
