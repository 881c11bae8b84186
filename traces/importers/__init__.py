"""Importers of public routing-trace formats into the project's trace format (see docs/trace-format.md).

Each importer is one module with `add_arguments(parser)` and `run(src, dst, args) -> Path`; `python -m
traces.import FORMAT SRC DST` picks one by name from IMPORTERS. Every importer validates the whole source
before it writes anything, and writes through the atomic TraceWriter, so a bad input never leaves a partial
trace behind.
"""

from __future__ import annotations

import importlib

# FORMAT name on the command line -> module under traces.importers
IMPORTERS = {
    "bigmoeonedge": "bigmoeonedge",
    "flame": "flame",
    "vllm-jsonl": "vllm_jsonl",
}


def get_importer(name: str):
    from traces.errors import TraceError

    if name not in IMPORTERS:
        raise TraceError(f"unknown format {name!r}; expected one of {', '.join(IMPORTERS)}", where="FORMAT")
    return importlib.import_module(f"traces.importers.{IMPORTERS[name]}")
