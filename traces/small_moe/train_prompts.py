"""Prompts from the TRAINING split of the small-MoE corpus, made like the held-out ones, for a large training
trace of the predictors (the held-out prompts in data/small_moe/prompts.jsonl come from the validation split).

    python -m traces.small_moe.train_prompts --data build/small_moe --n 6000 --out /tmp/train_prompts.jsonl

Documents are the training token stream (train.npy) cut at <|endoftext|>, decoded with the committed tokenizer;
prompts are paragraph openings of prose chosen exactly as corpus.make_prompts chooses the held-out ones (16-32
tokens, seeded), at most --per-doc per document. A prompt whose first --overlap-tokens tokens equal a held-out
prompt's is dropped, and the command fails if any held-out prompt (those first tokens) still matches one; it
prints counts, including how many held-out prompts occur verbatim anywhere in the training tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from traces.small_moe.corpus import make_prompts


def training_documents(train: np.ndarray, eot: int, tok) -> list[str]:
    cuts = np.flatnonzero(train == eot)
    docs, start = [], 0
    for c in list(cuts) + [len(train)]:
        if c > start:
            docs.append(tok.decode(train[start:c].tolist()))
        start = c + 1
    return docs


def occurs(haystack: np.ndarray, needle: list[int]) -> bool:
    """Whether the token sequence `needle` occurs in `haystack` (uint16 tokens)."""
    h = haystack.astype("<u2").tobytes()
    n = np.asarray(needle, dtype="<u2").tobytes()
    i = h.find(n)
    while i >= 0:
        if i % 2 == 0:
            return True
        i = h.find(n, i + 1)
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m traces.small_moe.train_prompts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("build/small_moe"))
    ap.add_argument("--tokenizer", type=Path, default=Path("data/small_moe/tokenizer/tokenizer.json"))
    ap.add_argument("--held-out", type=Path, default=Path("data/small_moe/prompts.jsonl"))
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--per-doc", type=int, default=8, help="at most this many prompts per document")
    ap.add_argument("--overlap-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    info = json.loads((args.data / "corpus.json").read_text())
    tok = Tokenizer.from_file(str(args.tokenizer))
    train = np.load(args.data / "train.npy")
    docs = training_documents(train, int(info["eot_id"]), tok)
    prompts = make_prompts(docs, tok, args.n * 2, 16, 32, seed=args.seed, per_doc=args.per_doc)
    held = [json.loads(line)["ids"] for line in args.held_out.read_text().splitlines() if line.strip()]
    k = args.overlap_tokens
    held_keys = {tuple(h[:k]) for h in held}
    equal = [tuple(p["ids"][:k]) in held_keys for p in prompts]
    kept = [p for p, eq in zip(prompts, equal) if not eq][: args.n]
    dropped = sum(equal)
    assert not {tuple(p["ids"][:k]) for p in kept} & held_keys
    in_train = sum(occurs(train, h[:k]) for h in held)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "w") as f:
        for p in kept:
            f.write(json.dumps({"ids": [int(x) for x in p["ids"]], "doc": int(p["doc"])}) + "\n")
    tmp.replace(args.out)
    report = {"out": str(args.out), "prompts": len(kept), "documents": len(docs),
              "documents_used": len({p["doc"] for p in kept}), "dropped_equal_to_held_out": dropped,
              "held_out_prompts": len(held), "held_out_in_training_tokens": in_train,
              "overlap_with_held_out": 0}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
