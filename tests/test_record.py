"""traces.record on tiny random-weight models of every supported family (CPU).

The recorded top-k is compared with an independent re-implementation of each family's router applied to the
MoE block's input, which a separate hook on the MoE block (not the router) captures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from traces.reader import Trace  # noqa: E402
from traces.record import main as record_main  # noqa: E402
from traces.tracer import RouterCapture, find_routers  # noqa: E402
from traces.tracer.generate import sorted_columns, trace_batch  # noqa: E402
from traces.tracer.tiny import TINY, TINY_EXTRA, tiny_model  # noqa: E402

FAMILIES = sorted(TINY)


@torch.no_grad()
def reference_route(family: str, router, x: torch.Tensor):
    """Independent top-k (rank order) and weights from the MoE input x [T, H], per transformers' documented rules."""
    x = x.float()
    w = router.weight.float()
    logits = x @ w.T
    k = router.top_k
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        probs = torch.softmax(logits, dim=-1)
        val, idx = torch.topk(probs, k, dim=-1)
        if family == "mixtral" or router.norm_topk_prob:
            val = val / val.sum(-1, keepdim=True)
        return idx, val
    if family in ("gpt_oss", "granitemoe"):
        if family == "gpt_oss":
            logits = logits + router.bias.float()
        val, idx = torch.topk(logits, k, dim=-1)
        return idx, torch.softmax(val, dim=-1)
    if family == "deepseek_v3":
        scores = torch.sigmoid(logits)
        choice = scores + router.e_score_correction_bias.float()
        g = router.num_group
        grouped = choice.view(len(x), g, -1)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(router.topk_group, dim=-1).indices, True)
        masked = torch.where(keep[:, :, None].expand_as(grouped).reshape(len(x), -1), choice, -torch.inf)
        idx = masked.topk(k, dim=-1).indices  # sorted: rank order by the choice score
        val = scores.gather(1, idx)
        if router.norm_topk_prob:
            val = val / (val.sum(-1, keepdim=True) + 1e-20)
        return idx, val * router.routed_scaling_factor
    raise AssertionError(family)


class MoeInputs:
    """Separate hooks on each MoE block (the router's parent) recording the block input per forward pass."""

    def __init__(self, model):
        self.sites = find_routers(model)
        self.calls: dict[int, list[torch.Tensor]] = {s.layer: [] for s in self.sites}
        self.handles = []
        for s in self.sites:
            block = model.get_submodule(s.name.rsplit(".", 1)[0])
            self.handles.append(block.register_forward_pre_hook(self._hook(s.layer), with_kwargs=True))

    def _hook(self, layer):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self.calls[layer].append(x.detach().reshape(-1, x.shape[-1]).clone())

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


PROMPTS = [[5, 9, 17, 33, 4, 8, 21], [7, 3], [11, 12, 13, 14, 15], [40, 41, 42, 43]]


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_topk_matches_router_and_hidden_matches_input(family):
    model = tiny_model(family)
    n_new = 3
    inputs = MoeInputs(model)
    with RouterCapture(model, hidden=True, logits=True) as cap:
        rows = trace_batch(model, cap, PROMPTS, max_new_tokens=n_new, pad_id=0)
    inputs.remove()
    sites = cap.sites
    b, s = len(PROMPTS), max(map(len, PROMPTS))
    mask = np.zeros((b, s), bool)
    for i, p in enumerate(PROMPTS):
        mask[i, s - len(p):] = True
    valid_per_step = [mask.ravel()] + [np.ones(b, bool)] * n_new
    for site in sites:
        calls = inputs.calls[site.layer]
        assert len(calls) == 1 + n_new  # one prefill pass + one pass per generated token
        d = rows.per_layer[site.layer]
        for step, (x, valid) in enumerate(zip(calls, valid_per_step)):
            ref_ids, ref_w = reference_route(family, site.module, x)
            got_ids, got_w = d["ids"][step], d["weights"][step]
            np.testing.assert_array_equal(got_ids, ref_ids.numpy()[valid], err_msg=f"{family} layer {site.layer}")
            np.testing.assert_allclose(got_w, ref_w.numpy()[valid], rtol=1e-5, atol=1e-6)
            hid = d["hidden"][step]
            assert hid.dtype == np.float16 and hid.shape == (valid.sum(), model.config.hidden_size)
            np.testing.assert_array_equal(hid, x.numpy()[valid].astype(np.float16))
            logits = d["logits"][step]
            assert logits.shape == (valid.sum(), site.n_experts)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_logits_match_output_router_logits(family):
    """transformers' own output_router_logits (an independent path through the model) agrees with the hooks."""
    model = tiny_model(family)
    ids = torch.tensor([PROMPTS[0]])
    with RouterCapture(model, logits=True) as cap, torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
        caps = cap.pop()
    assert len(out.router_logits) == len(caps)
    for layer, rl in enumerate(out.router_logits):
        np.testing.assert_allclose(caps[layer].logits.numpy(), rl.reshape(-1, rl.shape[-1]).float().numpy(), rtol=1e-6)
        probs = torch.softmax(rl.reshape(-1, rl.shape[-1]).float(), -1)
        np.testing.assert_array_equal(caps[layer].ids.numpy(), probs.topk(model.config.num_experts_per_tok).indices)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_padding_does_not_change_routing(family):
    """A prompt padded inside a batch routes (almost always exactly) as when run alone."""
    model = tiny_model(family)
    with RouterCapture(model) as cap:
        batch = trace_batch(model, cap, PROMPTS, max_new_tokens=4, pad_id=0)
        cb, _ = sorted_columns(batch, 0)
        agree = total = 0
        for i, p in enumerate(PROMPTS):
            alone = trace_batch(model, cap, [p], max_new_tokens=4, pad_id=0)
            ca, _ = sorted_columns(alone, i)
            sel = cb["sequence"] == i
            for key in ("position", "layer", "token_id", "phase"):
                np.testing.assert_array_equal(cb[key][sel], ca[key])
            assert batch.generated[i] == alone.generated[0]
            agree += (np.sort(cb["experts"][sel], 1) == np.sort(ca["experts"], 1)).all(1).sum()
            total += sel.sum()
    assert agree / total > 0.98


