"""`python -m predictors.evaluate TRACE --predictor NAME --distance D [--artifact A] [--json] [--budget B ...]`

Measures a predictor on the part of a trace it was not fit on (see predictors.split for the two kinds of split
and predictors.metrics for the figures). The evaluation replays the held-out sequences through
`predictors.views.replay`, the same loop the simulator runs: one prefill batch per prompt, one decode batch per
generated token, observe() then predict() at every layer.

Without --artifact a fresh predictor is fit on the training split first (trainable ones only). With --artifact
the split recorded in the artifact is used, so the scored sequences are exactly the ones it was not fit on.
--folds K (traces with several sequences) runs K-fold cross-validation: K predictors, each fit on K-1 parts
and scored on the remaining one, so every sequence is scored once and never by a predictor that saw it.
--goodpred also simulates the predictor as the prefetcher and reports fetch_rate and goodpred (accuracy x
fetch rate): see predictors.goodpred.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

from predictors.base import Predictor, PredictorUnavailable
from predictors.metrics import Scorer, clean
from predictors.registry import _REGISTRY, _load_all, available_predictors, make_predictor
from predictors.split import Split, TrainingTrace, evaluate_split, fit_summary, make_split
from predictors.views import HiddenSource, iter_batches, load_sequences, replay
from traces.errors import run_cli
from traces.reader import Trace


def parse_sets(items: list[str] | None) -> dict:
    """--set key=value (value parsed as JSON when it can be, else kept as a string)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def build_predictor(name: str, distance: int, seed: int = 0, params: dict | None = None) -> Predictor:
    """make_predictor with distances=[distance] and seed=seed where the predictor takes them."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown predictor {name!r}; available: {', '.join(available_predictors())}")
    accepted = inspect.signature(_REGISTRY[name].__init__).parameters
    kw = dict(params or {})
    if "distances" in accepted and "distances" not in kw:
        kw["distances"] = [distance]
    if "seed" in accepted and "seed" not in kw:
        kw["seed"] = seed
    return make_predictor(name, **kw)


def fit_on_split(predictor: Predictor, trace: Trace, split: Split, sequences=None) -> None:
    """Fit on the training part only, through a TrainingTrace that refuses held-out data."""
    if getattr(predictor, "trainable", False):
        predictor.fit(TrainingTrace(trace, split, sequences), list(split.train))


def prepare(trace: Trace | str, name: str, distance: int, *, params: dict | None = None,
            artifact: str | None = None, fraction: float = 0.9, seed: int = 0) -> tuple[Predictor, Split]:
    """A predictor ready to run on `trace`, and the split that says where it may be run (for the simulator).

    With `artifact`, the trained predictor and the split recorded in it; otherwise a new predictor fit (when
    trainable) on make_split(trace, fraction, seed)'s training part. Simulate only `split.eval` (and, for a
    position split, count metrics only from `split.scored_from(seq)`), or the figures include training data.
    """
    if not isinstance(trace, Trace):
        trace = Trace(trace)
    seqs = load_sequences(trace)
    if artifact is not None:
        from predictors.artifact import load_artifact

        predictor, head = load_artifact(artifact)
        split = artifact_split(trace, head, seqs, artifact)
    else:
        predictor = build_predictor(name, distance, seed, params)
        split = make_split(trace, fraction, seed, sequences=seqs)
        predictor.check_trace(trace.meta)
        fit_on_split(predictor, trace, split, seqs)
    predictor.check_trace(trace.meta)
    return predictor, split


def artifact_split(trace: Trace, head: dict, sequences, artifact) -> Split:
    """Which sequences of `trace` an artifact may be scored on.

    Fit on this very trace (same routing.parquet content hash): the held-out part of the split it recorded;
    refused when that split held nothing out (--split 1.0). Fit on another trace: every sequence of this one,
    refused when any of them has the fingerprint (content hash) of one of the artifact's training sequences.
    Artifacts without a content hash (older ones) are matched by their recorded split, as before.
    """
    from predictors.artifact import routing_sha256, sequence_fingerprint

    sp = head["split"]
    fit_hash = head["trace"].get("routing_sha256")
    if fit_hash is not None and fit_hash != routing_sha256(trace.path):
        trained = set(head.get("sequence_fingerprints") or [])
        seen = [s.sequence for s in sequences if sequence_fingerprint(s) in trained]
        if seen:
            raise ValueError(f"{artifact}: {len(seen)} of this trace's sequences (e.g. sequence {seen[0]}) are "
                             f"sequences the artifact was fit on (same content hash; training trace "
                             f"{head['trace'].get('path')}): they cannot be scored with it")
        return evaluate_split(trace, sequences)
    if sp["kind"] == "all":
        raise ValueError(f"{artifact}: fit on every sequence of this trace (routing.parquet sha256 "
                         f"{str(fit_hash)[:12]}..., --split 1.0), so none is held out; score it on another trace")
    split = make_split(trace, sp["fraction"], sp["seed"], folds=sp["folds"], fold=sp["fold"], sequences=sequences)
    if list(split.train) != list(sp["train"]):
        raise ValueError(f"{artifact}: its training sequences do not match this trace's split "
                         "(was the trace re-imported?)")
    return split


def fit_description(split: Split, head: dict | None, sequences) -> dict:
    """Where the scored predictor was fit: on a split of this trace, or on a separate training trace."""
    if split.kind == "separate":
        t = head["trace"]
        return {"where": "separate training trace", "trace": t.get("path"), "model": t.get("model"),
                "routing_sha256": t.get("routing_sha256"), "prompts": t.get("prompts"), **head.get("fit", {})}
    return {"where": f"{split.kind} split of this trace", **fit_summary(split, sequences)}


def score_split(trace: Trace, predictor: Predictor, split: Split, distance: int, scorer: Scorer, *,
                sequences=None, batch_size: int = 1, max_eval_sequences: int | None = None) -> None:
    """Replay split.eval and add the held-out predictions to `scorer`."""
    predictor.check_trace(trace.meta)
    seqs = sequences if sequences is not None else load_sequences(trace, split.eval)
    wanted = set(split.eval)
    seqs = [s for s in seqs if s.sequence in wanted]
    if max_eval_sequences is not None:
        seqs = seqs[:max_eval_sequences]
    source = HiddenSource(trace) if (trace.meta.has_hidden_states or trace.meta.has_router_weights) else None
    predictor.reset()

    def score(batch) -> bool:
        return all(a >= split.scored_from(s.sequence) for s, a, _ in batch.parts)

    def on_prediction(batch, target, pred) -> None:
        keys = list(zip(batch.sequences.tolist(), batch.positions.tolist()))
        scorer.add(target, batch.actual(target), pred.experts, decode=batch.phase == "decode", token_keys=keys)

    replay(predictor, iter_batches(seqs, trace.meta, batch_size=batch_size, source=source), distance,
           score=score, on_prediction=on_prediction)


def evaluate(trace: Trace | str, name: str, distance: int, *, artifact: str | None = None, fraction: float = 0.9,
             seed: int = 0, folds: int = 1, budgets: list[int] | None = None, params: dict | None = None,
             batch_size: int = 1, max_eval_sequences: int | None = None) -> dict:
    """Evaluate predictor `name` at `distance` on held-out data; returns the JSON-ready result."""
    if not isinstance(trace, Trace):
        trace = Trace(trace)
    meta = trace.meta
    if distance < 1:
        raise ValueError(f"distance must be >= 1, got {distance}")
    if distance >= meta.n_layers:
        raise ValueError(f"distance {distance} leaves no target layer in a trace of {meta.n_layers} layers")
    scorer = Scorer(meta.n_layers, meta.top_k, budgets)
    all_seqs = load_sequences(trace)
    splits = []
    fits = []
    if artifact is not None:
        from predictors.artifact import load_artifact

        predictor, head = load_artifact(artifact)
        if head["trace"]["model"] != meta.model or head["trace"]["n_layers"] != meta.n_layers:
            raise ValueError(f"{artifact}: trained on a trace of {head['trace']['model']!r}, not {meta.model!r}")
        if distance != head.get("distance", distance) and not _covers(predictor, distance):
            raise ValueError(f"{artifact}: trained for distance {head['distance']}, not {distance}")
        split = artifact_split(trace, head, all_seqs, artifact)
        predictor.check_trace(meta)
        score_split(trace, predictor, split, distance, scorer, sequences=all_seqs, batch_size=batch_size,
                    max_eval_sequences=max_eval_sequences)
        splits.append(split)
        fits.append(fit_description(split, head, all_seqs))
        name = head["predictor"]
    else:
        n_folds = folds if folds > 1 else 1
        for fold in range(n_folds):
            split = make_split(trace, fraction, seed, folds=folds, fold=fold, sequences=all_seqs)
            predictor = build_predictor(name, distance, seed, params)
            predictor.check_trace(meta)
            fit_on_split(predictor, trace, split, all_seqs)
            score_split(trace, predictor, split, distance, scorer, sequences=all_seqs, batch_size=batch_size,
                        max_eval_sequences=max_eval_sequences)
            splits.append(split)
            if getattr(predictor, "trainable", False):
                fits.append(fit_description(split, None, all_seqs))
    out = {"trace": str(trace.path), "model": meta.model, "predictor": name, "distance": distance,
           "top_k": meta.top_k, "n_layers": meta.n_layers, "n_experts": meta.n_experts}
    out.update(scorer.summary())
    out["split"] = {"kind": splits[0].kind, "fraction": splits[0].fraction, "seed": splits[0].seed,
                    "folds": len(splits) if artifact is None and folds > 1 else 1,
                    "eval_sequences": sorted({s for sp in splits for s in sp.eval}),
                    "scored_from": splits[0].cut and {str(k): v for k, v in splits[0].cut.items()}}
    if fits:  # per fold: what it was fit on (sequences, token positions, routing rows)
        out["fit"] = {**fits[0], "tokens": [f.get("tokens") for f in fits] if len(fits) > 1 else fits[0].get("tokens"),
                      "rows": [f.get("rows") for f in fits] if len(fits) > 1 else fits[0].get("rows"),
                      "sequences": [f.get("sequences") for f in fits] if len(fits) > 1 else fits[0].get("sequences")}
    return clean(out)


def _covers(predictor: Predictor, distance: int) -> bool:
    return distance in [int(d) for d in predictor.params.get("distances", [])]


def format_text(r: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"{r['predictor']} d={r['distance']} on {r['model']} ({r['trace']})",
             f"  accuracy {f(r['accuracy'])}  precision@{r['top_k']} {f(r['precision'])}  "
             f"recall@{r['top_k']} {f(r['recall'])}  n_eval {r['n_eval']} {r['headline_batches']} tokens, "
             f"{r['n_predictions']} predictions; split {r['split']['kind']}"]
    for b, v in r["budgets"].items():
        lines.append(f"  budget {b:>3}: precision {f(v['precision'])}  recall {f(v['recall'])}")
    if "prefill" in r:
        p = r["prefill"]
        lines.append(f"  prefill: accuracy {f(p['accuracy'])} over {p['n_predictions']} (batch, layer) predictions")
    lines.append("  per layer: " + " ".join(f"{x['layer']}:{f(x['accuracy'])}" for x in r["per_layer"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    from predictors._torchfit import single_threaded_blas

    single_threaded_blas()
    ap = argparse.ArgumentParser(prog="python -m predictors.evaluate", description=__doc__.split("\n\n")[1])
    ap.add_argument("trace")
    ap.add_argument("--predictor", required=True, help=f"one of: {', '.join(available_predictors())}")
    ap.add_argument("--distance", type=int, required=True, help="predict layer l+D while at layer l")
    ap.add_argument("--artifact", help="a trained artifact (predictors.train); its split decides what is scored")
    ap.add_argument("--split", type=float, default=0.9, help="training fraction (default 0.9)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=1, help="K-fold cross-validation over sequences (default off)")
    ap.add_argument("--budget", type=int, nargs="*", default=None,
                    help="extra budgets for precision/recall (top-k is always included)")
    ap.add_argument("--batch-size", type=int, default=1, help="decode batch size (sequences per step)")
    ap.add_argument("--max-eval-sequences", type=int, default=None)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="predictor parameter")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    g = ap.add_argument_group("GoodPred (accuracy x fetch rate; the fetch rate from a simulation, predictors.goodpred)")
    g.add_argument("--goodpred", action="store_true",
                   help="also simulate with this predictor as the prefetcher at the same distance")
    g.add_argument("--config", help="single-run simulator config (sim.run); its trace/prefetch keys are replaced")
    g.add_argument("--hardware", default="h200", help="hardware profile without --config (default h200)")
    g.add_argument("--cache-rate", type=float, default=None, help="cache rate (default 0.25, or the config's)")
    g.add_argument("--phase", default="decode", choices=["prefill", "decode", "both"],
                   help="simulated phase without --config (default decode, as the headline accuracy)")
    g.add_argument("--link-scale", type=float, default=1.0,
                   help="multiply the profile's host-to-device bandwidth (inf: infinitely fast link)")
    g.add_argument("--sim-set", action="append", metavar="KEY=VALUE", help="simulator config override")
    args = ap.parse_args(argv)
    if args.goodpred:
        return _main_goodpred(args)
    try:
        result = evaluate(args.trace, args.predictor, args.distance, artifact=args.artifact, fraction=args.split,
                          seed=args.seed, folds=args.folds, budgets=args.budget, params=parse_sets(args.set),
                          batch_size=args.batch_size, max_eval_sequences=args.max_eval_sequences)
    except (PredictorUnavailable, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(format_text(result))
    return 0


def _main_goodpred(args) -> int:
    from predictors.goodpred import goodpred

    if args.folds > 1 or args.batch_size != 1 or args.max_eval_sequences is not None or args.budget:
        print("error: --goodpred takes one split (no --folds, --batch-size, --max-eval-sequences, --budget; "
              "set the simulated batch size with --sim-set batch_size=N)", file=sys.stderr)
        return 2
    from sim.config import parse_sets as sim_parse_sets

    try:
        result = goodpred(args.trace, args.predictor, args.distance, config=args.config, hardware=args.hardware,
                          cache_rate=args.cache_rate, phase=args.phase, link_scale=args.link_scale,
                          params=parse_sets(args.set), artifact=args.artifact, fraction=args.split,
                          seed=args.seed, sim_sets=sim_parse_sets(args.sim_set))
    except (PredictorUnavailable, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        def f(v):
            return "n/a" if v is None else f"{v:.3f}"

        m = result["sim"]["metrics"]
        c = result["sim"]["config"]
        print(format_text(result))
        print(f"  simulated ({c['hardware']}, {c['phase']}, {c['cache.policy']} {c['cache.scope']}, cache rate "
              f"{c['cache.cache_rate']}): hit rate {f(m['hit_rate'])}, tpot {f(m['tpot_ms'])} ms, "
              f"prefetched_used {m['prefetched_used']}, late {m['n_prefetch_late']}")
        print(f"  accuracy {f(result['accuracy'])} x fetch rate {f(result['fetch_rate'])} = "
              f"GoodPred {f(result['goodpred'])}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
