"""vLLM-style JSON lines -> trace.

One JSON object per routed token and layer, ordered problem -> layer -> token:

    {"dataset": "humaneval", "problem_id": 0, "layer": 0, "experts": [6, 5], "gating_probs": [0.69, 0.31],
     "token_idx": 0}

Mapping: problem_id -> sequence (when the file holds several datasets, sequences are numbered by first
appearance of (dataset, problem_id) and the mapping is kept in meta.extra.sequences); every record is a
generated token, so phase = decode and position = token_idx; experts (top first) -> experts; gating_probs
(renormalized top-k) -> weights; token ids are not in the format (null). Expert sizes are not in the data:
--expert-bytes is required; --n-experts defaults to the largest expert id seen + 1 (recorded as inferred).
Captures drop records, so per-layer streams may differ in length: reported in meta.json and on stderr, kept.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from traces.errors import TraceError
from traces.format import Irregularity
from traces.importers._common import add_common_arguments, build_meta, finish_meta, missing_layer_irregularities, write

FIELDS = ("problem_id", "layer", "experts", "gating_probs", "token_idx")
INT32_MAX = 2**31 - 1


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_common_arguments(ap)
    ap.add_argument("--expert-bytes", type=int, help="bytes of one expert (required: the format carries no sizes)")
    ap.add_argument("--dense-bytes", type=int, help="bytes of the dense part of one MoE layer (optional)")
    ap.add_argument("--n-experts", type=int, help="routed experts per layer (default: largest id seen + 1)")
    ap.add_argument("--n-layers", type=int, help="MoE layers (default: largest layer id seen + 1)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse(path: Path) -> dict:
    """Read every line; TraceError names the first bad line and field."""
    problem, layer, token, experts, probs, datasets = [], [], [], [], [], []
    k = None
    try:
        fh = path.open("r", encoding="utf-8")
    except IsADirectoryError:
        raise TraceError("expected a .jsonl file, got a directory", path=path) from None
    with fh:
        try:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"line {line_no}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"invalid JSON: {exc.msg} (column {exc.colno})", path=path, where=where) from None
                if not isinstance(rec, dict):
                    raise TraceError(f"expected a JSON object, got {type(rec).__name__}", path=path, where=where)
                for f in FIELDS:
                    if f not in rec:
                        raise TraceError(f"missing field '{f}'", path=path, where=where)
                for f in ("problem_id", "layer", "token_idx"):
                    v = rec[f]
                    if not _is_int(v) or v < 0 or v > INT32_MAX:
                        raise TraceError(f"field '{f}' must be a non-negative integer, got {v!r}", path=path,
                                         where=where)
                ex, gp = rec["experts"], rec["gating_probs"]
                if not isinstance(ex, list) or not ex or not all(_is_int(e) and 0 <= e < 2**15 for e in ex):
                    raise TraceError(f"field 'experts' must be a non-empty list of expert ids, got {ex!r}"[:200],
                                     path=path, where=where)
                if k is None:
                    k = len(ex)
                if len(ex) != k:
                    raise TraceError(f"field 'experts' has {len(ex)} ids, earlier records have {k}", path=path,
                                     where=where)
                if len(set(ex)) != k:
                    raise TraceError(f"field 'experts' has repeated ids: {ex}", path=path, where=where)
                if not isinstance(gp, list) or len(gp) != k or not all(
                        _is_num(g) and math.isfinite(g) and g >= 0 for g in gp):
                    raise TraceError(f"field 'gating_probs' must be {k} finite non-negative numbers, got {gp!r}"[:200],
                                     path=path, where=where)
                ds = rec.get("dataset", "")
                datasets.append(ds if isinstance(ds, str) else json.dumps(ds))
                problem.append(rec["problem_id"])
                layer.append(rec["layer"])
                token.append(rec["token_idx"])
                experts.append(ex)
                probs.append(gp)
        except UnicodeDecodeError as exc:
            raise TraceError(f"not UTF-8 text ({exc.reason})", path=path) from None
    if not problem:
        raise TraceError("empty file (no JSON records)", path=path)
    return {"problem": np.asarray(problem, dtype=np.int64), "layer": np.asarray(layer, dtype=np.int64),
            "token": np.asarray(token, dtype=np.int64), "experts": np.asarray(experts, dtype=np.int64),
            "probs": np.asarray(probs, dtype=np.float64), "dataset": np.asarray(datasets, dtype=object), "k": k}


def run(src, dst, args: argparse.Namespace) -> Path:
    path = Path(src)
    if args.expert_bytes is None:
        raise TraceError("the vllm-jsonl format carries no expert sizes: pass --expert-bytes N (bytes of one "
                         "expert) and optionally --n-experts N", where="--expert-bytes")
    if args.expert_bytes <= 0:
        raise TraceError("--expert-bytes must be positive", where="--expert-bytes")
    rec = parse(path)
    k = rec["k"]
    max_id = int(rec["experts"].max())
    irregularities: list[Irregularity] = []
    if args.n_experts is not None:
        n_experts = args.n_experts
        if max_id >= n_experts:
            line = int(np.argmax((rec["experts"] >= n_experts).any(axis=1)))
            raise TraceError(f"expert id {max_id} outside 0..{n_experts - 1} (--n-experts {n_experts})", path=path,
                             where=f"record {line + 1} field 'experts'")
        n_note = "given with --n-experts"
    else:
        n_experts = max_id + 1
        n_note = "inferred as the largest expert id seen + 1 (may undercount experts never routed to)"
    if k > n_experts:
        raise TraceError(f"top-k {k} exceeds n_experts {n_experts}", path=path, where="--n-experts")
    layer = rec["layer"]
    layer_ids = None
    if args.n_layers is not None:
        n_layers = args.n_layers
        if layer.max() >= n_layers:
            i = int(np.argmax(layer >= n_layers))
            raise TraceError(f"layer {layer[i]} outside 0..{n_layers - 1} (--n-layers {n_layers})", path=path,
                             where=f"record {i + 1} field 'layer'")
        absent = np.setdiff1d(np.arange(n_layers), layer)
    else:
        # MoE layers are often numbered by the model's layer index (dense layers first): ids lo..hi become
        # trace layers 0..n-1 and the model's ids are kept in meta.layer_ids; a gap is an error, not a shift
        lo, hi = int(layer.min()), int(layer.max())
        n_layers = hi - lo + 1
        absent = np.setdiff1d(np.arange(lo, hi + 1), layer)
        if lo > 0 and not len(absent):
            layer_ids = list(range(lo, hi + 1))
            layer = layer - lo
    if len(absent):
        raise TraceError(f"no records at all for layer(s) {absent[:10].tolist()}; every MoE layer must have "
                         f"records (pass --n-layers N if layer ids are 0..N-1)", path=path, where="field 'layer'")
    rec["layer"] = layer

    # sequences: problem_id, or (dataset, problem_id) numbered by first appearance when several datasets mix
    datasets = rec["dataset"]
    uniq_ds = list(dict.fromkeys(datasets.tolist()))
    extra_seq = None
    if len(uniq_ds) <= 1:
        seq = rec["problem"]
    else:
        pairs = list(zip(datasets.tolist(), rec["problem"].tolist()))
        ids = {p: i for i, p in enumerate(dict.fromkeys(pairs))}
        seq = np.asarray([ids[p] for p in pairs], dtype=np.int64)
        extra_seq = [{"sequence": i, "dataset": d, "problem_id": p} for (d, p), i in ids.items()]

    # duplicates of (sequence, layer, token_idx) cannot be represented: refuse them, naming the record
    key = np.stack([seq, rec["layer"], rec["token"]], axis=1)
    order = np.lexsort((key[:, 2], key[:, 1], key[:, 0]))
    sk = key[order]
    dup = np.flatnonzero((sk[1:] == sk[:-1]).all(axis=1))
    if len(dup):
        i = int(max(order[dup[0]], order[dup[0] + 1]))
        raise TraceError(f"duplicate record for problem {rec['problem'][i]} layer {rec['layer'][i]} token_idx "
                         f"{rec['token'][i]}", path=path, where=f"record {i + 1}")

    # per-layer stream lengths per sequence: report differences (dropped records), keep the data as it is
    used, inv = np.unique(seq, return_inverse=True)
    c = np.zeros((len(used), n_layers), dtype=np.int64)
    np.add.at(c, (inv.ravel(), rec["layer"]), 1)
    uneven_idx = np.flatnonzero(c.min(axis=1) != c.max(axis=1))
    uneven = used[uneven_idx]
    if len(uneven):
        s = int(uneven[0])
        row = c[uneven_idx[0]]
        irregularities.append(Irregularity(
            kind="stream_length_mismatch", count=int(len(uneven)),
            detail=(f"{len(uneven)} of {len(used)} sequences have per-layer streams of different lengths (records "
                    f"dropped by the capture; kept, not padded); first: sequence {s} has {row.min()}..{row.max()} "
                    f"records per layer (shortest layer {int(np.argmin(row))})"),
        ))
    total = int(c.sum())
    expected = int((c.max(axis=1) * n_layers).sum())
    if total != expected:
        irregularities.append(Irregularity(
            kind="dropped_records", count=expected - total,
            detail=f"{expected - total} records missing against the longest layer stream of each sequence"))
    irregularities += missing_layer_irregularities(seq, np.full(len(seq), "decode"), rec["token"], rec["layer"],
                                                   n_layers)
    sums = rec["probs"].sum(axis=1)
    fields = {
        "model": "unknown (pass --model)",
        "source": f"vLLM-style JSON lines capture {path.name}",
        "n_layers": n_layers,
        "n_experts": n_experts,
        "top_k": k,
        "expert_bytes": [args.expert_bytes] * n_layers,
        "dense_bytes": [args.dense_bytes] * n_layers if args.dense_bytes is not None else None,
        "layer_ids": layer_ids,
        "license": "unknown (not given at import; pass --license)",
        "attribution": "unknown (not given at import; pass --attribution)",
        "capture": ("vLLM-style JSON lines: every record is a generated token, imported as phase decode with "
                    "position = token_idx; gating_probs (renormalized top-k weights) stored as weights; token ids "
                    f"not in the format. Weight sums {sums.min():.3f}..{sums.max():.3f}."),
        "irregularities": irregularities,
        "extra": {"importer": "vllm-jsonl", "source_file": path.name, "datasets": uniq_ds, "n_experts": n_note,
                  "expert_bytes": "given with --expert-bytes"},
    }
    if extra_seq is not None:
        fields["extra"]["sequences"] = extra_seq
    meta = build_meta(finish_meta(fields, args), path)
    columns = {"sequence": seq, "phase": np.full(len(seq), "decode"), "position": rec["token"],
               "layer": rec["layer"], "experts": rec["experts"], "weights": rec["probs"], "token_id": None}
    return write(dst, meta, columns, overwrite=args.overwrite, src=path)
