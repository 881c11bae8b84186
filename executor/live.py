"""Live mode: an HF MoE model running with its own routing, its experts offloaded through the runtime's slab.

`LiveOffload(model, ...)` takes a transformers MoE model whose MoE blocks hold their experts as fused tensors
(transformers 5.x: `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I], called as
`experts(hidden, top_k_index, top_k_weights)`: Qwen3-MoE, which the small trained model is, Qwen2-MoE, OLMoE...):

1. every expert's weights are copied into a `HostExpertStore` (pinned on CUDA) in the replay layout (gate, up,
   down: gate_up_proj[e] is exactly gate then up), and the model's own expert tensors are freed; the dense part
   (embeddings, attention, norms, routers, head) stays on the device;
2. each block's `experts` module is replaced by `OffloadedExperts`, which runs the runtime's layer step on the
   router's live choice: `gate` (lookups, pins, early preemption, prefetch), then the experts in the runtime's
   order from the slab (`expert_buffer`, waiting for copies), then `end_layer`. The router's top-k is read on the
   host at that point, as any offloading system must;
3. the prefetcher sees the live routing so far (this batch's layers and each sequence's earlier positions) and
   the live hidden state entering the layer (for hidden-state predictors: the MoE block's input, rounded to
   float16 as a trace stores it, so that the simulator replaying the stored states predicts exactly the same),
   through the same `BatchView`; a trained predictor (`learned_mlp`) comes from an artifact fit on a trace of the
   same model (`live_predictor`);
4. `generate(prompts)` runs greedy decoding with the KV cache: one prefill batch per prompt, then one decode batch
   per new token, timed like replay (TTFT, TPOT); `metrics()` gives the simulator's metric names.

The routing a run produced (and, for hidden-state predictors, its hidden states) is kept in `history`; the
simulator replays exactly that (`sequences_for_simulator`, `live_hidden`), also later from a validation row
(`routing_json`, `hidden_blob`). Not supported: the oracle predictor (no future in a live run), Belady (needs the
future), cpu_experts, and models whose experts are separate nn.Linear modules.
The small trained model (traces/small_moe) is a Qwen3-MoE; its weights are not committed: its training run
(`traces/small_moe/device_run.sh`) must save them where `SMALL_MOE_DIR` points.
"""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from executor.buffers import HostExpertStore
from executor.geometry import Geometry, geometry_from_hf_config, small_moe_dir
from executor.memory import whole_slot_capacity
from executor.model import ExpertKernels, layer_rows
from executor.runtime import quiet_gc
from traces.format import TraceMeta


def find_moe_blocks(model) -> list[tuple[int, nn.Module]]:
    """(MoE layer index, block) for every block with fused experts, in layer order."""
    out = []
    for module in model.modules():
        ex = getattr(module, "experts", None)
        if ex is not None and hasattr(ex, "gate_up_proj") and hasattr(ex, "down_proj"):
            out.append(module)
    return list(enumerate(out))


class _LiveModel(ExpertKernels):
    """What the runtime needs of a model: the host store, dtype, device, and the expert computation."""

    def __init__(self, geom: Geometry, store: HostExpertStore, device, dtype):
        super().__init__(geom)
        self.store = store
        self.device = torch.device(device)
        self.dtype = dtype

    def embed(self, sequences, positions):  # warm-up only
        return torch.zeros(len(positions), self.geom.hidden, dtype=self.dtype, device=self.device)

    def dense(self, layer, x):  # warm-up only
        return x


class OffloadedExperts(nn.Module):
    """Drop-in for a fused-experts module: forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])."""

    def __init__(self, layer: int, live: LiveOffload):
        super().__init__()
        self.layer = layer
        self._live = [live]  # not a submodule

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self._live[0].layer_step(self.layer, hidden_states, top_k_index, top_k_weights)


