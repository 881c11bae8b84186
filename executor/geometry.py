"""Model geometries: the shapes the executor allocates and computes, from the models' published configurations.

A geometry says how big one expert is (hidden x moe_intermediate, three matrices: gate, up, down, which are
also the natural 3 chunks of a transfer), how many layers and experts there are, the weight dtype, and how big
the dense part of each layer is (attention projections, the router, and a dense MLP where the model has one).
Replay uses it to build random weights with the real shapes, so copy and compute costs are real; the simulator
is handed the same byte sizes (`Geometry.trace_meta`), so both sides model the same bytes.

Presets (`PRESETS`, `get_geometry(name)`), from each model's Hugging Face `config.json`:

| preset | hidden | moe_intermediate | layers | experts | top-k | attention (q heads / kv heads x head_dim) |
|---|---|---|---|---|---|---|
| qwen3-30b-a3b | 2048 | 768 | 48 | 128 | 8 | 32 / 4 x 128 |
| gemma-4-26b-a4b | 2816 | 704 | 30 | 128 | 8 | 16 / 8 x 256 sliding; 16 / 2 x 512, k = v, global (1 in 6); MLP 2112 |
| mixtral-8x7b | 4096 | 14336 | 32 | 8 | 2 | 32 / 8 x 128 |
| flame-moe-290m | 1024 | 704 | 8 | 64 | 6 | from the embedded trace's meta (expert and dense bytes) |
| small-moe | 256 | 256 | 8 | 32 | 4 | the small trained model's config (data/small_moe/model_config.json) |
| small-moe-qwen2-57b-widths | 3584 | 2560 | 8 | 32 | 4 | Qwen2-57B-A14B's: 28 / 4 x 128, shared expert 20480 |

`small-moe-qwen2-57b-widths` is not a published model: it replays the small trained model's routing (its layers,
experts and top-k, so its trace and learned predictor apply) with Qwen2-57B-A14B's widths, whose 55 MB experts
take about 1 ms each to copy. It puts the executor where ProMoE's models are, copy-bound rather than launch-bound
(the small MoE's own 0.4 MB experts copy in 8 us, less than a kernel launch costs the host).

Cross-checks: Qwen3's 4-bit GGUF expert sizes in data/traces/qwen3-30b-a3b (3 059 712 bytes = two Q4_K matrices
plus one Q6_K matrix of 2048 x 768) and Gemma-4's (3 593 216 = two Q4_K + one Q5_0 of 2816 x 704) match these
shapes exactly. Gemma-4's experts use GeGLU (gelu-tanh) instead of SwiGLU: same three matrices, same bytes.

Overrides: `geometry.replace(hidden=..., n_layers=...)`, `--geometry NAME --set-geometry key=value` on the
command lines, or `first_layers(n)` (a model's first N layers, for configurations whose experts do not fit in
host memory; see executor.memory).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from traces.errors import TraceError
from traces.format import TraceMeta

REPO_ROOT = Path(__file__).resolve().parents[1]

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
                  "f32": "fp32", "f16": "fp16"}
ACTIVATIONS = ("swiglu", "geglu")


@dataclass(frozen=True)
class Geometry:
    name: str
    hidden: int
    moe_intermediate: int
    n_layers: int
    n_experts: int
    top_k: int
    dtype: str = "bf16"
    activation: str = "swiglu"  # swiglu: silu(x Wg) * (x Wu) Wd; geglu: gelu_tanh instead of silu
    # dense part of each layer, in parameters (attention projections + router + dense/shared MLP); one per layer
    dense_params: tuple[int, ...] = ()
    source: str = ""
    notes: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        dtype = _DTYPE_ALIASES.get(self.dtype.lower(), self.dtype.lower())
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"geometry {self.name!r}: dtype {self.dtype!r} not one of {sorted(DTYPE_BYTES)}")
        object.__setattr__(self, "dtype", dtype)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"geometry {self.name!r}: activation {self.activation!r} not one of {ACTIVATIONS}")
        for name in ("hidden", "moe_intermediate", "n_layers", "n_experts", "top_k"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"geometry {self.name!r}: {name} must be positive, got {getattr(self, name)}")
        if self.top_k > self.n_experts:
            raise ValueError(f"geometry {self.name!r}: top_k {self.top_k} > n_experts {self.n_experts}")
        dense = tuple(int(x) for x in self.dense_params) or (0,)
        if len(dense) == 1 and self.n_layers > 1:
            dense = dense * self.n_layers
        if len(dense) != self.n_layers:
            raise ValueError(f"geometry {self.name!r}: dense_params has {len(dense)} entries for "
                             f"{self.n_layers} layers")
        object.__setattr__(self, "dense_params", dense)

    # -- sizes --------------------------------------------------------------------------------------------------
    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def matrix_numel(self) -> int:
        """Elements of one of the three expert matrices (hidden x moe_intermediate)."""
        return self.hidden * self.moe_intermediate

    @property
    def expert_numel(self) -> int:
        return 3 * self.matrix_numel

    @property
    def expert_bytes(self) -> int:
        return self.expert_numel * self.dtype_bytes

    @property
    def matrix_bytes(self) -> int:
        return self.matrix_numel * self.dtype_bytes

    @property
    def dense_bytes(self) -> list[int]:
        return [p * self.dtype_bytes for p in self.dense_params]

    @property
    def all_experts_bytes(self) -> int:
        return self.expert_bytes * self.n_experts * self.n_layers

    def torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    # -- variants -----------------------------------------------------------------------------------------------
    def replace(self, **changes) -> Geometry:
        """A copy with some fields changed (dense_params is kept per layer, truncated or extended as needed)."""
        if "n_layers" in changes and "dense_params" not in changes:
            n = int(changes["n_layers"])
            d = self.dense_params
            changes["dense_params"] = tuple((d * (n // len(d) + 1))[:n])
        return dataclasses.replace(self, **changes)

    def first_layers(self, n: int) -> Geometry:
        if not 1 <= n <= self.n_layers:
            raise ValueError(f"--layers must be in 1..{self.n_layers} for {self.name}, got {n}")
        if n == self.n_layers:
            return self
        return dataclasses.replace(self, n_layers=n, dense_params=self.dense_params[:n],
                                   notes=(self.notes + f" first {n} layers").strip())

    def trace_meta(self, meta: TraceMeta, n_layers: int | None = None) -> TraceMeta:
        """The trace's meta with this geometry's byte sizes (what the simulator must model for a replay)."""
        n = n_layers if n_layers is not None else meta.n_layers
        if n > meta.n_layers:
            raise TraceError(f"trace of {meta.model!r} has {meta.n_layers} layers, {n} asked", where="--layers")
        check_trace_fits(self, meta, n)
        return meta.model_copy(update={
            "n_layers": n,
            "expert_bytes": [self.expert_bytes] * n,
            "dense_bytes": self.dense_bytes[:n],
            "hidden_size": self.hidden,
            "dtype": self.dtype,
            "layer_ids": meta.layer_ids[:n] if meta.layer_ids else None,
            "extra": {**meta.extra, "executor_geometry": self.name},
        })

    def describe(self) -> dict:
        return {"name": self.name, "hidden": self.hidden, "moe_intermediate": self.moe_intermediate,
                "n_layers": self.n_layers, "n_experts": self.n_experts, "top_k": self.top_k, "dtype": self.dtype,
                "activation": self.activation, "expert_bytes": self.expert_bytes,
                "dense_bytes_layer0": self.dense_bytes[0], "all_experts_bytes": self.all_experts_bytes}


def check_trace_fits(geom: Geometry, meta: TraceMeta, n_layers: int | None = None) -> None:
    """Routing forced from `meta`'s trace must address experts and layers the geometry has."""
    n = n_layers if n_layers is not None else meta.n_layers
    if meta.n_experts > geom.n_experts:
        raise TraceError(f"trace of {meta.model!r} has {meta.n_experts} experts per layer but geometry "
                         f"{geom.name!r} has {geom.n_experts}", where="geometry")
    if n > geom.n_layers:
        raise TraceError(f"replaying {n} layers of the trace of {meta.model!r} but geometry {geom.name!r} has "
                         f"{geom.n_layers} (use --layers {geom.n_layers} or a larger geometry)", where="geometry")


