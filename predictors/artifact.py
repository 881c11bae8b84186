"""Predictor artifacts: one .npz file per trained predictor.

Layout (numpy's .npz, readable with `np.load(path)`):
    __header__   0-d unicode array holding a JSON object:
                   format      "moe-offload-sim predictor artifact"
                   version     2 (1: before the skip path and float16 weights were documented; version-1
                               artifacts load unchanged, and this reader refuses only versions newer than its own;
                               the first artifacts with `ws` and float16, from the 2026-11-29 device call, still
                               say 1, which is harmless: readers go by the arrays present, not by the version)
                   predictor   registered name (make_predictor(predictor, **params) rebuilds it)
                   params      constructor parameters (JSON values)
                   distance    the distance it was trained for (the --distance of `predictors.train`)
                   trace       {path, model, n_layers, n_experts, top_k, hidden_size, has_hidden_states,
                               routing_sha256 (content hash of routing.parquet), prompts (meta.extra.prompts),
                               source (meta.source), n_sequences, n_rows}: the trace it was fit on
                   split       {kind, fraction, seed, train, eval, cut, folds, fold}: exactly which sequences (and
                               positions) it was fit on; evaluated on the same trace (same routing_sha256), the
                               artifact scores split.eval only; kind "all" (--split 1.0) holds nothing out and
                               is refused on its own trace
                   fit         {sequences, tokens, rows}: what the fit read (token positions, routing rows)
                   sequence_fingerprints  one short content hash per training sequence (token ids, positions,
                               routing): evaluating on another trace refuses any sequence that has one of these
                   n_params    learned parameters in total
                   command     the command line that made it
    <name>       every array of predictor.get_state(), e.g. "l3_d1/w1" (learned networks: layer 3, distance 1,
                 first weight matrix [in, units]) or "prob_d2" (cross_layer: [L, E, E] transition probabilities).
                 A learned network "lL_dD/" holds mu, sigma (input standardization, learned_mlp), w1, b1, w2, b2
                 and, since version 2, optionally ws [in, experts]: the linear skip path from the standardized
                 input straight to the scores (learned_mlp `skip=true`; absent = no skip path, the network
                 runs as before). Weight matrices (w1, w2, ws) may be stored as float16 (learned_mlp
                 `weights_dtype="float16"`, its default since version 2: half the size; biases, mu and sigma stay
                 float32); readers convert them to float32 (`_torchfit.unpack`), so a float16 artifact predicts
                 exactly as the fitted predictor, which rounds its weights the same way after the fit.

Written to a temporary name in the same folder and renamed, so a crash leaves no half-written artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from predictors.base import Predictor
from predictors.registry import make_predictor
from traces.atomic import atomic_write

FORMAT = "moe-offload-sim predictor artifact"
VERSION = 2  # 2: optional "ws" skip path and float16 weight matrices in learned networks


def save_artifact(path: str | os.PathLike, predictor: Predictor, header: dict) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: artifacts are .npz files; name it *.npz")
    state = {k: np.asarray(v) for k, v in predictor.get_state().items()}
    if "__header__" in state:
        raise ValueError("a predictor state may not use the name __header__")
    head = {"format": FORMAT, "version": VERSION, "predictor": predictor.name, "params": predictor.params,
            "n_params": int(sum(v.size for v in state.values()))}
    head.update(header)
    return atomic_write(
        path, lambda tmp: np.savez_compressed(tmp, __header__=np.array(json.dumps(head, sort_keys=True)), **state),
        suffix=".tmp.npz")


def read_header(path: str | os.PathLike) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return _header(z, path)


def _header(z, path) -> dict:
    if "__header__" not in z.files:
        raise ValueError(f"{path}: not a predictor artifact (no __header__)")
    head = json.loads(str(z["__header__"]))
    if head.get("format") != FORMAT:
        raise ValueError(f"{path}: not a predictor artifact (format {head.get('format')!r})")
    if head.get("version", 0) > VERSION:
        raise ValueError(f"{path}: artifact version {head['version']} is newer than this reader ({VERSION})")
    return head


def load_artifact(path: str | os.PathLike) -> tuple[Predictor, dict]:
    """Rebuild the predictor saved at `path`; returns (predictor, header)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "no such artifact", str(path))
    with np.load(path, allow_pickle=False) as z:
        head = _header(z, path)
        state = {k: z[k] for k in z.files if k != "__header__"}
    predictor = make_predictor(head["predictor"], **head.get("params", {}))
    predictor.set_state(state)
    return predictor, head


def routing_sha256(trace_path: str | os.PathLike) -> str:
    """Content hash of a trace's routing.parquet (what identifies the trace's sequences)."""
    h = hashlib.sha256()
    with open(Path(trace_path) / "routing.parquet", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sequence_fingerprint(seq) -> str:
    """16 hex digits identifying a sequence by its content: token ids, positions and routing of every position."""
    h = hashlib.sha1(np.asarray(seq.token_ids, dtype="<i8").tobytes())
    h.update(np.asarray(seq.positions, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(seq.experts, dtype="<i2").tobytes())
    return h.hexdigest()[:16]


def trace_identity(trace) -> dict:
    """The `trace` part of an artifact header."""
    meta = trace.meta
    return {"path": str(trace.path), "model": meta.model, "n_layers": meta.n_layers, "n_experts": meta.n_experts,
            "top_k": meta.top_k, "hidden_size": meta.hidden_size, "has_hidden_states": meta.has_hidden_states,
            "routing_sha256": routing_sha256(trace.path), "prompts": (meta.extra or {}).get("prompts"),
            "source": meta.source, "n_sequences": len(trace.sequences()), "n_rows": trace.n_rows}
