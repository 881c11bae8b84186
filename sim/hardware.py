"""Hardware profiles (YAML, validated) and the cost model built from them before the hot loop.

A profile (profiles/NAME.yaml) holds:

- `h2d.pinned` / `h2d.pageable`: effective host-to-device bandwidth (GB/s, 1e9 bytes/s) by transfer size;
  `h2d.copy_engines` (copy pipes per direction), `h2d.chunk_overhead_us` (extra cost of each chunk after the
  first when a transfer is split), `h2d.lookahead` (chunks queued on a copy stream ahead of the one in flight + 1:
  how many committed chunks a demand load waits for; default 1, sim.engine.link);
- `expert_compute`: tables of one expert FFN's GPU time (ms) by the number of tokens routed to it, one table per
  model geometry (hidden x intermediate, dtype bytes); `expert_launch_floor_ms`;
- `dense_compute`: tables of the dense part of one layer (attention, norms, gate) by batch tokens, keyed by the
  dense bytes of the layer; `dense_launch_floor_ms`;
- `cpu_expert_compute` (optional): the same tables for computing an expert on the host CPU (llama.cpp/Fiddler);
- `predictor_cost_us`: host time of one predictor call, by predictor name (`default` for the rest): a number
  (us per call) or `{call: X, token: Y}` (X + Y x the batch's tokens, us: learned predictors multiply over the
  batch's tokens, history predictors build per-token features, so a prefill call costs more than a decode one);
- `copy_compute_overlap`: 1.0 = a copy and a kernel on separate streams do not slow each other.

Lookup rules (applied once per run in `CostModel`, which turns everything into per-layer Python lists):

- bandwidth: linear interpolation of GB/s in log2(transfer size); clamped outside the table. A chunked transfer
  moves at the bandwidth of the whole transfer's size (measured on H200: copying an expert in 3 or 12 chunks
  costs no more than in one piece) and pays `chunk_overhead_us` per extra chunk.
- compute by tokens: piecewise linear in the token count; linear extrapolation beyond the last two points;
  the first value below the first point. Zero tokens cost nothing.
- geometry: the trace meta's expert bytes (and hidden size, when given) pick a table. A table matches exactly
  when its hidden size and intermediate size equal the trace's (intermediate = expert_bytes / (3 x hidden x
  dtype bytes), a SwiGLU expert). Otherwise the table nearest in log(expert bytes) is used, scaled by the ratio
  of expert bytes (= the ratio of weight bytes and FLOPs per token at the same dtype), and floored at
  `expert_launch_floor_ms` (small experts are launch-bound). Dense tables likewise by dense bytes per layer;
  a trace without dense_bytes uses the profile's `default_dense` table unscaled.
- transfer host costs (`demand_transfer_host_us`, `prefetch_transfer_host_us`, `prefetch_call_host_us`,
  `copy_issue_host_us`): an expert table may carry its geometry's own; a run whose layers all match that table
  exactly uses them, any other run (or a table without them) the profile's top-level values. `copy_issue_host_us`
  (0 in profiles that do not measure it) is charged per chunk group the link moves (one per high-priority piece,
  one per chunk of a low-priority one), paid by the compute stream at its next sync, except for the groups moved
  while it waits for a copy (sim.engine.link `issue_debt`).
- launch-bound refinements, only for layers whose geometry has an exact table (what the executor measured on
  itself): `group_ms` (a layer's leading resident experts that take every token computed as one group) and
  `kernel_ms` (an expert that waited for its copy had its launches overlap the wait: max(kernel, ms - wait) is
  left after the copy lands). Tables without them, or traces of other geometries, are charged `ms` per expert.
"""

from __future__ import annotations

