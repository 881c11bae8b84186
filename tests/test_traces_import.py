"""Importers: the real public files (issue 2's "Must show" figures), the embedded copies, each source quirk,
bad input (one clear line, exit 2, nothing left behind) and robustness on mangled input (hypothesis)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traces import Trace, TraceError
from traces.check import check_trace
from traces.errors import run_cli
from traces.stats import compute

IMPORT = __import__("importlib").import_module("traces.import")


def do_import(argv):
    """Run `python -m traces.import` in-process; return the exit status."""
    return run_cli(IMPORT.main, [str(a) for a in argv])


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# -- synthetic sources ----------------------------------------------------------------------------------------
def route_csv(n_layer=3, n_expert=8, k=2, prefill=3, decode=4, output_only=True, seed=0, shuffle_slots=True) -> str:
    """A small BigMoeOnEdge route.csv: prefill layer-major, decode position-major, slots optionally shuffled."""
    rng = np.random.default_rng(seed)
    lines = ["# route_trace v1", f"# model=/x/Tiny-Q4_K_M.gguf arch=tiny n_layer={n_layer} n_expert={n_expert} "
                                 f"n_expert_used={k}"]
    lines += [f"# layer={i} expert_bytes={1000 + i} dense_bytes={50 + i}" for i in range(n_layer)]
    lines.append("turn,phase,step,layer,slot,expert,weight,expert_bytes")

    def routing(phase, step, layer):
        ex = rng.permutation(n_expert)[:k]
        w = np.sort(rng.random(k))[::-1]
        w = w / w.sum()
        slots = rng.permutation(k) if shuffle_slots else np.arange(k)
        return [f"0,{phase},{step},{layer},{s},{ex[s]},{w[s]:.6f},{1000 + layer}" for s in slots]

    for layer in range(n_layer):
        for step in range(prefill):
            if output_only and layer == n_layer - 1 and step != prefill - 1:
                continue
            lines += routing(0, step, layer)
    for step in range(prefill, prefill + decode):
        for layer in range(n_layer):
            lines += routing(1, step, layer)
    return "\n".join(lines) + "\n"


def jsonl(n_problems=2, n_layers=2, n_tokens=3, k=2, n_experts=6, drop=(), seed=0) -> str:
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_problems):
        for lay in range(n_layers):
            for t in range(n_tokens):
                if (p, lay, t) in drop:
                    continue
                ex = rng.permutation(n_experts)[:k].tolist()
                w = np.sort(rng.random(k))[::-1]
                out.append(json.dumps({"dataset": "humaneval", "problem_id": p, "layer": lay, "experts": ex,
                                       "gating_probs": (w / w.sum()).round(4).tolist(), "token_idx": t}))
    return "\n".join(out) + "\n"


# -- the real public files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, layers, prefill, decode", [
    ("qwen3-30b-a3b", 48, 28, 128),
    ("gemma-4-26b-a4b", 30, 29, 128),
])
def test_bigmoeonedge_public(public_traces, tmp_path, capsys, name, layers, prefill, decode):
    src = public_traces / "bigmoeonedge" / f"{name}.route.csv"
    assert do_import(["bigmoeonedge", src, tmp_path / name]) == 0
    t = Trace(tmp_path / name)
    s = compute(t)
    assert (s["n_layers"], s["n_experts"], s["top_k"]) == (layers, 128, 6)
    assert s["tokens"] == {"prefill": prefill, "decode": decode}
    assert len(t.meta.expert_bytes) == layers and len(t.meta.dense_bytes) == layers
    assert t.meta.expert_bytes[0] == (3059712 if name.startswith("qwen") else 4336640)
    r = t.routing(0, "decode")
    assert r.positions[0] == prefill and len(r.positions) == decode  # position = absolute step
    np.testing.assert_allclose(np.nansum(r.weights, axis=2), 1, atol=1e-5)  # renormalized top-k
    assert (np.diff(r.weights, axis=2) <= 1e-7).all()  # slot order = router rank
    pre = t.routing(0, "prefill")
    irr = t.meta.irregularities
    if name.startswith("qwen"):  # the last MoE layer only has the output position in prefill
        assert pre.present()[:, -1].tolist() == [False] * (prefill - 1) + [True]
        assert [i.kind for i in irr] == ["prefill_layer_output_position_only"]
        assert "layer 47" in irr[0].detail
        assert "prefill_layer_output_position_only" in capsys.readouterr().err
    else:  # the Gemma file has every prefill position in every layer
        assert pre.present().all() and irr == []
    # the embedded copy is exactly what the importer produces
    emb = Trace(Path(__file__).resolve().parents[1] / "data" / "traces" / name)
    assert emb.table().equals(t.table())


def test_flame_public(public_traces, tmp_path):
    for folder, name in [("encoder_32x64", "enc"), ("decoder_64seq_pos0-9", "dec")]:
        assert do_import(["flame", public_traces / "flame-moe-290m" / folder, tmp_path / name]) == 0
    enc, dec = Trace(tmp_path / "enc"), Trace(tmp_path / "dec")
    for t in (enc, dec):
        m = t.meta
        assert (m.n_layers, m.n_experts, m.top_k) == (8, 64, 6)
        assert m.layer_ids == list(range(2, 10))
        assert m.expert_bytes == [3 * 1024 * 704 * 2] * 8 and m.hidden_size == 1024 and m.dtype == "bfloat16"
        assert "not renormalized" in m.extra["weights"]
        check_trace(t)
    tok = enc.table(["token_id"]).column("token_id").to_numpy()
    assert len(tok) == 2048 * 8 and (tok >= 0).all()
    assert compute(enc)["tokens"] == {"teacher_forced": 2048}
    assert compute(dec)["tokens"] == {"teacher_forced": 640}
    r = enc.routing(0, "teacher_forced")
    assert r.token_ids[:5].tolist() == [1512, 3206, 342, 824, 247]
    sums = np.nansum(r.weights, axis=2)
    assert sums.max() < 0.95 and sums.min() > 0.05  # softmax over 64 experts, not renormalized
    # decoder sequence 1 is encoder row 8 (same tokens, same routing), positions 0..9
    d1 = dec.routing(1, "teacher_forced")
    e8 = enc.routing(8, "teacher_forced")
    assert d1.positions.tolist() == list(range(10))
    np.testing.assert_array_equal(d1.experts, e8.experts[:10])
    np.testing.assert_array_equal(d1.token_ids, e8.token_ids[:10])
    root = Path(__file__).resolve().parents[1] / "data" / "traces"
    assert Trace(root / "flame-moe-290m-encoder").table().equals(enc.table())
    assert Trace(root / "flame-moe-290m-decoder").table().equals(dec.table())


def test_flame_reads_without_torch(public_traces, tmp_path):
    """The importer must not need torch: run it with `import torch` made to fail."""
    code = ("import sys; sys.modules['torch'] = None; import runpy; "
            "sys.argv = ['traces.import', 'flame', sys.argv[1], sys.argv[2]]; "
            "runpy.run_module('traces.import', run_name='__main__')")
    src = public_traces / "flame-moe-290m" / "decoder_64seq_pos0-9"
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "t")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert Trace(tmp_path / "t").n_rows == 64 * 10 * 8


def test_embedded_must_show(embedded_traces):
    want = {
        "qwen3-30b-a3b": (48, 128, 6, {"prefill": 28, "decode": 128}),
        "gemma-4-26b-a4b": (30, 128, 6, {"prefill": 29, "decode": 128}),
        "flame-moe-290m-encoder": (8, 64, 6, {"teacher_forced": 2048}),
        "flame-moe-290m-decoder": (8, 64, 6, {"teacher_forced": 640}),
    }
    for name, (L, E, k, tokens) in want.items():
        s = compute(Trace(embedded_traces / name))
        assert (s["n_layers"], s["n_experts"], s["top_k"], s["tokens"]) == (L, E, k, tokens), name
    enc = Trace(embedded_traces / "flame-moe-290m-encoder")
    assert enc.table(["token_id"]).column("token_id").null_count == 0
    assert len(np.unique(enc.table(["sequence", "position"]).to_pandas().to_records(index=False))) == 2048


# -- bigmoeonedge: mapping and quirks on synthetic files ------------------------------------------------------
def test_bigmoeonedge_mapping(tmp_path, capsys):
    text = route_csv()
    src = tmp_path / "tiny.route.csv"
    src.write_text(text)
    assert do_import(["bigmoeonedge", src, tmp_path / "t"]) == 0
    t = Trace(tmp_path / "t")
    m = t.meta
    assert (m.n_layers, m.n_experts, m.top_k) == (3, 8, 2)
    assert m.expert_bytes == [1000, 1001, 1002] and m.dense_bytes == [50, 51, 52]
    assert m.model == "Tiny-Q4_K_M" and m.dtype == "GGUF Q4_K_M" and m.license == "Apache-2.0"
    # every CSV row is in the trace, experts ordered by slot, weights as given
    import pandas as pd

    df = pd.read_csv(src, comment="#").sort_values(["phase", "step", "layer", "slot"])
    table = t.table().to_pandas()
    got = {(("prefill", "decode").index(r.phase), r.position, r.layer): (list(r.experts), list(r.weights))
           for r in table.itertuples()}
    for (ph, step, lay), g in df.groupby(["phase", "step", "layer"]):
        ex, w = got[(ph, step, lay)]
        assert ex == g.expert.tolist()
        np.testing.assert_allclose(w, g.weight.to_numpy(), rtol=1e-6)
    assert len(got) == len(df) // 2
    assert [i.kind for i in m.irregularities] == ["prefill_layer_output_position_only"]
    assert "warning:" in capsys.readouterr().err
    # the overrides
    assert do_import(["bigmoeonedge", src, tmp_path / "t2", "--model", "X", "--capture-note", "k overridden"]) == 0
    m2 = Trace(tmp_path / "t2").meta
    assert m2.model == "X" and m2.capture.endswith("k overridden")


def test_bigmoeonedge_dropped_decode_rows_are_reported(tmp_path, capsys):
    lines = route_csv(shuffle_slots=False).splitlines()
    # drop the last decode position's layer 2 (both slots): an irregularity, not an error
    lines = lines[:-2]
    src = tmp_path / "r.csv"
    src.write_text("\n".join(lines) + "\n")
    assert do_import(["bigmoeonedge", src, tmp_path / "t"]) == 0
    kinds = [i.kind for i in Trace(tmp_path / "t").meta.irregularities]
    assert "incomplete_positions" in kinds
    assert "incomplete_positions" in capsys.readouterr().err


def _csv_error(tmp_path, capsys, text, *argv_extra):
    src = tmp_path / "r.csv"
    src.write_bytes(text.encode() if isinstance(text, str) else text)
    dst = tmp_path / "out"
    rc = do_import(["bigmoeonedge", src, dst, *argv_extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and str(src) in err[0]
    assert not dst.exists() and leftovers(tmp_path, "out") == []
    return err[0]


def test_bigmoeonedge_bad_input(tmp_path, capsys):
    good = route_csv(shuffle_slots=False)
    lines = good.splitlines()
    n_pre = 2 + 3
    assert "empty file" in _csv_error(tmp_path, capsys, "")
    assert "line 1" in _csv_error(tmp_path, capsys, "turn,phase\n1,2\n")
    # truncated in the middle of the last line: the missing field is named with its line
    cut = good[: good.rstrip().rfind(",") - 1]
    msg = _csv_error(tmp_path, capsys, cut)
    assert f"line {len(lines)}" in msg and "truncated" in msg
    # truncated at a line boundary inside a routing: the group lacks a slot
    msg = _csv_error(tmp_path, capsys, "\n".join(lines[:-1]) + "\n")
    assert "has 1 rows, expected one per slot" in msg and f"line {len(lines) - 1}:" in msg
    # wrong header
    bad = lines.copy()
    bad[n_pre] = "turn,phase,step,layer,rank,expert,weight,expert_bytes"
    msg = _csv_error(tmp_path, capsys, "\n".join(bad))
    assert f"line {n_pre + 1}" in msg and "wrong header" in msg and "slot" in msg
    # ids out of range, phase, weights, garbage
    for field, value, pattern in [(5, "8", "field 'expert' 8 outside 0..7"), (3, "3", "field 'layer' 3 outside"),
                                  (1, "2", "field 'phase' must be 0"), (6, "-0.5", "field 'weight'"),
                                  (6, "abc", "field 'weight' not a valid number"), (4, "x", "field 'slot'")]:
        bad = lines.copy()
        row = bad[n_pre + 3].split(",")
        row[field] = value
        bad[n_pre + 3] = ",".join(row)
        msg = _csv_error(tmp_path, capsys, "\n".join(bad) + "\n")
        assert f"line {n_pre + 4}" in msg and pattern in msg, msg
    # preamble problems
    assert "line 1" in _csv_error(tmp_path, capsys, "\n".join(["# something else"] + lines[1:]))
    assert "n_expert" in _csv_error(tmp_path, capsys, "\n".join([lines[0], "# model=x n_layer=3"] + lines[2:]))
    assert "missing layer(s) [2]" in _csv_error(tmp_path, capsys, "\n".join(lines[:4] + lines[5:]))
    assert "not UTF-8" in _csv_error(tmp_path, capsys, b"\xff\xfe\x00garbage")
    # duplicated row -> a group with 3 rows
    assert "has 3 rows" in _csv_error(tmp_path, capsys, "\n".join(lines + [lines[-1]]) + "\n")
    # too many fields
    bad = lines.copy()
    bad[n_pre + 2] += ",9"
    assert f"line {n_pre + 3}" in _csv_error(tmp_path, capsys, "\n".join(bad))


def test_cli_paths(tmp_path, capsys):
    rc = do_import(["bigmoeonedge", tmp_path / "nope.csv", tmp_path / "out"])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.csv" in err and "no such file" in err
    rc = do_import(["bigmoeonedge", tmp_path, tmp_path / "out"])
    assert rc == 2 and "got a directory" in capsys.readouterr().err
    src = tmp_path / "r.csv"
    src.write_text(route_csv())
    (tmp_path / "out").mkdir()
    rc = do_import(["bigmoeonedge", src, tmp_path / "out"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert do_import(["bigmoeonedge", src, tmp_path / "out", "--overwrite"]) == 0
    assert Trace(tmp_path / "out").n_rows > 0
    assert do_import(["parquet", src, tmp_path / "x"]) == 2
    assert "unknown format 'parquet'" in capsys.readouterr().err


# -- vllm-jsonl -----------------------------------------------------------------------------------------------
def test_vllm_jsonl_mapping_and_dropped_records(tmp_path, capsys):
    src = tmp_path / "cap.jsonl"
    src.write_text(jsonl(drop={(1, 1, 2)}))
    dst = tmp_path / "t"
    assert do_import(["vllm-jsonl", src, dst]) == 2
    assert "--expert-bytes" in capsys.readouterr().err and not dst.exists()
    assert do_import(["vllm-jsonl", src, dst, "--expert-bytes", "4096", "--n-experts", "8"]) == 0
    err = capsys.readouterr().err
    assert "stream_length_mismatch" in err
    t = Trace(dst)
    m = t.meta
    assert (m.n_layers, m.n_experts, m.top_k, m.expert_bytes) == (2, 8, 2, [4096, 4096])
    kinds = {i.kind: i for i in m.irregularities}
    assert "sequence 1 has 2..3 records per layer (shortest layer 1)" in kinds["stream_length_mismatch"].detail
    assert kinds["dropped_records"].count == 1
    assert t.keys() == [(0, "decode"), (1, "decode")]
    r = t.routing(1, "decode")
    assert r.present().tolist() == [[True, True], [True, True], [True, False]]
    first = json.loads(src.read_text().splitlines()[0])
    assert t.routing(0, "decode").experts[0, 0].tolist() == first["experts"]
    # n_experts inferred when not given, and said so
    assert do_import(["vllm-jsonl", src, tmp_path / "u", "--expert-bytes", "1"]) == 0
    assert "inferred" in Trace(tmp_path / "u").meta.extra["n_experts"]


def test_vllm_jsonl_model_layer_ids(tmp_path):
    src = tmp_path / "cap.jsonl"
    src.write_text(jsonl().replace('"layer": 1', '"layer": 4').replace('"layer": 0', '"layer": 3'))
    assert do_import(["vllm-jsonl", src, tmp_path / "t", "--expert-bytes", "10"]) == 0
    t = Trace(tmp_path / "t")
    assert (t.meta.n_layers, t.meta.layer_ids) == (2, [3, 4])
    assert sorted(set(t.table(["layer"]).column("layer").to_pylist())) == [0, 1]


def test_vllm_jsonl_several_datasets(tmp_path):
    a = jsonl(n_problems=1).splitlines()
    b = [ln.replace("humaneval", "mbpp") for ln in a]
    src = tmp_path / "cap.jsonl"
    src.write_text("\n".join(a + b) + "\n")
    assert do_import(["vllm-jsonl", src, tmp_path / "t", "--expert-bytes", "10"]) == 0
    m = Trace(tmp_path / "t").meta
    assert m.extra["sequences"] == [{"sequence": 0, "dataset": "humaneval", "problem_id": 0},
                                    {"sequence": 1, "dataset": "mbpp", "problem_id": 0}]


@pytest.mark.parametrize("line, pattern", [
    ('{"problem_id": 0, "layer": 0, "experts": [1, 2], "gating_probs": [0.5, 0.5]}', "missing field 'token_idx'"),
    ('{"problem_id": 0, "layer": 0, "experts": [1, 2, 3], "gating_probs": [0.5, 0.5, 0], "token_idx": 9}',
     "has 3 ids, earlier records have 2"),
    ('{"problem_id": 0, "layer": 0, "experts": [1, 1], "gating_probs": [0.5, 0.5], "token_idx": 9}', "repeated"),
    ('{"problem_id": 0, "layer": -1, "experts": [1, 2], "gating_probs": [0.5, 0.5], "token_idx": 9}', "'layer'"),
    ('{"problem_id": 0, "layer": 0, "experts": [1, 2], "gating_probs": [0.5, NaN], "token_idx": 9}', "gating_probs"),
    ('[1, 2]', "expected a JSON object"),
    ('{"problem_id": 0, "layer": 0, "experts": [1, 2], "gating', "invalid JSON"),
])
def test_vllm_jsonl_bad_lines(tmp_path, capsys, line, pattern):
    lines = jsonl().splitlines()
    lines.insert(3, line)
    src = tmp_path / "cap.jsonl"
    src.write_text("\n".join(lines) + "\n")
    rc = do_import(["vllm-jsonl", src, tmp_path / "t", "--expert-bytes", "10"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{src}: line 4" in err[0] and pattern in err[0], err
    assert not (tmp_path / "t").exists() and leftovers(tmp_path, "t") == []


def test_vllm_jsonl_other_errors(tmp_path, capsys):
    src = tmp_path / "cap.jsonl"
    src.write_text("")
    assert do_import(["vllm-jsonl", src, tmp_path / "t", "--expert-bytes", "10"]) == 2
    assert "empty file" in capsys.readouterr().err
    src.write_text(jsonl())
    assert do_import(["vllm-jsonl", src, tmp_path / "t", "--expert-bytes", "10", "--n-experts", "3"]) == 2
    assert "outside 0..2" in capsys.readouterr().err
    src.write_text(jsonl() + jsonl().splitlines()[0] + "\n")
    assert do_import(["vllm-jsonl", src, tmp_path / "t", "--expert-bytes", "10"]) == 2
    assert "duplicate record" in capsys.readouterr().err
    src.write_text("\n".join(ln for ln in jsonl(n_layers=3).splitlines() if '"layer": 1' not in ln))
    assert do_import(["vllm-jsonl", src, tmp_path / "t", "--expert-bytes", "10"]) == 2
    assert "no records at all for layer(s) [1]" in capsys.readouterr().err
    assert do_import(["vllm-jsonl", src, tmp_path / "t", "--expert-bytes", "10", "--n-layers", "2"]) == 2
    assert "layer 2 outside 0..1" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


# -- flame on small files written by torch --------------------------------------------------------------------
def _save_pt(path: Path, obj: dict) -> None:
    torch = pytest.importorskip("torch")
    path.parent.mkdir(parents=True, exist_ok=True)
    conv = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in obj.items()}
    torch.save(conv, path)


def _flame_stream(folder: Path, layers=(2, 3), n_seq=2, seq_len=3, k=2, E=8, seed=0, bad_id=None):
    rng = np.random.default_rng(seed)
    n = n_seq * seq_len
    samples = rng.integers(0, 1000, n)
    for lay in layers:
        idx = np.stack([rng.permutation(E)[:k] for _ in range(n)]).astype(np.int64)
        sc = np.sort(rng.random((n, k)).astype(np.float32) / 4, axis=1)[:, ::-1].copy()
        if bad_id is not None:
            idx[4, 1] = bad_id
        _save_pt(folder / f"flame-moe-290m_layer{lay}.pt",
                 {"model": "flame-moe-290m", "layer": lay, "num_sequences": n_seq, "sequence_length": seq_len,
                  "num_tokens": n, "samples": samples, "indices": idx, "scores": sc})
    return samples


def test_flame_stream_layout(tmp_path):
    samples = _flame_stream(tmp_path / "enc")
    assert do_import(["flame", tmp_path / "enc", tmp_path / "t"]) == 0
    t = Trace(tmp_path / "t")
    m = t.meta
    assert (m.n_layers, m.n_experts, m.top_k, m.layer_ids) == (2, 64, 2, [2, 3])
    assert [i.kind for i in m.irregularities] == ["layer_ids"]  # the 290M config has MoE layers 2..9
    r = t.routing(1, "teacher_forced")
    assert r.token_ids.tolist() == samples[3:].tolist() and r.positions.tolist() == [0, 1, 2]


def test_flame_per_position_layout_and_errors(tmp_path, capsys):
    rng = np.random.default_rng(1)
    n, k = 4, 2
    for pos, folder in enumerate(["1st", "2nd"]):
        samples = rng.integers(0, 100, n)
        for lay in (2, 3):
            idx = np.stack([rng.permutation(64)[:k] for _ in range(n)]).astype(np.int64)
            _save_pt(tmp_path / "dec" / folder / f"l{lay}.pt",
                     {"model": "flame-moe-290m", "layer": lay, "token_position": pos, "samples": samples,
                      "indices": idx, "scores": rng.random((n, k)).astype(np.float32)})
    assert do_import(["flame", tmp_path / "dec", tmp_path / "t"]) == 0
    t = Trace(tmp_path / "t")
    assert t.n_rows == n * 2 * 2 and t.meta.extra["layout"] == "per_position"
    assert t.routing(3, "teacher_forced").positions.tolist() == [0, 1]
    # a folder that mixes layouts, an unsafe pickle, a corrupt file: clear errors, nothing written
    _flame_stream(tmp_path / "dec" / "enc")
    assert do_import(["flame", tmp_path / "dec", tmp_path / "x"]) == 2
    assert "import each folder separately" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "dec" / "enc")
    bad = tmp_path / "dec" / "2nd" / "l3.pt"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    assert do_import(["flame", tmp_path / "dec", tmp_path / "x"]) == 2
    err = capsys.readouterr().err
    assert "l3.pt" in err and "zip" in err
    import pickle
    import zipfile

    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"layer": print}))
    assert do_import(["flame", tmp_path / "dec", tmp_path / "x"]) == 2
    assert "refusing to load global builtins.print" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and leftovers(tmp_path, "x") == []
    (tmp_path / "empty").mkdir()
    assert do_import(["flame", tmp_path / "empty", tmp_path / "x"]) == 2
    assert "no .pt files" in capsys.readouterr().err


def test_flame_bad_fields(tmp_path, capsys):
    _flame_stream(tmp_path / "a", bad_id=64)  # an id above the 64 experts of FLAME-MoE-290M
    assert do_import(["flame", tmp_path / "a", tmp_path / "x"]) == 2
    err = capsys.readouterr().err
    assert "layer2.pt: field 'indices' row 4: expert id outside 0..63" in err
    _flame_stream(tmp_path / "b")
    _save_pt(tmp_path / "b" / "extra.pt", {"model": "flame-moe-290m", "layer": 3, "samples": np.zeros(6, np.int64),
                                           "indices": np.tile(np.arange(2), (6, 1)),
                                           "scores": np.zeros((6, 2), np.float32)})
    assert do_import(["flame", tmp_path / "b", tmp_path / "x"]) == 2
    assert "extra.pt: missing field 'num_sequences'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -- robustness: mangled inputs give a valid trace or a TraceError, never anything else ------------------------
MANGLE = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("byte"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("drop_line"), st.floats(0, 1)),
    st.tuples(st.just("dup_line"), st.floats(0, 1)),
    st.tuples(st.just("swap_chars"), st.floats(0, 1), st.sampled_from([",", "-", "9", ".", "\n", "#", "{", '"']))
)


def mangle(data: bytes, ops) -> bytes:
    for op in ops:
        if op[0] == "truncate":
            data = data[: int(len(data) * op[1])]
        elif op[0] == "byte" and data:
            i = min(int(len(data) * op[1]), len(data) - 1)
            data = data[:i] + bytes([op[2]]) + data[i + 1:]
        elif op[0] in ("drop_line", "dup_line"):
            lines = data.split(b"\n")
            i = min(int(len(lines) * op[1]), len(lines) - 1)
            lines = lines[:i] + lines[i + 1:] if op[0] == "drop_line" else lines[:i + 1] + lines[i:]
            data = b"\n".join(lines)
        elif op[0] == "swap_chars" and data:
            i = min(int(len(data) * op[1]), len(data) - 1)
            data = data[:i] + op[2].encode() + data[i + 1:]
    return data


def _robust(tmp_path, fmt, data, extra=()):
    import argparse

    from traces.importers import get_importer

    src = tmp_path / "src"
    src.write_bytes(data)
    dst = tmp_path / "out"
    shutil.rmtree(dst, ignore_errors=True)
    mod = get_importer(fmt)
    ap = argparse.ArgumentParser()
    ap.add_argument("--overwrite", action="store_true")
    mod.add_arguments(ap)
    args = ap.parse_args(list(extra))
    try:
        mod.run(src, dst, args)
    except TraceError:
        assert not dst.exists()
    else:
        check_trace(Trace(dst))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@SETTINGS
@given(ops=st.lists(MANGLE, min_size=1, max_size=3))
def test_bigmoeonedge_mangled(tmp_path, ops):
    _robust(tmp_path, "bigmoeonedge", mangle(route_csv(n_layer=2, prefill=2, decode=2).encode(), ops))


@SETTINGS
@given(ops=st.lists(MANGLE, min_size=1, max_size=3))
def test_vllm_jsonl_mangled(tmp_path, ops):
    _robust(tmp_path, "vllm-jsonl", mangle(jsonl(n_tokens=2).encode(), ops), ["--expert-bytes", "100"])


@pytest.fixture(scope="module")
def flame_bytes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flame")
    _flame_stream(folder, layers=(2,))
    return next(folder.glob("*.pt")).read_bytes()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255), st.booleans()), min_size=1, max_size=4))
def test_flame_mangled(tmp_path, flame_bytes, cuts):
    import argparse

    from traces.importers import get_importer

    data = flame_bytes
    for where, value, truncate in cuts:
        i = min(int(len(data) * where), len(data) - 1)
        data = data[:i] if truncate else data[:i] + bytes([value]) + data[i + 1:]
    src = tmp_path / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    (src / "layer2.pt").write_bytes(data)
    dst = tmp_path / "out"
    shutil.rmtree(dst, ignore_errors=True)
    mod = get_importer("flame")
    ap = argparse.ArgumentParser()
    ap.add_argument("--overwrite", action="store_true")
    mod.add_arguments(ap)
    try:
        mod.run(src, dst, ap.parse_args([]))
    except TraceError:
        assert not dst.exists()
    else:
        check_trace(Trace(dst))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []
