"""The small-MoE pipeline on CPU (corpus -> tokenizer -> a few training steps -> recording) and the committed trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from traces.small_moe.corpus import held_out, html_to_text

TRACE = Path(__file__).resolve().parents[1] / "data/traces/small-moe-qwen3moe-e32k4"

WORDS = ("the a module function returns value list string object method class when which table query row "
         "column index server client option file path name user data type error default call").split()


def _prose(rng, n_par: int) -> str:
    pars = []
    for _ in range(n_par):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(14, 30)))]
        pars.append(" ".join(words).capitalize() + ".")
    return "\n\n".join(pars)


def _fake_packages(root: Path) -> None:
    """The directory layout `dpkg -x` gives for the five packages, with a few small documents each."""
    rng = np.random.default_rng(0)
    doc = root / "usr/share/doc"
    for i in range(30):
        p = doc / f"python3.11/html/_sources/library/mod{i}.rst.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"mod{i}\n=====\n\n" + _prose(rng, 6))
    for i in range(5):
        p = root / f"usr/share/perl/5.36.0/pod/perl{i}.pod"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("=head1 NAME\n\n" + _prose(rng, 5))
        h = doc / f"postgresql-doc-15/html/page{i}.html"
        h.parent.mkdir(parents=True, exist_ok=True)
        h.write_text(f"<html><div class='navheader'>Prev Next</div><p>{_prose(rng, 5)}</p></html>")
        d = doc / f"python-django-doc/html/topics/t{i}.html"
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_text(f"<html><body><div role='main'><p>{_prose(rng, 5)}</p></div></body></html>")
        g = doc / f"git-doc/git-cmd{i}.txt"
        g.parent.mkdir(parents=True, exist_ok=True)
        g.write_text(_prose(rng, 5))


def test_html_to_text_drops_navigation_and_scripts():
    raw = ("<html><head><title>T</title></head><body><div class='navheader'>Prev Up Next</div>"
           "<script>var x = 1;</script><h1>Title</h1><p>First &amp; second.</p><p>Third</p></body></html>")
    text = html_to_text(raw)
    assert "Prev" not in text and "var x" not in text
    assert "Title" in text and "First & second." in text and "Third" in text


def test_held_out_split_is_deterministic_and_small():
    paths = [f"usr/share/doc/x/{i}.html" for i in range(5000)]
    frac = np.mean([held_out(p) for p in paths])
    assert 0.005 < frac < 0.05
    assert [held_out(p) for p in paths[:50]] == [held_out(p) for p in paths[:50]]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from traces.small_moe import corpus, train

    tmp = tmp_path_factory.mktemp("smallmoe")
    root = tmp / "root"
    _fake_packages(root)
    data, tok_dir = tmp / "data", tmp / "tok" / "tokenizer"
    rc = corpus.main(["--root", str(root), "--out", str(data), "--tokenizer-dir", str(tok_dir),
                      "--vocab-size", "400", "--prompts", "4"])
    assert rc == 0
    model_dir = tmp / "model"
    rc = train.main(["--data", str(data), "--tokenizer-dir", str(tok_dir), "--out", str(model_dir), "--tiny",
                     "--device", "cpu", "--max-steps", "3", "--batch-size", "2", "--seq-len", "32",
                     "--eval-every", "2", "--eval-tokens", "128", "--warmup", "2", "--balance", "per-layer",
                     "--reserve-docs", "20"])
    assert rc == 0
    return tmp, data, tok_dir, model_dir


def test_corpus_outputs(pipeline):
    tmp, data, tok_dir, _ = pipeline
    info = json.loads((data / "corpus.json").read_text())
    assert set(info["packages"]) == {"python3.11-doc", "perl-doc", "postgresql-doc-15", "python-django-doc",
                                     "git-doc"}
    tr = np.load(data / "train.npy")
    assert tr.dtype == np.uint16 and tr.max() < info["vocab_size"] and (tr == info["eot_id"]).sum() > 10
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert tok.decode(tok("the query returns a row")["input_ids"]) == "the query returns a row"
    prompts = [json.loads(line) for line in (tok_dir.parent / "prompts.jsonl").read_text().splitlines()]
    assert prompts and all(16 <= len(p["ids"]) <= 32 for p in prompts)


def test_training_report_and_recording(pipeline, tmp_path):
    _, data, tok_dir, model_dir = pipeline
    report = json.loads((model_dir / "train_report.json").read_text())
    assert report["steps"] == 3 and report["held_out"]["unigram_perplexity"] > 1
    assert len(report["held_out"]["usage_entropy_normalized"]) == 2 and report["balance"] == "per-layer"
    assert len(report["held_out"]["unused_experts"]) == 2
    assert all(0 < e <= 1 for e in report["held_out"]["usage_entropy_normalized"])
    from traces.reader import Trace
    from traces.record import main as record_main

    dst = tmp_path / "trace"
    rc = record_main(["--model", str(model_dir), "--prompts", str(tok_dir.parent / "prompts.jsonl"),
                      "--max-prompts", "3", "--max-new-tokens", "3", "--batch-size", "2", "--hidden-states",
                      "--router-weights", "--out", str(dst), "--quiet"])
    assert rc == 0
    t = Trace(dst)
    assert t.meta.has_hidden_states and t.meta.extra["family"] == "qwen3_moe"
    assert t.routing(0, "decode").n_positions == 3


def test_training_prompts_and_time_boxed_recording(pipeline, tmp_path, capsys):
    """device_predictors.sh's steps 3: prompts from the training split only, recorded batch by batch."""
    _, data, tok_dir, model_dir = pipeline
    from traces import record
    from traces.reader import Trace
    from traces.small_moe import train_prompts

    out = tmp_path / "p.jsonl"
    assert train_prompts.main(["--data", str(data), "--tokenizer", str(tok_dir / "tokenizer.json"), "--held-out",
                               str(tok_dir.parent / "prompts.jsonl"), "--n", "5", "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    prompts = [json.loads(line) for line in out.read_text().splitlines()]
    held = [json.loads(line)["ids"] for line in (tok_dir.parent / "prompts.jsonl").read_text().splitlines()]
    assert rep["prompts"] == len(prompts) == 5 and all(16 <= len(p["ids"]) <= 32 for p in prompts)
    assert not {tuple(p["ids"][:16]) for p in prompts} & {tuple(h[:16]) for h in held}
    # every training prompt is a piece of the training tokens
    assert all(train_prompts.occurs(np.load(data / "train.npy"), p["ids"]) for p in prompts)
    # reserved documents: the model (trained with --reserve-docs 20) did not see them; prompts come only from them
    report = json.loads((model_dir / "train_report.json").read_text())["reserved_documents"]
    tr = np.load(data / "train.npy")
    eot = json.loads((data / "corpus.json").read_text())["eot_id"]
    spans = train_prompts.document_spans(tr, eot)
    mask = train_prompts.reserved_mask(len(spans), 20)
    assert report["stride"] == 5 and report["reserved_documents"] == mask.sum() > 0
    kept, _ = train_prompts.reservation(tr, eot, 20)
    assert report["train_tokens"] == len(kept) == len(tr) - report["reserved_tokens"] - mask.sum()  # and their eot
    assert not any(train_prompts.occurs(kept, tr[s:e].tolist()) for (s, e), m in zip(spans, mask) if m)
    out_r = tmp_path / "r.jsonl"
    assert train_prompts.main(["--data", str(data), "--tokenizer", str(tok_dir / "tokenizer.json"), "--held-out",
                               str(tok_dir.parent / "prompts.jsonl"), "--n", "200", "--per-doc", "2",
                               "--reserve-docs", "20", "--out", str(out_r)]) == 0
    rep_r = json.loads(capsys.readouterr().out)
    res = [json.loads(line) for line in out_r.read_text().splitlines()]
    assert len(res) == 200 and 0 < rep_r["distinct_prompts"] <= 2 * mask.sum()
    assert all(mask[p["doc"]] for p in res)
    assert all(train_prompts.occurs(np.concatenate([tr[s:e] for (s, e), m in zip(spans, mask) if m]), p["ids"])
               for p in res)
    def rec(budget, dst):
        assert record.main(["--time-budget", budget, "--model", str(model_dir), "--prompts", str(out),
                            "--max-prompt-tokens", "24", "--max-new-tokens", "2", "--batch-size", "2",
                            "--temperature", "0.8", "--hidden-states", "--router-weights", "--out", str(dst),
                            "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1]), Trace(dst)

    summary, t = rec("600", tmp_path / "tt")
    assert summary["sequences"] == 5 and summary["batches"] == 3 and len(t.sequences()) == 5
    assert t.meta.extra["recorded_prompts"] == 5 and "--time-budget 600" in t.meta.source
    assert t.meta.has_hidden_states and t.routing(4, "decode").n_positions == 2
    # a budget the first batch already uses up: whole batches only, and the meta says what was recorded
    summary, t = rec("1e-9", tmp_path / "tt1")
    assert summary["sequences"] == 2 and summary["offered"] == 5 and summary["batches"] == 1
    assert len(t.sequences()) == 2 and t.meta.extra["recorded_prompts"] == 2
    assert t.meta.extra["offered_prompts"] == 5 and "; 2 prompts," in t.meta.capture


@pytest.mark.skipif(not TRACE.exists(), reason="committed trace not present")
def test_committed_trace_loads_with_hidden_states():
    from traces.check import check_trace
    from traces.reader import Trace

    t = Trace(TRACE)
    meta = t.meta
    assert check_trace(t)["ok"]
    assert meta.has_hidden_states and meta.has_router_weights
    assert (meta.n_layers, meta.n_experts, meta.top_k, meta.hidden_size) == (8, 32, 4, 256)
    assert len(t.sequences()) >= 64
    for seq in t.sequences()[:4]:
        d = t.routing(seq, "decode")
        assert d.n_positions >= 128
        p = t.routing(seq, "prefill")
        assert (d.positions == np.arange(p.n_positions, p.n_positions + d.n_positions)).all()
    # the stored hidden states times the stored router weights reproduce the recorded choice (the model ran the
    # router in bf16, so a few near-ties differ)
    table = t.table(["layer", "experts", "hidden_row"])
    layer = table.column("layer").to_numpy()
    rows = table.column("hidden_row").to_numpy()
    experts = np.stack(table.column("experts").to_numpy(zero_copy_only=False)).astype(int)
    for la in (0, meta.n_layers - 1):
        sel = layer == la
        h = np.asarray(t.hidden_states(la))[rows[sel]].astype(np.float32)
        assert h.shape == (sel.sum(), 256) and np.isfinite(h).all()
        top = np.argsort(-(h @ np.asarray(t.router_weights(la)).T), axis=1)[:, : meta.top_k]
        assert (np.sort(top, 1) == np.sort(experts[sel], 1)).all(1).mean() > 0.98
