"""Run configuration (pydantic, unknown keys rejected) and YAML loading with one-line errors.

A single-run config (configs/examples/*.yaml) is a mapping with these keys; dotted names are what
`--set` and sweep grids use (`cache.policy=lfu`):

    trace                 trace directory; relative paths are tried against the config file's directory,
                          then the repository root, then the current directory (e.g. data/traces/qwen3-30b-a3b)
    hardware              profile name (profiles/NAME.yaml) or a YAML path, resolved like `trace`
    phase                 prefill | decode | both   (the prompt is one prefill batch; decode = one token per
                          sequence per batch)
    batch_size            sequences decoded together (prefill batches are one prompt each)
    max_sequences         use only the first N sequences of the trace (null = all)
    max_decode_tokens     use only the first N decode positions of each sequence (null = all)
    seed                  seed of the predictor's train/eval split (trainable predictors); else recorded only
    warmup_batches        leading batches simulated but left out of the metrics (ChampSim-style warm-up)
    pinned_memory         host expert store in pinned memory (false: the profile's pageable table)
    cache.policy          lru | lfu | fifo | static | belady | lcs:<libCacheSim algorithm> ...
    cache.scope           global | per_layer
    cache.capacity_mib | cache.capacity_experts | cache.cache_rate     exactly one
    cache.policy_params   extra keyword arguments of the policy
    prefetch.predictor    none | oracle | any registered predictor
    prefetch.distance     d: predicting while layer l runs, for layer l+d (1 next-layer, 2 ProMoE stride)
    prefetch.max_inflight_mib   bound on bytes queued or in flight on the link when a prefetch is issued (null: none)
    prefetch.top_n        experts prefetched per prediction (null: top_k x tokens of the batch)
    prefetch.chunks       chunks per transfer when chunked_prefetch is on
    prefetch.predictor_params   keyword arguments of the predictor
    prefetch.artifact     a trained predictor (.npz from predictors.train); its recorded split is used
    prefetch.train_fraction     trainable predictor without artifact: fit on this share of the trace
                          (predictors.evaluate.prepare); only the held-out part is simulated and, for a
                          positions split (one-sequence traces), the training positions are warm-up
    prefetch.blocking     where the predictor runs: false = beside the compute stream (ProMoE's concurrent CPU
                          predictor: only its own copies wait for it; the executor: a predictor thread), true = at
                          the gate on the compute timeline (the stream waits for it), null = each engine's default
                          (the simulator: beside; the executor: at the gate, on its main thread)
    chunked_prefetch      ProMoE switch: split transfers into prefetch.chunks chunks (preemptible between chunks)
    early_preemption      ProMoE switch: at gate time drop the layer's queued speculative transfers and enqueue
                          its exact misses at high priority
    reordered_inference   ProMoE switch: compute resident experts first, then in flight, then not started
    cpu_experts           compute a missed expert on the CPU when that is faster than copying it (Fiddler)
    heldout_only          replay only what prefetch.train_fraction's split holds out (the sequences, or positions,
                          a trainable predictor is scored on), whatever the predictor: runs with and without a
                          trained predictor then cover the same tokens and their times compare
    timeline | chrome_trace   optional output paths (per-batch Parquet timeline, Chrome/Perfetto JSON);
                          not part of the run's identity
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from traces.errors import TraceError
from traces.format import format_validation_error

REPO_ROOT = Path(__file__).resolve().parents[1]
# bump when the model changes in a way that invalidates stored sweep results
# (2: the engine touches a layer's experts in first-occurrence order at its end: LRU recency = order of first use)
# (3: a high-priority chunked copy pays the per-group issue overhead once, as the executor issues it as one group)
SIM_VERSION = 3

OUTPUT_KEYS = ("timeline", "chrome_trace")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class CacheConfig(_Strict):
    policy: str = "lru"
    scope: Literal["global", "per_layer"] = "global"
    capacity_mib: float | None = Field(default=None, ge=0)
    capacity_experts: float | None = Field(default=None, ge=0)
    cache_rate: float | None = Field(default=None, ge=0, le=1)
    policy_params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_capacity(cls, data):
        keys = ("capacity_mib", "capacity_experts", "cache_rate")
        if isinstance(data, dict) and all(data.get(k) is None for k in keys):
            data = {**data, "cache_rate": 0.25}  # no capacity given: a quarter of all experts
        return data

    @model_validator(mode="after")
    def _one_capacity(self):
        given = [n for n in ("capacity_mib", "capacity_experts", "cache_rate") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of cache.capacity_mib, cache.capacity_experts, cache.cache_rate"
                + (f" (got {', '.join(given)}; unset the others with null)" if given else "")
            )
        return self


class PrefetchConfig(_Strict):
    predictor: str = "none"
    distance: int = Field(default=1, ge=1)
    max_inflight_mib: float | None = Field(default=1024, ge=0)
    top_n: int | None = Field(default=None, ge=0)
    chunks: int = Field(default=3, ge=1)
    predictor_params: dict[str, Any] = Field(default_factory=dict)
    artifact: str | None = None  # a trained predictor (predictors.train); resolved like `trace`
    train_fraction: float = Field(default=0.9, gt=0, lt=1)
    blocking: bool | None = None  # (module docstring; null is left out of the identity, as heldout_only false)


class RunConfig(_Strict):
    trace: str
    hardware: str = "h200"
    phase: Literal["prefill", "decode", "both"] = "both"
    batch_size: int = Field(default=1, ge=1)
    max_sequences: int | None = Field(default=None, ge=1)
    max_decode_tokens: int | None = Field(default=None, ge=0)
    seed: int = 0
    warmup_batches: int = Field(default=0, ge=0)
    pinned_memory: bool = True
    cache: CacheConfig = Field(default_factory=CacheConfig)
    prefetch: PrefetchConfig = Field(default_factory=PrefetchConfig)
    chunked_prefetch: bool = False
    early_preemption: bool = False
    reordered_inference: bool = False
    cpu_experts: bool = False
    heldout_only: bool = False
    timeline: str | None = None
    chrome_trace: str | None = None
    # where relative paths are resolved from (the config file's directory); not part of the identity
    base_dir: str | None = Field(default=None, exclude=True)
    source_file: str | None = Field(default=None, exclude=True)  # the YAML it came from, for error messages

    # -- identity ---------------------------------------------------------------------------------------------
    def identity(self) -> dict:
        """The settings that decide the result (no output paths), as a plain nested dict."""
        d = self.model_dump(mode="json")
        for k in OUTPUT_KEYS:
            d.pop(k, None)
        if not d.get("heldout_only"):  # added later: absent when off, so earlier configs keep their hashes
            d.pop("heldout_only", None)
        if d["prefetch"].get("blocking") is None:  # likewise
            d["prefetch"].pop("blocking", None)
        return d

    def flat(self) -> dict:
        return flatten(self.identity())

    def resolve_trace(self) -> Path:
        return resolve_path(self.trace, self.base_dir, field="trace", source=self.source_file)

    def run_hash(self) -> str:
        """Hash of the resolved config: settings, simulator version, and fingerprints of the trace and profile."""
        from sim.hardware import resolve_profile_path

        payload = {"config": self.identity(), "sim_version": SIM_VERSION}
        try:
            tpath = self.resolve_trace()
            meta = (tpath / "meta.json").read_bytes()
            routing = tpath / "routing.parquet"
            payload["trace_fp"] = [hashlib.sha256(meta).hexdigest(), routing.stat().st_size]
        except (OSError, TraceError):
            payload["trace_fp"] = None
        try:
            prof = resolve_profile_path(self.hardware, Path(self.base_dir) if self.base_dir else None)
            payload["hardware_fp"] = hashlib.sha256(prof.read_bytes()).hexdigest()
        except (OSError, TraceError):
            payload["hardware_fp"] = None
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_path(value: str, base_dir: str | None, *, field: str, source: str | None = None) -> Path:
    """Absolute; else relative to the config file's directory, the repository root, the current directory."""
    p = Path(value).expanduser()
    if p.is_absolute():
        if p.exists():
            return p
        raise TraceError(f"{value}: no such file or directory", path=source, where=f"field '{field}'")
    candidates = ([Path(base_dir) / p] if base_dir else []) + [REPO_ROOT / p, Path.cwd() / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise TraceError(f"{value}: no such file or directory (tried {tried})", path=source, where=f"field '{field}'")


# -- dotted keys ---------------------------------------------------------------------------------------------
def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("policy_params", "predictor_params"):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def unflatten(d: dict) -> dict:
    """Accept nested mappings and dotted keys together; dotted keys are applied after nested ones."""
    out: dict = {}
    dotted = {}
    for k, v in d.items():
        if "." in str(k):
            dotted[k] = v
        elif isinstance(v, dict) and k in out and isinstance(out[k], dict):
            out[k].update(v)
        else:
            out[k] = json.loads(json.dumps(v)) if isinstance(v, dict) else v
    for k, v in dotted.items():
        set_dotted(out, k, v)
    return out


def known_keys() -> set[str]:
    keys = set()
    for name, f in RunConfig.model_fields.items():
        if name == "base_dir":
            continue
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for sub in ann.model_fields:
                keys.add(f"{name}.{sub}")
        else:
            keys.add(name)
    return keys


def check_key(key: str, *, path: object = None, where: str = "") -> None:
    """Reject an unknown dotted key with the file and key named."""
    keys = known_keys()
    root = key.split(".")[0]
    if key in keys or (key.split(".")[0] in ("cache", "prefetch") and key.count(".") >= 2
                       and ".".join(key.split(".")[:2]) in ("cache.policy_params", "prefetch.predictor_params")):
        return
    import difflib

    close = difflib.get_close_matches(key, sorted(keys), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    if root in ("cache", "prefetch") and key == root:
        return
    raise TraceError(f"unknown key{hint}", path=path, where=f"{where}field '{key}'")


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 0.25, true, null, lru, [1, 2]."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def build_config(raw: dict, *, path: object = None, base_dir: str | Path | None = None,
                 overrides: dict | None = None) -> RunConfig:
    """Validate a (nested or dotted) mapping into a RunConfig; errors name the file and the field."""
    if not isinstance(raw, dict):
        raise TraceError("a run config must be a YAML mapping", path=path)
    for k in flatten(unflatten(raw)):
        check_key(k, path=path)
    merged = unflatten(raw)
    for k, v in (overrides or {}).items():
        check_key(k, path=path, where="--set ")
        set_dotted(merged, k, v)
    # a capacity given by override replaces the file's one
    given = [k for k in (overrides or {}) if k in ("cache.capacity_mib", "cache.capacity_experts", "cache.cache_rate")]
    if given and (overrides or {})[given[-1]] is not None:
        for other in ("capacity_mib", "capacity_experts", "cache_rate"):
            if f"cache.{other}" != given[-1] and isinstance(merged.get("cache"), dict):
                merged["cache"][other] = None
    if base_dir is not None:
        merged["base_dir"] = str(base_dir)
    if path is not None:
        merged["source_file"] = str(path)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise TraceError(format_validation_error(exc), path=path) from None


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.exists():
        raise TraceError("no such file or directory", path=p)
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise TraceError(f"invalid YAML: {getattr(exc, 'problem', None) or exc}", path=p,
                         where=f"line {mark.line + 1}" if mark else None) from None


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    p = Path(path)
    raw = read_yaml(p)
    if isinstance(raw, dict) and "grid" in raw:
        raise TraceError("this is a sweep (it has a 'grid:' key); run it with `python -m sim.sweep`", path=p)
    return build_config(raw or {}, path=p, base_dir=p.resolve().parent, overrides=overrides)


def parse_sets(items: list[str] | None) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise TraceError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out
