"""No predictor but the oracle may read the future, and no evaluation may score training data.

- Perturbation: two traces identical up to a cut (batch b*, layer l*) and different after it (experts AND
  hidden states). Every predictor, fit on the (identical) training split, must make the same predictions for
  every (batch, layer) up to the cut. A deliberately cheating predictor is caught by the same check.
- Views: every BatchView holds only earlier positions and the batch's layers 0..l, read-only.
- Splits are disjoint; a predictor that memorizes its training data scores perfectly on it and the evaluation
  still reports held-out figures.
"""

from __future__ import annotations

import numpy as np
import pytest

from predictors.base import Prediction, Predictor, rank_counts
from predictors.evaluate import build_predictor, evaluate, fit_on_split
from predictors.registry import _REGISTRY, available_predictors, register_predictor
from predictors.split import TrainingTrace, make_split
from predictors.synthetic import make_trace
from predictors.views import HiddenSource, iter_batches, load_sequences, replay
from traces.reader import Trace
from traces.writer import write_trace

SMALL = dict(n_sequences=10, prompt_len=4, gen_len=8, n_layers=5, n_experts=8, top_k=2, hidden_size=8)
FAST = {"learned_mlp": {"epochs": 3, "max_units": 32}, "learned_mlp_gate": {"epochs": 3, "max_units": 32},
        "learned_history": {"epochs": 3}}
# registered predictors with options that change what they read: checked like the defaults
VARIANTS = {"learned_mlp+past_input": ("learned_mlp", {**FAST["learned_mlp"], "past_input": True}),
            "learned_mlp_gate+past_input": ("learned_mlp_gate", {**FAST["learned_mlp_gate"], "past_input": True})}


def _columns(trace: Trace) -> dict:
    """The trace's rows as numpy columns, with the hidden state of every row (for rewriting)."""
    t = trace.table()
    k = trace.meta.top_k
    cols = {name: t.column(name).to_numpy(zero_copy_only=False) for name in ("sequence", "position", "layer")}
    cols["phase"] = np.asarray(t.column("phase").to_pylist(), dtype=object)
    cols["experts"] = np.stack(t.column("experts").to_numpy(zero_copy_only=False)).reshape(-1, k).astype(np.int16)
    cols["weights"] = np.stack(t.column("weights").to_numpy(zero_copy_only=False)).reshape(-1, k)
    rows = t.column("hidden_row").to_numpy(zero_copy_only=False)
    hidden = np.zeros((len(rows), trace.meta.hidden_size), dtype=np.float32)
    for layer in range(trace.meta.n_layers):
        sel = cols["layer"] == layer
        hidden[sel] = trace.hidden_states(layer)[rows[sel].astype(np.int64)]
    cols["hidden"] = hidden
    return cols


def _perturbed_copy(src: Trace, dst, seq: int, batch_positions: list[np.ndarray], b_cut: int, l_cut: int,
                    seed: int) -> Trace:
    """Copy of `src` where sequence `seq`'s rows after (batch b_cut, layer l_cut) get random experts/hidden."""
    c = _columns(src)
    rng = np.random.default_rng(seed)
    later = np.concatenate(batch_positions[b_cut + 1:]) if b_cut + 1 < len(batch_positions) else np.empty(0)
    fut = (c["sequence"] == seq) & (np.isin(c["position"], later)
                                    | (np.isin(c["position"], batch_positions[b_cut]) & (c["layer"] > l_cut)))
    assert fut.any()
    n, k = fut.sum(), src.meta.top_k
    c["experts"][fut] = np.stack([rng.choice(src.meta.n_experts, k, replace=False) for _ in range(n)])
    c["hidden"][fut] = rng.standard_normal((n, src.meta.hidden_size)).astype(np.float32) * 5
    routers = {layer: np.asarray(src.router_weights(layer)) for layer in range(src.meta.n_layers)}
    write_trace(dst, src.meta.model_copy(update={"has_hidden_states": False, "has_router_weights": False}),
                sequence=c["sequence"], phase=c["phase"], position=c["position"], layer=c["layer"],
                experts=c["experts"], weights=c["weights"], hidden=c["hidden"], router_weights=routers)
    return Trace(dst)


