"""Hit rate against cache size for every policy, from sim.mrc's one-pass curves, as tables and figures.

    python -m analysis.mrc TRACE [--out PNG] [--phase both|prefill|decode] [--points N]

draws the README's figure (global and per-layer scope side by side; lru, fifo, lfu and the Belady bound; a
line at one token's working set). The README figure is regenerated with

    python -m analysis.mrc data/traces/qwen3-30b-a3b --out docs/figures/hit_rate_qwen3.png

Curves are computed by `sim.mrc.compute_mrc` on `sim.access.lookup_stream` (the simulator's demand stream, no
prefetch): exact step curves for lru and belady, simulated points for the other policies.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import style
from analysis.results import trace_model

DEFAULT_POLICIES = ("lru", "fifo", "lfu", "belady")


def lookup_stream(trace: str | Path, phase: str = "both", batch_size: int = 1):
    from sim.access import lookup_stream as _ls

    return _ls(trace, phase=phase, batch_size=batch_size)


def mrc_table(trace: str | Path, policies: Sequence[str] = DEFAULT_POLICIES, *, scopes: Sequence[str] = ("global",),
              phase: str = "both", batch_size: int = 1, points: int = 12, stream=None,
              sim_budget: int | None = None) -> pd.DataFrame:
    """Tidy hit-rate curves: one row per (scope, policy, capacity).

    Columns: trace, model, phase, scope, policy, method, capacity_experts, cache_rate_pct, hit_rate.
    lru and belady are exact step curves (every step point); other policies are simulated at `points` evenly
    spaced sizes plus four around one forward pass's working set. `sim_budget` (lookups simulated in all, for
    large traces) lowers the number of sizes to fit it: then 3 or 4 sizes from 0.9 to 6 working sets."""
    from sim.mrc import compute_mrc, saturation_capacity

    s = stream if stream is not None else lookup_stream(trace, phase, batch_size)
    total = s.n_layers * s.n_experts
    ws = token_working_set(trace, phase, stream=s)["experts"]
    rows = []
    for scope in scopes:
        exact = [p for p in policies if p in ("lru", "belady")]
        other = [p for p in policies if p not in exact]
        parts = []
        if exact:
            parts.append(compute_mrc(s, exact, scope=scope, unit="experts"))
        if other:
            top = saturation_capacity(s, scope, "experts")
            low = s.n_layers if scope == "per_layer" else 1
            grid, extra = np.linspace(low, top, max(2, points)), np.array([0.5, 0.9, 1.1, 1.5])
            if sim_budget is not None and len(s):
                fit = sim_budget // (len(s) * len(other) * len(scopes))
                if fit < len(grid) + len(extra):  # few sizes: where the curve bends, around the working set
                    grid, extra = np.zeros(0), np.array([0.9, 1.5, 3.0, 6.0])[:max(3, min(4, int(fit)))]
            caps = np.r_[grid, ws * extra]
            caps = np.unique(np.clip(caps.round(), low, top).astype(int))
            parts.append(compute_mrc(s, other, scope=scope, unit="experts", capacities=caps.tolist()))
        for res in parts:
            for pol, c in res["policies"].items():
                cap = np.asarray(c["capacity"], dtype=float)
                hr = list(c["hit_rate"])
                if c["method"] != "simulated" and len(cap) and cap[-1] < total:
                    cap = np.r_[cap, total]  # a step curve stays flat beyond saturation
                    hr.append(hr[-1])
                for x, h in zip(cap, hr):
                    rows.append((str(trace), trace_model(trace), phase, scope, pol, c["method"], x,
                                 100.0 * x / total, h))
    return pd.DataFrame(rows, columns=["trace", "model", "phase", "scope", "policy", "method", "capacity_experts",
                                       "cache_rate_pct", "hit_rate"])


def token_working_set(trace: str | Path, phase: str = "both", stream=None) -> dict:
    """The experts one forward pass touches: the median over batches of the batch's lookups (unique experts per
    layer, summed over layers). For a one-token decode batch that is n_layers x top_k; for a teacher-forced or
    prefill batch of many tokens it is more. Returns experts, cache_rate_pct and a label for figures."""
    from traces.reader import Trace

    meta = Trace(trace).meta
    s = stream if stream is not None else lookup_stream(trace, phase)
    per_batch = np.bincount(s.batch) if len(s) else np.zeros(1, np.int64)
    n = int(np.median(per_batch[per_batch > 0])) if (per_batch > 0).any() else 0
    if n == meta.n_layers * meta.top_k:
        label = f"one token's working set\n({meta.n_layers} layers x top-{meta.top_k} = {n} experts)"
    else:
        label = f"one batch's working set\n(median {n} experts per forward pass)"
    return {"experts": n, "cache_rate_pct": 100.0 * n / (meta.n_layers * meta.n_experts), "label": label,
            "n_layers": meta.n_layers, "top_k": meta.top_k, "n_experts": meta.n_experts}


def hit_rate_table(table: pd.DataFrame, rates_pct: Sequence[float] = (5, 10, 25, 50)) -> pd.DataFrame:
    """Hit rates read off mrc_table curves at cache rates (%): exact step curves at the step below, simulated
    curves interpolated linearly between their points. Index (trace, scope, policy); a column per rate."""
    rows = []
    for (trace, scope, policy), g in table.groupby(["trace", "scope", "policy"], sort=True):
        g = g.sort_values("cache_rate_pct")
        x, y = g["cache_rate_pct"].to_numpy(), g["hit_rate"].to_numpy()
        exact = g["method"].iloc[0] != "simulated"
        vals = {}
        for r in rates_pct:
            if exact:
                i = int(np.searchsorted(x, r, side="right")) - 1
                vals[f"{r:g}%"] = float(y[i]) if i >= 0 else 0.0
            else:
                vals[f"{r:g}%"] = float(np.interp(r, np.r_[0.0, x], np.r_[0.0, y]))
        rows.append({"trace": Path(str(trace)).name, "scope": scope, "policy": policy,
                     "method": "exact" if exact else "simulated, interpolated", **vals})
    return pd.DataFrame(rows).set_index(["trace", "scope", "policy"])


def lru_cliff(table: pd.DataFrame, working_set: dict, scope: str = "global") -> dict:
    """LRU's hit rate one expert below a forward pass's working set, at it and at twice it (global scope): below
    it, LRU evicts each expert before the next pass needs it again, so only the hits inside a batch remain."""
    g = table[(table["policy"] == "lru") & (table["scope"] == scope)].sort_values("capacity_experts")
    ws = working_set["experts"]

    def at(c):
        sel = g[g["capacity_experts"] <= c]
        return float(sel["hit_rate"].iloc[-1]) if len(sel) else 0.0

    return {"working_set_experts": ws, "lru_hit_rate_below": at(ws - 1), "lru_hit_rate_at": at(ws),
            "lru_hit_rate_at_2x": at(2 * ws)}


def plot_mrc(ax, table: pd.DataFrame, *, working_set: dict | None = None, title: str | None = None,
             x: str = "cache_rate_pct") -> None:
    """Hit rate (%) against cache size, one curve per policy (Belady drawn as the bound)."""
    for pol in sorted(table["policy"].unique(), key=lambda p: (p == "belady", p)):
        g = table[table["policy"] == pol].sort_values(x)
        st = style.series_style(pol, "none")
        st.pop("linestyle")
        exact = g["method"].iloc[0] != "simulated"
        label = "Belady (optimal bound)" if pol == "belady" else pol.upper() if len(pol) <= 4 else pol
        if exact:
            st.pop("marker")
            ax.step(g[x], 100 * g["hit_rate"], where="post", label=label + (" (exact)" if pol != "belady" else ""),
                    linestyle="--" if pol == "belady" else "-", **st)
        else:
            ax.plot(g[x], 100 * g["hit_rate"], label=label + " (simulated)", linestyle="-", **st)
    if working_set is not None:
        ws = working_set["cache_rate_pct"] if x == "cache_rate_pct" else working_set["experts"]
        ax.axvline(ws, color="#d62728", linewidth=1.0, linestyle=":")
        left = working_set["cache_rate_pct"] > 30
        ax.annotate(working_set["label"], xy=(ws, 12), xytext=(-8 if left else 8, 0), textcoords="offset points",
                    fontsize=8, color="#d62728", va="center", ha="right" if left else "left",
                    bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.85))
    ax.set_xlabel("cache rate (% of all experts)" if x == "cache_rate_pct" else "cache size (experts)")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(-2, 102)
    ax.set_xlim(left=0)
    if title:
        ax.set_title(title)


def curves(trace: str | Path, *, policies: Sequence[str] = DEFAULT_POLICIES, phase: str = "both", points: int = 12,
           sim_budget: int | None = None) -> tuple[pd.DataFrame, dict]:
    """(mrc_table in global and per-layer scope, token_working_set) of one trace."""
    stream = lookup_stream(trace, phase)
    table = mrc_table(trace, policies, scopes=("global", "per_layer"), phase=phase, points=points, stream=stream,
                      sim_budget=sim_budget)
    return table, token_working_set(trace, phase, stream=stream)


def _curves_job(args):
    trace, kw = args
    return curves(trace, **kw)


def curves_parallel(traces: Sequence[str | Path], *, workers: int = 2, **kw) -> list[tuple[pd.DataFrame, dict]]:
    """`curves` of several traces in a pool of `workers` processes (in order)."""
    jobs = [(t, kw) for t in traces]
    if workers <= 1 or len(jobs) <= 1:
        return [_curves_job(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_curves_job, jobs))


def mrc_figure(trace: str | Path, *, policies: Sequence[str] = DEFAULT_POLICIES, phase: str = "both",
               points: int = 12, hardware: str = "any hardware (hit rate does not depend on it)",
               xmax_pct: float | None = 60.0, precomputed: tuple[pd.DataFrame, dict] | None = None,
               sim_budget: int | None = None):
    """Global and per-layer scope side by side for one trace; returns (fig, table). `precomputed` = the
    (table, working set) of `curves` when already computed."""
    table, ws = precomputed or curves(trace, policies=policies, phase=phase, points=points, sim_budget=sim_budget)
    fig, axes = style.new_figure(1, 2, sharey=True)
    for ax, scope in zip(axes[0], ("global", "per_layer")):
        plot_mrc(ax, table[table["scope"] == scope], working_set=ws if scope == "global" else None,
                 title=f"{scope.replace('_', '-')} cache scope")
        if xmax_pct:
            ax.set_xlim(0, min(100.0, max(xmax_pct, 1.25 * ws["cache_rate_pct"])))
    phase_txt = {"both": "prompt + decode", "prefill": "prompt only", "decode": "decode only"}[phase]
    fig.suptitle(f"Hit rate against cache size: {trace_model(trace)} (trace {Path(str(trace)).name}, {phase_txt})\n"
                 f"demand fetching, no prefetch; {hardware}")
    style.legend_outside(fig, axes.ravel())
    return fig, table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.mrc", description="Hit rate against cache size figure.")
    ap.add_argument("trace", help="trace directory")
    ap.add_argument("--out", default=None, help="PNG path (default: hit_rate_<trace>.png in the current directory)")
    ap.add_argument("--phase", default="both", choices=("both", "prefill", "decode"))
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    ap.add_argument("--points", type=int, default=12, help="sizes at which simulated policies are evaluated")
    args = ap.parse_args(argv)
    if not Path(args.trace).is_dir():
        print(f"error: {args.trace}: no such trace directory", file=sys.stderr)
        return 2
    fig, _ = mrc_figure(args.trace, policies=[p for p in args.policies.split(",") if p], phase=args.phase,
                        points=args.points)
    out = args.out or f"hit_rate_{Path(args.trace).name}.png"
    print(style.save(fig, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