class LiveOffload:
    def __init__(self, model, *, cache_capacity_bytes: int | None = None, cache_rate: float | None = None,
                 cache_policy: str = "lru", cache_scope: str = "global", policy_params: dict | None = None,
                 predictor=None, distance: int = 1, top_n: int | None = None, max_inflight_bytes=None,
                 chunked_prefetch: bool = False, chunks: int = 3, early_preemption: bool = False,
                 reordered_inference: bool = False, device=None, transfer_backend: str | None = None,
                 lookahead: int = 1, check: bool = False, name: str = "live", predictor_thread: bool = False,
                 predictor_backend: str = "auto"):
        from executor.runtime import OffloadedRuntime
        from predictors.registry import make_predictor
        from sim.cache import ExpertCache
        from sim.policies import policy_class

        if policy_class(cache_policy).needs_future:
            raise ValueError(f"policy {cache_policy!r} needs the future, which a live run does not have")
        predictor = predictor if predictor is not None else make_predictor("none")
        if predictor.reads_future:
            raise ValueError("the oracle predictor needs the future, which a live run does not have")
        self.model = model
        cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
        blocks = find_moe_blocks(model)
        if not blocks:
            raise ValueError("no MoE block with fused experts (experts.gate_up_proj / down_proj) in this model")
        ex0 = blocks[0][1].experts
        n_exp, two_i, hidden = ex0.gate_up_proj.shape
        geom = geometry_from_hf_config(cfg, name=name)
        geom = geom.replace(n_layers=len(blocks), n_experts=n_exp, moe_intermediate=two_i // 2, hidden=hidden)
        self.device = torch.device(device or next(model.parameters()).device)
        if self.device.type == "cuda":
            from executor.transfer import cuda_device

            self.device = cuda_device(self.device)
        dtype = ex0.gate_up_proj.dtype
        self.geom = geom
        store = HostExpertStore(geom, n_layers=len(blocks), n_experts=n_exp, pin=self.device.type == "cuda",
                                dtype=dtype, init=False)
        m = geom.matrix_numel
        with torch.no_grad():
            for layer, block in blocks:
                ex = block.experts
                for e in range(n_exp):
                    flat = store.expert((layer, e))
                    flat[:2 * m].copy_(ex.gate_up_proj[e].reshape(-1))
                    flat[2 * m:].copy_(ex.down_proj[e].reshape(-1))
                block.experts = OffloadedExperts(layer, self)  # the model's own expert tensors are freed
        self.blocks = blocks
        self.top_k = int(cfg.get("num_experts_per_tok") or cfg.get("top_k_experts") or geom.top_k)
        meta = live_meta(geom, len(blocks), self.top_k, name)
        self.meta = meta
        if cache_capacity_bytes is None:
            cache_capacity_bytes = ExpertCache.resolve_capacity_bytes(
                expert_bytes=meta.expert_bytes, n_experts=n_exp, cache_rate=cache_rate if cache_rate is not None
                else 0.25)
        cache_capacity_bytes = whole_slot_capacity(cache_capacity_bytes, geom.expert_bytes, len(blocks), cache_scope)
        self._hidden_now: dict[int, np.ndarray] = {}
        # per sequence, the layer inputs [L, H] (float16) of its last position run: the next batch's past_hidden
        self._last_hidden: dict[int, np.ndarray] = {}
        self.rt = OffloadedRuntime(
            _LiveModel(geom, store, self.device, dtype), meta, [], weights_fn=None,
            cache_capacity_bytes=cache_capacity_bytes, cache_scope=cache_scope, cache_policy=cache_policy,
            policy_params=policy_params, predictor=predictor, distance=distance, top_n=top_n,
            max_inflight_bytes=max_inflight_bytes, chunked_prefetch=chunked_prefetch, chunks=chunks,
            early_preemption=early_preemption, reordered_inference=reordered_inference,
            trace=SimpleNamespace(meta=meta, hidden_states=self._hidden_states, router_weights=None),
            transfer_backend=transfer_backend, lookahead=lookahead, check=check, scratch_slots=n_exp,
            predictor_thread=predictor_thread, predictor_backend=predictor_backend)
        self._batch = None
        self._past: dict[int, list[np.ndarray]] = {}
        self._index = 0
        # (phase, sequences, positions, experts [T, L, k], hidden float16 [T, L, H] or None) of every batch run
        self.history: list[tuple] = []

    # -- the prefetcher's view of the live run ------------------------------------------------------------------
    def _hidden_states(self, layer: int) -> np.ndarray:
        return self._hidden_now[layer]

    def begin(self, phase: str, sequences: list[int], positions: list[int]) -> None:
        T = len(positions)
        past = {s: (np.concatenate(self._past[s]) if self._past.get(s) else
                    np.full((0, self.meta.n_layers, self.top_k), -1, np.int16)) for s in set(sequences)}
        self._batch = SimpleNamespace(
            index=self._index, phase=phase, sequences=np.asarray(sequences, np.int64),
            positions=np.asarray(positions, np.int64),
            experts=np.full((T, self.meta.n_layers, self.top_k), -1, np.int16), past=past,
            hidden_rows=np.tile(np.arange(T, dtype=np.int64)[:, None], (1, self.meta.n_layers)), starts=[],
            tokens=T)
        pf = self.rt.prefetcher
        if getattr(pf, "needs_hidden", False):
            self._batch.past_hidden = self._past_hidden_fn(phase, sequences)
        self._hidden_now = {}
        pf.forget_hidden()  # the live hidden states change every batch
        self.rt.begin_batch(self._batch)
        self._index += 1

    def _past_hidden_fn(self, phase: str, sequences: list[int]):
        """view.past_hidden for the batch: each token's sequence's layer inputs at its last position before the
        batch (zeros in a prompt batch, as predictors.views and the simulator give them)."""
        L, H = self.meta.n_layers, self.geom.hidden
        none = np.zeros((L, H), np.float16)
        prev = np.stack([none if phase == "prefill" else self._last_hidden.get(s, none) for s in sequences])
        def past_hidden(layer: int) -> np.ndarray:
            out = prev[:, layer].astype(np.float32)
            out.setflags(write=False)
            return out
        return past_hidden

    def end(self, output=None) -> None:
        b = self._batch
        for i, s in enumerate(b.sequences.tolist()):
            self._past.setdefault(s, []).append(b.experts[i:i + 1])
        hidden = None
        if self._hidden_now:
            hidden = np.stack([self._hidden_now[layer] for layer in range(self.meta.n_layers)], axis=1)
            for i, s in enumerate(b.sequences.tolist()):  # (the last token of a sequence wins)
                self._last_hidden[s] = hidden[i]
        self.history.append((b.phase, b.sequences, b.positions, b.experts, hidden))
        self.rt.end_batch(b.phase, b.tokens, output)
        self._batch = None

    # -- the layer step, called by OffloadedExperts ----------------------------------------------------------------
    def layer_step(self, layer: int, hidden, top_k_index, top_k_weights):
        from sim.engine.schedule import layer_sets

        rt = self.rt
        b = self._batch
        if b is None:
            raise RuntimeError("LiveOffload: call the model through LiveOffload.forward/generate")
        T = hidden.shape[0]
        idx = top_k_index.detach().to("cpu").numpy().astype(np.int16)  # the host reads the routing here
        b.experts[:T, layer, :] = idx
        if "hidden_states" in rt.prefetcher.predictor.needs:  # float16, as a trace stores it (module docstring);
            self._hidden_now[layer] = hidden.detach().to(torch.float16).cpu().numpy()  # read as float32, as a trace
        ids = layer_sets(idx[:, None, :])[0][0]
        order, local = rt.gate(layer, ids)
        out = torch.zeros((T, idx.shape[1], hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
        out2d = out.view(-1, hidden.shape[1])
        rows = layer_rows(idx, top_k_weights.to(hidden.dtype), hidden.device)  # from the routing on the host
        rt.compute_experts(layer, order, local, hidden, rows, out2d)
        rt.end_layer(layer, ids)
        return out.sum(dim=1)

    # -- running the model -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids, *, phase: str, sequences: list[int], positions: list[int], **kwargs):
        """One forward pass of the wrapped model as one batch (tokens flattened row-major)."""
        self.begin(phase, sequences, positions)
        out = self.model(input_ids=input_ids, **kwargs)
        self.end(out.logits[:, -1].float() if hasattr(out, "logits") else None)
        return out

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding, one sequence at a time (batch size 1, as the replay suites): prefill, then decode."""
        outs = []
        for s, prompt in enumerate(prompts):
            ids = torch.tensor([prompt], device=self.device)
            res = self.forward(ids, phase="prefill", sequences=[s] * len(prompt), positions=list(range(len(prompt))),
                               use_cache=True)
            past = res.past_key_values
            tok = int(res.logits[0, -1].argmax())
            gen = [tok]
            for i in range(max_new_tokens - 1):
                pos = len(prompt) + i
                res = self.forward(torch.tensor([[tok]], device=self.device), phase="decode", sequences=[s],
                                   positions=[pos], past_key_values=past, use_cache=True)
                past = res.past_key_values
                tok = int(res.logits[0, -1].argmax())
                gen.append(tok)
            outs.append(gen)
        return outs

    def finish(self) -> dict:
        self.rt.close()
        return self.rt.metrics()


def live_meta(geom: Geometry, n_layers: int, top_k: int, name: str) -> TraceMeta:
    """What the simulator knows of a live run's model: its first `n_layers` layers of `geom`."""
    return TraceMeta(model=name, source="executor.live", n_layers=n_layers, n_experts=geom.n_experts, top_k=top_k,
                     expert_bytes=[geom.expert_bytes] * n_layers, dense_bytes=geom.dense_bytes[:n_layers],
                     hidden_size=geom.hidden, dtype=geom.dtype, license="n/a", attribution="n/a",
                     has_hidden_states=True)


def live_profile(profile, name: str, meta):
    """The profile the simulator should use for a live run of model `name`: its dense tables replaced by the
    model's measured live layer (`live_dense_compute`), when the profile has one; else the profile unchanged."""
    table = next((t for t in (profile.live_dense_compute or []) if t.name == name), None)
    if table is None:
        return profile
    nbytes = meta.dense_bytes[0] if meta.dense_bytes else table.dense_bytes
    table = table.model_copy(update={"dense_bytes": nbytes})
    return profile.model_copy(update={"dense_compute": [table], "default_dense": table.name})


def measure_live_dense(model, profile, *, name: str, prompt_lens=(8, 24), new_tokens: int = 8, repeats: int = 3,
                       device=None) -> dict:
    """A `live_dense_compute` table for `model` (a transformers MoE): the live runtime with every expert resident
    (cache rate 1.0; a first generation loads them, the same prompts again then hit everywhere) times prefill
    batches of each prompt length and decode batches; per layer, what is left after the experts as the simulator
    charges them (`profile`'s expert tables for the batch's unique experts, a resident group at `group_ms` where
    the profile has it: sim.engine.core.group_then_each) is the dense part."""
    import statistics

    from sim.engine.core import group_then_each
    from sim.engine.schedule import layer_sets
    from sim.hardware import CostModel

    rng = np.random.default_rng(0)
    vocab = int(model.config.vocab_size)
    prompts = [rng.integers(2, vocab, size=n).tolist() for n in prompt_lens]
    live = LiveOffload(model, cache_rate=1.0, device=device, name=name)
    with quiet_gc():
        live.generate(prompts, new_tokens)  # loads the experts (and warms the kernels)
        first = len(live.history)
        for _ in range(repeats):
            live.generate(prompts, new_tokens)
    live.finish()
    cost = CostModel(profile, live.meta)
    L = live.meta.n_layers
    per_tokens: dict[int, list[float]] = {}
    for row, batch in zip(live.rt.batch_rows[first:], live.history[first:]):
        experts = batch[3]  # [T, L, k]
        T = int(row["tokens"])
        cost.prepare(T)
        ex_s = 0.0
        for layer, (ids, counts) in enumerate(layer_sets(experts)):
            # what the engine charges an all-resident layer (its resident group, where the profile has group_ms)
            cnt = dict(zip(ids, counts)) if counts is not None else dict.fromkeys(ids, 1)
            es, gs = cost.expert_s[layer], cost.group_s[layer]
            if gs is not None and len(ids) > 1:
                ex_s = group_then_each(ex_s, sorted(ids), cnt, T, es, gs)
            else:
                for e in ids:
                    ex_s += es[cnt[e]]
        per_tokens.setdefault(T, []).append(max(0.0, (row["duration_ms"] * 1e-3 - ex_s) / L) * 1e3)
    tokens = sorted(per_tokens)
    return {"name": name, "dense_bytes": int(live.meta.dense_bytes[0]) if live.meta.dense_bytes else 1,
            "tokens": tokens, "ms": [round(statistics.median(per_tokens[t]), 5) for t in tokens],
            "note": f"measured live ({name}, random weights): every expert resident, median of {repeats} runs of "
                    f"{len(prompts)} prompts, the experts subtracted as the profile charges them"}


def routing_json(live: LiveOffload) -> str:
    """The routing a live run produced (its batches' phase, sequences, positions, experts), as JSON: stored in the
    validation row so the simulator side can be recomputed later without the model (`validate --resimulate`)."""
    return json.dumps({"n_layers": live.meta.n_layers, "top_k": live.top_k,
                       "batches": [[h[0], h[1].tolist(), h[2].tolist(), h[3].tolist()] for h in live.history]})


def live_hidden(history) -> np.ndarray | None:
    """Every batch token's hidden states in run order, float16 [N, L, H] (the rows `_sequences` numbers), or None
    where the run kept none (no hidden-state predictor)."""
    parts = [h[4] for h in history if len(h) > 4 and h[4] is not None]
    return np.concatenate(parts) if parts else None


def hidden_blob(live: LiveOffload) -> str | None:
    """`live_hidden` as text (base64 of a compressed .npz) for a validation row; None without hidden states."""
    hidden = live_hidden(live.history)
    if hidden is None:
        return None
    buf = io.BytesIO()
    np.savez_compressed(buf, hidden=hidden)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class HiddenStates:
    """What the simulator's prefetcher reads of a trace for hidden-state predictors (`hidden_states(layer)`), over
    a live run's kept states; rows are numbered as `_sequences` numbers them."""

    def __init__(self, hidden: np.ndarray):
        self.hidden = hidden

    def hidden_states(self, layer: int) -> np.ndarray:
        return self.hidden[:, layer]


def sequences_from_routing(blob: str, hidden: str | None = None) -> tuple[list, HiddenStates | None]:
    """`routing_json`'s text (and `hidden_blob`'s) back as the simulator's SequenceData (prefill batch, then decode
    rows) and the hidden states they point at (None without)."""
    d = json.loads(blob)
    history = [(ph, np.asarray(s, dtype=np.int64), np.asarray(p, dtype=np.int64), np.asarray(e, dtype=np.int16))
               for ph, s, p, e in d["batches"]]
    states = None
    if isinstance(hidden, str):
        states = np.load(io.BytesIO(base64.b64decode(hidden)))["hidden"]
        n, i = len(states), 0
        for j, h in enumerate(history):  # the states belong to the batches in run order
            history[j] = (*h, states[i:i + len(h[2])])
            i += len(h[2])
        if i != n:
            raise ValueError(f"the stored hidden states have {n} rows, the stored routing {i} batch tokens")
    return _sequences(history, d["n_layers"], d["top_k"]), None if states is None else HiddenStates(states)


def sequences_for_simulator(live: LiveOffload) -> tuple[list, HiddenStates | None]:
    """The routing a live run produced, as the simulator's SequenceData (prefill batch, then decode rows), and its
    hidden states (None when the run kept none)."""
    hidden = live_hidden(live.history)
    return (_sequences(live.history, live.meta.n_layers, live.top_k),
            None if hidden is None else HiddenStates(hidden))


def _sequences(history, L: int, k: int) -> list:
    """SequenceData per sequence; where the batches carry hidden states, hidden rows number the batch tokens in
    run order (the rows of `live_hidden`)."""
    from sim.engine.schedule import SequenceData

    by_seq: dict[int, dict] = {}
    row0 = 0
    for h in history:
        phase, seqs, pos, experts = h[:4]
        rows = None
        if len(h) > 4 and h[4] is not None:  # (only batches with states count rows, as live_hidden stacks them)
            rows = np.arange(row0, row0 + len(pos), dtype=np.int64)
            row0 += len(pos)
        for s in sorted(set(seqs.tolist())):
            sel = seqs == s
            hr = np.repeat(rows[sel][:, None], L, axis=1) if rows is not None else None
            by_seq.setdefault(s, {"prefill": [], "decode": []})[phase].append((pos[sel], experts[sel], hr))
    out = []
    for s, parts in by_seq.items():
        prompts = [("prefill", ex, p, hr) for p, ex, hr in parts["prefill"]]
        if parts["decode"]:
            gen = np.concatenate([ex for _, ex, _ in parts["decode"]])
            gpos = np.concatenate([p for p, _, _ in parts["decode"]])
            ghr = (np.concatenate([hr for _, _, hr in parts["decode"]])
                   if all(hr is not None for _, _, hr in parts["decode"]) else None)
        else:
            gen, gpos, ghr = np.full((0, L, k), -1, np.int16), np.zeros(0, np.int64), None
        n_before = sum(len(p[1]) for p in prompts)
        allrows = np.concatenate([p[1] for p in prompts] + [gen]) if prompts or len(gen) else gen
        last = prompts[-1][3][-1] if prompts and prompts[-1][3] is not None and len(prompts[-1][3]) else None
        out.append(SequenceData(s, prompts, gen, gpos, ghr, allrows, n_before, last))
    return out


def small_model_for_timing(device):
    """The small model's architecture (data/small_moe/model_config.json) with random weights: its layers' timing
    does not depend on the weights, so calibration needs no trained model."""
    import transformers

    from executor.geometry import REPO_ROOT

    raw = json.loads((REPO_ROOT / "data" / "small_moe" / "model_config.json").read_text())
    cfg = transformers.AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items()
                                                                      if k not in ("architectures", "dtype")})
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()


def load_small_model(device):
    """The small trained model (transformers) from SMALL_MOE_DIR / data/small_moe/model, or a clear error."""
    d = small_moe_dir()
    if d is None or not (list(d.glob("*.safetensors")) or list(d.glob("*.bin"))):
        where = f"{d} has a config.json but no weights" if d else "no small-moe model directory"
        raise NotImplementedError(f"live mode needs the small trained model's weights ({where}; set SMALL_MOE_DIR "
                                  "to the directory traces.small_moe.train wrote)")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16 if torch.device(device).type == "cuda"
                                                else torch.float32).to(device).eval(), d


