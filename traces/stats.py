"""`python -m traces.stats TRACE [--json]`: what a trace looks like to an expert cache and a predictor.

Keys (all computed with numpy over the whole routing table; definitions in docs/trace-format.md, "Statistics"):

- n_layers, n_experts, top_k, rows, sequences, tokens (positions per phase)
- consecutive_overlap: mean over consecutive tokens (positions p, p+1) of the same sequence and layer of
  |A ∩ B| / k, on decode tokens; a trace without decode uses teacher_forced (then prefill), named in
  consecutive_overlap_phase
- cross_layer_precision: a transition-count model of layer l -> l+1, fit on a training split and evaluated on
  held-out tokens: the top-k of layer l+1 predicted from the counts summed over layer l's experts;
  precision = |predicted ∩ true| / k averaged over (held-out token, layer)
- popularity_entropy: per layer, the entropy of the expert usage distribution over log(n_experts), in [0, 1]
- reuse_distance: distribution of reuse distances counted in unique-expert lookups (DESIGN.md: one lookup per
  unique expert per (layer, batch)), for one cache over all layers (global) and per layer, plus the LRU hit
  rate it implies at a few cache rates
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from traces.errors import run_cli
from traces.format import PHASES
from traces.reader import Trace, _column_np, _fixed_list_np

CACHE_RATES = (0.05, 0.1, 0.25, 0.5)
PERCENTILES = (10, 25, 50, 75, 90, 99)
MAX_LOOKUPS = 5_000_000


# -- loading --------------------------------------------------------------------------------------------------
class Dense:
    """The routing table as dense per-token arrays: tokens are (sequence, phase, position), sorted."""

    def __init__(self, trace: Trace):
        meta = trace.meta
        table = trace.table(["sequence", "phase", "position", "layer", "experts"])
        seq = _column_np(table, "sequence").astype(np.int64)
        col = table.column("phase").combine_chunks()
        names = np.asarray(col.dictionary.to_pylist(), dtype=object)
        code_of = np.array([PHASES.index(n) for n in names], dtype=np.int64)
        phase = code_of[col.indices.to_numpy()]
        pos = _column_np(table, "position").astype(np.int64)
        layer = _column_np(table, "layer").astype(np.int64)
        experts = _fixed_list_np(table, "experts", meta.top_k).astype(np.int16)
        order = np.lexsort((pos, phase, seq))
        key = np.stack([seq, phase, pos], axis=1)[order]
        new = np.r_[True, (key[1:] != key[:-1]).any(axis=1)]
        tok_sorted = np.cumsum(new) - 1
        tok = np.empty(len(order), dtype=np.int64)
        tok[order] = tok_sorted
        self.n_tokens = int(new.sum())
        self.seq, self.phase, self.pos = key[new, 0], key[new, 1], key[new, 2]
        self.L, self.E, self.k = meta.n_layers, meta.n_experts, meta.top_k
        self.experts = np.full((self.n_tokens, self.L, self.k), -1, dtype=np.int16)  # int16: ids < 32768
        self.experts[tok, layer] = experts
        self.present = self.experts[:, :, 0] >= 0
        self.rows = len(seq)


# -- statistics -----------------------------------------------------------------------------------------------
def token_counts(d: Dense) -> dict[str, int]:
    return {PHASES[c]: int((d.phase == c).sum()) for c in range(len(PHASES)) if (d.phase == c).any()}


def overlap_phase(d: Dense) -> str | None:
    for name in ("decode", "teacher_forced", "prefill"):
        if (d.phase == PHASES.index(name)).any():
            return name
    return None


def consecutive_overlap(d: Dense, phase: str) -> dict:
    """Pairs (t, t+1) of the same sequence and phase at positions p, p+1, per layer where both are present."""
    code = PHASES.index(phase)
    a = np.flatnonzero((d.phase[:-1] == code) & (d.phase[1:] == code) & (d.seq[:-1] == d.seq[1:])
                       & (d.pos[1:] == d.pos[:-1] + 1))
    b = a + 1
    A, B = d.experts[a], d.experts[b]  # [P, L, k]
    valid = d.present[a] & d.present[b]  # [P, L]
    inter = (A[..., :, None] == B[..., None, :]).any(-1).sum(-1) / d.k  # [P, L]
    per_layer = [float(inter[valid[:, lay], lay].mean()) if valid[:, lay].any() else None for lay in range(d.L)]
    return {
        "consecutive_overlap": float(inter[valid].mean()) if valid.any() else None,
        "consecutive_overlap_phase": phase,
        "consecutive_overlap_pairs": int(valid.sum()),
        "consecutive_overlap_per_layer": per_layer,
        "consecutive_overlap_random": d.k / d.E,
    }


def split_tokens(d: Dense, test_every: int = 5) -> tuple[np.ndarray, str]:
    """Held-out mask over tokens. With at least `test_every` sequences, every 5th sequence (by id rank) is held
    out; otherwise the last 20% of each sequence's tokens (in phase, position order) are."""
    uniq, inv = np.unique(d.seq, return_inverse=True)
    inv = inv.ravel()
    if len(uniq) >= test_every:
        return (inv % test_every) == test_every - 1, f"sequences: every {test_every}th sequence held out"
    # tokens are sorted by (sequence, phase, position): rank within the sequence
    start = np.searchsorted(d.seq, uniq)
    count = np.bincount(inv)
    rank = np.arange(d.n_tokens) - start[inv]
    n_test = np.floor(count / test_every).astype(np.int64)
    n_test[(n_test == 0) & (count >= 2)] = 1
    return rank >= (count - n_test)[inv], "positions: last 20% of each sequence's tokens held out"


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row; ties go to the lower expert id (stable sort)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _precision(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    return (pred[:, :, None] == true[:, None, :]).any(-1).sum(-1) / true.shape[1]


def cross_layer_precision(d: Dense, chunk: int = 1 << 15) -> dict:
    if d.L < 2:
        return {"cross_layer_precision": None, "cross_layer_split": "single layer"}
    test, how = split_tokens(d)
    train = ~test
    E, k = d.E, d.k
    per_layer, pop_layer, n_eval = [], [], []
    tot = tot_pop = 0.0
    n_tot = 0
    for lay in range(d.L - 1):
        both = d.present[:, lay] & d.present[:, lay + 1]
        tr = np.flatnonzero(both & train)
        te = np.flatnonzero(both & test)
        A, B = d.experts[tr, lay], d.experts[tr, lay + 1]
        counts = np.zeros((E, E), dtype=np.int64)
        np.add.at(counts, (np.repeat(A, k, axis=1).ravel(), np.tile(B, (1, k)).ravel()), 1)
        pop = np.bincount(B.ravel(), minlength=E)
        pop_pred = _topk(pop[None, :].astype(np.float64), k)
        s = sp = 0.0
        for c0 in range(0, len(te), chunk):
            t = te[c0:c0 + chunk]
            scores = counts[d.experts[t, lay]].sum(axis=1)  # [n, E]
            # break count ties by training popularity of layer l+1, then by expert id
            key = scores * (pop.max() + 1) + pop[None, :]
            true = d.experts[t, lay + 1]
            s += _precision(_topk(key.astype(np.float64), k), true).sum()
            sp += _precision(np.broadcast_to(pop_pred, (len(t), k)), true).sum()
        per_layer.append(s / len(te) if len(te) else None)
        pop_layer.append(sp / len(te) if len(te) else None)
        n_eval.append(len(te))
        tot += s
        tot_pop += sp
        n_tot += len(te)
    return {
        "cross_layer_precision": tot / n_tot if n_tot else None,
        "cross_layer_precision_per_layer": per_layer,
        "cross_layer_precision_popularity": tot_pop / n_tot if n_tot else None,
        "cross_layer_split": how,
        "cross_layer_train_tokens": int(train.sum()),
        "cross_layer_test_tokens": int(test.sum()),
    }


def popularity_entropy(d: Dense) -> dict:
    """Normalized entropy of expert usage per layer, and the share of routings that go to the most popular
    10% of experts (ceil(0.1 * n_experts) of them)."""
    ent, top = [], []
    n_top = max(1, math.ceil(0.1 * d.E))
    for lay in range(d.L):
        ids = d.experts[d.present[:, lay], lay].ravel()
        c = np.bincount(ids, minlength=d.E).astype(np.float64)
        p = c[c > 0] / c.sum()
        ent.append(float(-(p * np.log(p)).sum() / math.log(d.E)) if d.E > 1 and len(p) else 0.0)
        top.append(float(np.sort(c)[::-1][:n_top].sum() / c.sum()) if c.sum() else 0.0)
    return {"popularity_entropy": ent, "popularity_entropy_mean": float(np.mean(ent)),
            "popularity_top10pct_share": top, "popularity_top10pct_share_mean": float(np.mean(top))}


def lookup_groups(d: Dense):
    """Yield (layer, expert ids) per (layer, batch) in execution order, with DESIGN.md's lookup semantics (the
    same as sim.access with batch size 1): sequences one after another; the prefill of a sequence is one batch of
    all its prompt positions, and so is a teacher_forced sequence (all positions at once, as in training); each
    decode position is a batch. One lookup per unique expert per (layer, batch), in order of first occurrence
    (positions in order, each token's experts in router-rank order)."""
    whole = np.isin(d.phase, [PHASES.index("prefill"), PHASES.index("teacher_forced")])
    # a batch = a run of tokens with the same (sequence, phase) for prefill/teacher_forced, else one token
    new_batch = np.r_[True, (d.seq[1:] != d.seq[:-1]) | (d.phase[1:] != d.phase[:-1]) | ~whole[1:]]
    starts = np.flatnonzero(new_batch)
    ends = np.r_[starts[1:], d.n_tokens]
    for b0, b1 in zip(starts, ends):
        if b1 - b0 == 1:
            for lay in np.flatnonzero(d.present[b0]):
                yield int(lay), d.experts[b0, lay]
            continue
        for lay in range(d.L):
            ids = d.experts[b0:b1, lay].ravel()
            ids = ids[ids >= 0]
            if len(ids):
                uniq, first = np.unique(ids, return_index=True)
                yield lay, uniq[np.argsort(first)]


def lookup_distances(d: Dense, max_lookups: int = MAX_LOOKUPS) -> tuple[np.ndarray, np.ndarray, bool]:
    """Stack (reuse) distance of every lookup in distinct expert keys, global and per-layer scope; -1 = cold.
    Returns (global distances, per-layer distances, truncated). One Python step per (layer, batch), numpy
    within it."""
    n_keys = d.L * d.E
    last = np.full(n_keys, -1, dtype=np.int64)  # time of the last lookup of each key
    dist_g, dist_l = [], []
    t = 0
    truncated = False
    for lay, ids in lookup_groups(d):
        keys = lay * d.E + ids.astype(np.int64)
        m = len(keys)
        prev = last[keys]
        sl = last[lay * d.E:(lay + 1) * d.E]
        g = (last[None, :] > prev[:, None]).sum(axis=1)
        loc = (sl[None, :] > prev[:, None]).sum(axis=1)
        # earlier keys of this same group that were not already counted (their last use was before prev)
        earlier = np.tril(prev[None, :] <= prev[:, None], k=-1).sum(axis=1)
        cold = prev < 0
        dist_g.append(np.where(cold, -1, g + earlier))
        dist_l.append(np.where(cold, -1, loc + earlier))
        last[keys] = t + np.arange(m)
        t += m
        if t >= max_lookups:
            truncated = True
            break
    dg = np.concatenate(dist_g) if dist_g else np.empty(0, dtype=np.int64)
    dl = np.concatenate(dist_l) if dist_l else np.empty(0, dtype=np.int64)
    return dg, dl, truncated


def reuse_distances(d: Dense, max_lookups: int = MAX_LOOKUPS) -> dict:
    dg, dl, truncated = lookup_distances(d, max_lookups)
    n_keys = d.L * d.E
    out = {
        "unit": "distinct expert keys (layer, expert) looked up since the previous lookup of the same key",
        "lookup_semantics": "one lookup per unique expert per (layer, batch), first-occurrence order; prefill and "
                            "teacher_forced = one batch per sequence, decode = one token per batch; sequences "
                            "one after another (batch size 1), as sim.access",
        "lookups": int(len(dg)),
        "truncated": truncated,
        "global": _distribution(dg, n_keys),
        "per_layer": _distribution(dl, d.E),
        # LRU with a capacity of floor(rate * keys) experts hits exactly the warm lookups with distance < capacity
        "lru_hit_rate_global": {str(r): _hit_rate(dg, int(r * n_keys)) for r in CACHE_RATES},
        "lru_hit_rate_per_layer": {str(r): _hit_rate(dl, int(r * d.E)) for r in CACHE_RATES},
    }
    return out


def _hit_rate(dist: np.ndarray, capacity: int) -> float:
    return float(((dist >= 0) & (dist < capacity)).sum() / max(len(dist), 1))


def _distribution(dist: np.ndarray, max_keys: int) -> dict:
    warm = dist[dist >= 0]
    top = max(int(math.ceil(math.log2(max(max_keys, 2)))), 1)
    edges = [0] + [2**i for i in range(top + 1)]
    counts = np.histogram(warm, bins=edges)[0] if len(warm) else np.zeros(len(edges) - 1, dtype=np.int64)
    return {
        "cold": int((dist < 0).sum()),
        "warm": int(len(warm)),
        "mean": float(warm.mean()) if len(warm) else None,
        "percentiles": {f"p{q}": float(np.percentile(warm, q)) for q in PERCENTILES} if len(warm) else {},
        "histogram": {"edges": edges, "counts": counts.astype(int).tolist(),
                      "note": "counts[i] = warm lookups with edges[i] <= distance < edges[i+1]"},
    }


def compute(trace: Trace, max_lookups: int = MAX_LOOKUPS, check: bool = True) -> dict:
    """All statistics of a trace. check: verify the invariants first (traces.check), so a malformed trace gives
    one clear TraceError instead of wrong numbers."""
    if check:
        from traces.check import check_trace

        check_trace(trace)
    d = Dense(trace)
    meta = trace.meta
    out: dict = {
        "trace": str(trace.path),
        "model": meta.model,
        "n_layers": meta.n_layers,
        "n_experts": meta.n_experts,
        "top_k": meta.top_k,
        "rows": d.rows,
        "sequences": int(len(np.unique(d.seq))),
        "tokens": token_counts(d),
        "irregularities": len(meta.irregularities),
    }
    phase = overlap_phase(d)
    out.update(consecutive_overlap(d, phase) if phase else {"consecutive_overlap": None})
    out.update(cross_layer_precision(d))
    out.update(popularity_entropy(d))
    out["reuse_distance"] = reuse_distances(d, max_lookups)
    return out


def _fmt(x, nd=3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def human(s: dict) -> str:
    rd = s["reuse_distance"]
    lines = [
        f"trace         {s['trace']}  ({s['model']})",
        f"geometry      {s['n_layers']} layers x {s['n_experts']} experts, top-{s['top_k']}; {s['rows']} rows, "
        f"{s['sequences']} sequence(s), {s['irregularities']} irregularit(y/ies) in meta.json",
        "tokens        " + ", ".join(f"{k} {v}" for k, v in s["tokens"].items()),
        f"consecutive   overlap {_fmt(s.get('consecutive_overlap'))} on {s.get('consecutive_overlap_phase')} tokens "
        f"({s.get('consecutive_overlap_pairs', 0)} pairs; random would give "
        f"{_fmt(s.get('consecutive_overlap_random'))})",
        f"cross-layer   precision {_fmt(s.get('cross_layer_precision'))} (popularity baseline "
        f"{_fmt(s.get('cross_layer_precision_popularity'))}; split: {s.get('cross_layer_split')})",
        f"popularity    entropy mean {_fmt(s['popularity_entropy_mean'])}, per layer min "
        f"{_fmt(min(s['popularity_entropy']))} max {_fmt(max(s['popularity_entropy']))}; the top 10% of experts "
        f"take {_fmt(s['popularity_top10pct_share_mean'])} of the routings",
        f"reuse dist.   {rd['lookups']} lookups; global: cold {rd['global']['cold']}, "
        + ", ".join(f"{k} {v:.0f}" for k, v in rd["global"]["percentiles"].items()),
        "              per layer: " + ", ".join(f"{k} {v:.0f}" for k, v in rd["per_layer"]["percentiles"].items()),
        "LRU hit rate  global " + ", ".join(f"{float(r):.0%}: {h:.3f}" for r, h in rd["lru_hit_rate_global"].items())
        + "; per layer " + ", ".join(f"{float(r):.0%}: {h:.3f}" for r, h in rd["lru_hit_rate_per_layer"].items()),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m traces.stats", description=__doc__.splitlines()[0])
    ap.add_argument("trace", metavar="TRACE")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--max-lookups", type=int, default=MAX_LOOKUPS,
                    help="stop the reuse-distance pass after this many lookups (default %(default)s)")
    ap.add_argument("--no-check", action="store_true", help="skip the invariant check (traces.check) first")
    args = ap.parse_args(argv)
    stats = compute(Trace(args.trace), args.max_lookups, check=not args.no_check)
    print(json.dumps(stats) if args.json else human(stats))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
