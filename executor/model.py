"""The replay model: real SwiGLU expert compute on the tokens the trace routes to each expert, a dense stand-in,
and the all-resident reference forward used by the correctness tests.

Per layer l of a batch of T tokens (x: [T, hidden], float activations in the geometry's dtype):

    x = x + dense_l(x)                      dense stand-in (below)
    h = rms_norm(x)
    for each expert e of the layer (in the runtime's order):
        rows (t, r) with trace experts[t, l, r] == e
        y = act(h[t] W_gate^T) * (h[t] W_up^T) W_down^T * weight[t, l, r]     (act = silu, or gelu-tanh for GeGLU)
        out[t, r] = y
    x = x + out.sum(dim=1)

Per expert this is six kernel launches and little Python (`expert_into`): gate and up are one matmul (the two
matrices are adjacent in the flat buffer), the rows, destination indices and router weights of every expert of
the layer are made once per layer (`layer_rows`: one host-to-device copy, slices per expert), a slot's matrix
views are made once (`SlotPool.matrices`). At batch size 1 the host's launch path is what a decode step costs, so
every Python call here is paid hundreds of times per token.

`out` is [T, top_k, hidden] and every (t, r) is written exactly once, so the result does not depend on the order
in which experts are computed (reordered inference): the offloaded runtime and the reference give bit-identical
outputs on the same device.

Dense stand-in: the geometry's dense parameters of the layer (attention projections, router, dense MLP) as two
matrices, W1 [hidden, m] and W2 [m, hidden] with 2 x hidden x m = dense parameters: x + rms_norm(x) W1 W2 / sqrt(m).
It reads the same weight bytes and does the same FLOPs per token as the layer's projections, so its time
tracks the real dense part at small batches (weight-bound) and large ones (FLOP-bound). What it leaves out:
attention over the KV cache (a context-length-dependent cost), softmax/RoPE/norm kernels and their launches.
Document it beside any number it produces.

Inputs: deterministic per (sequence, position): x0[t, j] = sin(0.37 (position + 1) (j + 1) + sequence) / 4.
Routing and router weights are forced from the trace (weights renormalised as the trace stored them; absent
rows, expert id -1, contribute nothing).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from executor.buffers import HostExpertStore, expert_matrices
from executor.geometry import Geometry


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMS norm without a weight (torch's fused kernel where it has one: one launch instead of six)."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def dense_width(geom: Geometry, layer: int) -> int:
    """m of the dense stand-in's [hidden, m] [m, hidden] pair (2 x hidden x m = the layer's dense parameters)."""
    return max(1, geom.dense_params[layer] // (2 * geom.hidden))


def make_dense_weights(geom: Geometry, layer: int, *, device, dtype, generator: torch.Generator):
    h, m = geom.hidden, dense_width(geom, layer)
    w1 = torch.randn(h, m, generator=generator, device=device).mul_(h ** -0.5).to(dtype)
    w2 = torch.randn(m, h, generator=generator, device=device).mul_(m ** -0.5 * 0.5).to(dtype)
    return w1, w2


def dense_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return x + (rms_norm(x) @ w1) @ w2


def activation(geom: Geometry):
    return F.silu if geom.activation == "swiglu" else (lambda z: F.gelu(z, approximate="tanh"))


def split_expert(flat: torch.Tensor, geom: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate and up stacked [2I, h], down [h, I]): views of the flat buffer."""
    wd = expert_matrices(flat, geom)[2]
    return flat[: 2 * geom.matrix_numel].view(2 * geom.moe_intermediate, geom.hidden), wd


def expert_apply(mats: tuple[torch.Tensor, torch.Tensor], h: torch.Tensor, act) -> torch.Tensor:
    """SwiGLU (or GeGLU) expert on tokens h [n, hidden]; `mats` from split_expert."""
    wgu, wd = mats
    gu = torch.mm(h, wgu.t())
    i = wd.shape[1]
    return torch.mm(act(gu[:, :i]) * gu[:, i:], wd.t())


