"""BigMoeOnEdge `route.csv` (llama.cpp-based engine) -> trace.

Source layout (see docs/trace-format.md, "bigmoeonedge"):

    # route_trace v1
    # model=PATH arch=ARCH n_layer=L n_expert=E n_expert_used=K
    # layer=0 expert_bytes=B dense_bytes=D          (one line per layer)
    turn,phase,step,layer,slot,expert,weight,expert_bytes
    0,0,0,0,0,49,0.221297,3059712
    ...

Mapping: turn -> sequence; phase 0/1 -> prefill/decode; step -> position; slot (router rank) orders the k
experts of a row; weight -> weights (already renormalized over the top-k by the engine). Columns are read by
name. Sizes come from the preamble; the per-row `expert_bytes` column (bytes the engine read, 0 after the
first use within a batch) is not routing and is dropped. In prefill the engine computes the last layer only
for the output position: kept as it is and reported as an irregularity.
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import numpy as np

from traces.errors import TraceError
from traces.format import Irregularity
from traces.importers._common import add_common_arguments, build_meta, finish_meta, missing_layer_irregularities, write

REQUIRED = ("turn", "phase", "step", "layer", "slot", "expert", "weight")
PHASE_CODES = {0: "prefill", 1: "decode"}
DEFAULT_SOURCE = ("github.com/Helldez/BigMoeOnEdge commit 2d4f2b11db128cbe32da738ce114c0479542f458, "
                  "docs/bench-data/2026-07-15-route-trace/")
DEFAULT_LICENSE = "Apache-2.0"
DEFAULT_ATTRIBUTION = ("Routing traces recorded by the BigMoeOnEdge project (github.com/Helldez/BigMoeOnEdge), "
                       "Apache-2.0; one column (engine cache residency) removed")
DEFAULT_CAPTURE = ("BigMoeOnEdge llama.cpp-based engine on a phone, GGUF weights, one prompt with the chat template, "
                   "greedy decoding; prefill is one batched forward over the whole prompt, decode one token per "
                   "forward. weights are the applied gate weights renormalized over the top-k. Sizes are the "
                   "quantized bytes from the file's preamble.")

_KV = re.compile(r"(\w+)=(\S+)")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_common_arguments(ap)


def _int(value: str, path: Path, line: int, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise TraceError(f"field '{field}' is not an integer: {value!r}", path=path, where=f"line {line}") from None


def parse_preamble(lines: list[str], path: Path) -> tuple[dict, list[int], list[int], int]:
    """Return (facts, expert_bytes, dense_bytes, number of preamble lines)."""
    if not lines:
        raise TraceError("empty file", path=path)
    if not lines[0].startswith("# route_trace"):
        raise TraceError(f"not a BigMoeOnEdge route trace: first line must be '# route_trace v1', got "
                         f"{lines[0][:60]!r}", path=path, where="line 1")
    version = lines[0].split()[-1]
    if version != "v1":
        raise TraceError(f"unsupported route_trace version {version!r} (this importer reads v1)", path=path,
                         where="line 1")
    facts: dict = {"route_trace": version}
    per_layer: dict[int, tuple[int, int]] = {}
    n = 1
    while n < len(lines) and lines[n].startswith("#"):
        line_no = n + 1
        kv = dict(_KV.findall(lines[n]))
        if "layer" in kv:
            layer = _int(kv["layer"], path, line_no, "layer")
            if "expert_bytes" not in kv:
                raise TraceError("layer line lacks expert_bytes=", path=path, where=f"line {line_no}")
            eb = _int(kv["expert_bytes"], path, line_no, "expert_bytes")
            db = _int(kv.get("dense_bytes", "0"), path, line_no, "dense_bytes")
            if layer in per_layer:
                raise TraceError(f"layer {layer} described twice in the preamble", path=path, where=f"line {line_no}")
            if eb <= 0:
                raise TraceError(f"expert_bytes must be positive, got {eb}", path=path, where=f"line {line_no}")
            per_layer[layer] = (eb, db)
        else:
            for key in ("model", "arch"):
                if key in kv:
                    facts[key] = kv[key]
            for key in ("n_layer", "n_expert", "n_expert_used"):
                if key in kv:
                    facts[key] = _int(kv[key], path, line_no, key)
                    facts[f"{key}_line"] = line_no
        n += 1
    for key in ("n_layer", "n_expert", "n_expert_used"):
        if key not in facts:
            raise TraceError(f"preamble lacks {key}= (expected '# model=... n_layer= n_expert= n_expert_used=')",
                             path=path, where=f"lines 1-{n}")
        if facts[key] <= 0:
            raise TraceError(f"{key} must be positive, got {facts[key]}", path=path,
                             where=f"line {facts[key + '_line']}")
    n_layer = facts["n_layer"]
    if sorted(per_layer) != list(range(n_layer)):
        missing = sorted(set(range(n_layer)) - set(per_layer))
        extra = sorted(set(per_layer) - set(range(n_layer)))
        what = f"missing layer(s) {missing[:8]}" if missing else f"layer(s) {extra[:8]} beyond n_layer={n_layer}"
        raise TraceError(f"preamble must have one '# layer=L expert_bytes=B dense_bytes=D' line per layer: {what}",
                         path=path, where=f"lines 1-{n}")
    expert_bytes = [per_layer[i][0] for i in range(n_layer)]
    dense_bytes = [per_layer[i][1] for i in range(n_layer)]
    return facts, expert_bytes, dense_bytes, n


def read_body(text: str, path: Path, first_line: int) -> dict[str, np.ndarray]:
    """Parse the CSV body (header at file line `first_line`); columns by name, errors name the file line."""
    import pandas as pd

    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False, engine="c",
                         skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise TraceError("no CSV header after the preamble (file truncated?)", path=path,
                         where=f"line {first_line}") from None
    except pd.errors.ParserError as exc:
        msg = str(exc)
        m = re.search(r"line (\d+)", msg)
        where = f"line {int(m.group(1)) + first_line - 1}" if m else None
        raise TraceError(f"malformed CSV: {msg.split('. ')[-1] if m else msg}", path=path, where=where) from None
    header = [c.strip() for c in df.columns]
    df.columns = header
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise TraceError(f"wrong header: missing column(s) {', '.join(missing)}; expected at least "
                         f"{','.join(REQUIRED)}", path=path, where=f"line {first_line}")
    if len(df) == 0:
        raise TraceError("no routing rows after the header", path=path, where=f"line {first_line}")
    cells = df.to_numpy(dtype=object)
    empty = (df.isna().to_numpy() | (cells == "")).any(axis=1)  # pandas gives missing trailing fields as ""
    if empty.any():
        i = int(np.argmax(empty))
        col = header[int(np.argmax([v is None or v != v or v == "" for v in cells[i]]))]
        raise TraceError(f"field '{col}' is empty (line truncated?)", path=path, where=f"line {first_line + 1 + i}")
    out: dict[str, np.ndarray] = {}
    for col in REQUIRED:
        raw = df[col]
        num = pd.to_numeric(raw.str.strip(), errors="coerce")
        values = num.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values) if col != "weight" else np.isnan(values)
        if col != "weight":
            bad = bad | (np.nan_to_num(values) % 1 != 0) | (np.abs(np.nan_to_num(values)) > 2**53)
        if bad.any():
            i = int(np.argmax(bad))
            value = raw.iloc[i]
            missing = not isinstance(value, str) or value.strip() == ""
            what = "missing (line truncated?)" if missing else f"not a valid number: {value!r}"
            raise TraceError(f"field '{col}' {what}", path=path, where=f"line {first_line + 1 + i}")
        out[col] = values if col == "weight" else values.astype(np.int64)
    return out


def run(src, dst, args: argparse.Namespace) -> Path:
    path = Path(src)
    if path.is_dir():
        raise TraceError("expected a route.csv file, got a directory", path=path)
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise TraceError(f"not a text file (byte {exc.start} is not UTF-8)", path=path) from None
    lines = text.splitlines()
    facts, expert_bytes, dense_bytes, n_pre = parse_preamble(lines, path)
    body_text = "".join(text.splitlines(keepends=True)[n_pre:]).rstrip() + "\n"
    if not body_text.strip():
        raise TraceError("no CSV header after the preamble (file truncated?)", path=path, where=f"line {n_pre + 1}")
    cols = read_body(body_text, path, n_pre + 1)
    L, E, K = facts["n_layer"], facts["n_expert"], facts["n_expert_used"]
    line_of = np.arange(len(cols["turn"])) + n_pre + 2

    def fail_at(mask: np.ndarray, msg) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            raise TraceError(msg(i), path=path, where=f"line {line_of[i]}")

    fail_at(~np.isin(cols["phase"], list(PHASE_CODES)), lambda i: f"field 'phase' must be 0 (prefill) or 1 "
                                                                  f"(decode), got {cols['phase'][i]}")
    fail_at((cols["layer"] < 0) | (cols["layer"] >= L),
            lambda i: f"field 'layer' {cols['layer'][i]} outside 0..{L - 1} (n_layer={L})")
    fail_at((cols["expert"] < 0) | (cols["expert"] >= E),
            lambda i: f"field 'expert' {cols['expert'][i]} outside 0..{E - 1} (n_expert={E})")
    fail_at((cols["slot"] < 0) | (cols["slot"] >= K),
            lambda i: f"field 'slot' {cols['slot'][i]} outside 0..{K - 1} (n_expert_used={K})")
    fail_at((cols["step"] < 0) | (cols["turn"] < 0), lambda i: "negative 'step' or 'turn'")
    fail_at(~np.isfinite(cols["weight"]) | (cols["weight"] < 0),
            lambda i: f"field 'weight' must be finite and non-negative, got {cols['weight'][i]}")
    fail_at((cols["turn"] > np.iinfo(np.int32).max) | (cols["step"] > np.iinfo(np.int32).max),
            lambda i: "'turn' or 'step' too large")

    # group rows into (turn, phase, step, layer); each group must hold slots 0..K-1 exactly once
    keys = np.stack([cols["turn"], cols["phase"], cols["step"], cols["layer"]], axis=1)
    order = np.lexsort((cols["slot"], keys[:, 3], keys[:, 2], keys[:, 1], keys[:, 0]))
    sk = keys[order]
    new_group = np.r_[True, (sk[1:] != sk[:-1]).any(axis=1)]
    starts = np.flatnonzero(new_group)
    sizes = np.diff(np.r_[starts, len(order)])
    bad = np.flatnonzero(sizes != K)
    if len(bad):
        g = bad[0]
        rows = order[starts[g]:starts[g] + sizes[g]]
        t, p, s, lay = sk[starts[g]]
        raise TraceError(f"(turn {t}, phase {p}, step {s}, layer {lay}) has {sizes[g]} rows, expected one per slot "
                         f"0..{K - 1} (file truncated or rows duplicated?)", path=path,
                         where=f"line {line_of[rows.min()]}")
    slots = cols["slot"][order].reshape(-1, K)
    bad_slots = (slots != np.arange(K)).any(axis=1)
    if bad_slots.any():
        g = int(np.argmax(bad_slots))
        raise TraceError(f"slots {slots[g].tolist()} in one (turn, phase, step, layer): each of 0..{K - 1} must "
                         f"appear once", path=path, where=f"line {line_of[order[g * K:(g + 1) * K]].min()}")
    experts = cols["expert"][order].reshape(-1, K)
    srt = np.sort(experts, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
    if dup.any():
        g = int(np.argmax(dup))
        raise TraceError(f"expert ids not distinct within one routing: {experts[g].tolist()}", path=path,
                         where=f"line {line_of[order[g * K]]}")
    weights = cols["weight"][order].reshape(-1, K)
    gk = sk[starts]
    seq, phase_code, position, layer = gk[:, 0], gk[:, 1], gk[:, 2], gk[:, 3]
    phase = np.where(phase_code == 0, "prefill", "decode")

    irregularities = []
    if not text.endswith("\n"):
        irregularities.append(Irregularity(
            kind="no_final_newline",
            detail=f"the last line ({len(lines)}) has no newline: the file may have been cut there; the line "
                   f"parsed as complete and is kept"))
    # a position that has both phases would be a duplicate (sequence, position) in two phases: fine for the format
    # (phases are separate), but report steps of a turn that appear in both phases.
    pre_steps = {(t, s) for t, s in zip(seq[phase_code == 0].tolist(), position[phase_code == 0].tolist())}
    both = [(t, s) for t, s in set(zip(seq[phase_code == 1].tolist(), position[phase_code == 1].tolist()))
            if (t, s) in pre_steps]
    if both:
        irregularities.append(Irregularity(kind="step_in_both_phases", count=len(both),
                                           detail=f"{len(both)} (turn, step) pairs appear in prefill and decode; "
                                                  f"first {sorted(both)[0]}"))
    # prefill layers with rows for fewer positions than the prompt (llama.cpp computes only the output position
    # in the last layer); kept as is.
    explained: set[tuple[int, str, int]] = set()
    for t in np.unique(seq[phase_code == 0]):
        sel = (seq == t) & (phase_code == 0)
        n_pos = len(np.unique(position[sel]))
        counts = np.bincount(layer[sel], minlength=L)
        partial = np.flatnonzero((counts > 0) & (counts < n_pos))
        for lay in partial:
            kept = np.unique(position[sel & (layer == lay)])
            only_last = len(kept) == 1 and kept[0] == position[sel].max()
            irregularities.append(Irregularity(
                kind="prefill_layer_output_position_only" if only_last else "prefill_layer_partial",
                count=int(counts[lay]),
                detail=(f"turn {t} prefill: layer {lay} has rows for {counts[lay]} of {n_pos} prompt positions "
                        f"(positions {kept[:5].tolist()}{'...' if len(kept) > 5 else ''})"
                        + ("; the engine computes only the output position in the last MoE layer during prefill: "
                           "real behaviour, kept as it is, not fabricated" if only_last else "; kept as it is")),
            ))
            explained.add((int(t), "prefill", int(lay)))
    irregularities += missing_layer_irregularities(seq, phase, position, layer, L, skip=explained)

    model = Path(facts.get("model", path.stem)).name
    model = model[:-5] if model.endswith(".gguf") else model
    fields = {
        "model": model,
        "source": f"{DEFAULT_SOURCE}, imported from {path.name}",
        "n_layers": L,
        "n_experts": E,
        "top_k": K,
        "expert_bytes": expert_bytes,
        "dense_bytes": dense_bytes,
        "dtype": _quant(model),
        "license": DEFAULT_LICENSE,
        "attribution": DEFAULT_ATTRIBUTION,
        "capture": DEFAULT_CAPTURE + (
            " In prefill the last MoE layer has rows only for the output position (the engine computes only that "
            "position there): real behaviour, kept, listed in irregularities."
            if any(i.kind == "prefill_layer_output_position_only" for i in irregularities) else ""),
        "irregularities": irregularities,
        "extra": {
            "importer": "bigmoeonedge",
            "source_file": path.name,
            "route_trace": facts["route_trace"],
            "arch": facts.get("arch"),
            "gguf": facts.get("model"),
            "n_expert_used": K,
            "row_order_in_source": "prefill layer-major (all prompt positions of a layer, then the next layer); "
                                   "decode position-major; routing.parquet is sorted by (sequence, phase, "
                                   "position, layer)",
            "dropped_columns": ["expert_bytes (per-row bytes read by the engine; sizes come from the preamble)"],
        },
    }
    meta = build_meta(finish_meta(fields, args), path)
    columns = {"sequence": seq, "phase": phase, "position": position, "layer": layer, "experts": experts,
               "weights": weights, "token_id": None}
    return write(dst, meta, columns, overwrite=args.overwrite, src=path)


def _quant(model: str) -> str | None:
    m = re.search(r"(Q\d_K_[SML]|Q\d_K|Q\d_\d|F16|BF16|F32)$", model, re.IGNORECASE)
    return f"GGUF {m.group(1)}" if m else None
