"""traces.check: each invariant, and the first offending row named in the message."""

import numpy as np
import pytest

from traces import Trace, TraceError, TraceMeta, write_trace
from traces.check import check_trace, main
from traces.errors import run_cli


def make(tmp_path, *, experts=None, weights=None, layer=None, sequence=None, position=None, n_layers=2, name="t"):
    """8 rows: sequences 0 and 1, positions 0..1, layers 0..1 (2 experts of 4 each)."""
    seq = np.array(sequence if sequence is not None else [0, 0, 0, 0, 1, 1, 1, 1])
    pos = np.array(position if position is not None else [0, 0, 1, 1, 0, 0, 1, 1])
    lay = np.array(layer if layer is not None else [0, 1, 0, 1, 0, 1, 0, 1])
    ex = np.array(experts if experts is not None else [[0, 1], [1, 2], [2, 3], [3, 0]] * 2)
    w = np.array(weights if weights is not None else [[0.6, 0.4]] * len(seq), dtype=np.float32)
    meta = TraceMeta(model="m", source="s", n_layers=n_layers, n_experts=4, top_k=2, expert_bytes=[1] * n_layers,
                     license="l", attribution="a")
    write_trace(tmp_path / name, meta, sequence=seq, phase=["decode"] * len(seq), position=pos, layer=lay,
                experts=ex, weights=w)
    return Trace(tmp_path / name)


def with_row(base, row, value):
    out = [list(r) for r in base]
    out[row] = value
    return out


BASE_E = [[0, 1], [1, 2], [2, 3], [3, 0]] * 2


def test_valid(tmp_path):
    assert check_trace(make(tmp_path)) == {"ok": True, "rows": 8, "sequences": 2}


@pytest.mark.parametrize("kwargs, message", [
    ({"experts": with_row(BASE_E, 5, [1, 4])}, r"row 5 \(sequence 1, position 0, layer 1\): expert id outside 0..3"),
    ({"experts": with_row(BASE_E, 3, [-1, 2])}, r"row 3 .*expert id outside"),
    ({"experts": with_row(BASE_E, 6, [2, 2])}, r"row 6 .*expert ids not distinct: \[2, 2\]"),
    ({"weights": with_row([[0.5, 0.5]] * 8, 2, [0.5, -0.1])}, r"row 2 .*finite and non-negative"),
    ({"weights": with_row([[0.5, 0.5]] * 8, 7, [np.nan, 0.1])}, r"row 7 .*finite and non-negative"),
    ({"layer": [0, 1, 0, 2, 0, 1, 0, 1]}, r"row 3 .*layer 2 outside 0..1"),
    ({"n_layers": 3}, r"layer 2 has no rows"),
    ({"sequence": [0, 0, 1, 1, 0, 0, 1, 1]}, r"row 4 \(sequence 0.*rows of sequence 0 are not contiguous"),
    ({"position": [0, 0, 0, 0, 0, 0, 1, 1]}, r"row 2 \(sequence 0, position 0, layer 0\).*duplicate"),
    ({"position": [0, 0, -1, 1, 0, 0, 1, 1]}, r"row 2 .*negative position"),
])
def test_first_offending_row(tmp_path, kwargs, message):
    t = make(tmp_path, **kwargs)
    with pytest.raises(TraceError, match=message) as info:
        check_trace(t)
    assert "routing.parquet" in str(info.value)


def test_cli_exit_codes(tmp_path, capsys):
    make(tmp_path)
    assert run_cli(main, [str(tmp_path / "t")]) == 0
    assert "ok (8 rows, 2 sequences)" in capsys.readouterr().out
    make(tmp_path, experts=with_row(BASE_E, 5, [1, 9]), name="bad")
    assert run_cli(main, [str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad/routing.parquet: row 5" in err[0]
    for target, msg in [(tmp_path / "nope", "no such file"), (tmp_path, "no meta.json")]:
        assert run_cli(main, [str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0] and str(target) in err[0]