def expert_into(out2d: torch.Tensor, mats, h: torch.Tensor, rows, act) -> None:
    """out2d[t k + r] = expert(h[t]) * weight[t, r] for the rows routed to this expert (`layer_rows`)."""
    tok, dst, wcol, full = rows
    y = expert_apply(mats, h if full else h.index_select(0, tok), act)
    out2d.index_copy_(0, dst, y.mul_(wcol))


def experts_into(out2d: torch.Tensor, pool, slots: list[int], h: torch.Tensor, rows: list, geom: Geometry,
                 act) -> None:
    """`expert_into` for several experts at once, each taking every token of `h` in order (batch-size-1 decode):
    their weights stacked from the pool's slots, gate+up and down as batched matmuls, one scatter. Nine launches
    for the group instead of six per expert; the stacking reads and writes each expert's weights once more on
    the GPU (microseconds), which is cheaper than the host's launches it saves. On the CPU the result equals
    `expert_into`'s bit for bit (the tests compare with the all-resident reference)."""
    m, i, hd = geom.matrix_numel, geom.moe_intermediate, geom.hidden
    w = torch.stack([pool.buf[s] for s in slots])
    r = len(slots)
    gu = torch.matmul(h, w[:, : 2 * m].view(r, 2 * i, hd).transpose(1, 2))
    y = torch.bmm(act(gu[..., :i]) * gu[..., i:], w[:, 2 * m:].view(r, hd, i).transpose(1, 2))
    wcol = torch.cat([row[2] for row in rows])
    dst = torch.cat([row[1] for row in rows])
    out2d.index_copy_(0, dst, y.reshape(-1, hd).mul_(wcol))


