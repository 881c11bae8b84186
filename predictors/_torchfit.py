"""Training small multi-label networks with torch (imported lazily) and running them with numpy.

A network is a dict of numpy arrays: optional input standardization (`mu`, `sigma`), then either a linear layer
(`w2`, `b2`) or a two-layer MLP (`w1`, `b1`, ReLU, `w2`, `b2`). Its output scores the experts of one layer.
Training minimizes the cross-entropy between softmax(scores) and the true experts (k-hot, normalized), with
Adam, weight decay and early stopping on a held-back tenth of the training rows (rows, not sequences: this
tenth is part of the training split; the evaluation split is never seen). On a GPU (`device="cuda"`) the whole
training set is copied to the device once (as given, e.g. float16) and standardized there; large training sets
want a large `batch_size` there (thousands of rows per step), since each step costs about the same.
"""

from __future__ import annotations

import numpy as np


def forward(net: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if "mu" in net:
        x = (x - net["mu"]) / net["sigma"]
    if "w1" in net:
        x = np.maximum(x @ net["w1"] + net["b1"], 0.0)
    return x @ net["w2"] + net["b2"]


def n_params(net: dict[str, np.ndarray]) -> int:
    return int(sum(net[k].size for k in ("w1", "b1", "w2", "b2") if k in net))


def require_torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("training this predictor needs torch: pip install -e '.[trace]' "
                          "(torch==2.13.0); running a saved artifact does not") from exc
    return torch


def train(x: np.ndarray, y: np.ndarray, *, hidden_units: int, epochs: int = 30, lr: float = 1e-3,
          weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0, standardize: bool = True,
          patience: int = 4, threads: int = 1, device: str = "cpu", loss: str = "softmax",
          dropout: float = 0.0, time_limit: float = 0.0) -> dict[str, np.ndarray]:
    """x: float [N, F]; y: multi-hot float [N, E]. Returns the network of the best validation epoch.

    time_limit > 0: no new epoch starts after that many seconds (a bound for time-boxed runs; results then
    depend on the machine's speed, so it is off by default)."""
    torch = require_torch()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # one thread by default: deterministic, and the machine's cores are shared
    try:
        return _train(torch, x, y, hidden_units=hidden_units, epochs=epochs, lr=lr, weight_decay=weight_decay,
                      batch_size=batch_size, seed=seed, standardize=standardize, patience=patience,
                      device=_device(torch, device), loss=loss, dropout=dropout, time_limit=time_limit)
    finally:
        torch.set_num_threads(old_threads)


def _device(torch, device: str):
    """"cpu", "cuda" (error when absent) or "auto" (cuda when available). Only training runs there."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return torch.device(device)


def _train(torch, x, y, *, hidden_units, epochs, lr, weight_decay, batch_size, seed, standardize, patience, device,
           loss="softmax", dropout=0.0, time_limit=0.0, torch_prep=None):
    import time

    t_start = time.perf_counter()
    if loss not in ("softmax", "bce"):
        raise ValueError(f"loss must be 'softmax' or 'bce', got {loss!r}")
    y = np.asarray(y, dtype=np.float32)
    n, f = x.shape
    e = y.shape[1]
    net: dict[str, np.ndarray] = {}
    if torch_prep is None:  # the GPU path (tests force it on the CPU with torch_prep=True)
        torch_prep = device.type != "cpu"
    if not torch_prep:
        x = np.asarray(x, dtype=np.float32)
        if standardize:
            mu = x.mean(axis=0)
            sigma = x.std(axis=0) + 1e-3
            net["mu"], net["sigma"] = mu.astype(np.float32), sigma.astype(np.float32)
            x = (x - mu) / sigma
        xt = torch.from_numpy(x)
    else:  # on a GPU: copy as given (float16 hidden states stay half the size), standardize there
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(device).float()
        if standardize:
            mu_t = xt.double().mean(dim=0)
            sigma_t = ((xt.double() - mu_t) ** 2).mean(dim=0).sqrt() + 1e-3
            net["mu"] = mu_t.float().cpu().numpy()
            net["sigma"] = sigma_t.float().cpu().numpy()
            xt = (xt - mu_t.float()) / sigma_t.float()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = max(1, n // 10) if n >= 20 else 0
    val, tr = perm[:n_val], perm[n_val:]
    torch.manual_seed(seed)
    if hidden_units > 0:
        mid = [torch.nn.Dropout(dropout)] if dropout > 0 else []
        model = torch.nn.Sequential(torch.nn.Linear(f, hidden_units), torch.nn.ReLU(), *mid,
                                    torch.nn.Linear(hidden_units, e))
    else:
        model = torch.nn.Sequential(torch.nn.Linear(f, e))
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    if loss == "bce":
        yt = torch.from_numpy(y).to(device)
    else:
        yt = torch.from_numpy(y / np.maximum(y.sum(axis=1, keepdims=True), 1.0)).to(device)

    def loss_of(idx):
        logits = model(xt[idx])
        if loss == "bce":
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, yt[idx])
        return -(yt[idx] * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()

    def snapshot():
        layers = [m for m in model if isinstance(m, torch.nn.Linear)]
        out = {}
        if len(layers) == 2:
            out["w1"] = layers[0].weight.detach().cpu().numpy().T.copy()
            out["b1"] = layers[0].bias.detach().cpu().numpy().copy()
        out["w2"] = layers[-1].weight.detach().cpu().numpy().T.copy()
        out["b2"] = layers[-1].bias.detach().cpu().numpy().copy()
        return out

    best, best_loss, bad = snapshot(), float("inf"), 0
    gen = torch.Generator().manual_seed(seed)
    tr_t = torch.from_numpy(tr)
    val_t = torch.from_numpy(val).to(device)
    for _ in range(epochs):
        if time_limit and time.perf_counter() - t_start > time_limit:
            break
        model.train()
        order = tr_t[torch.randperm(len(tr_t), generator=gen)].to(device)
        for i in range(0, len(order), batch_size):
            opt.zero_grad()
            loss = loss_of(order[i: i + batch_size])
            loss.backward()
            opt.step()
        if n_val == 0:
            best = snapshot()
            continue
        model.eval()
        with torch.no_grad():
            v = float(loss_of(val_t))
        if v < best_loss - 1e-5:
            best, best_loss, bad = snapshot(), v, 0
        else:
            bad += 1
            if bad >= patience:
                break
    net.update(best)
    return net


def multi_hot(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """experts: int [N, k] (-1 ignored) -> float32 [N, n_experts]."""
    n = experts.shape[0]
    out = np.zeros((n, n_experts), dtype=np.float32)
    rows, cols = np.nonzero(experts >= 0)
    out[rows, experts[rows, cols].astype(np.int64)] = 1.0
    return out


def pack(nets: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{"l3_d1": net} -> flat {"l3_d1/w1": array} for an .npz artifact."""
    return {f"{name}/{k}": v for name, net in nets.items() for k, v in net.items()}


def unpack(state: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    nets: dict[str, dict[str, np.ndarray]] = {}
    for key, v in state.items():
        if "/" in key:
            name, k = key.split("/", 1)
            nets.setdefault(name, {})[k] = np.asarray(v, dtype=np.float32)
    return nets