# -- attention sizes -----------------------------------------------------------------------------------------
def attention_params(hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, *, k_eq_v: bool = False) -> int:
    """q, k, v, o projections (no biases; norms are negligible)."""
    q = hidden * n_heads * head_dim
    kv = hidden * n_kv_heads * head_dim
    o = n_heads * head_dim * hidden
    return q + kv + (0 if k_eq_v else kv) + o


def _qwen3_30b_a3b() -> Geometry:
    h, e = 2048, 128
    dense = attention_params(h, 32, 4, 128) + e * h
    return Geometry("qwen3-30b-a3b", hidden=h, moe_intermediate=768, n_layers=48, n_experts=e, top_k=8,
                    dense_params=(dense,),
                    source="huggingface.co/Qwen/Qwen3-30B-A3B config.json: hidden_size 2048, moe_intermediate_size "
                           "768, num_hidden_layers 48, num_experts 128, num_experts_per_tok 8, num_attention_heads "
                           "32, num_key_value_heads 4, head_dim 128",
                    extra={"n_heads": 32, "n_kv_heads": 4, "head_dim": 128})


def _gemma4_26b_a4b() -> Geometry:
    h, e, layers = 2816, 128, 30
    mlp = 3 * h * 2112  # Gemma-4 26B-A4B keeps a dense MLP (intermediate_size 2112) beside the experts
    sliding = attention_params(h, 16, 8, 256) + mlp + e * h
    full = attention_params(h, 16, 2, 512, k_eq_v=True) + mlp + e * h
    dense = tuple(full if (i + 1) % 6 == 0 else sliding for i in range(layers))
    return Geometry("gemma-4-26b-a4b", hidden=h, moe_intermediate=704, n_layers=layers, n_experts=e, top_k=8,
                    activation="geglu", dense_params=dense,
                    source="huggingface.co/google/gemma-4-26B-A4B-it config.json text_config: hidden_size 2816, "
                           "moe_intermediate_size 704, intermediate_size 2112, num_hidden_layers 30, num_experts 128, "
                           "top_k_experts 8, num_attention_heads 16, num_key_value_heads 8, head_dim 256, "
                           "num_global_key_value_heads 2, global_head_dim 512, attention_k_eq_v, 5 sliding : 1 full",
                    extra={"n_heads": 16, "n_kv_heads": 8, "head_dim": 256})