def layer_rows(experts: np.ndarray, weights: torch.Tensor, device) -> dict[int, tuple]:
    """Per expert of one layer (experts [T, k] host ids, -1 = no row; weights [T, k] on the device):
    (token index, destination row t k + r of the [T k, hidden] combine buffer, router weight column, whether the
    expert takes every token in order). One copy to the device for the whole layer; per expert only slices."""
    experts = np.asarray(experts)
    T, k = experts.shape
    flat = experts.reshape(-1)
    valid = np.flatnonzero(flat >= 0)
    if not len(valid):
        return {}
    ids = flat[valid]
    order = np.argsort(ids, kind="stable")
    dst, ids_s = valid[order], ids[order]
    idx = torch.as_tensor(np.stack([dst // k, dst]).astype(np.int64)).to(device)
    wcol = weights.reshape(-1).index_select(0, idx[1]).unsqueeze(1)
    cuts = np.flatnonzero(np.diff(ids_s)) + 1
    per: dict[int, tuple] = {}
    for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(ids_s)].tolist()):
        per[int(ids_s[a])] = (idx[0, a:b], idx[1, a:b], wcol[a:b], b - a == T)
    return per


class ExpertKernels:
    """What the runtime calls to compute experts, bound to a geometry: the replay model and the live model share
    it (the same kernels whatever produced the routing)."""

    def __init__(self, geom: Geometry):
        self.geom = geom
        self._act = activation(geom)

    def split(self, flat: torch.Tensor):
        return split_expert(flat, self.geom)

    def expert_into(self, out2d: torch.Tensor, mats, h: torch.Tensor, rows: tuple) -> None:
        """out2d[t k + r] = expert(h[t]) * w[t, r] for the rows routed to this expert (see `expert_into`)."""
        expert_into(out2d, mats, h, rows, self._act)

    def experts_into(self, out2d: torch.Tensor, pool, slots: list[int], h: torch.Tensor, rows: list) -> None:
        """Several resident experts that each take every token, as one group (see `experts_into`)."""
        experts_into(out2d, pool, slots, h, rows, self.geom, self._act)


class ReplayModel(ExpertKernels):
    def __init__(self, geom: Geometry, store: HostExpertStore, *, device, seed: int = 0,
                 dtype: torch.dtype | None = None):
        super().__init__(geom)
        self.store = store
        self.device = torch.device(device)
        self.dtype = dtype or store.dtype
        self.n_layers = store.n_layers
        # generated where they live (GiBs of dense weights for the large geometries: fast on the GPU)
        g = torch.Generator(device=self.device).manual_seed(int(seed) + 7919)
        self.dense_w = [make_dense_weights(geom, layer, device=self.device, dtype=self.dtype, generator=g)
                        for layer in range(self.n_layers)]

    # -- pieces -------------------------------------------------------------------------------------------------
    def embed(self, sequences: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        pos = torch.as_tensor(np.asarray(positions), dtype=torch.float64)[:, None] + 1.0
        seq = torch.as_tensor(np.asarray(sequences), dtype=torch.float64)[:, None]
        j = torch.arange(1, self.geom.hidden + 1, dtype=torch.float64)[None, :]
        return (torch.sin(0.37 * pos * j + seq) / 4).to(self.dtype).to(self.device)

    def dense(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.dense_w[layer]
        return dense_forward(x, w1, w2)

    # -- the all-resident reference ------------------------------------------------------------------------------
    def reference_forward(self, batch_inputs) -> torch.Tensor:
        """The batch's output with every expert read straight from the host store (nothing offloaded)."""
        x = self.embed(batch_inputs.sequences, batch_inputs.positions)
        for layer in range(self.n_layers):
            x = self.dense(layer, x)
            h = rms_norm(x)
            out = torch.zeros((x.shape[0], batch_inputs.top_k, x.shape[1]), dtype=x.dtype, device=x.device)
            out2d = out.view(-1, x.shape[1])
            for e, rows in sorted(batch_inputs.rows[layer].items()):
                flat = self.store.expert((layer, e)).to(self.device)
                self.expert_into(out2d, self.split(flat), h, rows)
            x = x + out.sum(dim=1)
        return x


class BatchInputs:
    """The tensors of one batch for the replay model: per layer, the rows of each expert (`layer_rows`) with the
    router weights (zero where the trace has no row). Built before the batch's timing starts."""

    def __init__(self, batch, weights: np.ndarray, n_layers: int, device, dtype):
        self.sequences = batch.sequences
        self.positions = batch.positions
        experts = np.asarray(batch.experts)[:, :n_layers, :]  # [T, L, k]
        self.top_k = experts.shape[2]
        w = np.nan_to_num(np.asarray(weights, dtype=np.float32)[:, :n_layers, :], nan=0.0)
        w = np.where(experts >= 0, w, 0.0)
        wdev = torch.as_tensor(w).to(dtype).to(device)
        self.rows: list[dict[int, tuple]] = [layer_rows(experts[:, layer, :], wdev[:, layer, :], device)
                                             for layer in range(n_layers)]


class TraceWeights:
    """Router weights of a trace by (sequence, phase group, position), for the sim's Batch objects."""

    def __init__(self, trace, n_layers: int):
        self._by: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
        self.top_k = trace.meta.top_k
        self.n_layers = n_layers
        for r in trace.iter_routing():
            group = "decode" if r.phase == "decode" else "prompt"
            pos = np.asarray(r.positions, dtype=np.int64)
            w = np.asarray(r.weights[:, :n_layers, :], dtype=np.float32)
            self._by.setdefault((int(r.sequence), group), []).append((pos, w))

    def for_batch(self, batch) -> np.ndarray:
        group = "decode" if batch.phase == "decode" else "prompt"
        out = np.full((batch.tokens, self.n_layers, self.top_k), np.nan, dtype=np.float32)
        for i, (s, p) in enumerate(zip(batch.sequences.tolist(), batch.positions.tolist())):
            for pos, w in self._by.get((int(s), group), []):
                j = int(np.searchsorted(pos, p))
                if j < len(pos) and pos[j] == p:
                    out[i] = w[j]
                    break
        return out


def uniform_weights(batch, n_layers: int) -> np.ndarray:
    k = batch.experts.shape[2]
    return np.full((batch.tokens, n_layers, k), 1.0 / k, dtype=np.float32)


def describe_dense(geom: Geometry) -> str:
    m = dense_width(geom, 0)
    return (f"dense stand-in: x + rms(x) [{geom.hidden}x{m}] [{m}x{geom.hidden}] "
            f"({geom.dense_bytes[0] / 2**20:.1f} MiB of weights per layer; no KV-cache attention)")