def _predictions(trace: Trace, name: str, distance: int, seq: int, cls=None) -> dict:
    """(batch index, layer) -> ranked experts, for the batches of `seq`, fit on the split's training part."""
    split = make_split(trace, 0.8, seed=1)
    real, params = VARIANTS.get(name, (name, FAST.get(name)))
    predictor = cls() if cls is not None else build_predictor(real, distance, 0, params)
    fit_on_split(predictor, trace, split)
    predictor.reset()
    seqs = [s for s in load_sequences(trace) if s.sequence == seq]
    out: dict = {}
    batches = list(iter_batches(seqs, trace.meta, source=HiddenSource(trace)))
    index = {id(b): i for i, b in enumerate(batches)}
    replay(predictor, batches, distance,
           on_prediction=lambda b, t, p: out.__setitem__((index[id(b)], t - distance), p.experts.tolist()))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("future")
    trace = Trace(make_trace(d / "orig", "router", seed=3, **SMALL))
    split = make_split(trace, 0.8, seed=1)
    seq = split.eval[0]
    (sr,) = [s for s in load_sequences(trace) if s.sequence == seq]
    batch_positions = [b.positions for b in iter_batches([sr], trace.meta)]
    cuts = [(0, 1), (1, 2), (3, 0), (len(batch_positions) - 2, 3)]  # inside prefill, first decode, later ones
    perturbed = [_perturbed_copy(trace, d / f"p{i}", seq, batch_positions, b, l_, seed=i)
                 for i, (b, l_) in enumerate(cuts)]
    return trace, seq, cuts, perturbed


def _assert_no_future(base, name, distance, cls=None):
    trace, seq, cuts, perturbed = base
    ref = _predictions(trace, name, distance, seq, cls)
    for (b_cut, l_cut), other in zip(cuts, perturbed):
        got = _predictions(other, name, distance, seq, cls)
        for (b, layer), experts in ref.items():
            if (b, layer) <= (b_cut, l_cut):
                assert got[(b, layer)] == experts, (
                    f"{name} d={distance}: prediction at batch {b}, layer {layer} changed when only rows after "
                    f"batch {b_cut}, layer {l_cut} changed: it reads the future")


HONEST = [n for n in available_predictors() if not _REGISTRY[n].reads_future] + list(VARIANTS)


@pytest.mark.parametrize("name", HONEST)
@pytest.mark.parametrize("distance", [1, 2])
def test_predictions_ignore_the_future(base, name, distance):
    _assert_no_future(base, name, distance)


class _Cheater(Predictor):
    """Opens the whole trace behind the evaluation's back and predicts the true future."""

    trainable = True

    def fit(self, trace, sequences):
        self._all = {s.sequence: s for s in load_sequences(Trace(trace.path))}

    def predict(self, view, distance, future=None):
        seq = self._all[int(view.sequences[0])]
        idx = np.flatnonzero(np.isin(seq.positions, view.positions))
        ids = seq.experts[idx, view.layer + distance].ravel()
        return rank_counts(np.bincount(ids[ids >= 0].astype(np.int64), minlength=view.meta.n_experts) * 1.0)


def test_the_perturbation_check_catches_a_cheater(base):
    with pytest.raises(AssertionError, match="reads the future"):
        _assert_no_future(base, "cheater", 1, cls=_Cheater)


def test_the_oracle_is_the_only_one_reading_the_future():
    assert [n for n in available_predictors() if _REGISTRY[n].reads_future] == ["oracle"]


class _Spy(Predictor):
    def __init__(self):
        super().__init__()
        self.views = []

    def observe(self, view):
        self.views.append(view)

    def predict(self, view, distance, future=None):
        assert future is None
        return Prediction(np.empty(0, dtype=np.int64))


