"""`python -m predictors.train TRACE --predictor NAME --distance D --out ARTIFACT.npz [--split 0.9] [--seed S]`

Fits a predictor on the training split of a trace (predictors.split: 9:1 over sequences, or over generated
positions for a one-sequence trace) and saves it as an artifact (format in predictors.artifact). The split is
recorded in the artifact, and `predictors.evaluate --artifact` scores only the held-out part.

`--split 1.0` (or `--fit-all`) fits on the whole trace, a separate training trace: the artifact records that
trace's identity (model, content hash of routing.parquet, prompts source, one fingerprint per sequence) and
`predictors.evaluate --artifact` then scores every sequence of ANOTHER trace, refusing the training trace itself
and any trace holding one of its sequences. `--share-as NAME:PATH` also saves the fitted networks as predictor
NAME when NAME's fit is the same code (learned_mlp_gate reuses learned_mlp's networks), so they are fit once.
`python -m predictors.train --reshare SRC.npz --predictor NAME --out PATH` does the same later, from a saved
artifact (no trace, no fit): e.g. learned_mlp_gate's artifacts rebuilt from learned_mlp's, so a device call need
not return both copies of the same networks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from predictors.artifact import save_artifact, sequence_fingerprint, trace_identity
from predictors.base import PredictorUnavailable
from predictors.evaluate import build_predictor, fit_on_split, parse_sets
from predictors.registry import available_predictors
from predictors.split import fit_summary, make_split
from predictors.views import load_sequences
from traces.errors import run_cli
from traces.reader import Trace


def train(trace_path: str, name: str, distance: int, out: str, *, fraction: float = 0.9, seed: int = 0,
          folds: int = 1, fold: int = 0, params: dict | None = None, command: str = "",
          share_as: list[tuple[str, str]] | None = None) -> dict:
    trace = Trace(trace_path)
    meta = trace.meta
    if not 1 <= distance < meta.n_layers:
        raise ValueError(f"distance must be in [1, {meta.n_layers - 1}] for this trace, got {distance}")
    predictor = build_predictor(name, distance, seed, params)
    predictor.check_trace(meta)
    shared = []
    for other, path in share_as or []:
        twin = build_predictor(other, distance, seed, params)
        if type(twin).fit is not type(predictor).fit or type(twin).get_state is not type(predictor).get_state:
            raise ValueError(f"--share-as {other}: its fit is not {name}'s; train it separately")
        twin.check_trace(meta)
        shared.append((twin, path))
    seqs = load_sequences(trace)
    split = make_split(trace, fraction, seed, folds=folds, fold=fold, sequences=seqs)
    t0 = time.perf_counter()
    fit_on_split(predictor, trace, split, seqs)
    fit_s = time.perf_counter() - t0
    allowed = set(split.train)
    header = {
        "distance": distance,
        "trace": trace_identity(trace),
        "split": split.describe(),
        "fit": fit_summary(split, seqs),
        "sequence_fingerprints": [sequence_fingerprint(s) for s in seqs if s.sequence in allowed],
        "command": command,
    }
    save_artifact(out, predictor, header)
    state = predictor.get_state()
    for twin, path in shared:
        twin.set_state(state)
        save_artifact(path, twin, {**header, "shared_from": f"{name} (the same networks, fit once)"})
    return {"artifact": out, "predictor": predictor.name, "distance": distance, "train_sequences": len(split.train),
            "eval_sequences": len(split.eval), "split": split.kind, "fit_seconds": round(fit_s, 2),
            "fit": header["fit"], "shared": [p for _, p in shared],
            "fit_report": getattr(predictor, "fit_report", None)}


def reshare(src: str, name: str, out: str, command: str = "") -> dict:
    """Save the networks of artifact `src` as predictor `name` (whose fit is the same code), header kept."""
    from predictors.artifact import load_artifact

    pred, head = load_artifact(src)
    twin = build_predictor(name, int(head["distance"]), params=head.get("params", {}))
    if type(twin).fit is not type(pred).fit or type(twin).get_state is not type(pred).get_state:
        raise ValueError(f"--reshare: {name}'s fit is not {pred.name}'s")
    twin.set_state(pred.get_state())
    keep = {k: v for k, v in head.items() if k not in ("format", "version", "predictor", "params", "n_params")}
    keep["shared_from"] = f"{pred.name} (the same networks, fit once; {src})"
    if command:
        keep["reshare_command"] = command
    save_artifact(out, twin, keep)
    return {"artifact": out, "predictor": name, "distance": head["distance"], "shared_from": src}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m predictors.train", description=__doc__.split("\n\n")[1])
    ap.add_argument("trace", nargs="?", help="the trace to fit on (not with --reshare)")
    ap.add_argument("--predictor", required=True, help=f"one of: {', '.join(available_predictors())}")
    ap.add_argument("--distance", type=int, help="required unless --reshare")
    ap.add_argument("--reshare", metavar="SRC.npz",
                    help="no fit: save SRC's networks as --predictor (same fit code) at --out")
    ap.add_argument("--out", required=True, help="artifact path (*.npz)")
    ap.add_argument("--split", type=float, default=0.9,
                    help="training fraction (default 0.9); 1.0 = fit on the whole trace (a separate training trace)")
    ap.add_argument("--fit-all", action="store_true", help="same as --split 1.0")
    ap.add_argument("--share-as", action="append", metavar="NAME:PATH",
                    help="also save the fitted state as predictor NAME (same fit code, e.g. learned_mlp_gate)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=1, help="with --fold: train on all folds but one")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="predictor parameter")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cmd = "python -m predictors.train " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.reshare:
        try:
            res = reshare(args.reshare, args.predictor, args.out, command=cmd)
        except (PredictorUnavailable, ValueError, ImportError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(res) if args.json else f"wrote {res['artifact']}: {res['predictor']} "
              f"d={res['distance']} (the networks of {res['shared_from']})")
        return 0
    if args.trace is None or args.distance is None:
        ap.error("TRACE and --distance are required (unless --reshare)")
    try:
        share = []
        for item in args.share_as or []:
            if ":" not in item:
                raise ValueError(f"--share-as expects NAME:PATH, got {item!r}")
            share.append(tuple(item.split(":", 1)))
        res = train(args.trace, args.predictor, args.distance, args.out, fraction=1.0 if args.fit_all else args.split,
                    seed=args.seed, folds=args.folds, fold=args.fold, params=parse_sets(args.set), command=cmd,
                    share_as=share)
    except (PredictorUnavailable, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
    else:
        print(f"wrote {res['artifact']}: {res['predictor']} d={res['distance']} fit on {res['train_sequences']} "
              f"sequence(s), {res['fit']['tokens']} tokens ({res['split']} split) in {res['fit_seconds']} s"
              + "".join(f"; also {p}" for p in res["shared"]))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
