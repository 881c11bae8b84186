"""Miss-ratio curves: the hit rate of a policy at every cache size, from the demand lookup stream.

    python -m sim.mrc TRACE --policies lru,belady,fifo,lfu [--scope global|per_layer] [--unit experts|bytes]
                      [--phase both|prefill|decode] [--batch-size B] [--semantics gate|sequential]
                      [--points N | --capacities C,C,...] [--json]

JSON: {"unit": "experts"|"bytes", "scope": ..., "semantics": ..., "lookups": N, "policies": {"lru": {"capacity":
[...], "hit_rate": [...], "method": ..., "exact": bool, "exact_from": C}, ...}}. `capacity` is the TOTAL cache
size (experts, or bytes); in per_layer scope each layer gets capacity // n_layers of it, as in ExpertCache.

Semantics: a curve is, at each capacity, the hit count of `sim.cache.ExpertCache` driven by `replay` over the
demand stream of `sim.access` (one lookup per unique expert per (layer, batch)):
- "gate" (default; DESIGN.md): all lookups of a (layer, batch) group see the cache as it is at the layer's gate,
  the group's experts are pinned while the layer runs (never evicted by its own misses), the misses are inserted,
  and the group's experts end up in first-occurrence recency order (they are touched in the order they are used,
  so recency does not depend on which of them hit: that is what makes a one-pass algorithm possible). The SimPy
  engine matches it when it touches the layer's experts in first-occurrence order after queuing its misses.
- "sequential": one lookup at a time, insert on a miss, no pins: what libCacheSim and other trace simulators do
  (an earlier miss of a group may evict a later expert of the same group). tests/test_sim_libcachesim.py checks
  ExpertCache and these curves against libCacheSim's own simulator in this mode.
The two differ by a handful of lookups on the public traces (global LRU at 4000 MiB: Qwen3 29600 vs 29596 hits of
39526, Gemma-4 18871 vs 18862 of 24578). Curves are exact from the capacity `exact_from` up: in gate semantics
the cache must hold the largest group (in per_layer scope each layer's share its layer's largest group; for
Belady one expert more); below that the group itself does not fit and the engine streams experts uncached.
Prefetches (touches of resident experts, speculative inserts) are not part of a miss-ratio curve.

Methods (the `method` key):
- `lru`, "stack": one pass gives every lookup the smallest capacity at which it hits (the LRU stack distance,
  Mattson et al. 1970: the distinct keys looked up since its previous lookup, up to its group's start in gate
  semantics, plus one; in bytes their sizes plus its own size) in O(1) per lookup: a bitmap marks each key's latest
  slot, slots are compacted when used up (arrays bounded by the number of keys) and two levels of running counts
  (in experts each updated with one vector compare-and-add per lookup) answer "live slots after p" with one popcount
  (numba when installed, plain Python with a Fenwick tree otherwise; same integers; in experts in sequential
  semantics up to 8192 keys a copy specialised per size class: `_seq_body`). In experts the kernel returns the
  cumulative histogram, i.e. the hits at every capacity, directly.
  In bytes with unequal sizes (Gemma, Qwen3 here) the LRU content is always the longest prefix of the recency stack
  that fits, so the byte stack distance is exact for every capacity >= the largest expert (steps below that size
  are moved up to it).
- `belady`, "opt-stack": Mattson et al.'s OPT stack algorithm (priority = sooner next use) gives every lookup's
  smallest hitting capacity under demand MIN (farthest-next-use eviction, a missed key always inserted) for all
  sizes in one pass; in gate semantics on the stream where each group is followed by an uncounted second reference
  to its experts (so MIN keeps them until the group ends). Exact in experts; in per_layer scope in bytes too (sizes
  are uniform within a layer); in global scope with unequal sizes there is no stack algorithm (byte-optimal caching
  is NP-hard), so it is simulated at each capacity with ExpertCache's belady policy (method "simulated",
  exact: false: farthest-next-use, not the byte optimum).
- every other policy (fifo, lfu, static, ...): ExpertCache replayed at each capacity of the grid (`--points`,
  default 16 evenly spaced sizes, or `--capacities`), method "simulated".
- `lcs:NAME` (any libCacheSim algorithm, S3FIFO included): libCacheSim's own simulator on the same stream at each
  capacity of the grid (`run_libcachesim`, always sequential), method "libcachesim".
Exact curves are step functions: by default their capacities are the step points (every size up to saturation
in experts); with --points/--capacities they are evaluated at those sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sim.access import PHASE_SELECT, LookupStream, lookup_stream
from traces.errors import TraceError, run_cli

INF = np.iinfo(np.int64).max
UNITS = ("experts", "bytes")
SCOPES = ("global", "per_layer")
EXACT = ("lru", "belady")
SEMANTICS = ("gate", "sequential")

# ---------------------------------------------------------------------------------------------------------------
# kernels: smallest hitting capacity per lookup
# ---------------------------------------------------------------------------------------------------------------


def lru_hit_capacity_py(ids: np.ndarray, cls: np.ndarray, sizes: np.ndarray, n_ids: int,
                        bounds: np.ndarray | None = None) -> np.ndarray:
    """Reference version (pure Python + a Fenwick tree over time).

    For each lookup t of key ids[t] (0..n_ids-1, size sizes[cls[t]]): the smallest LRU capacity at which it hits,
    i.e. the total size of the distinct keys looked up since its previous lookup, plus its own size; INF for a
    first lookup. `bounds` (group boundaries: 0 = b_0 < b_1 < ... < b_G = N) switches on gate semantics: every
    lookup of a group is answered against the state at the group's start (the keys of a group are unique), so
    keys looked up earlier in the same group do not count; None = one group per lookup (sequential semantics)."""
    n = len(ids)
    if bounds is None:
        bounds = np.arange(n + 1)
    tree = [0] * (n + 1)
    last = [-1] * n_ids
    out = np.full(n, INF, dtype=np.int64)
    w_all = sizes[cls].tolist() if n else []
    ids_l = ids.tolist()
    bl = np.asarray(bounds).tolist()
    for g in range(len(bl) - 1):
        g0, g1 = bl[g], bl[g + 1]
        for t in range(g0, g1):  # queries against the state at the group start
            p = last[ids_l[t]]
            if p >= 0:
                s = 0
                i = g0
                while i > 0:
                    s += tree[i]
                    i -= i & -i
                i = p + 1
                while i > 0:
                    s -= tree[i]
                    i -= i & -i
                out[t] = s + w_all[t]
        for t in range(g0, g1):  # then the group's updates
            k = ids_l[t]
            w = w_all[t]
            p = last[k]
            if p >= 0:
                i = p + 1
                while i <= n:
                    tree[i] -= w
                    i += i & -i
            i = t + 1
            while i <= n:
                tree[i] += w
                i += i & -i
            last[k] = t
    return out


def lru_hit_counts_py(a: np.ndarray, b: np.ndarray, mul: int, n_ids: int,
                      bounds: np.ndarray | None = None) -> np.ndarray:
    """Unit sizes, key of lookup t = a[t] * mul + b[t]: cum[c] = the lookups that hit at capacity c, for c = 0 up to
    the largest hitting capacity (the cumulative histogram of lru_hit_capacity_py)."""
    ids = np.asarray(a, dtype=np.int64) * int(mul) + np.asarray(b, dtype=np.int64)
    h = lru_hit_capacity_py(ids, np.zeros(len(ids), np.int64), np.ones(1, np.int64), n_ids, bounds)
    return np.cumsum(np.bincount(h[h != INF], minlength=1))


def opt_hit_capacity_py(ids: np.ndarray, next_use: np.ndarray, n_ids: int) -> np.ndarray:
    """Mattson et al.'s OPT stack (unit sizes): each lookup's smallest hitting capacity under demand MIN.

    Stack order is priority (sooner next use = higher). On a lookup of x at depth d (len(stack) for a miss), x goes
    on top, the former top is carried down, and at each level i < d the carried item and the one there swap when
    the one there is used later; the carried item lands in x's former slot. The carried items are the running
    maxima ('records') of next-use time along the stack, so one update is a rotation over those records."""
    n = len(ids)
    stack = np.empty(n_ids, dtype=np.int64)
    prio = np.empty(n_ids, dtype=np.int64)
    pos = np.full(n_ids, -1, dtype=np.int64)  # stack position of each key (-1 = not seen)
    depth = 0
    out = np.full(n, INF, dtype=np.int64)
    ids_l = np.asarray(ids).tolist()
    nu_l = np.asarray(next_use).tolist()
    for t in range(n):
        k = ids_l[t]
        d = int(pos[k])
        if d >= 0:
            out[t] = d + 1
        else:
            d = depth
            depth += 1
        if d == 1:
            stack[1] = stack[0]
            prio[1] = prio[0]
            pos[stack[1]] = 1
        elif d > 1:
            seg = prio[:d]
            run = np.maximum.accumulate(seg)
            rec = np.flatnonzero(np.r_[True, seg[1:] > run[:-1]])
            moved_s = stack[rec]
            moved_p = prio[rec]
            dst = np.r_[rec[1:], d]
            stack[dst] = moved_s
            prio[dst] = moved_p
            pos[moved_s] = dst
        stack[0] = k
        prio[0] = nu_l[t]
        pos[k] = 0
    return out


try:
    import numba
    from numba.core import types as _nbtypes
    from numba.extending import intrinsic as _intrinsic

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_NUMBA = False

if HAVE_NUMBA:
    from llvmlite import ir as _ir

    _ONE = np.uint64(1)
    _ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
    _VEC_BITS = 256  # one AVX2 register; LLVM splits it on narrower machines

    @_intrinsic
    def _ctpop(typingctx, x):  # pragma: no cover - compiled
        sig = _nbtypes.uint64(_nbtypes.uint64)

        def codegen(context, builder, signature, args):
            fn = builder.module.declare_intrinsic("llvm.ctpop", [args[0].type])
            return builder.call(fn, args)

        return sig, codegen

    @_intrinsic
    def _lanes(typingctx, arr):  # pragma: no cover - compiled
        """Elements of arr's dtype in one vector: a compile-time constant."""
        n = _VEC_BITS // arr.dtype.bitwidth
        return _nbtypes.intp(arr), lambda context, builder, sig, args: context.get_constant(_nbtypes.intp, n)

    @_intrinsic
    def _dec_after(typingctx, arr, start, d):  # pragma: no cover - compiled
        """arr[start + j] -= 1 for the lanes j > d (d in -1..lanes) of one vector: a compare and an add, written as
        vector IR because numba's loops over 16 small integers come out as 16 scalar read-modify-writes."""

        def codegen(context, builder, signature, args):
            a = context.make_array(signature.args[0])(context, builder, args[0])
            elt = context.get_data_type(signature.args[0].dtype)
            lanes = _VEC_BITS // elt.width
            vty = _ir.VectorType(elt, lanes)
            dv = builder.insert_element(_ir.Constant(vty, _ir.Undefined), builder.trunc(args[2], elt),
                                        _ir.Constant(_ir.IntType(32), 0))
            dv = builder.shuffle_vector(dv, _ir.Constant(vty, _ir.Undefined),
                                        _ir.Constant(_ir.VectorType(_ir.IntType(32), lanes), [0] * lanes))
            minus_one = builder.sext(builder.icmp_signed(">", _ir.Constant(vty, list(range(lanes))), dv), vty)
            ptr = builder.bitcast(builder.gep(a.data, [args[1]]), vty.as_pointer())
            old = builder.load(ptr, align=elt.width // 8)
            builder.store(builder.add(old, minus_one), ptr, align=elt.width // 8)
            return context.get_dummy_value()

        return _nbtypes.void(arr, start, d), codegen

    @numba.njit(inline="always")
    def _pc(x):  # pragma: no cover - compiled
        return np.int64(_ctpop(x))

    # Slots: every lookup takes the next slot; a key's latest slot is "live" (one bit in `words`), older ones are
    # dead. The LRU stack distance of a lookup = live slots after its key's previous slot. When the S = 2 * n_ids
    # slots are used up the live ones are compacted to the front (order kept; at least n_ids lookups apart, so
    # O(1) amortised), which bounds every array by the number of keys, not of lookups. Counts: P2[b] = live slots
    # in blocks (of _WB words) before b, P1[w] = live slots in w's block before word w; the live slots from p on
    # are then live - P2 - P1 - popcount(p's word below p): O(1) per query. A block is 16 words so that clearing a
    # slot updates P1's block (16 x int16) and P2 (16 lanes while there are at most 16 blocks, i.e. up to 8192
    # keys) with one vector compare-and-add each (`_dec_after`). Counters past the current word are stale and set
    # when the slots reach them; a word's bits are all set when it starts (a slot is live when taken, and bits at
    # or after the current slot never enter a count), so taking a slot writes nothing but its key.
    _LWB = 4
    _WB = 1 << _LWB  # words per block
    _SLOTS_PER_KEY = 2

    @numba.njit
    def _slots(n_ids):  # pragma: no cover - compiled
        blk = 64 * _WB
        return max(((_SLOTS_PER_KEY * n_ids + blk - 1) // blk) * blk, 2 * blk)

    @numba.njit
    def _pad(x):  # pragma: no cover - compiled
        return (x + 15) & ~15

    def _unit_counts(n_ids: int) -> tuple[np.ndarray, np.ndarray]:
        """P1, P2 for _lru_unit_nb: P1 (< 1024) 16-bit, P2 16-bit while the counts fit (more vector lanes)."""
        nw = _slots(n_ids) >> 6
        return np.zeros(nw, np.int16), np.zeros(_pad(nw >> _LWB), np.int16 if (nw << 6) < (1 << 15) else np.int32)

    @numba.njit(inline="always")
    def _tz(x):  # pragma: no cover - compiled
        return _pc((x & (~x + _ONE)) - _ONE)

    @numba.njit(inline="always")
    def _compact_unit(words, P1, P2, skey, last, cur):  # pragma: no cover - compiled
        """Move the live slots (those before cur) to the front in order; returns their number (the next free slot),
        whose word has its remaining bits set."""
        if cur & 63:
            words[cur >> 6] &= ~(_ALL << np.uint64(cur & 63))
        j = 0
        for w in range((cur + 63) >> 6):
            x = words[w]
            base = w << 6
            while x:
                k = skey[base + _tz(x)]
                x &= x - _ONE
                skey[j] = k
                last[k] = j
                j += 1
        words[:] = 0
        words[: j >> 6] = _ALL
        words[j >> 6] = _ALL
        for w in range(P1.shape[0]):
            P1[w] = (w & (_WB - 1)) << 6
        for b in range(P2.shape[0]):
            P2[b] = b << (6 + _LWB)
        return j

    @numba.njit(inline="always")
    def _start_word(words, P1, P2, cur, live):  # pragma: no cover - compiled
        """Counts of the word that starts at slot cur; all its bits set."""
        cw = cur >> 6
        words[cw] = _ALL
        if (cw & (_WB - 1)) == 0:
            P2[cw >> _LWB] = live
        P1[cw] = live - P2[cw >> _LWB]

    @numba.njit(inline="always")
    def _from_word(x, P1, P2, p, live):  # pragma: no cover - compiled
        """Live slots at or after slot p (p live, x = its word): the stack distance of p's key."""
        pw = p >> 6
        return live - P2[pw >> _LWB] - P1[pw] - _pc(x & ~(_ALL << np.uint64(p & 63)))

    @numba.njit(inline="always")
    def _from(words, P1, P2, p, live):  # pragma: no cover - compiled
        return _from_word(words[p >> 6], P1, P2, p, live)

    @numba.njit(inline="always")
    def _kill(words, P1, P2, p):  # pragma: no cover - compiled
        """Slot p dies: its bit and the counts after it."""
        words[p >> 6] ^= _ONE << np.uint64(p & 63)
        _kill_counts(P1, P2, p >> 6)

    @numba.njit(inline="always")
    def _kill_counts(P1, P2, pw):  # pragma: no cover - compiled
        """The counts after a slot of word pw that dies."""
        pb = pw >> _LWB
        _dec_after(P1, pb << _LWB, pw & (_WB - 1))
        n2 = _lanes(P2)
        if P2.shape[0] == n2:
            _dec_after(P2, 0, pb)
        else:
            for c in range(0, P2.shape[0], n2):
                _dec_after(P2, c, min(max(pb - c, -1), n2))

    @numba.njit(cache=True, nogil=True)
    def _lru_unit_nb(a, b, mul, n_ids, bounds, seq, out, P1, P2):  # pragma: no cover - compiled
        """Unit sizes. Key of lookup t = a[t] * mul + b[t]. Gate semantics over groups `bounds`, or one lookup at a
        time when `seq`. Returns the cumulative histogram of hitting capacities (hits at capacity c = cum[c],
        trimmed after the largest) and, unless `out` is None (then the branches compile away), each lookup's hitting
        capacity in `out` (INF: first)."""
        n = a.shape[0]
        S = P1.shape[0] << 6
        words = np.zeros(P1.shape[0], np.uint64)
        skey = np.empty(S, np.int32)
        last = np.full(n_ids, -1, np.int32)
        hist = np.zeros(n_ids + 2, np.int64)
        keys = np.empty(n, np.uint32)  # one pass first: the main loop then keeps fewer values in registers
        for t in range(n):
            keys[t] = a[t] * mul + b[t]
        live = 0
        cur = 0
        _start_word(words, P1, P2, 0, 0)
        if seq:
            for t in range(n):
                k = keys[t]  # indices unsigned (keys, np.uintp): no negative-index wraparound code
                p = np.int64(last[k])
                last[k] = cur
                skey[np.uintp(cur)] = k
                if p >= 0:
                    pw = p >> 6
                    x = words[pw]  # read once: query, then clear the bit
                    words[pw] = x ^ (_ONE << np.uint64(p & 63))
                    h = _from_word(x, P1, P2, p, live)
                    hist[np.uintp(h)] += 1
                    if out is not None:
                        out[t] = h
                    _kill_counts(P1, P2, pw)
                else:
                    live += 1
                    if out is not None:
                        out[t] = INF
                cur += 1
                if (cur & 63) == 0:
                    if cur == S:
                        cur = _compact_unit(words, P1, P2, skey, last, cur)
                    else:
                        _start_word(words, P1, P2, cur, live)
        else:
            for g in range(bounds.shape[0] - 1):
                g0 = bounds[g]
                g1 = bounds[g + 1]
                for t in range(g0, g1):  # gate: every query against the state at the group start
                    p = np.int64(last[keys[t]])
                    if p >= 0:
                        h = _from(words, P1, P2, p, live)
                        hist[np.uintp(h)] += 1
                        if out is not None:
                            out[t] = h
                    elif out is not None:
                        out[t] = INF
                if cur + (g1 - g0) > S:
                    cur = _compact_unit(words, P1, P2, skey, last, cur)
                for t in range(g0, g1):  # then the group's updates
                    k = keys[t]
                    p = np.int64(last[k])
                    last[k] = cur
                    skey[np.uintp(cur)] = k
                    if p >= 0:
                        _kill(words, P1, P2, p)
                    else:
                        live += 1
                    cur += 1
                    if (cur & 63) == 0:
                        _start_word(words, P1, P2, cur, live)
        top = live  # no distance exceeds the number of keys seen
        while top > 0 and hist[top] == 0:
            top -= 1
        cum = np.empty(top + 1, np.int64)
        s = 0
        for i in range(top + 1):
            s += hist[i]
            cum[i] = s
        return cum

    @numba.njit(inline="always")
    def _drop(P1, P2, pw, size):  # pragma: no cover - compiled
        """Weighted counts (_lru_sized_nb) after clearing a slot of word pw (weight `size`)."""
        pb = pw >> _LWB
        wi = pw & (_WB - 1)
        base = pb << _LWB
        for i in range(_WB):
            P1[base + i] -= size * (i > wi)
        for j in range(P2.shape[0]):
            P2[j] -= size * (j > pb)

    @numba.njit(cache=True, nogil=True)
    def _lru_sized_nb(ids, cls, sizes, n_ids, bounds, out):  # pragma: no cover - compiled
        """Sized keys (class cls[t], size sizes[cls[t]]): the same slots with byte-weighted counts and one bitmap
        per size class for the partial word. Gate semantics over `bounds`."""
        n_cls = sizes.shape[0]
        S = _slots(n_ids)
        nw = S >> 6
        words = np.zeros(nw, np.uint64)
        wq = np.zeros((n_cls, nw), np.uint64)
        P1 = np.zeros(nw, np.int64)
        P2 = np.zeros(_pad(nw >> _LWB), np.int64)
        skey = np.empty(S, np.int32)
        last = np.full(n_ids, -1, np.int32)
        kcls = np.zeros(n_ids, np.int64)
        live = 0  # bytes
        cur = 0
        for g in range(bounds.shape[0] - 1):
            g0 = bounds[g]
            g1 = bounds[g + 1]
            for t in range(g0, g1):
                p = last[ids[t]]
                if p >= 0:
                    pw = p >> 6
                    m = _ALL >> np.uint64(63 - (p & 63))
                    tot = live - P2[pw >> _LWB] - P1[pw] + sizes[cls[t]]
                    for q in range(n_cls):
                        tot -= sizes[q] * _pc(wq[q, pw] & m)
                    out[t] = tot
                else:
                    out[t] = INF
            if cur + (g1 - g0) > S:  # compact, then rebuild the per-class bitmaps and weighted counts
                cur = _compact_unit(words, P1, P2, skey, last, cur)
                wq[:] = 0
                acc = 0
                for s in range(cur):
                    w = s >> 6
                    if (s & 63) == 0:
                        if (w & (_WB - 1)) == 0:
                            P2[w >> _LWB] = acc
                        P1[w] = acc - P2[w >> _LWB]
                    c = kcls[skey[s]]
                    wq[c, w] |= _ONE << np.uint64(s & 63)
                    acc += sizes[c]
            for t in range(g0, g1):
                cw = cur >> 6
                if (cur & 63) == 0:
                    if (cw & (_WB - 1)) == 0:
                        P2[cw >> _LWB] = live
                    P1[cw] = live - P2[cw >> _LWB]
                k = ids[t]
                c = cls[t]
                size = sizes[c]
                p = last[k]
                last[k] = cur
                skey[cur] = k
                kcls[k] = c
                if p >= 0:
                    pw = p >> 6
                    bit = ~(_ONE << np.uint64(p & 63))
                    words[pw] &= bit
                    wq[c, pw] &= bit
                    _drop(P1, P2, pw, size)
                else:
                    live += size
                bit = _ONE << np.uint64(cur & 63)
                words[cw] |= bit
                wq[c, cw] |= bit
                cur += 1
        return out

    # Sequential semantics, up to _SEQ_MAX keys: the same slots and counts, specialised. The sizes are compile-time
    # constants (one compiled kernel per size class, _SEQ_CLASSES), the per-key and per-slot arrays share one int32
    # buffer and the per-word and per-block counts one int16 buffer at constant offsets (fewer live pointers: the
    # loop spills fewer of them), there are 2 to 2.7 slots per possible key (16384 for Qwen3's 6144 ids, 4.4 per key
    # it looks up: one compaction instead of four), a key not looked up yet has slot S (a spare word: no sign test,
    # unsigned indices), and the next lookup's previous slot and bitmap word are read before this lookup's writes
    # (the word replaced in a register when it is the same). 1.25 to 1.4 times the speed of _lru_unit_nb on the
    # Qwen3 stream (docs/simulator.md).
    _SEQ_CLASSES = ((1024, 2048), (8192, 16384))  # (most keys, slots): S >= 2 * keys, at most 16 blocks (P2 lanes)

    @numba.njit(inline="always")
    def _seq_compact(words, c16, c32, cur, S, NMAX):  # pragma: no cover - compiled
        """_compact_unit on the shared buffers (skey = c32[0:S], last = c32[S + NMAX + 2:]), written out at constant
        offsets: calling _compact_unit on views of the buffers made the whole kernel about 1.4 times slower
        (186 -> 252-298 us on the Qwen3 stream), though compaction itself runs once."""
        NW = S >> 6
        OL = S + NMAX + 2
        if cur & 63:
            words[cur >> 6] &= ~(_ALL << np.uint64(cur & 63))
        j = 0
        for w in range((cur + 63) >> 6):
            x = words[w]
            base = w << 6
            while x:
                k = c32[base + _tz(x)]
                x &= x - _ONE
                c32[j] = k
                c32[np.uintp(OL + k)] = j
                j += 1
        words[:] = 0
        words[: j >> 6] = _ALL
        words[j >> 6] = _ALL
        for w in range(NW):
            c16[w] = (w & (_WB - 1)) << 6
        for b in range(16):
            c16[NW + b] = b << (6 + _LWB)
        return j

    @numba.njit(inline="always")
    def _seq_body(a, b, mul, out, S, NMAX):  # pragma: no cover - compiled
        """Sequential semantics, at most NMAX keys, S slots (constants). c16 = P1 (NW) then P2 (16 lanes); c32 =
        skey (S), hist (NMAX + 2), last (NMAX). Returns the cumulative histogram; each lookup's hitting capacity in
        `out` unless it is None."""
        NW = S >> 6
        OP2 = NW
        OH = S
        OL = S + NMAX + 2
        n = a.shape[0]
        c16 = np.zeros(NW + 16, np.int16)
        words = np.zeros(NW + 1, np.uint64)  # words[NW]: the word of slot S, every key's slot before its first lookup
        c32 = np.empty(OL + NMAX, np.int32)
        c32[OH:OL] = 0
        c32[OL:] = S
        keys = np.empty(n + 1, np.uint32)
        for t in range(n):
            keys[t] = a[t] * mul + b[t]
        keys[n] = 0
        live = 0
        cur = 0
        words[0] = _ALL
        k = keys[0]
        p = np.int64(c32[np.uintp(OL + k)])
        x = words[np.uintp(p >> 6)]
        for t in range(n):
            c32[np.uintp(OL + k)] = cur
            c32[np.uintp(cur)] = k
            k2 = keys[t + 1]  # the next lookup, read before this one's writes below
            p2 = np.int64(c32[np.uintp(OL + k2)])
            pw2 = p2 >> 6
            x2 = words[np.uintp(pw2)]  # indices unsigned: no negative-index wraparound code
            if p != S:
                pw = p >> 6
                pb = pw >> _LWB
                bit = _ONE << np.uint64(p & 63)
                y = x ^ bit
                words[np.uintp(pw)] = y
                h = live - np.int64(c16[np.uintp(OP2 + pb)]) - np.int64(c16[np.uintp(pw)]) - _pc(x & (bit - _ONE))
                c32[np.uintp(OH + h)] += 1
                if out is not None:
                    out[t] = h
                _dec_after(c16, pb << _LWB, pw & (_WB - 1))
                _dec_after(c16, OP2, pb)
                if pw2 == pw:
                    x2 = y
            else:
                live += 1
                if out is not None:
                    out[t] = INF
            cur += 1
            if (cur & 63) == 0:
                if cur == S:
                    cur = _seq_compact(words, c16, c32, cur, S, NMAX)
                else:
                    cw = cur >> 6
                    words[cw] = _ALL
                    if (cw & (_WB - 1)) == 0:
                        c16[OP2 + (cw >> _LWB)] = live
                    c16[cw] = live - c16[OP2 + (cw >> _LWB)]
                p2 = np.int64(c32[np.uintp(OL + k2)])  # slots moved, or the new word's counts written
                x2 = words[np.uintp(p2 >> 6)]
            p = p2
            x = x2
            k = k2
        top = live
        while top > 0 and c32[OH + top] == 0:
            top -= 1
        cum = np.empty(top + 1, np.int64)
        s = 0
        for i in range(top + 1):
            s += c32[OH + i]
            cum[i] = s
        return cum

    @numba.njit(cache=True, nogil=True)
    def _lru_seq_small(a, b, mul, out):  # pragma: no cover - compiled
        return _seq_body(a, b, mul, out, 2048, 1024)

    @numba.njit(cache=True, nogil=True)
    def _lru_seq_large(a, b, mul, out):  # pragma: no cover - compiled
        return _seq_body(a, b, mul, out, 16384, 8192)

    _SEQ_MAX = _SEQ_CLASSES[-1][0]

    def _lru_seq(a, b, mul, n_ids, out):
        """The specialised sequential kernel of the size class of n_ids (<= _SEQ_MAX keys)."""
        return (_lru_seq_small if n_ids <= _SEQ_CLASSES[0][0] else _lru_seq_large)(a, b, mul, out)

    _NONE = np.zeros(1, np.int64)  # bounds in sequential mode

    def lru_hit_capacity_nb(ids, cls, sizes, n_ids, bounds=None):
        """As lru_hit_capacity_py, in O(1) per lookup (see _lru_unit_nb / _lru_sized_nb)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        n = len(ids)
        out = np.empty(n, np.int64)
        if len(sizes) == 1 and int(sizes[0]) == 1:
            if bounds is None and n_ids <= _SEQ_MAX and n < (1 << 31):
                _lru_seq(ids, ids, 0, int(n_ids), out)
                return out
            bnd = _NONE if bounds is None else np.ascontiguousarray(bounds, dtype=np.int64)
            _lru_unit_nb(ids, ids, 0, int(n_ids), bnd, bounds is None, out, *_unit_counts(int(n_ids)))
            return out
        bnd = np.arange(n + 1, dtype=np.int64) if bounds is None else np.ascontiguousarray(bounds, dtype=np.int64)
        return _lru_sized_nb(ids, np.ascontiguousarray(cls, dtype=np.int64),
                             np.ascontiguousarray(sizes, dtype=np.int64), int(n_ids), bnd, out)

    def lru_hit_counts_nb(a, b, mul, n_ids, bounds=None):
        """Unit sizes, key = a * mul + b: cum[c] = lookups that hit at capacity c (c = 0..largest hitting one)."""
        if bounds is None and n_ids <= _SEQ_MAX and len(a) < (1 << 31):
            return _lru_seq(a, b, int(mul), int(n_ids), None)
        bnd = _NONE if bounds is None else np.ascontiguousarray(bounds, dtype=np.int64)
        return _lru_unit_nb(a, b, int(mul), int(n_ids), bnd, bounds is None, None, *_unit_counts(int(n_ids)))

    @numba.njit(cache=True, nogil=True)
    def opt_hit_capacity_nb(ids, next_use, n_ids):  # pragma: no cover - compiled; tested against the Python one
        n = ids.shape[0]
        stack = np.empty(n_ids, np.int64)
        prio = np.empty(n_ids, np.int64)
        seen = np.zeros(n_ids, np.bool_)
        depth = 0
        out = np.full(n, INF, np.int64)
        for t in range(n):
            k = ids[t]
            if seen[k]:
                d = 0
                while stack[d] != k:
                    d += 1
                out[t] = d + 1
            else:
                seen[k] = True
                d = depth
                depth += 1
            if d > 0:
                cs = stack[0]
                cp = prio[0]
                for i in range(1, d):
                    if prio[i] > cp:
                        ts = stack[i]
                        tp = prio[i]
                        stack[i] = cs
                        prio[i] = cp
                        cs = ts
                        cp = tp
                stack[d] = cs
                prio[d] = cp
            stack[0] = k
            prio[0] = next_use[t]
        return out

    BACKEND = "numba"
    lru_hit_capacity = lru_hit_capacity_nb
    lru_hit_counts = lru_hit_counts_nb
    opt_hit_capacity = opt_hit_capacity_nb
else:  # pragma: no cover
    BACKEND = "python"
    lru_hit_capacity = lru_hit_capacity_py
    lru_hit_counts = lru_hit_counts_py
    opt_hit_capacity = opt_hit_capacity_py


def opt_gate(ids: np.ndarray, bounds: np.ndarray | None, n_ids: int) -> np.ndarray:
    """OPT stack distances under gate semantics: the running group's experts may not be evicted until the group
    ends. That is demand MIN on the stream in which every group is followed by a second (uncounted) reference to
    each of its experts: MIN never evicts an expert referenced again within the group, and after those references
    every expert's priority is its true next use. Exact for capacities above the largest group."""
    if bounds is None:
        return opt_hit_capacity(ids, next_use(ids), n_ids)
    bounds = np.asarray(bounds, dtype=np.int64)
    sizes = np.diff(bounds)
    group = np.repeat(np.arange(len(sizes)), sizes)
    # augmented stream: group g's lookups, then the same keys again; original lookup t sits at t + bounds[group]
    pos = np.arange(len(ids)) + bounds[group]
    aug = np.empty(2 * len(ids), dtype=np.int64)
    aug[pos] = ids
    aug[pos + sizes[group]] = ids
    h = opt_hit_capacity(aug, next_use(aug), n_ids)
    return h[pos]


def next_use(ids: np.ndarray) -> np.ndarray:
    """For each position, the position of the next lookup of the same key (INF if none). Vectorized."""
    n = len(ids)
    order = np.argsort(ids, kind="stable")
    out = np.full(n, INF, dtype=np.int64)
    if n > 1:
        same = ids[order[1:]] == ids[order[:-1]]
        out[order[:-1][same]] = order[1:][same]
    return out


# ---------------------------------------------------------------------------------------------------------------
# curves
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Exact:
    """An exact step curve: hits(C) = sum over parts of #{h <= (C // split) // unit}.

    A part is one independent stream (the whole stream in global scope, one layer in per_layer scope) with its
    lookups' smallest hitting capacities h (in `unit`s). Small integer h (counts of experts) are kept as a
    cumulative histogram, large ones (bytes) sorted."""

    parts: list[tuple[np.ndarray, int, bool]]  # (cumulative counts or sorted h, unit, is_histogram)
    split: int  # 1 for global, n_layers for per_layer (each part gets C // n_layers)
    lookups: int

    @staticmethod
    def part(h: np.ndarray, unit: int) -> tuple[np.ndarray, int, bool]:
        h = h[h != INF]
        if len(h) == 0 or int(h.max()) <= (1 << 22):
            return np.cumsum(np.bincount(h, minlength=1)), unit, True
        return np.sort(h), unit, False

    def hits(self, capacity) -> np.ndarray:
        share = np.asarray(capacity, dtype=np.int64)
        if self.split != 1:
            share = share // self.split
        if len(self.parts) == 1 and self.parts[0][1:] == (1, True):  # one histogram in unit steps: a lookup
            return np.take(self.parts[0][0], share, mode="clip")
        total = np.zeros(share.shape, dtype=np.int64)
        for arr, unit, is_hist in self.parts:
            c = share // unit if unit != 1 else share
            if is_hist:
                total += arr[np.minimum(c, len(arr) - 1)]
            else:
                total += np.searchsorted(arr, c, side="right")
        return total

    def breakpoints(self) -> np.ndarray:
        pts = [np.zeros(1, dtype=np.int64)]
        for arr, unit, is_hist in self.parts:
            h = np.arange(len(arr), dtype=np.int64) if is_hist else np.unique(arr)
            pts.append(h * (unit * self.split) if unit * self.split != 1 else h)
        if len(pts) == 2:
            return pts[1] if is_hist else np.unique(np.concatenate(pts))
        return np.unique(np.concatenate(pts))


def _classes(stream: LookupStream, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Per lookup: size-class index, and the class sizes (1 for experts)."""
    if unit == "experts" or len(stream) == 0:
        return np.zeros(len(stream), dtype=np.int64), np.ones(1, dtype=np.int64)
    sizes, inv = np.unique(np.asarray(stream.expert_bytes, dtype=np.int64), return_inverse=True)
    return inv.astype(np.int64)[stream.layer], sizes.astype(np.int64)


def _exact_curve(stream: LookupStream, policy: str, scope: str, unit: str, semantics: str = "gate") -> _Exact | None:
    """The exact step curve of lru or belady, or None where no exact one-pass method applies."""
    n = len(stream)
    if scope == "global":
        n_ids = stream.n_layers * stream.n_experts
        if policy == "lru":
            bounds = np.r_[stream.group_starts(), n] if semantics == "gate" else None
            if unit == "experts":  # the cumulative histogram straight from the kernel
                return _Exact([(lru_hit_counts(stream.layer, stream.expert, stream.n_experts, n_ids, bounds), 1,
                                True)], 1, n)
            cls, sizes = _classes(stream, unit)
            h = lru_hit_capacity(stream.keys, cls, sizes, n_ids, bounds)
            return _Exact([_Exact.part(h, 1)], 1, n)
        ids = stream.keys
        uniform = unit == "experts" or len(set(stream.expert_bytes)) == 1
        if not uniform:
            return None
        h = opt_gate(ids, np.r_[stream.group_starts(), n] if semantics == "gate" else None, n_ids)
        unit_size = 1 if unit == "experts" else stream.expert_bytes[0]
        return _Exact([_Exact.part(h, unit_size)], 1, n)
    # per_layer: independent streams; counts per layer, capacity per layer = (C // L) // size
    parts = []
    for layer in range(stream.n_layers):
        sel = stream.layer == layer
        ids = stream.expert[sel].astype(np.int64)
        bounds = None
        if semantics == "gate":
            batch = stream.batch[sel]
            bounds = np.r_[np.flatnonzero(np.r_[True, batch[1:] != batch[:-1]]), len(ids)] if len(ids) else np.zeros(1)
        size = 1 if unit == "experts" else int(stream.expert_bytes[layer])
        if policy == "lru":
            parts.append((lru_hit_counts(ids, ids, 0, stream.n_experts, bounds), size, True))
        else:
            parts.append(_Exact.part(opt_gate(ids, bounds, stream.n_experts), size))
    return _Exact(parts, stream.n_layers, n)


def saturation_capacity(stream: LookupStream, scope: str, unit: str) -> int:
    """The smallest total capacity that holds every key the stream looks up (in its scope)."""
    keys = np.unique(stream.keys)
    layers = keys // stream.n_experts
    size = np.ones(len(keys), np.int64) if unit == "experts" else np.asarray(stream.expert_bytes, np.int64)[layers]
    if scope == "global":
        return int(size.sum())
    per_layer = np.bincount(layers, weights=size, minlength=stream.n_layers)
    return int(per_layer.max() * stream.n_layers) if len(per_layer) else 0


def replay(stream: LookupStream, cache, *, semantics: str = "gate"):
    """Drive an ExpertCache with a demand lookup stream; the reference the curves are checked against.

    gate (DESIGN.md; the default): for each (layer, batch) group: pin its experts; look every one up (hit = resident
    at the gate); insert the misses in first-occurrence order (never evicting the group's experts); touch the
    group's experts in first-occurrence order (the order they are used, so recency does not depend on which of
    them hit); unpin. An insert that cannot fit (the group alone exceeds the cache) leaves that expert uncached.
    sequential (as libCacheSim and other trace simulators): for each lookup: look up; insert on a miss; no pins.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    keys = stream.key_tuples()
    lookup, insert = cache.lookup, cache.insert
    if semantics == "sequential":
        for k in keys:
            if not lookup(k):
                insert(k)
        return cache
    pin, unpin, touch = cache.pin, cache.unpin, cache.touch
    bounds = stream.group_starts().tolist() + [len(keys)]
    for g0, g1 in zip(bounds[:-1], bounds[1:]):
        group = keys[g0:g1]
        for k in group:
            pin(k)
        missed = [k for k in group if not lookup(k)]
        for k in missed:
            insert(k)
        for k in group:
            touch(k)
        for k in group:
            unpin(k)
    return cache


def simulate_hits(stream: LookupStream, policy: str, capacity: int, *, scope: str = "global",
                  unit: str = "experts", policy_params: dict | None = None, semantics: str = "gate") -> int:
    """Demand hits of ExpertCache with this policy at one capacity, driven by `replay`."""
    from sim.cache import ExpertCache

    sizes = [1] * stream.n_layers if unit == "experts" else stream.expert_bytes
    future = stream.key_tuples()
    params = dict(policy_params or {})
    if policy == "static" and "hot" not in params and "profile" not in params:
        params["profile"] = future  # oracle static set: fitted on the evaluated stream
    cache = ExpertCache(n_layers=stream.n_layers, n_experts=stream.n_experts, expert_bytes=sizes,
                        capacity_bytes=int(capacity), scope=scope, policy=policy, policy_params=params,
                        future=future)
    return replay(stream, cache, semantics=semantics).stats.hits


def exact_from(stream: LookupStream, policy: str, scope: str, unit: str, semantics: str = "gate") -> int:
    """The smallest capacity from which the one-pass curve equals `replay` exactly.

    sequential: every capacity (in global bytes: from the largest expert up). gate: the cache must hold the largest
    (layer, batch) group (in per_layer scope: each layer's share its layer's largest group), and for belady one
    expert more (then demand MIN never needs to evict an expert of the running group, so the sequential OPT stack
    is exact for the gate too)."""
    big = 1 if unit == "experts" else max(stream.expert_bytes)
    if semantics == "sequential" or len(stream) == 0:
        return big if scope == "global" else big * stream.n_layers
    starts = stream.group_starts()
    size = np.ones(len(stream), np.int64) if unit == "experts" else stream.sizes
    group_size = np.add.reduceat(size, starts)
    extra = big if policy == "belady" else 0
    if scope == "global":
        return max(int(group_size.max()) + extra, big)
    layer_of_group = stream.layer[starts]
    need = np.zeros(stream.n_layers, np.int64)
    np.maximum.at(need, layer_of_group, group_size)
    per_layer_size = np.ones(stream.n_layers, np.int64) if unit == "experts" else np.asarray(stream.expert_bytes)
    return max(int(((need + (per_layer_size if policy == "belady" else 0)) * stream.n_layers).max()),
               big * stream.n_layers)


def _grid(stream: LookupStream, scope: str, unit: str, points: int) -> np.ndarray:
    top = saturation_capacity(stream, scope, unit)
    if unit == "bytes":
        low = max(stream.expert_bytes) * (stream.n_layers if scope == "per_layer" else 1)
    else:
        low = stream.n_layers if scope == "per_layer" else 1
    if top <= low:
        return np.array([top], dtype=np.int64)
    return np.unique(np.linspace(low, top, max(2, points)).round().astype(np.int64))


def compute_mrc(stream: LookupStream, policies: Sequence[str], *, scope: str = "global", unit: str = "experts",
                points: int | None = None, capacities: Sequence[int] | None = None,
                policy_params: dict[str, dict] | None = None, semantics: str = "gate") -> dict:
    """Hit-rate curves of several policies on one lookup stream (see the module docstring). JSON-ready."""
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    n = len(stream)
    out: dict = {"unit": unit, "scope": scope, "semantics": semantics, "lookups": n, "backend": BACKEND,
                 "policies": {}}
    grid = None
    if capacities is not None:
        grid = np.asarray(sorted(set(int(c) for c in capacities)), dtype=np.int64)
    elif points is not None:
        grid = _grid(stream, scope, unit, points)
    for policy in policies:
        exact = _exact_curve(stream, policy, scope, unit, semantics) if policy in EXACT else None
        if exact is not None:
            caps = grid if grid is not None else exact.breakpoints()
            if grid is None and unit == "bytes" and scope == "global":
                big = max(stream.expert_bytes)
                # below the largest expert the curve is not defined: its steps there move up to that size
                caps = np.unique(np.where(caps == 0, 0, np.maximum(caps, big)))
            hits = exact.hits(caps)
            method = "stack" if policy == "lru" else "opt-stack"
        elif policy.startswith("lcs:"):  # libCacheSim's own simulator at each size (any of its algorithms)
            params = (policy_params or {}).get(policy) or {}
            kept, got = [], []
            for c in grid if grid is not None else _grid(stream, scope, unit, 16):
                try:
                    got.append(run_libcachesim(stream, policy[4:], int(c), scope=scope, unit=unit, **params)["hits"]
                               if c > 0 else 0)
                    kept.append(c)
                except ValueError as exc:
                    if "too small" not in str(exc):
                        raise  # sizes libCacheSim cannot configure (it would abort) are left off the curve
            caps, hits = np.asarray(kept, dtype=np.int64), np.asarray(got, dtype=np.int64)
            method = "libcachesim"
        else:
            caps = grid if grid is not None else _grid(stream, scope, unit, 16)
            params = (policy_params or {}).get(policy)
            hits = np.array([simulate_hits(stream, policy, int(c), scope=scope, unit=unit, policy_params=params,
                                           semantics=semantics) for c in caps], dtype=np.int64)
            method = "simulated"
        out["policies"][policy] = {
            "capacity": [int(c) for c in caps],
            "hit_rate": [float(h) / n if n else 0.0 for h in hits],
            "method": method,
            "exact": method != "simulated" or policy not in EXACT,
        }
        if method in ("stack", "opt-stack"):
            out["policies"][policy]["exact_from"] = exact_from(stream, policy, scope, unit, semantics)
        if method == "libcachesim":
            out["policies"][policy]["semantics"] = "sequential"  # libCacheSim processes one lookup at a time
        if policy == "belady" and method == "simulated":
            out["policies"][policy]["note"] = "farthest-next-use with unequal sizes: a heuristic, not the byte optimum"
    return out


def hit_rate_at(curve: dict, capacity: float) -> float:
    """Evaluate a step curve from compute_mrc (capacity list + hit_rate list) at a capacity."""
    caps = np.asarray(curve["capacity"])
    i = int(np.searchsorted(caps, capacity, side="right")) - 1
    return float(curve["hit_rate"][i]) if i >= 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# libCacheSim on our stream
# ---------------------------------------------------------------------------------------------------------------

_ORACLE = np.dtype([("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])


def _oracle_records(obj_ids: np.ndarray, obj_sizes: np.ndarray, with_next: bool) -> np.ndarray:
    """libCacheSim's oracleGeneral records; the next-access time (-1 = never) only where the algorithm reads it."""
    n = len(obj_ids)
    rec = np.empty(n, dtype=_ORACLE)
    rec["t"] = np.arange(n, dtype=np.uint32)
    rec["id"] = obj_ids
    rec["size"] = obj_sizes
    if with_next:
        nu = next_use(obj_ids.astype(np.int64))
        rec["next"] = np.where(nu == INF, -1, nu)
    else:
        rec["next"] = -1
    return rec


ORACLE_ALGOS = ("belady", "beladysize", "lrb", "glcache", "threelcache")  # libCacheSim algorithms reading the future


def run_libcachesim(stream: LookupStream, algo: str, capacity: int, *, scope: str = "global",
                    unit: str = "experts", **algo_params) -> dict:
    """Run libCacheSim's own simulator (C trace reader + cache.process_trace) on our lookup stream at one size.

    The stream is written as libCacheSim's oracleGeneral binary records (object id = key + 1, size = 1 or the
    expert's bytes, next access time for Belady-type algorithms) to a temporary file. Per_layer scope runs one
    cache of capacity // n_layers per layer on that layer's lookups. Returns hits, hit_rate, the end-to-end time
    (building the records, writing, reading, simulating) and the simulation-only time, with accesses/s for both.
    """
    import libcachesim

    from sim.policies.libcachesim_adapter import make_libcachesim_cache

    if unit not in UNITS or scope not in SCOPES:
        raise ValueError(f"bad unit/scope {unit!r}/{scope!r}")
    t0 = time.perf_counter()
    sizes = np.ones(len(stream), np.uint32) if unit == "experts" else stream.sizes.astype(np.uint32)
    keys = stream.keys + 1
    if scope == "global":
        jobs = [(np.ones(len(stream), bool), int(capacity))]
    else:
        jobs = [(stream.layer == layer, int(capacity) // stream.n_layers) for layer in range(stream.n_layers)]
    hits = 0
    sim_s = 0.0
    with tempfile.TemporaryDirectory(prefix="lcs-") as tmp:
        for i, (sel, cap) in enumerate(jobs):
            n_sel = int(sel.sum())
            if n_sel == 0:
                continue
            path = os.path.join(tmp, f"part{i}.oracleGeneral")
            _oracle_records(keys[sel], sizes[sel], algo.lower() in ORACLE_ALGOS).tofile(path)
            if cap <= 0:
                continue
            reader = libcachesim.TraceReader(path, libcachesim.TraceType.ORACLE_GENERAL_TRACE)
            cache = make_libcachesim_cache(algo, cap, n_objects=stream.n_layers * stream.n_experts, **algo_params)
            s0 = time.perf_counter()
            miss_ratio, _ = cache.process_trace(reader)
            sim_s += time.perf_counter() - s0
            hits += n_sel - int(round(miss_ratio * n_sel))
    total_s = time.perf_counter() - t0
    n = len(stream)
    return {"algo": algo, "capacity": int(capacity), "unit": unit, "scope": scope, "lookups": n, "hits": hits,
            "hit_rate": hits / n if n else 0.0, "seconds": total_s, "sim_seconds": sim_s,
            "accesses_per_s": n / total_s if total_s else float("inf"),
            "sim_accesses_per_s": n / sim_s if sim_s else float("inf")}


def bench_mrc(trace_path, *, repeats: int = 15, calls: int = 3, phase: str = "both") -> dict:
    """Speed of the all-sizes LRU MRC against libCacheSim's LRU at one size, on one core, same lookup stream.

    Both sides answer from the in-memory lookup stream in the same (sequential) semantics, unit sizes. Timed on
    our side: what `compute_mrc` pays for the curve, from the stream's arrays to the hit count at every size (the
    kernel with its allocations and its first pass over the keys, the curve's capacities and hits); libCacheSim
    simulates one size (half the distinct keys). The headline compares against libCacheSim's C loop alone
    (`cache.process_trace` over its oracleGeneral reader: no Python per request, no record building or file
    writing, the reader and the cache made untimed just before); `*_e2e` adds those (what it takes to get
    libCacheSim's answer from our stream). `repeats` rounds, each `calls` consecutive calls of one side then of
    the other (alternating, so that load on a shared machine hits both alike; consecutive, because the first call
    after the other side's file writing and reading runs slower), best call of each, after a warm-up that also
    compiles the numba kernel. Keys: mrc_accesses_per_s, libcachesim_accesses_per_s,
    mrc_speedup_vs_libcachesim (C loop); libcachesim_e2e_accesses_per_s, mrc_speedup_vs_libcachesim_e2e; mrc_sizes
    (capacities on the curve) and mrc_agrees_with_libcachesim."""
    stream = lookup_stream(trace_path, phase=phase)
    n = len(stream)
    size = max(1, len(np.unique(stream.keys)) // 2)

    def mrc_once():
        curve = _exact_curve(stream, "lru", "global", "experts", "sequential")
        caps = curve.breakpoints()
        return caps, curve.hits(caps)

    caps, hits = mrc_once()
    first = run_libcachesim(stream, "LRU", size)
    agrees = int(_exact_curve(stream, "lru", "global", "experts", "sequential").hits([size])[0]) == first["hits"]
    mrc_s, lcs = [], []
    for _ in range(repeats):
        mrc_s.extend(_timed(mrc_once) for _ in range(calls))
        lcs.extend(run_libcachesim(stream, "LRU", size) for _ in range(calls))
    mrc_best = min(mrc_s)
    lcs_sim_s = min(r["sim_seconds"] for r in lcs)
    lcs_s = min(r["seconds"] for r in lcs)
    return {
        "mrc_accesses_per_s": n / mrc_best,
        "libcachesim_accesses_per_s": n / lcs_sim_s,
        "mrc_speedup_vs_libcachesim": lcs_sim_s / mrc_best,
        "libcachesim_e2e_accesses_per_s": n / lcs_s,
        "mrc_speedup_vs_libcachesim_e2e": lcs_s / mrc_best,
        "mrc_accesses": n,
        "mrc_sizes": len(caps),
        "mrc_agrees_with_libcachesim": agrees,
        "mrc_backend": BACKEND,
    }


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.mrc", description="hit rate at every cache size, one pass")
    ap.add_argument("trace", help="trace directory")
    ap.add_argument("--policies", default="lru,belady", help="comma-separated (lru, belady, fifo, lfu, lcs:S3FIFO...)")
    ap.add_argument("--scope", choices=SCOPES, default="global")
    ap.add_argument("--unit", choices=UNITS, default="experts")
    ap.add_argument("--phase", choices=sorted(PHASE_SELECT), default="both")
    ap.add_argument("--batch-size", type=int, default=1, help="decode batch size (sequences per forward pass)")
    ap.add_argument("--semantics", choices=SEMANTICS, default="gate",
                    help="gate: DESIGN.md's (a layer's lookups all see the cache as at its gate; the running batch is "
                         "never evicted); sequential: one lookup at a time, as libCacheSim")
    grid = ap.add_mutually_exclusive_group()
    grid.add_argument("--points", type=int, help="evaluate every policy at N evenly spaced sizes")
    grid.add_argument("--capacities", help="comma-separated sizes (in --unit) to evaluate")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    from sim.policies import policy_class

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        raise TraceError("--policies is empty")
    for p in policies:
        try:
            policy_class(p)
        except ValueError as exc:
            raise TraceError(str(exc), where="--policies") from None
    capacities = None
    if args.capacities:
        try:
            capacities = [int(float(c)) for c in args.capacities.split(",") if c.strip()]
        except ValueError:
            raise TraceError(f"not a list of numbers: {args.capacities!r}", where="--capacities") from None
    if args.batch_size < 1:
        raise TraceError("must be >= 1", where="--batch-size")
    if args.points is not None and args.points < 1:
        raise TraceError("must be >= 1", where="--points")
    stream = lookup_stream(args.trace, phase=args.phase, batch_size=args.batch_size)
    if len(stream) == 0:
        raise TraceError(f"no lookups in phase {args.phase!r}", path=args.trace)
    if not args.json and capacities is None and args.points is None:  # the table shows a few sizes: compute those
        top = saturation_capacity(stream, args.scope, args.unit)
        capacities = sorted({int(round(top * f)) for f in (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)})
    try:
        result = compute_mrc(stream, policies, scope=args.scope, unit=args.unit, points=args.points,
                             capacities=capacities, semantics=args.semantics)
    except (ValueError, TypeError) as exc:
        raise TraceError(str(exc), where="--policies") from None
    result.update(trace=str(args.trace), phase=args.phase, batch_size=args.batch_size)
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"{args.trace}: {len(stream)} lookups, scope {args.scope}, unit {args.unit}, phase {args.phase}, "
          f"semantics {args.semantics}")
    show = sorted({c for p in policies for c in result["policies"][p]["capacity"]})
    print("capacity    " + "".join(f"{p:>12}" for p in policies))
    for c in show:
        row = "".join(f"{hit_rate_at(result['policies'][p], c):>12.4f}" for p in policies)
        print(f"{c:<12}" + row)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
