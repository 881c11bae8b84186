"""Build the training corpus from Debian documentation packages, train the BPE tokenizer, tokenize.

    python -m traces.small_moe.corpus --download --work /tmp/smallmoe-debs --out build/small_moe

The packages (all Debian 12 "bookworm", section doc, DFSG-free; `apt-get download` then `dpkg -x`):

| package | text taken | license (debian/copyright) |
|---|---|---|
| python3.11-doc | reStructuredText sources of the Python 3.11 documentation (`_sources/**/*.rst.txt`) | PSF License 2 |
| perl-doc | the Perl manual pages (`*.pod`) | GPL-1+ or Artistic |
| postgresql-doc-15 | the PostgreSQL 15 manual (HTML, converted to text) | PostgreSQL License |
| python-django-doc | the Django 3.2 documentation (HTML, converted to text) | BSD-3-Clause |
| git-doc | the Git manual (AsciiDoc `*.txt`) | GPL-2 |

Each file is one document. Documents are split into train and held-out by a hash of their path (2% held out),
so no held-out text is seen in training. Outputs in --out: train.npy / val.npy (uint16 token ids, documents
separated by <|endoftext|>), tokenizer.json, prompts.jsonl (held-out prompts), corpus.json (sizes, sources).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

PACKAGES = ["python3.11-doc", "perl-doc", "postgresql-doc-15", "python-django-doc", "git-doc"]
LICENSES = {
    "python3.11-doc": "PSF-2.0",
    "perl-doc": "GPL-1.0-or-later OR Artistic-1.0-Perl",
    "postgresql-doc-15": "PostgreSQL",
    "python-django-doc": "BSD-3-Clause",
    "git-doc": "GPL-2.0-only",
}
EOT = "<|endoftext|>"
PAD = "<|pad|>"
HELD_OUT_PERCENT = 2


class _Text(HTMLParser):
    """HTML to plain text: drops scripts, styles and navigation blocks; block tags become line breaks."""

    SKIP_TAGS = {"script", "style", "head", "nav", "footer", "header"}
    SKIP_CLASSES = re.compile(r"navheader|navfooter|sphinxsidebar|related|footer|headerlink|nav|breadcrumbs|toc")
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.stack: list[tuple[str, bool]] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "img", "hr", "meta", "link", "input"):
            if tag == "br" and not self.skip:
                self.out.append("\n")
            return
        cls = dict(attrs).get("class") or ""
        skipping = tag in self.SKIP_TAGS or bool(self.SKIP_CLASSES.search(cls))
        self.stack.append((tag, skipping))
        if skipping:
            self.skip += 1
        if tag in self.BLOCK and not self.skip:
            self.out.append("\n")

    def handle_endtag(self, tag):
        while self.stack:
            t, skipping = self.stack.pop()
            if skipping:
                self.skip -= 1
            if t == tag:
                break
        if tag in self.BLOCK and not self.skip:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def html_to_text(raw: str) -> str:
    p = _Text()
    p.feed(raw)
    return html.unescape("".join(p.out))


def clean(text: str) -> str:
    lines = [ln.rstrip() for ln in text.replace("\r", "").split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def documents(root: Path):
    """(package, relative path, text) for every document in the extracted packages under root."""
    doc = root / "usr/share/doc"
    for p in sorted((doc / "python3.11/html/_sources").rglob("*.rst.txt")):
        yield "python3.11-doc", str(p.relative_to(root)), p.read_text(errors="replace")
    for p in sorted((root / "usr/share/perl").rglob("*.pod")):
        yield "perl-doc", str(p.relative_to(root)), p.read_text(errors="replace")
    for p in sorted((doc / "postgresql-doc-15/html").rglob("*.html")):
        yield "postgresql-doc-15", str(p.relative_to(root)), html_to_text(p.read_text(errors="replace"))
    for p in sorted((doc / "python-django-doc/html").rglob("*.html")):
        rel = p.relative_to(doc / "python-django-doc/html")
        if rel.parts[0] in ("_modules", "_static", "_images") or rel.name in ("genindex.html", "search.html",
                                                                           "py-modindex.html"):
            continue
        yield "python-django-doc", str(p.relative_to(root)), html_to_text(p.read_text(errors="replace"))
    for p in sorted((doc / "git-doc").glob("*.txt")):
        yield "git-doc", str(p.relative_to(root)), p.read_text(errors="replace")


def held_out(path: str) -> bool:
    return int(hashlib.sha1(path.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def download(work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=work, check=True)
    root = work / "root"
    for deb in sorted(work.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def train_tokenizer(texts, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, PAD], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out))
    return tok


def save_hf_tokenizer(tokenizer_json: Path, dst: Path) -> None:
    """Save as a transformers tokenizer directory (AutoTokenizer.from_pretrained(dst) works)."""
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=EOT, pad_token=PAD, bos_token=EOT)
    t.save_pretrained(str(dst))


def make_prompts(val_docs: list[str], tok, n: int, min_tokens: int, max_tokens: int, seed: int,
                 per_doc: int = 3) -> list[dict]:
    """Held-out prompts: the start of a paragraph of real prose (>= 8 words, few symbols), cut to a token budget."""
    rng = np.random.default_rng(seed)
    candidates = []
    for d, text in enumerate(val_docs):
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            words = para.split()
            if len(words) < 12 or sum(c.isalpha() or c == " " for c in para) / len(para) < 0.9:
                continue
            candidates.append((d, para))
    rng.shuffle(candidates)
    prompts, used_docs = [], {}
    for d, para in candidates:
        if used_docs.get(d, 0) >= per_doc:
            continue
        ids = tok.encode(para).ids
        if len(ids) < min_tokens:
            continue
        k = int(rng.integers(min_tokens, max_tokens + 1))
        ids = ids[:k]
        prompts.append({"text": tok.decode(ids), "ids": ids, "doc": d})
        used_docs[d] = used_docs.get(d, 0) + 1
        if len(prompts) == n:
            break
    return prompts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m traces.small_moe.corpus", description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="directory the packages were extracted into (dpkg -x)")
    ap.add_argument("--download", action="store_true", help="apt-get download and dpkg -x the packages into --work")
    ap.add_argument("--work", type=Path, default=Path("/tmp/smallmoe-debs"))
    ap.add_argument("--out", type=Path, default=Path("build/small_moe"))
    ap.add_argument("--tokenizer-dir", type=Path, default=Path("data/small_moe/tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--prompts", type=int, default=96)
    args = ap.parse_args(argv)
    root = download(args.work) if args.download else args.root
    if root is None or not root.exists():
        print(f"error: {root}: no extracted packages (pass --root or --download)", file=sys.stderr)
        return 2
    train_docs, val_docs, per_pkg = [], [], {}
    for pkg, rel, text in documents(root):
        text = clean(text)
        if len(text) < 200:
            continue
        (val_docs if held_out(rel) else train_docs).append(text)
        st = per_pkg.setdefault(pkg, {"documents": 0, "bytes": 0, "license": LICENSES[pkg]})
        st["documents"] += 1
        st["bytes"] += len(text.encode())
    args.out.mkdir(parents=True, exist_ok=True)
    args.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    tok_json = args.tokenizer_dir / "tokenizer.json"
    tok = train_tokenizer(train_docs, args.vocab_size, tok_json)
    save_hf_tokenizer(tok_json, args.tokenizer_dir)
    eot = tok.token_to_id(EOT)
    sizes = {}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        encs = tok.encode_batch(docs)
        parts = []
        for e in encs:
            parts.append(np.asarray(e.ids, dtype=np.uint16))
            parts.append(np.asarray([eot], dtype=np.uint16))
        arr = np.concatenate(parts)
        np.save(args.out / f"{name}.npy", arr)
        sizes[name] = {"documents": len(docs), "tokens": int(len(arr)), "bytes": sum(len(d.encode()) for d in docs)}
    prompts = make_prompts(val_docs, tok, args.prompts, 16, 32, seed=0)
    with open(args.tokenizer_dir.parent / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"ids": p["ids"], "text": p["text"]}) + "\n")
    info = {"packages": per_pkg, "splits": sizes, "vocab_size": tok.get_vocab_size(), "eot_id": eot,
            "pad_id": tok.token_to_id(PAD), "held_out_percent": HELD_OUT_PERCENT, "prompts": len(prompts)}
    (args.out / "corpus.json").write_text(json.dumps(info, indent=2))
    (args.tokenizer_dir.parent / "corpus.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
