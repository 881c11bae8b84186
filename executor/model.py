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
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


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


def expert_forward(flat: torch.Tensor, h: torch.Tensor, geom: Geometry, act) -> torch.Tensor:
    """SwiGLU (or GeGLU) expert on tokens h [n, hidden] with weights in the flat buffer `flat`."""
    wg, wu, wd = expert_matrices(flat, geom)
    return F.linear(act(F.linear(h, wg)) * F.linear(h, wu), wd)


class ReplayModel:
    def __init__(self, geom: Geometry, store: HostExpertStore, *, device, seed: int = 0,
                 dtype: torch.dtype | None = None):
        self.geom = geom
        self.store = store
        self.device = torch.device(device)
        self.dtype = dtype or store.dtype
        self.n_layers = store.n_layers
        # generated where they live (GiBs of dense weights for the large geometries: fast on the GPU)
        g = torch.Generator(device=self.device).manual_seed(int(seed) + 7919)
        self.dense_w = [make_dense_weights(geom, layer, device=self.device, dtype=self.dtype, generator=g)
                        for layer in range(self.n_layers)]
        self._act = activation(geom)

    # -- pieces -------------------------------------------------------------------------------------------------
    def embed(self, sequences: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        pos = torch.as_tensor(np.asarray(positions), dtype=torch.float64)[:, None] + 1.0
        seq = torch.as_tensor(np.asarray(sequences), dtype=torch.float64)[:, None]
        j = torch.arange(1, self.geom.hidden + 1, dtype=torch.float64)[None, :]
        return (torch.sin(0.37 * pos * j + seq) / 4).to(self.dtype).to(self.device)

    def dense(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.dense_w[layer]
        return dense_forward(x, w1, w2)

    def expert(self, flat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return expert_forward(flat, h, self.geom, self._act)

    def expert_into(self, out: torch.Tensor, flat: torch.Tensor, h: torch.Tensor, rows: tuple, w: torch.Tensor):
        """out[t, r] = expert(h[t]) * w for the (t, r) rows routed to this expert."""
        t_idx, r_idx = rows
        y = self.expert(flat, h[t_idx])
        out[t_idx, r_idx] = y * w[t_idx, r_idx].unsqueeze(-1)

    # -- the all-resident reference ------------------------------------------------------------------------------
    def reference_forward(self, batch_inputs) -> torch.Tensor:
        """The batch's output with every expert read straight from the host store (nothing offloaded)."""
        x = self.embed(batch_inputs.sequences, batch_inputs.positions)
        for layer in range(self.n_layers):
            x = self.dense(layer, x)
            h = rms_norm(x)
            out = torch.zeros((x.shape[0], batch_inputs.top_k, x.shape[1]), dtype=x.dtype, device=x.device)
            w = batch_inputs.weights[layer]
            for e, rows in sorted(batch_inputs.rows[layer].items()):
                flat = self.store.expert((layer, e)).to(self.device)
                self.expert_into(out, flat, h, rows, w)
            x = x + out.sum(dim=1)
        return x


class BatchInputs:
    """The tensors of one batch for the replay model: per layer, the (token, rank) rows of each expert and the
    router weights [T, k] (zero where the trace has no row)."""

    def __init__(self, batch, weights: np.ndarray, n_layers: int, device, dtype):
        self.sequences = batch.sequences
        self.positions = batch.positions
        experts = np.asarray(batch.experts)[:, :n_layers, :]  # [T, L, k]
        self.top_k = experts.shape[2]
        w = np.nan_to_num(np.asarray(weights, dtype=np.float32)[:, :n_layers, :], nan=0.0)
        w = np.where(experts >= 0, w, 0.0)
        self.weights = [torch.as_tensor(w[:, layer, :]).to(dtype).to(device) for layer in range(n_layers)]
        self.rows: list[dict[int, tuple]] = []
        for layer in range(n_layers):
            ex = experts[:, layer, :]
            t_idx, r_idx = np.nonzero(ex >= 0)
            ids = ex[t_idx, r_idx]
            per: dict[int, tuple] = {}
            if len(ids):
                order = np.argsort(ids, kind="stable")
                ids_s, t_s, r_s = ids[order], t_idx[order], r_idx[order]
                cuts = np.flatnonzero(np.diff(ids_s)) + 1
                for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(ids_s)]):
                    per[int(ids_s[a])] = (torch.as_tensor(t_s[a:b], device=device),
                                          torch.as_tensor(r_s[a:b], device=device))
            self.rows.append(per)


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

