"""Prompts from the TRAINING split of the small-MoE corpus, made like the held-out ones, for a large training
trace of the predictors (the held-out prompts in data/small_moe/prompts.jsonl come from the validation split).

    python -m traces.small_moe.train_prompts --data build/small_moe --reserve-docs 8 --n 8192 --per-doc 64 \
        --out /tmp/train_prompts.jsonl

Documents are the training token stream (train.npy) cut at <|endoftext|> (empty pieces skipped; document i is
the i-th non-empty piece), decoded with the committed tokenizer. `--reserve-docs PCT` (PCT > 0) draws prompts
only from the RESERVED documents, those that `traces.small_moe.train --reserve-docs PCT` does not train on:
document i is reserved when i % k == k - 1 with k = round(100 / PCT) (every k-th document in corpus order, so
every package contributes; PCT 8 gives k = 12, 213 of 2,565 documents). Without it (0, the old behaviour) every
training document is used. Prompts are paragraph openings of prose chosen exactly as corpus.make_prompts chooses
the held-out ones (16-32 tokens, seeded), at most --per-doc per document; when the documents offer fewer than
--n, the prompts are repeated in order up to --n (--repeat; a sampled continuation differs each time) and the
report says how many are distinct. A prompt whose first --overlap-tokens tokens equal a held-out
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


def document_spans(train: np.ndarray, eot: int) -> list[tuple[int, int]]:
    """[start, end) token spans of the documents of a token stream cut at `eot` (empty pieces skipped)."""
    cuts = np.flatnonzero(train == eot)
    spans, start = [], 0
    for c in list(cuts) + [len(train)]:
        if c > start:
            spans.append((start, int(c)))
        start = int(c) + 1
    return spans


def reserve_stride(pct: float) -> int:
    """k of the reservation rule (document i reserved when i % k == k - 1); 0 when nothing is reserved."""
    if pct <= 0:
        return 0
    if pct > 50:
        raise ValueError(f"--reserve-docs takes a percentage in (0, 50], got {pct}")
    return max(2, int(round(100.0 / pct)))


def reserved_mask(n_docs: int, pct: float) -> np.ndarray:
    """bool [n_docs]: which documents are reserved (not trained on; the predictors' training prompts)."""
    k = reserve_stride(pct)
    idx = np.arange(n_docs)
    return (idx % k == k - 1) if k else np.zeros(n_docs, dtype=bool)


def reservation(train: np.ndarray, eot: int, pct: float) -> tuple[np.ndarray, dict]:
    """The training tokens without the reserved documents (each kept document followed by `eot`, as in the
    corpus), and a summary of the reservation for the model's report."""
    spans = document_spans(train, eot)
    mask = reserved_mask(len(spans), pct)
    k = reserve_stride(pct)
    info = {"pct": pct, "rule": f"document i (i-th non-empty piece of train.npy cut at eot) reserved when "
                                f"i % {k} == {k - 1}" if k else "none", "stride": k,
            "documents": len(spans), "reserved_documents": int(mask.sum()),
            "reserved_tokens": int(sum(e - s for (s, e), m in zip(spans, mask) if m)),
            "train_tokens_before": int(len(train))}
    if not mask.any():
        info["train_tokens"] = int(len(train))
        return train, info
    parts = []
    for (s, e), m in zip(spans, mask):
        if not m:
            parts.append(train[s:e])
            parts.append(np.array([eot], dtype=train.dtype))
    kept = np.concatenate(parts)
    info["train_tokens"] = int(len(kept))
    return kept, info


def training_documents(train: np.ndarray, eot: int, tok, reserve_pct: float = 0.0) -> tuple[list[str], np.ndarray,
                                                                                          int]:
    """The decoded documents of the training stream (with reserve_pct > 0 only the reserved ones, in order), each
    one's index among all training documents, and how many training documents there are."""
    spans = document_spans(train, eot)
    index = np.flatnonzero(reserved_mask(len(spans), reserve_pct)) if reserve_pct > 0 else np.arange(len(spans))
    return [tok.decode(train[slice(*spans[i])].tolist()) for i in index], index, len(spans)


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
    ap.add_argument("--reserve-docs", type=float, default=0.0, metavar="PCT",
                    help="draw prompts only from the documents traces.small_moe.train --reserve-docs PCT leaves out")
    ap.add_argument("--no-repeat", dest="repeat", action="store_false",
                    help="do not repeat prompts up to --n when the documents offer fewer")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    info = json.loads((args.data / "corpus.json").read_text())
    tok = Tokenizer.from_file(str(args.tokenizer))
    train = np.load(args.data / "train.npy")
    eot = int(info["eot_id"])
    # "doc" in the output: the document's index among all training documents
    docs, index, n_docs = training_documents(train, eot, tok, args.reserve_docs)
    prompts = make_prompts(docs, tok, args.n * 2, 16, 32, seed=args.seed, per_doc=args.per_doc)
    for p in prompts:
        p["doc"] = int(index[p["doc"]])
    held = [json.loads(line)["ids"] for line in args.held_out.read_text().splitlines() if line.strip()]
    k = args.overlap_tokens
    held_keys = {tuple(h[:k]) for h in held}
    equal = [tuple(p["ids"][:k]) in held_keys for p in prompts]
    kept = [p for p, eq in zip(prompts, equal) if not eq][: args.n]
    dropped = sum(equal)
    assert not {tuple(p["ids"][:k]) for p in kept} & held_keys
    distinct = len(kept)
    if args.repeat and kept and len(kept) < args.n:
        kept = [kept[i % distinct] for i in range(args.n)]
    in_train = sum(occurs(train, h[:k]) for h in held)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "w") as f:
        for p in kept:
            f.write(json.dumps({"ids": [int(x) for x in p["ids"]], "doc": int(p["doc"])}) + "\n")
    tmp.replace(args.out)
    report = {"out": str(args.out), "prompts": len(kept), "distinct_prompts": distinct,
              "reserve_docs_pct": args.reserve_docs, "training_documents": n_docs, "documents": len(docs),
              "documents_used": len({p["doc"] for p in kept}), "dropped_equal_to_held_out": dropped,
              "held_out_prompts": len(held), "held_out_in_training_tokens": in_train,
              "overlap_with_held_out": 0}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