def test_views_hold_only_the_past_and_the_current_layers(base):
    trace = base[0]
    seqs = load_sequences(trace)
    by_id = {s.sequence: s for s in seqs}
    spy = _Spy()
    replay(spy, iter_batches(seqs, trace.meta, batch_size=3, source=HiddenSource(trace)), 1)
    assert spy.views
    L = trace.meta.n_layers
    for v in spy.views:
        assert v.current.shape == (len(v.positions), v.layer + 1, trace.meta.top_k)
        assert not v.current.flags.writeable
        for sid in np.unique(v.sequences):
            past = v.past[int(sid)]
            mine = v.positions[v.sequences == sid]
            assert not past.flags.writeable
            assert past.shape[1:] == (L, trace.meta.top_k)
            s = by_id[int(sid)]
            # the past is exactly the positions before the batch's first position of that sequence
            first = int(np.flatnonzero(s.positions == mine.min())[0])
            assert past.shape[0] == first
            assert np.array_equal(past, s.experts[:first])
        if v.phase == "decode":
            assert len(np.unique(v.sequences)) == len(v.sequences)  # one token per sequence
    # views come layer by layer: 0..L-1 for each batch, in order
    layers = [v.layer for v in spy.views]
    assert layers == list(range(L)) * (len(layers) // L)


def test_prefill_is_one_batch_and_decode_one_token_per_batch(base):
    trace = base[0]
    seqs = load_sequences(trace)[:2]
    batches = list(iter_batches(seqs, trace.meta))
    phases = [b.phase for b in batches]
    assert phases == (["prefill"] + ["decode"] * SMALL["gen_len"]) * 2
    assert batches[0].n_tokens == SMALL["prompt_len"]
    assert all(b.n_tokens == 1 for b in batches if b.phase == "decode")


# -- splits --------------------------------------------------------------------------------------------------

def test_sequence_splits_are_disjoint_and_folds_cover_everything(base):
    trace = base[0]
    s = make_split(trace, 0.9, seed=4)
    assert set(s.train).isdisjoint(s.eval) and set(s.train) | set(s.eval) == set(trace.sequences())
    seen = []
    for fold in range(5):
        f = make_split(trace, 0.9, seed=4, folds=5, fold=fold)
        assert set(f.train).isdisjoint(f.eval)
        seen += list(f.eval)
    assert sorted(seen) == sorted(trace.sequences())


def test_training_trace_refuses_held_out_data(base):
    trace = base[0]
    split = make_split(trace, 0.8, seed=1)
    tt = TrainingTrace(trace, split)
    assert {s.sequence for s in tt.load()} == set(split.train)
    with pytest.raises(PermissionError):
        tt._check(split.eval[0])


@pytest.fixture(scope="module")
def one_sequence(tmp_path_factory):
    d = tmp_path_factory.mktemp("oneseq")
    return Trace(make_trace(d / "one", "cross_layer", n_sequences=1, prompt_len=5, gen_len=40, n_layers=4,
                            n_experts=8, top_k=2))


def test_position_split_trains_before_the_cut_and_scores_after(one_sequence):
    split = make_split(one_sequence, 0.9)
    assert split.kind == "positions"
    (seq,) = split.train
    cut = split.cut[seq]
    assert cut == 5 + 36  # the prompt plus 90% of the 40 generated positions
    (train,) = TrainingTrace(one_sequence, split).load()
    assert train.n_positions == cut
    r = evaluate(one_sequence, "oracle", 1)
    assert r["n_eval"] == 4


@register_predictor("test_memorizer")
class _Memorizer(Predictor):
    """Remembers the exact routing of every training position; knows nothing else."""

    trainable = True

    def fit(self, trace, sequences):
        from predictors.split import training_sequences

        self.table = {}
        for s in training_sequences(trace, sequences):
            for i, p in enumerate(s.positions):
                self.table[(s.sequence, int(p))] = s.experts[i]

    def predict(self, view, distance, future=None):
        counts = np.zeros(view.meta.n_experts)
        for s, p in zip(view.sequences, view.positions):
            row = self.table.get((int(s), int(p)))
            if row is not None:
                ids = row[view.layer + distance]
                counts[ids[ids >= 0].astype(np.int64)] += 1
        return rank_counts(counts)


@pytest.mark.parametrize("fixture", ["base", "one_sequence"])
def test_evaluation_never_scores_training_data(request, fixture):
    got = request.getfixturevalue(fixture)
    trace = got[0] if isinstance(got, tuple) else got
    split = make_split(trace, 0.9)
    m = build_predictor("test_memorizer", 1)
    fit_on_split(m, trace, split)
    # on its own training data it is perfect ...
    train_only = split.__class__(**{**split.__dict__, "eval": split.train, "cut": None})
    from predictors.evaluate import score_split
    from predictors.metrics import Scorer

    sc = Scorer(trace.meta.n_layers, trace.meta.top_k)
    score_split(trace, m, train_only, 1, sc)
    # (one sequence: all of it is replayed; perfect on its 36 training positions, blind on the 4 held out)
    assert sc.summary()["accuracy"] == (1.0 if fixture == "base" else 36 / 40)
    # ... and the evaluation, which scores held-out data only, sees nothing it memorized
    for folds in ([1, 3] if fixture == "base" else [1]):
        r = evaluate(trace, "test_memorizer", 1, folds=folds)
        assert r["accuracy"] == 0.0 and r["n_eval"] > 0