def test_cli_counts_and_reader(tmp_path):
    dst = tmp_path / "trace"
    rc = record_main(["--model", "tiny:qwen3_moe", "--out", str(dst), "--num-prompts", "5", "--prompt-len", "9",
                      "--batch-size", "2", "--max-new-tokens", "6", "--hidden-states", "--router-weights",
                      "--router-logits", "--quiet"])
    assert rc == 0
    t = Trace(dst)
    meta = t.meta
    assert meta.has_hidden_states and meta.has_router_weights and meta.n_layers == 3 and meta.top_k == 4
    from traces.record import random_prompts

    prompts = random_prompts(5, 9, 128, 0)
    table = t.table()
    phase = np.asarray(table.column("phase").to_pylist())
    assert (phase == "prefill").sum() == sum(map(len, prompts)) * meta.n_layers
    assert (phase == "decode").sum() == 5 * 6 * meta.n_layers
    for seq, p in enumerate(prompts):
        r = t.routing(seq, "prefill")
        np.testing.assert_array_equal(r.positions, np.arange(len(p)))
        np.testing.assert_array_equal(r.token_ids, p)
        d = t.routing(seq, "decode")
        np.testing.assert_array_equal(d.positions, np.arange(len(p), len(p) + 6))
        for layer in range(meta.n_layers):
            h = t.hidden_states(layer)[r.hidden_rows[:, layer]]
            assert h.shape == (len(p), meta.hidden_size) and h.dtype == np.float16
    assert t.router_weights(0).shape == (meta.n_experts, meta.hidden_size)
    lg = np.load(dst / "router_logits" / "layer_000.npy")
    assert lg.shape == (t.hidden_states(0).shape[0], meta.n_experts)
    # the stored logits rank the stored experts first (softmax router: top-k of logits = top-k of probs)
    rows = table.filter(table.column("layer").to_numpy() == 0)
    ex = np.stack(rows.column("experts").to_numpy(zero_copy_only=False))
    hr = rows.column("hidden_row").to_numpy()
    top = np.argsort(-lg[hr].astype(np.float32), axis=1)[:, :4]
    assert (np.sort(top, 1) == np.sort(ex, 1)).all(1).mean() > 0.98
    assert json.loads((dst / "meta.json").read_text())["extra"]["router_logits"]


def test_cli_bad_model_path(tmp_path, capsys):
    from traces.errors import run_cli

    rc = run_cli(record_main, ["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "t")])
    assert rc == 2 and "nope" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


class ExpertsInputs:
    """Hooks on each layer's experts module: the ids and weights the MoE block actually handed to its experts."""

    def __init__(self, model, sites):
        self.calls = {s.layer: [] for s in sites}
        self.handles = []
        for s in sites:
            experts = model.get_submodule(s.name.rsplit(".", 1)[0]).experts
            self.handles.append(experts.register_forward_pre_hook(self._hook(s.layer), with_kwargs=True))

    def _hook(self, layer):
        def hook(module, args, kwargs):
            vals = list(args) + [kwargs[k] for k in ("top_k_index", "top_k_weights") if k in kwargs]
            ids = next(v for v in vals if isinstance(v, torch.Tensor) and not v.is_floating_point())
            w = [v for v in vals[1:] if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == ids.shape]
            self.calls[layer].append((ids.reshape(-1, ids.shape[-1]).clone(), w[0].reshape(ids.shape[0], -1).clone()))

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES + sorted(TINY_EXTRA))
def test_recorded_routing_is_what_the_experts_received(family):
    """Independent of any re-implementation: what the experts module was given equals what was recorded."""
    model = tiny_model(family)
    sites = find_routers(model)
    probe = ExpertsInputs(model, sites)
    with RouterCapture(model, sites=sites) as cap:
        rows = trace_batch(model, cap, PROMPTS[:2], max_new_tokens=2, pad_id=0)
    probe.remove()
    valid0 = np.zeros((2, 7), bool)
    valid0[0, :] = True
    valid0[1, 5:] = True
    for s in sites:
        d = rows.per_layer[s.layer]
        assert len(probe.calls[s.layer]) == 3
        for step, (ids, w) in enumerate(probe.calls[s.layer]):
            valid = valid0.ravel() if step == 0 else np.ones(2, bool)
            got_ids, got_w = d["ids"][step], d["weights"][step]
            ref_ids, ref_w = ids.numpy()[valid], w.float().numpy()[valid]
            o_got, o_ref = np.argsort(got_ids, 1), np.argsort(ref_ids, 1)
            np.testing.assert_array_equal(np.take_along_axis(got_ids, o_got, 1), np.take_along_axis(ref_ids, o_ref, 1))
            np.testing.assert_allclose(np.take_along_axis(got_w, o_got, 1), np.take_along_axis(ref_w, o_ref, 1),
                                       rtol=1e-6)