import bisect
import math
import re
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from traces.errors import TraceError
from traces.format import TraceMeta, format_validation_error

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = REPO_ROOT / "profiles"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_size(value) -> int:
    """An int of bytes, or a string such as '64KiB', '1 MiB', '4MB'."""
    if isinstance(value, bool):
        raise ValueError("size must be a number of bytes or a string like '64KiB'")
    if isinstance(value, int | float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse size {value!r} (use bytes or e.g. '64KiB', '16MiB', '1GiB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BandwidthPoint(_Strict):
    size: int = Field(description="transfer size in bytes (or '64KiB', '1GiB')")
    gbps: float = Field(gt=0, description="effective bandwidth, 1e9 bytes/s")

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v):
        return parse_size(v)


class LinkTable(_Strict):
    points: list[BandwidthPoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _sorted(self):
        sizes = [p.size for p in self.points]
        if sizes != sorted(sizes) or len(set(sizes)) != len(sizes):
            raise ValueError("bandwidth points must have strictly increasing sizes")
        return self

    def gbps(self, nbytes: float) -> float:
        pts = self.points
        if nbytes <= pts[0].size:
            return pts[0].gbps
        if nbytes >= pts[-1].size:
            return pts[-1].gbps
        xs = [math.log2(p.size) for p in pts]
        x = math.log2(nbytes)
        i = bisect.bisect_right(xs, x) - 1
        f = (x - xs[i]) / (xs[i + 1] - xs[i])
        return pts[i].gbps + f * (pts[i + 1].gbps - pts[i].gbps)

    def seconds(self, nbytes: float) -> float:
        return nbytes / (self.gbps(nbytes) * 1e9) if nbytes > 0 else 0.0


class H2D(_Strict):
    pinned: LinkTable
    pageable: LinkTable | None = None
    streaming: LinkTable | None = Field(
        default=None,
        description="documentary: pinned copies queued back to back (executor.calibrate.measure_h2d_streaming), "
                    "whose setup overlaps the copy before; the link model reads `pinned`")
    latency_us: float = Field(default=0.0, ge=0, description="per-copy fixed cost; documentary (folded into the table)")
    copy_engines: int = Field(default=1, ge=1, description="independent copy pipes host-to-device")
    chunk_overhead_us: float = Field(default=0.0, ge=0, description="extra cost of each chunk after the first")
    issue_overhead_us: float = Field(
        default=0.0, ge=0,
        description="link time lost per chunk group handed to the copy stream: the executor's host gap between "
                    "a chunk landing and the next one issued, during which the link idles")
    lookahead: int = Field(
        default=1, ge=1,
        description="chunk groups the executor keeps queued on the copy stream: a demand load that must not wait "
                    "behind a prefetch waits for the chunk in flight and lookahead - 1 more already committed")


class TokenTable(_Strict):
    tokens: list[int] = Field(min_length=1)
    ms: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        if len(self.tokens) != len(self.ms):
            raise ValueError(f"tokens has {len(self.tokens)} entries but ms has {len(self.ms)}")
        if self.tokens != sorted(self.tokens) or len(set(self.tokens)) != len(self.tokens) or self.tokens[0] < 1:
            raise ValueError("tokens must be strictly increasing and >= 1")
        if any(m < 0 for m in self.ms):
            raise ValueError("ms must be >= 0")
        return self

    def at(self, tokens: float) -> float:
        """ms for `tokens` tokens: piecewise linear, linear extrapolation beyond the last point."""
        if tokens <= 0:
            return 0.0
        xs, ys = self.tokens, self.ms
        if tokens <= xs[0] or len(xs) == 1:
            return ys[0] if tokens <= xs[0] else ys[0] * tokens / xs[0]
        if tokens >= xs[-1]:
            i = len(xs) - 2
        else:
            i = bisect.bisect_right(xs, tokens) - 1
        f = (tokens - xs[i]) / (xs[i + 1] - xs[i])
        return max(0.0, ys[i] + f * (ys[i + 1] - ys[i]))


class ExpertTable(TokenTable):
    name: str
    hidden: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    dtype_bytes: float = Field(default=2, gt=0)
    note: str = ""
    kernel_ms: list[float] | None = Field(
        default=None, description="the expert's GPU time alone by tokens (CUDA-graph replay: no launch cost), same "
                                  "tokens as ms; where ms is launch-bound, the launches of an expert that waits for "
                                  "its copy overlap the wait, and only max(kernel, ms - wait) remains after it")
    group_ms: float | None = Field(
        default=None, ge=0, description="per expert, when a layer's leading experts that are resident at the gate "
                                        "and each take every token of the batch (batch-size-1 decode) are computed "
                                        "as one group of batched kernels (the executor's group_resident), instead "
                                        "of ms each; used for traces of exactly this geometry")
    demand_transfer_host_us: float | None = Field(
        default=None, ge=0, description="this geometry's demand_transfer_host_us (expert_compute tables; the host "
                                        "cost of a copy depends on the expert's size); absent: the profile's")
    prefetch_transfer_host_us: float | None = Field(
        default=None, ge=0, description="this geometry's prefetch_transfer_host_us; absent: the profile's")
    prefetch_call_host_us: float | None = Field(
        default=None, ge=0, description="this geometry's prefetch_call_host_us; absent: the profile's")
    copy_issue_host_us: float | None = Field(
        default=None, ge=0, description="this geometry's copy_issue_host_us; absent: the profile's")

    @model_validator(mode="after")
    def _kernel(self):
        if self.kernel_ms is not None and len(self.kernel_ms) != len(self.tokens):
            raise ValueError(f"kernel_ms has {len(self.kernel_ms)} entries but tokens has {len(self.tokens)}")
        return self

    @property
    def expert_bytes(self) -> float:
        return 3 * self.hidden * self.intermediate * self.dtype_bytes


class DenseTable(TokenTable):
    name: str
    dense_bytes: int = Field(gt=0)
    note: str = ""

    @field_validator("dense_bytes", mode="before")
    @classmethod
    def _size(cls, v):
        return parse_size(v)


class PredictorCost(_Strict):
    """A predictor call's host cost that grows with the batch: `call` + `token` x tokens of the batch (us)."""
    call: float = Field(ge=0)
    token: float = Field(ge=0)


def _check_predictor_costs(v):
    """predictor_cost_us entries: a number >= 0 or {call, token}, each >= 0; errors name the entry."""
    if not isinstance(v, dict):
        raise ValueError("must be a mapping of predictor name -> us per call or {call: us, token: us}")
    for name, c in v.items():
        where = f"predictor_cost_us.{name}"
        if isinstance(c, PredictorCost):
            continue
        if isinstance(c, dict):
            if set(c) != {"call", "token"}:
                raise ValueError(f"{where} must have exactly the keys call and token (got {sorted(map(str, c))})")
            vals = c.values()
        else:
            vals = [c]
        for x in vals:
            if isinstance(x, bool) or not isinstance(x, int | float) or not x >= 0:
                raise ValueError(f"{where} must be a number >= 0 (us per call) or {{call: us, token: us}} with "
                                 f"numbers >= 0 (got {c!r})")
    return v


class HardwareProfile(_Strict):
    name: str
    provenance: str = Field(description="where the figures come from (measured, datasheet, ...)")
    notes: str = ""
    h2d: H2D
    expert_compute: list[ExpertTable] = Field(min_length=1)
    expert_launch_floor_ms: float = Field(default=0.0, ge=0)
    dense_compute: list[DenseTable] = Field(min_length=1)
    default_dense: str | None = Field(default=None, description="dense table for traces without dense_bytes")
    dense_launch_floor_ms: float = Field(default=0.0, ge=0)
    cpu_expert_compute: list[ExpertTable] | None = None
    cpu_activation_copy_us: float = Field(default=0.0, ge=0,
                                          description="moving a token's activations to the CPU and back")
    predictor_cost_us: dict[str, float | PredictorCost] = Field(default_factory=lambda: {"default": 0.0})
    copy_compute_overlap: float = Field(default=1.0, ge=0, le=1)
    demand_transfer_host_us: float = Field(
        default=0.0, ge=0, description="compute-timeline (host) time per demand load issued: the executor's cache "
                                       "insert, slot and the copy's launch (its own accounting, host_demand_issue_ms)")
    prefetch_transfer_host_us: float = Field(
        default=0.0, ge=0, description="the same per prefetch issued at the gate after the prediction (profiles "
                                       "without prefetch_call_host_us: the prefetcher's ranking included, spread "
                                       "over the copies of an all-miss run)")
    prefetch_call_host_us: float = Field(
        default=0.0, ge=0, description="compute-timeline (host) time of one prefetcher call that has a prediction "
                                       "to issue, whether or not it issues a copy: ranking it and refreshing what "
                                       "is resident (the executor's host_prefetch_issue_ms in an all-resident run)")
    copy_issue_host_us: float = Field(
        default=0.0, ge=0, description="compute-timeline (host) time of issuing one chunk group to the copy stream "
                                       "(the executor's host_copy_issue_ms / copy_issues: events, stream switch, "
                                       "copies), charged for every group the link moves except while the stream "
                                       "waits for a copy; profiles that set it measure demand_ and "
                                       "prefetch_transfer_host_us without it. 0: not charged apart (older "
                                       "profiles: a copy's issue is inside those two)")
    live_dense_compute: list[DenseTable] | None = Field(
        default=None, description="per model run live by the executor (table name = its geometry name): the rest of "
                                  "a layer beside the experts (Hugging Face attention, norms, router, and the "
                                  "model's head spread over its layers) by batch tokens; validate uses it for live "
                                  "runs instead of the replay model's dense stand-in")

    @field_validator("predictor_cost_us", mode="before")
    @classmethod
    def _predictor_costs(cls, v):
        return _check_predictor_costs(v)

    @model_validator(mode="after")
    def _check(self):
        if self.default_dense is not None and self.default_dense not in {d.name for d in self.dense_compute}:
            raise ValueError(f"default_dense {self.default_dense!r} names no dense_compute table")
        return self

    def predictor_cost(self, name: str) -> tuple[float, float]:
        """(call_s, token_s): a call of predictor `name` costs call_s + token_s x the batch's tokens (seconds)."""
        costs = self.predictor_cost_us
        c = costs.get(name, costs.get("default", 0.0))
        if isinstance(c, PredictorCost):
            return c.call * 1e-6, c.token * 1e-6
        return float(c) * 1e-6, 0.0

    def predictor_cost_s(self, name: str, tokens: int = 1) -> float:
        """Seconds of one call of predictor `name` on a batch of `tokens` tokens."""
        call_s, token_s = self.predictor_cost(name)
        return call_s + token_s * tokens


def resolve_profile_path(name_or_path: str, base_dir: Path | None = None) -> Path:
    """A profile name (profiles/NAME.yaml) or a path (absolute, relative to base_dir, or to the repo root)."""
    p = Path(name_or_path)
    candidates = []
    if p.is_absolute():
        candidates.append(p)
    else:
        if base_dir is not None:
            candidates.append(base_dir / p)
        candidates += [REPO_ROOT / p, Path.cwd() / p]
        if p.suffix == "":
            candidates.append(PROFILES_DIR / f"{name_or_path}.yaml")
    for c in candidates:
        if c.is_file():
            return c.resolve()
    known = ", ".join(sorted(x.stem for x in PROFILES_DIR.glob("*.yaml")))
    raise TraceError(f"no hardware profile {name_or_path!r} (known: {known})", where="field 'hardware'")


@lru_cache(maxsize=32)
def _load_cached(path: str, mtime: float) -> HardwareProfile:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise TraceError(f"invalid YAML: {getattr(exc, 'problem', exc)}", path=p,
                         where=f"line {mark.line + 1}" if mark else None) from None
    if not isinstance(raw, dict):
        raise TraceError("a hardware profile must be a YAML mapping", path=p)
    try:
        return HardwareProfile.model_validate(raw)
    except ValidationError as exc:
        raise TraceError(format_validation_error(exc), path=p) from None


def load_profile(name_or_path: str, base_dir: Path | None = None) -> HardwareProfile:
    path = resolve_profile_path(name_or_path, base_dir)
    return _load_cached(str(path), path.stat().st_mtime)


def _nearest(tables, target_bytes: float, size_of):
    return min(tables, key=lambda t: (abs(math.log(size_of(t)) - math.log(target_bytes)), t.name))


_DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "f16": 2, "fp32": 4, "float32": 4, "f32": 4,
                "fp8": 1, "int8": 1, "q8_0": 1.0625, "int4": 0.5, "q4_0": 0.5625, "q4_k": 0.5625}


def exact_expert_table(tables: list[ExpertTable], meta: TraceMeta, layer: int) -> ExpertTable | None:
    """The table of exactly this layer's geometry (hidden size, intermediate size, dtype), if the profile has one."""
    nbytes = meta.expert_bytes[layer]
    dtype_bytes = _DTYPE_BYTES.get((meta.dtype or "bf16").lower(), 2)
    if meta.hidden_size:
        inter = nbytes / (3 * meta.hidden_size * dtype_bytes)
        for t in tables:
            if t.hidden == meta.hidden_size and abs(t.intermediate - inter) < 0.5 and t.dtype_bytes == dtype_bytes:
                return t
    return None


def expert_time_fn(tables: list[ExpertTable], meta: TraceMeta, layer: int, floor_ms: float):
    """(tokens -> ms, how): the geometry choice for one layer, per the module docstring."""
    t = exact_expert_table(tables, meta, layer)
    if t is not None:
        return t.at, f"table {t.name} (exact geometry)"
    nbytes = meta.expert_bytes[layer]
    ref = _nearest(tables, nbytes, lambda t: t.expert_bytes)
    ratio = nbytes / ref.expert_bytes
    return (lambda n: max(floor_ms, ref.at(n) * ratio) if n > 0 else 0.0,
            f"table {ref.name} scaled by expert bytes x{ratio:.3g}, floored at {floor_ms} ms")


def dense_time_fn(profile: HardwareProfile, meta: TraceMeta, layer: int):
    tables = profile.dense_compute
    floor = profile.dense_launch_floor_ms
    if meta.dense_bytes is None:
        name = profile.default_dense or tables[0].name
        t = next(x for x in tables if x.name == name)
        return t.at, f"table {t.name} (trace has no dense_bytes)"
    nbytes = meta.dense_bytes[layer]
    ref = _nearest(tables, nbytes, lambda t: t.dense_bytes)
    ratio = nbytes / ref.dense_bytes
    if abs(ratio - 1) < 1e-9:
        return ref.at, f"table {ref.name} (exact)"
    return (lambda n: max(floor, ref.at(n) * ratio) if n > 0 else 0.0,
            f"table {ref.name} scaled by dense bytes x{ratio:.3g}")


def transfer_host_us(profile: HardwareProfile, exact: list[ExpertTable | None], field: str) -> float:
    """A transfer host cost (`field`, us) for a run: the value of the expert table every layer matches exactly, when
    it carries one (the executor measured it on this geometry: issuing a tiny expert's copy costs more host time,
    as the copy stream is idle and the copy is started and reaped in the issue path), else the profile's."""
    if exact and exact[0] is not None and all(t is exact[0] for t in exact):
        v = getattr(exact[0], field)
        if v is not None:
            return v
    return getattr(profile, field)


class CostModel:
    """Per-run lookup tables in seconds, as plain Python lists indexed by layer (and token count)."""

    def __init__(self, profile: HardwareProfile, meta: TraceMeta, *, pinned: bool = True, chunks: int = 1):
        self.profile = profile
        self.meta = meta
        link = profile.h2d.pinned if pinned or profile.h2d.pageable is None else profile.h2d.pageable
        if not pinned and profile.h2d.pageable is None:
            raise TraceError(f"profile {profile.name!r} has no pageable bandwidth table", where="field 'pinned_memory'")
        self.link = link
        self.copy_engines = profile.h2d.copy_engines
        self.lookahead = profile.h2d.lookahead
        L = meta.n_layers
        self.expert_bytes = [int(b) for b in meta.expert_bytes]
        issue = profile.h2d.issue_overhead_us * 1e-6
        self.issue_s = issue  # link time lost per chunk group (in each chunk's time; sim.engine.link)
        self.xfer_s = [link.seconds(b) + issue for b in self.expert_bytes]  # one expert in one piece (one group)
        self.chunks = max(1, int(chunks))
        over = profile.h2d.chunk_overhead_us * 1e-6
        # chunk time when split: the whole transfer's bandwidth, plus the per-chunk overhead after the first, plus
        # the issue overhead of each chunk (a speculative transfer's chunks are issued one group at a time)
        self.chunk_s = [(x - issue) / self.chunks + over * (self.chunks - 1) / self.chunks + issue
                        for x in self.xfer_s]
        self._expert_fns = []
        self.geometry: list[str] = []
        for layer in range(L):
            fn, how = expert_time_fn(profile.expert_compute, meta, layer, profile.expert_launch_floor_ms)
            self._expert_fns.append(fn)
            self.geometry.append(how)
        self._dense_fns = []
        self.dense_geometry: list[str] = []
        for layer in range(L):
            fn, how = dense_time_fn(profile, meta, layer)
            self._dense_fns.append(fn)
            self.dense_geometry.append(how)
        # the executor's launch-bound refinements, for layers whose geometry has an exact table (module docstring)
        exact = [exact_expert_table(profile.expert_compute, meta, layer) for layer in range(L)]
        self.group_s = [t.group_ms * 1e-3 if t is not None and t.group_ms is not None else None for t in exact]
        self._kernel_fns = [TokenTable(tokens=t.tokens, ms=t.kernel_ms).at
                            if t is not None and t.kernel_ms is not None else None for t in exact]
        self.kernel_s: list[list[float] | None] = [None] * L
        self._cpu_fns = None
        if profile.cpu_expert_compute:
            self._cpu_fns = [expert_time_fn(profile.cpu_expert_compute, meta, layer, 0.0)[0] for layer in range(L)]
        self.overlap = profile.copy_compute_overlap
        self.demand_host_s = transfer_host_us(profile, exact, "demand_transfer_host_us") * 1e-6
        self.prefetch_host_s = transfer_host_us(profile, exact, "prefetch_transfer_host_us") * 1e-6
        self.prefetch_call_host_s = transfer_host_us(profile, exact, "prefetch_call_host_us") * 1e-6
        self.copy_issue_host_s = transfer_host_us(profile, exact, "copy_issue_host_us") * 1e-6
        self._max_tokens = 0
        self.expert_s: list[list[float]] = [[0.0] for _ in range(L)]
        # the same while a copy moves (copy_compute_overlap): the copy slows the GPU's kernels, not the host's
        # launches, so where the kernels' own times are known (kernel_ms) an expert takes max(its time, kernel x
        # penalty), else its time x penalty; group_busy_s alike with the one-token kernel (prepare)
        self.overlap_penalty = 2.0 - self.overlap if self.overlap < 1.0 else 1.0
        self.expert_busy_s: list[list[float]] = [[0.0] for _ in range(L)]
        self.kernel_busy_s: list[list[float] | None] = [None] * L
        self.group_busy_s: list[float | None] = [None] * L
        self.dense_s: list[list[float]] = [[0.0] for _ in range(L)]
        self.cpu_s: list[list[float]] | None = None

    def prepare(self, max_tokens: int) -> None:
        """Tabulate every layer's expert and dense time for 0..max_tokens tokens (once, before the hot loop)."""
        if max_tokens <= self._max_tokens:
            return
        n = max_tokens + 1
        self.expert_s = [[fn(t) * 1e-3 for t in range(n)] for fn in self._expert_fns]
        self.dense_s = [[fn(t) * 1e-3 for t in range(n)] for fn in self._dense_fns]
        self.kernel_s = [None if fn is None else [fn(t) * 1e-3 for t in range(n)] for fn in self._kernel_fns]
        pen = self.overlap_penalty
        self.kernel_busy_s = [None if ks is None else [k * pen for k in ks] for ks in self.kernel_s]
        self.expert_busy_s = [[x * pen for x in es] if kb is None else [max(x, k) for x, k in zip(es, kb, strict=True)]
                              for es, kb in zip(self.expert_s, self.kernel_busy_s, strict=True)]
        self.group_busy_s = [None if gs is None else (gs * pen if kb is None else max(gs, kb[1]))
                             for gs, kb in zip(self.group_s, self.kernel_busy_s, strict=True)]
        if self._cpu_fns is not None:
            act = self.profile.cpu_activation_copy_us * 1e-6
            self.cpu_s = [[(fn(t) * 1e-3 + act if t else 0.0) for t in range(n)] for fn in self._cpu_fns]
        self._max_tokens = max_tokens

    def describe(self) -> dict:
        return {"profile": self.profile.name, "expert_geometry": self.geometry[0],
                "dense_geometry": self.dense_geometry[0],
                "expert_transfer_ms": self.xfer_s[0] * 1e3,
                "gbps_at_expert_size": self.link.gbps(self.expert_bytes[0])}