def read_prompt_ids(path, n: int, max_tokens: int = 24) -> list[list[int]]:
    import json
    from pathlib import Path

    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append([int(x) for x in json.loads(line)["ids"]][:max_tokens])
        if len(out) >= n:
            break
    return out


def run_live(ex: dict, cfg, profile, *, device=None, model=None, lookahead: int = 1, repeats: int = 1,
             real_stat: str = "median", predictor_backend: str = "auto") -> dict:
    """A validation run in live mode: the small model generates on held-out prompts with its experts offloaded;
    the simulator then runs the routing it produced, with the same cache, predictor and switches.

    An untimed warm-up generation comes first (the process's first Hugging Face forward pays one-time costs: in
    session 4 the first live run took 153 ms to prefill and the same config later 48), then `repeats` timed runs,
    each on a freshly loaded model (LiveOffload takes the model's experts over); the median run by total time (or
    the fastest, `real_stat`) is compared, its routing simulated."""
    import copy

    from executor.geometry import REPO_ROOT
    from executor.validate import batch_times, compare_row, repeat_run

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fresh = (lambda: copy.deepcopy(model)) if model is not None else (lambda: load_small_model(device)[0])
    model_dir = None if model is not None else small_moe_dir()
    prompts = read_prompt_ids(ex.get("prompts") or REPO_ROOT / "data" / "small_moe" / "prompts.jsonl",
                              cfg.max_sequences or 4)
    inflight = cfg.prefetch.max_inflight_mib * (1 << 20) if cfg.prefetch.max_inflight_mib is not None else None
    new_tokens = cfg.max_decode_tokens if cfg.max_decode_tokens is not None else 32

    artifact = live_artifact(cfg, model_dir)

    def one(prompts_=prompts, tokens: int = max(1, new_tokens + 1)):
        live = LiveOffload(fresh(), cache_capacity_bytes=None, cache_rate=cfg.cache.cache_rate,
                           cache_policy=cfg.cache.policy, cache_scope=cfg.cache.scope,
                           policy_params=cfg.cache.policy_params,
                           predictor=live_predictor(cfg, artifact),
                           distance=cfg.prefetch.distance, top_n=cfg.prefetch.top_n, max_inflight_bytes=inflight,
                           chunked_prefetch=cfg.chunked_prefetch, chunks=cfg.prefetch.chunks,
                           early_preemption=cfg.early_preemption, reordered_inference=cfg.reordered_inference,
                           device=device, lookahead=lookahead, name=ex.get("geometry") or "small-moe",
                           predictor_thread=cfg.prefetch.blocking is False, predictor_backend=predictor_backend)
        live.rt.warmup([1, max(len(p) for p in prompts_)])
        with quiet_gc():
            live.generate(prompts_, tokens)
        return live, live.finish()

    one(prompts[:1], 2)  # warm-up, not timed
    (live, real), repeat_cols = repeat_run(one, repeats, device, real_stat)
    capacity = live.rt.n_slots * live.meta.expert_bytes[0]
    seqs, hidden = sequences_for_simulator(live)
    sim = simulate_live(cfg, profile, ex.get("geometry") or "small-moe", live.meta, seqs, capacity, hidden,
                        live.rt.prefetcher.predictor)
    return compare_row(real, sim, {"geometry_name": live.geom.name, "n_layers": live.meta.n_layers,
                                   "slab_slots": live.rt.n_slots, "capacity_bytes": capacity, "device": str(device),
                                   "live_routing": routing_json(live), "live_hidden": hidden_blob(live),
                                   "live_artifact": str(artifact) if artifact else None,
                                   "real_batch_ms": batch_times(live.rt), **repeat_cols})