def _mixtral_8x7b() -> Geometry:
    h, e = 4096, 8
    dense = attention_params(h, 32, 8, 128) + e * h
    return Geometry("mixtral-8x7b", hidden=h, moe_intermediate=14336, n_layers=32, n_experts=e, top_k=2,
                    dense_params=(dense,),
                    source="huggingface.co/mistralai/Mixtral-8x7B-v0.1 config.json: hidden_size 4096, "
                           "intermediate_size 14336, num_hidden_layers 32, num_local_experts 8, num_experts_per_tok 2, "
                           "num_attention_heads 32, num_key_value_heads 8",
                    extra={"n_heads": 32, "n_kv_heads": 8, "head_dim": 128})


def _flame_moe_290m() -> Geometry:
    meta_path = REPO_ROOT / "data" / "traces" / "flame-moe-290m-decoder" / "meta.json"
    if meta_path.exists():
        return geometry_from_meta(TraceMeta.load(meta_path), name="flame-moe-290m")
    # the values of that meta, should the trace be absent
    return Geometry("flame-moe-290m", hidden=1024, moe_intermediate=704, n_layers=8, n_experts=64, top_k=6,
                    dense_params=(17174528 // 2,), source="data/traces/flame-moe-290m-decoder/meta.json")


def _small_moe_qwen2_57b_widths() -> Geometry:
    h, inter, shared = 3584, 2560, 20480
    routing = get_geometry("small-moe")  # layers, experts, top-k of the trained model (its trace's routing)
    e = routing.n_experts
    dense = attention_params(h, 28, 4, 128) + e * h + 3 * h * shared
    return Geometry("small-moe-qwen2-57b-widths", hidden=h, moe_intermediate=inter, n_layers=routing.n_layers,
                    n_experts=e, top_k=routing.top_k, dense_params=(dense,),
                    source="the small trained model's routing shape with huggingface.co/Qwen/Qwen2-57B-A14B "
                           "config.json widths: hidden_size 3584, moe_intermediate_size 2560, "
                           "shared_expert_intermediate_size 20480, num_attention_heads 28, num_key_value_heads 4",
                    extra={"n_heads": 28, "n_kv_heads": 4, "head_dim": 128})


def _tiny() -> Geometry:
    return Geometry("tiny", hidden=32, moe_intermediate=16, n_layers=4, n_experts=8, top_k=2, dtype="fp32",
                    dense_params=(2 * 32 * 64,), source="test geometry (CPU correctness tests)")


_BUILDERS = {
    "qwen3-30b-a3b": _qwen3_30b_a3b,
    "gemma-4-26b-a4b": _gemma4_26b_a4b,
    "mixtral-8x7b": _mixtral_8x7b,
    "flame-moe-290m": _flame_moe_290m,
    "tiny": _tiny,
    "small-moe-qwen2-57b-widths": _small_moe_qwen2_57b_widths,  # (reads the small-moe geometry when called)
}
PRESETS = tuple(_BUILDERS) + ("small-moe",)


def small_moe_dir() -> Path | None:
    """The small trained model's HF directory: $SMALL_MOE_DIR, data/small_moe/model or traces/small_moe/model."""
    cands = []
    if os.environ.get("SMALL_MOE_DIR"):
        cands.append(Path(os.environ["SMALL_MOE_DIR"]))
    cands += [REPO_ROOT / "data" / "small_moe" / "model", REPO_ROOT / "data" / "small_moe",
              REPO_ROOT / "traces" / "small_moe" / "model"]
    for c in cands:
        if (c / "config.json").is_file():
            return c
    return None


def get_geometry(name: str) -> Geometry:
    """A preset by name, or a path to an HF config.json (or a directory holding one)."""
    if name in _BUILDERS:
        return _BUILDERS[name]()
    if name == "small-moe":
        d = small_moe_dir()
        if d is not None:
            return geometry_from_hf_config(d / "config.json", name="small-moe")
        committed = REPO_ROOT / "data" / "small_moe" / "model_config.json"  # the trained model's config
        if committed.is_file():
            return geometry_from_hf_config(committed, name="small-moe")
        raise TraceError("the small trained model's config is not there (no config.json in $SMALL_MOE_DIR, "
                         "data/small_moe/model, traces/small_moe/model; no data/small_moe/model_config.json)",
                         where="geometry 'small-moe'")
    p = Path(name)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return geometry_from_hf_config(p)
    raise TraceError(f"unknown geometry {name!r} (presets: {', '.join(PRESETS)}; or a path to an HF config.json)",
                     where="geometry")


def parse_geometry_overrides(items: list[str] | None) -> dict:
    """`key=value` strings (ints, or dtype/activation/name strings) -> Geometry.replace keywords."""
    out: dict = {}
    fields = {f.name for f in dataclasses.fields(Geometry)} - {"extra", "dense_params", "source", "notes"}
    for item in items or []:
        if "=" not in item:
            raise TraceError(f"expected key=value, got {item!r}", where="--set-geometry")
        k, v = (s.strip() for s in item.split("=", 1))
        if k == "dense_params":
            out[k] = (int(v),)
        elif k not in fields:
            raise TraceError(f"unknown geometry field {k!r} (fields: {', '.join(sorted(fields | {'dense_params'}))})",
                             where="--set-geometry")
        else:
            out[k] = v if k in ("name", "dtype", "activation") else int(v)
    return out


def resolve_geometry(name: str, overrides: dict | None = None, layers: int | None = None) -> Geometry:
    g = get_geometry(name)
    if overrides:
        try:
            g = g.replace(**overrides)
        except (TypeError, ValueError) as exc:
            raise TraceError(str(exc), where="geometry overrides") from None
    if layers is not None:
        try:
            g = g.first_layers(layers)
        except ValueError as exc:
            raise TraceError(str(exc), where="--layers") from None
    return g


def geometry_from_hf_config(path_or_dict, *, name: str | None = None) -> Geometry:
    """From a transformers MoE config (Qwen2/3-MoE, Mixtral, Gemma-4, OLMoE, DeepSeek-style keys)."""
    if isinstance(path_or_dict, dict):
        cfg, src = path_or_dict, "config dict"
    else:
        p = Path(path_or_dict)
        try:
            cfg = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TraceError(f"cannot read HF config: {exc}", path=p) from None
        src = str(p)
    top = cfg
    cfg = cfg.get("text_config", cfg)

    def first(*keys, default=None):
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        if default is not None:
            return default
        raise TraceError(f"HF config lacks any of {keys}", path=src)

    hidden = int(first("hidden_size", "d_model"))
    n_experts = int(first("num_experts", "num_local_experts", "n_routed_experts"))
    inter = int(first("moe_intermediate_size", "expert_intermediate_size", "intermediate_size"))
    n_heads = int(first("num_attention_heads", default=max(1, hidden // 128)))
    n_kv = int(first("num_key_value_heads", default=n_heads))
    head_dim = int(first("head_dim", default=hidden // n_heads))
    layers = int(first("num_hidden_layers", "n_layers"))
    dense = attention_params(hidden, n_heads, n_kv, head_dim) + n_experts * hidden
    if cfg.get("moe_intermediate_size") and cfg.get("intermediate_size") and cfg.get("enable_moe_block"):
        dense += 3 * hidden * int(cfg["intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):
        dense += 3 * hidden * int(cfg["shared_expert_intermediate_size"])
    act = str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu")
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or top.get("torch_dtype") or top.get("dtype") or "bf16")
    dtype = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if dtype not in DTYPE_BYTES:
        dtype = "bf16"
    return Geometry(name or str(cfg.get("model_type") or top.get("model_type") or "hf-model"), hidden=hidden,
                    moe_intermediate=inter, n_layers=layers, n_experts=n_experts,
                    top_k=int(first("num_experts_per_tok", "top_k_experts", "moe_top_k", default=2)),
                    dtype=dtype, activation="geglu" if "gelu" in act else "swiglu", dense_params=(dense,),
                    source=f"HF config {src}", extra={"n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": head_dim})


def geometry_from_meta(meta: TraceMeta, *, name: str | None = None) -> Geometry:
    """From a trace meta that has hidden_size and unquantized expert bytes (a SwiGLU expert: 3 x hidden x I)."""
    if not meta.hidden_size:
        raise TraceError(f"trace of {meta.model!r} has no hidden_size: name a geometry preset", where="geometry")
    dtype = _DTYPE_ALIASES.get((meta.dtype or "bf16").lower(), (meta.dtype or "bf16").lower())
    if dtype not in DTYPE_BYTES:
        raise TraceError(f"trace of {meta.model!r} has dtype {meta.dtype!r} (quantized?): name a geometry preset",
                         where="geometry")
    nb = DTYPE_BYTES[dtype]
    sizes = set(meta.expert_bytes)
    if len(sizes) != 1:
        raise TraceError(f"trace of {meta.model!r} has experts of different sizes: name a geometry preset",
                         where="geometry")
    eb = sizes.pop()
    inter, rem = divmod(eb, 3 * meta.hidden_size * nb)
    if rem or inter <= 0:
        raise TraceError(f"expert_bytes {eb} is not 3 x hidden {meta.hidden_size} x I x {nb} bytes", where="geometry")
    dense = tuple(b // nb for b in meta.dense_bytes) if meta.dense_bytes else (0,)
    return Geometry(name or meta.model, hidden=meta.hidden_size, moe_intermediate=inter, n_layers=meta.n_layers,
                    n_experts=meta.n_experts, top_k=meta.top_k, dtype=dtype, dense_params=dense,
                    source=f"trace meta of {meta.model!r}")
