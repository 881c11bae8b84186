"""`python -m traces.import FORMAT SRC DST [--overwrite] [options]`: import a public routing-trace format.

FORMAT is one of bigmoeonedge, flame, vllm-jsonl (see docs/trace-format.md for how each maps its source).
Irregularities in the source are kept, recorded in meta.json and printed on stderr; bad input gives one line
naming the file and line or field, exit status 2, and nothing written at DST.
"""

from __future__ import annotations

import argparse
import sys

from traces.errors import TraceError, run_cli
from traces.importers import IMPORTERS, get_importer


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fmt = next((a for a in argv if not a.startswith("-")), None)
    ap = argparse.ArgumentParser(prog="python -m traces.import", description=__doc__.splitlines()[0])
    ap.add_argument("format", metavar="FORMAT", help=f"one of: {', '.join(IMPORTERS)}")
    ap.add_argument("src", metavar="SRC", help="source file or folder")
    ap.add_argument("dst", metavar="DST", help="trace directory to create")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    if fmt in IMPORTERS:
        get_importer(fmt).add_arguments(ap)
    args = ap.parse_args(argv)
    importer = get_importer(args.format)
    from pathlib import Path

    src = Path(args.src)
    if not src.exists():
        raise TraceError("no such file or directory", path=src, where="SRC")
    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise TraceError("destination already exists (pass --overwrite to replace it)", path=dst, where="DST")
    out = importer.run(src, dst, args)
    from traces.reader import Trace

    trace = Trace(out)
    m = trace.meta
    print(f"{out}: {trace.n_rows} rows, {m.n_layers} layers, {m.n_experts} experts, top-{m.top_k}, "
          f"{len(m.irregularities)} irregularit{'y' if len(m.irregularities) == 1 else 'ies'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
