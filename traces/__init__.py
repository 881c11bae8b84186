"""Traces of MoE router decisions: format, reader, writer, checks, importers, tracer and statistics."""

from traces.errors import TraceError
from traces.format import FORMAT_VERSION, PHASES, TraceMeta
from traces.reader import Routing, Trace, open_trace
from traces.writer import TraceWriter, write_trace

__all__ = ["FORMAT_VERSION", "PHASES", "Routing", "Trace", "TraceError", "TraceMeta", "TraceWriter", "open_trace",
           "write_trace"]
