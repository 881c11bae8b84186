"""The on-disk trace format: file names, the routing table's schema and the metadata model.

A trace is a directory (see docs/trace-format.md):

    meta.json              TraceMeta below
    routing.parquet        one row per (sequence, phase, position, layer)
    hidden/layer_NNN.npy   optional: float16 [rows_of_layer, hidden_size], indexed by the `hidden_row` column
    router/layer_NNN.npy   optional: router (gate) weight of the layer, [n_experts, hidden_size]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from traces.errors import TraceError

FORMAT_VERSION = 1
META_FILE = "meta.json"
ROUTING_FILE = "routing.parquet"
HIDDEN_DIR = "hidden"
ROUTER_DIR = "router"

PHASES = ("prefill", "decode", "teacher_forced")
Phase = Literal["prefill", "decode", "teacher_forced"]


def layer_file(directory: str, layer: int) -> str:
    return f"{directory}/layer_{layer:03d}.npy"


def routing_schema(top_k: int) -> pa.Schema:
    """Fixed-size lists keep the top-k ids and weights contiguous, so readers reshape them without loops."""
    return pa.schema(
        [
            pa.field("sequence", pa.int32(), nullable=False),
            pa.field("phase", pa.dictionary(pa.int8(), pa.string()), nullable=False),
            pa.field("position", pa.int32(), nullable=False),
            pa.field("layer", pa.int16(), nullable=False),
            pa.field("token_id", pa.int32(), nullable=True),
            pa.field("experts", pa.list_(pa.int16(), top_k), nullable=False),
            pa.field("weights", pa.list_(pa.float32(), top_k), nullable=False),
            pa.field("hidden_row", pa.int32(), nullable=True),
        ]
    )


class Irregularity(BaseModel):
    """Something odd in the source that the importer kept as it was and reports instead of fixing."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    detail: str
    count: int | None = None


class TraceMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    model: str = Field(description="model name")
    source: str = Field(description="where the routing came from (repository, commit, command)")
    n_layers: int = Field(gt=0, description="number of MoE layers (layer ids 0..n_layers-1 in this trace)")
    n_experts: int = Field(gt=0, description="routed experts per layer")
    top_k: int = Field(gt=0, description="experts chosen per token and layer")
    expert_bytes: list[int] = Field(description="bytes of one expert, per layer")
    dense_bytes: list[int] | None = Field(default=None, description="bytes of the dense part, per layer")
    hidden_size: int | None = None
    dtype: str | None = Field(default=None, description="weight dtype the byte sizes refer to")
    layer_ids: list[int] | None = Field(
        default=None, description="the model's own index of each MoE layer, where it differs from 0..n_layers-1"
    )
    license: str
    attribution: str
    capture: str = Field(default="", description="how it was captured: engine, prompts, decoding, quirks")
    has_hidden_states: bool = False
    has_router_weights: bool = False
    irregularities: list[Irregularity] = Field(default_factory=list)
    extra: dict = Field(default_factory=dict, description="source-specific facts kept verbatim")

    @model_validator(mode="after")
    def _check(self) -> TraceMeta:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k {self.top_k} exceeds n_experts {self.n_experts}")
        if len(self.expert_bytes) != self.n_layers:
            raise ValueError(f"expert_bytes has {len(self.expert_bytes)} entries, expected n_layers={self.n_layers}")
        if self.dense_bytes is not None and len(self.dense_bytes) != self.n_layers:
            raise ValueError(f"dense_bytes has {len(self.dense_bytes)} entries, expected n_layers={self.n_layers}")
        if any(b <= 0 for b in self.expert_bytes):
            raise ValueError("expert_bytes must be positive")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version} is newer than this reader ({FORMAT_VERSION})")
        return self

    def total_expert_bytes(self) -> int:
        return sum(self.expert_bytes) * self.n_experts

    @classmethod
    def load(cls, path: Path) -> TraceMeta:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise TraceError("not a trace directory (no meta.json)", path=path.parent) from None
        except json.JSONDecodeError as exc:
            raise TraceError(f"invalid JSON: {exc.msg}", path=path, where=f"line {exc.lineno}") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise TraceError(format_validation_error(exc), path=path) from None

    def dump(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def format_validation_error(exc: ValidationError) -> str:
    """pydantic's errors as `field: message` lines joined by '; '."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"field '{loc}': {err['msg']}")
    return "; ".join(parts)
