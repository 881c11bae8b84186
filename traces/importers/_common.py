"""Helpers shared by the importers: irregularity reporting, common options, the final atomic write."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from traces.errors import TraceError
from traces.format import Irregularity, TraceMeta
from traces.writer import write_trace


def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    """Options every importer understands (they override what the importer derives from the source)."""
    ap.add_argument("--model", help="model name to record in meta.json (default: derived from the source)")
    ap.add_argument("--source", help="where the data came from (default: derived from the source / its path)")
    ap.add_argument("--license", dest="license_", metavar="LICENSE", help="license of the source data")
    ap.add_argument("--attribution", help="attribution line for the source data")
    ap.add_argument("--capture-note", action="append", default=[], metavar="TEXT",
                    help="extra capture note appended to meta.capture (repeatable)")


def report(irregularities: list[Irregularity], src: Path) -> None:
    """Irregularities go to meta.json and, one line each, to stderr."""
    for irr in irregularities:
        count = f" ({irr.count})" if irr.count is not None else ""
        print(f"warning: {src}: {irr.kind}{count}: {irr.detail}", file=sys.stderr)


def finish_meta(fields: dict, args: argparse.Namespace) -> dict:
    """Apply the common overrides to the importer's meta fields."""
    if getattr(args, "model", None):
        fields["model"] = args.model
    if getattr(args, "source", None):
        fields["source"] = args.source
    if getattr(args, "license_", None):
        fields["license"] = args.license_
    if getattr(args, "attribution", None):
        fields["attribution"] = args.attribution
    notes = [n for n in getattr(args, "capture_note", None) or [] if n]
    if notes:
        fields["capture"] = (fields.get("capture", "") + " " + " ".join(notes)).strip()
    return fields


def build_meta(fields: dict, src: Path) -> TraceMeta:
    from pydantic import ValidationError

    from traces.format import format_validation_error

    try:
        return TraceMeta(**fields)
    except ValidationError as exc:
        raise TraceError(f"cannot build meta.json: {format_validation_error(exc)}", path=src) from None


def sort_rows(columns: dict) -> dict:
    """Order rows by (sequence, phase, position, layer): sequences contiguous, as the reader expects."""
    from traces.format import PHASES

    phase = np.asarray(columns["phase"])
    codes = np.zeros(len(phase), dtype=np.int8)
    for i, name in enumerate(PHASES):
        codes[phase == name] = i
    order = np.lexsort((np.asarray(columns["layer"]), np.asarray(columns["position"]), codes,
                        np.asarray(columns["sequence"])))
    return {k: (np.asarray(v)[order] if v is not None else None) for k, v in columns.items()}


def write(dst, meta: TraceMeta, columns: dict, *, overwrite: bool, src: Path) -> Path:
    """Report irregularities, then write atomically and check the invariants before the final rename."""
    report(meta.irregularities, src)
    return write_trace(dst, meta, overwrite=overwrite, check=True, **sort_rows(columns))


def missing_layer_irregularities(seq, phase, position, layer, n_layers: int, *,
                                 skip: set[tuple[int, str, int]] | None = None) -> list[Irregularity]:
    """Positions that lack some layers (dropped records), summarised per phase; `skip` holds
    (sequence, phase, layer) triples already explained by another irregularity."""
    from traces.format import PHASES

    out: list[Irregularity] = []
    seq = np.asarray(seq, dtype=np.int64)
    position = np.asarray(position, dtype=np.int64)
    layer = np.asarray(layer, dtype=np.int64)
    phase = np.asarray(phase)
    for name in PHASES:
        sel = phase == name
        if not sel.any():
            continue
        tok = np.stack([seq[sel], position[sel]], axis=1)
        uniq, inv = np.unique(tok, axis=0, return_inverse=True)
        inv = inv.ravel()
        present = np.zeros((len(uniq), n_layers), dtype=bool)
        present[inv, layer[sel]] = True
        if skip:
            for s, p, lay in skip:
                if p == name:
                    present[uniq[:, 0] == s, lay] = True
        bad = np.flatnonzero(~present.all(axis=1))
        if len(bad):
            first = uniq[bad[0]]
            lacking = np.flatnonzero(~present[bad[0]])
            out.append(Irregularity(
                kind="incomplete_positions",
                detail=(f"{len(bad)} {name} position(s) lack some layers (records dropped in the source; kept as "
                        f"they are, the missing (position, layer) rows are absent); first: sequence {first[0]} "
                        f"position {first[1]} lacks layer(s) {lacking[:10].tolist()}"),
                count=int(len(bad)),
            ))
    return out
