"""Where expert weights live: the host store (pinned when CUDA is available) and the device slab of fixed slots.

An expert is one flat buffer of `3 x hidden x moe_intermediate` elements: gate [I, h], up [I, h], down [h, I]
(nn.Linear weight layout), contiguous. Its natural chunks are the three matrices (`chunk_ranges(3)`); other
chunk counts split the flat buffer into equal element ranges.

Host store: experts packed into arenas (see executor.memory for why), `pin_memory=True` only when CUDA is
available; on a CPU-only machine plain tensors. Weights are random, seeded per (seed, layer, expert), scaled
like an initialised layer (gate/up ~ N(0, 1/h), down ~ N(0, 1/I)) so activations stay bounded over many
layers. On CUDA they are generated on the GPU and copied down (fast for tens of GiB); on CPU with a CPU
generator. Either way the same store feeds the offloaded runtime and the all-resident reference.

Slab: `n_slots` expert-sized buffers on the device. The slot map (key <-> slot) follows the ExpertCache: a slot
is assigned when the cache admits a key (at transfer enqueue time, as the simulator reserves the cache space)
and released when the cache evicts or removes it. Scratch: a separate pool for demand loads the cache cannot
hold (capacity 0, everything pinned, static policy); at most the unique experts of one layer and batch.
"""

from __future__ import annotations

import torch

from executor.geometry import Geometry
from executor.memory import DEFAULT_ARENA, arena_layout

Key = tuple[int, int]


def chunk_ranges(numel: int, n_chunks: int) -> list[tuple[int, int]]:
    """Element ranges of `n_chunks` near-equal chunks (3 chunks of a 3-matrix expert = the 3 matrices)."""
    n = max(1, int(n_chunks))
    bounds = [numel * i // n for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


def expert_matrices(flat: torch.Tensor, geom: Geometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, h, i = geom.matrix_numel, geom.hidden, geom.moe_intermediate
    return flat[:m].view(i, h), flat[m:2 * m].view(i, h), flat[2 * m:3 * m].view(h, i)


def _expert_seed(seed: int, layer: int, expert: int) -> int:
    return (int(seed) * 1_000_003 + layer * 65_537 + expert) & 0x7FFF_FFFF_FFFF


class HostExpertStore:
    def __init__(self, geom: Geometry, *, n_layers: int | None = None, n_experts: int | None = None, seed: int = 0,
                 pin: bool | None = None, init_device: str | torch.device | None = None,
                 arena_bytes: int = DEFAULT_ARENA, dtype: torch.dtype | None = None, init: bool = True):
        self.geom = geom
        self.n_layers = n_layers if n_layers is not None else geom.n_layers
        self.n_experts = n_experts if n_experts is not None else geom.n_experts
        self.dtype = dtype or geom.torch_dtype()
        self.numel = geom.expert_numel
        self.pinned = torch.cuda.is_available() if pin is None else bool(pin)
        if self.pinned and not torch.cuda.is_available():
            raise ValueError("pinned host memory needs CUDA")
        elem = torch.empty(0, dtype=self.dtype).element_size()
        arena, per, n_arenas = arena_layout(self.numel * elem, self.n_layers * self.n_experts, arena_bytes)
        self.arena_bytes = arena
        self.per_arena = per
        self.arenas = [torch.empty(arena // elem, dtype=self.dtype, pin_memory=self.pinned) for _ in range(n_arenas)]
        if init_device is None:
            init_device = "cuda" if torch.cuda.is_available() else "cpu"
        if init:  # random weights (replay); live mode copies the model's own weights in instead
            self._init(seed, torch.device(init_device))

    def _init(self, seed: int, dev: torch.device) -> None:
        g = self.geom
        m = g.matrix_numel
        scale_in, scale_down = g.hidden ** -0.5, g.moe_intermediate ** -0.5
        gen = torch.Generator(device=dev)
        buf = torch.empty(self.numel, dtype=torch.float32, device=dev)
        for layer in range(self.n_layers):
            for e in range(self.n_experts):
                gen.manual_seed(_expert_seed(seed, layer, e))
                buf.normal_(generator=gen)
                buf[: 2 * m].mul_(scale_in)
                buf[2 * m:].mul_(scale_down)
                self.expert((layer, e)).copy_(buf)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def expert(self, key: Key) -> torch.Tensor:
        """The flat host buffer of expert `key` (a view into its arena)."""
        layer, e = key
        if not (0 <= layer < self.n_layers and 0 <= e < self.n_experts):
            raise KeyError(f"expert {key} outside {self.n_layers} layers x {self.n_experts} experts")
        idx = layer * self.n_experts + e
        a, j = divmod(idx, self.per_arena)
        return self.arenas[a][j * self.numel:(j + 1) * self.numel]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.arenas)


class SlotPool:
    """`n_slots` expert buffers on `device` and the key <-> slot map. Plain bookkeeping; no policy here."""

    def __init__(self, n_slots: int, numel: int, dtype: torch.dtype, device, name: str = "slab", split=None):
        """`split`: flat buffer -> the views the expert kernel takes (made once per slot, on first use)."""
        self.name = name
        self.split = split
        self._mats: dict[int, object] = {}
        self.n_slots = int(n_slots)
        self.numel = numel
        self.buf = torch.empty((max(self.n_slots, 0), numel), dtype=dtype, device=device)
        self.free: list[int] = list(range(self.n_slots - 1, -1, -1))  # pop() gives slot 0 first
        self.slot_of: dict = {}
        self.owner: list = [None] * self.n_slots
        # CUDA events guarding slot reuse: last kernel that read it, last copy that wrote it
        self.last_read: list = [None] * self.n_slots
        self.last_write: list = [None] * self.n_slots

    def assign(self, owner) -> int:
        if owner in self.slot_of:
            raise RuntimeError(f"{self.name}: {owner} already holds slot {self.slot_of[owner]}")
        if not self.free:
            raise RuntimeError(f"{self.name}: no free slot for {owner} ({self.n_slots} slots, all held)")
        s = self.free.pop()
        self.slot_of[owner] = s
        self.owner[s] = owner
        return s

    def release(self, owner) -> int:
        s = self.slot_of.pop(owner)
        self.owner[s] = None
        self.free.append(s)
        return s

    def view(self, slot: int) -> torch.Tensor:
        return self.buf[slot]

    def matrices(self, slot: int):
        m = self._mats.get(slot)
        if m is None:
            m = self._mats[slot] = self.split(self.buf[slot])
        return m

    def guards(self, slot: int) -> list:
        return [ev for ev in (self.last_read[slot], self.last_write[slot]) if ev is not None]

    @property
    def used(self) -> int:
        return len(self.slot_of)
