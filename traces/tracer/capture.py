"""Forward hooks on router modules: what each MoE layer received and what its router chose, per forward pass."""

from __future__ import annotations

from dataclasses import dataclass

from traces.tracer.routers import RouterSite, find_routers, rank_order, split_router_output


@dataclass
class LayerCapture:
    """One MoE layer in one forward pass; rows are the flattened [batch * seq] tokens in row-major order."""

    ids: object  # torch int64 [T, k], rank order
    weights: object  # torch float32 [T, k], aligned with ids
    logits: object | None  # torch float32 [T, E]
    hidden: object | None  # torch float16 [T, H]: the router's (= MoE block's) input


class RouterCapture:
    """Context manager. `pop()` returns {trace layer: LayerCapture} for the forward passes since the last pop."""

    def __init__(self, model, *, hidden: bool = False, logits: bool = False, sites: list[RouterSite] | None = None):
        self.model = model
        self.sites = sites if sites is not None else find_routers(model)
        self.want_hidden = hidden
        self.want_logits = logits
        self._handles = []
        self._buf: dict[int, LayerCapture] = {}

    def _hook(self, site: RouterSite):
        def hook(module, args, kwargs, output):
            import torch

            logits, weights, ids = split_router_output(output, site.n_experts, site.top_k)
            logits = logits.detach().reshape(-1, logits.shape[-1])
            weights = weights.detach().reshape(-1, weights.shape[-1]).float()
            ids = ids.detach().reshape(-1, ids.shape[-1]).long()
            weights, ids = rank_order(site, logits, weights, ids)
            hidden = None
            if self.want_hidden:
                x = args[0] if args else kwargs["hidden_states"]
                hidden = x.detach().reshape(-1, x.shape[-1]).to(torch.float16)
            if site.layer in self._buf:
                raise RuntimeError(f"router of layer {site.layer} ran twice in one step; call pop() between passes")
            self._buf[site.layer] = LayerCapture(
                ids=ids, weights=weights, logits=logits.float() if self.want_logits else None, hidden=hidden
            )

        return hook

    def __enter__(self) -> RouterCapture:
        for site in self.sites:
            self._handles.append(site.module.register_forward_hook(self._hook(site), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def pop(self) -> dict[int, LayerCapture]:
        out, self._buf = self._buf, {}
        missing = [s.layer for s in self.sites if s.layer not in out]
        if missing:
            raise RuntimeError(f"routers of layers {missing} did not run in this forward pass")
        return out