def live_artifact(cfg, model_dir=None):
    """The artifact of a live run's trainable predictor (learned_mlp, cross_layer, ...), which must have been fit on
    a trace of the same model: `prefetch.artifact`, else `MODEL_DIR/predictors/NAME_dD.npz` beside the live model's
    weights (executor/device_run.sh fits it there right after training the model); missing, the run is skipped.
    None for a predictor that is not trained."""
    from executor.replay import predictor_class
    from sim.config import resolve_path

    name, d = cfg.prefetch.predictor, cfg.prefetch.distance
    if cfg.prefetch.artifact:
        return resolve_path(cfg.prefetch.artifact, cfg.base_dir, field="prefetch.artifact", source=cfg.source_file)
    if not getattr(predictor_class(name), "trainable", False):
        return None
    path = model_dir / "predictors" / f"{name}_d{d}.npz" if model_dir is not None else None
    if path is None or not path.exists():
        where = f"{path} is missing" if path is not None else "no small-moe model directory (SMALL_MOE_DIR)"
        raise NotImplementedError(f"live {name} at d={d} needs an artifact fit on a trace of the live model "
                                  f"({where}; set prefetch.artifact, or see executor/device_run.sh)")
    return path


def live_predictor(cfg, artifact=None):
    """The run's predictor: loaded from `artifact` (live_artifact), else made from the config."""
    from predictors.registry import make_predictor

    if artifact is not None:
        return make_predictor(cfg.prefetch.predictor, artifact=str(artifact))
    return make_predictor(cfg.prefetch.predictor, **cfg.prefetch.predictor_params)


def simulate_live(cfg, profile, name: str, meta, sequences, capacity_bytes: int, hidden=None,
                  predictor=None) -> dict:
    """The simulator on a live run's routing (and hidden states, for hidden-state predictors) with the run's own
    predictor (`live_predictor`; made from the config when None): both phases (a live run always prefills, then
    decodes), the profile's live layer of model `name` in place of the dense stand-in (`live_profile`)."""
    from executor.validate import simulate

    return simulate(*live_simulation_inputs(cfg, profile, name, meta, sequences, hidden, predictor), capacity_bytes)


def live_simulation_inputs(cfg, profile, name: str, meta, sequences, hidden=None, predictor=None) -> tuple:
    """(config, setup, profile) of `simulate_live`."""
    setup = SimpleNamespace(meta=meta, sequences=sequences, trace=hidden, predictor=predictor)
    return cfg.model_copy(update={"phase": "both"}), setup, live_profile(profile, name, meta)
