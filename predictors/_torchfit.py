"""Training small multi-label networks with torch (imported lazily) and running them with numpy.

A network is a dict of numpy arrays: optional input standardization (`mu`, `sigma`), then either a linear layer
(`w2`, `b2`) or a two-layer MLP (`w1`, `b1`, ReLU, `w2`, `b2`), optionally plus a linear skip path from the
(standardized) input straight to the scores (`ws` [inputs, experts]; networks without it, e.g. every artifact
written before it existed, run as before). Its output scores the experts of one layer.

`train_many` fits several such networks of the same shape at once (one per source layer: the same distance,
equally many input features), as ONE batched network: weights stacked along a leading layer dimension and
applied with batched matrix products, so each optimizer step trains every layer's network on its own rows.
Each network keeps its own early stopping (its best validation epoch) on its own validation rows. It is what
the learned predictors use.
Training minimizes the cross-entropy between softmax(scores) and the true experts (k-hot, normalized), with
AdamW, weight decay and early stopping on the last tenth of each network's training rows (part of the training
split; the evaluation split is never seen). On a GPU (`device="cuda"`) the whole
training set is copied to the device once (as given, e.g. float16) and standardized there; large training sets
want a large `batch_size` there (thousands of rows per step), since each step costs about the same.
"""

from __future__ import annotations

import numpy as np

_ONE_BLAS_THREAD = False


def single_threaded_blas() -> None:
    """Limit numpy's BLAS to one thread in this process (once). A prediction multiplies one batch's few rows by a
    network's weights. Beside other busy processes (a sweep's workers, a report beside a fit) OpenBLAS's spinning
    threads made a 1 x 512 by 512 x 1536 product take 8 ms instead of 0.1 ms on two shared cores (session 10: one
    evaluation 431 s instead of about 20). On an idle 16-core host (the H200 machine) its 16 threads did the same
    product in 45 us against 172 us on one, so a lone evaluation there is slower, by at most a few seconds; the
    bounded worst case is the one kept. Called by the commands that run predictors (predictors.evaluate,
    predictors.report, sim.run, the sweep's runs); not by the executor, whose host costs are calibrated with
    numpy's default threads."""
    global _ONE_BLAS_THREAD
    if _ONE_BLAS_THREAD:
        return
    _ONE_BLAS_THREAD = True
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn's dependency; without it numpy keeps its default
        return
    threadpool_limits(limits=1, user_api="blas")


def forward(net: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The network's logits (in place where it can: a prediction at every gate pays per numpy call)."""
    x = np.asarray(x, dtype=np.float32)
    if "mu" in net:
        x = (x - net["mu"]) / net["sigma"]
    h = x
    if "w1" in net:
        h = x @ net["w1"]
        h += net["b1"]
        np.maximum(h, 0.0, out=h)
    y = h @ net["w2"]
    y += net["b2"]
    if "ws" in net:  # the skip path, added last as before
        y += x @ net["ws"]
    return y


def n_params(net: dict[str, np.ndarray]) -> int:
    return int(sum(net[k].size for k in ("w1", "b1", "w2", "b2", "ws") if k in net))


def require_torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("training this predictor needs torch: pip install -e '.[trace]' "
                          "(torch==2.13.0); running a saved artifact does not") from exc
    return torch


def _device(torch, device: str):
    """"cpu", "cuda" (error when absent) or "auto" (cuda when available). Only training runs there."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return torch.device(device)


# the fit options both learned predictors take from their params and hand to train_many unchanged
SHARED_OPTIONS = ("epochs", "lr", "weight_decay", "batch_size", "device", "patience", "schedule", "warmup",
                  "min_epochs", "threads", "time_limit")


def shared_options(params: dict) -> dict:
    """SHARED_OPTIONS from a predictor's params; train_many's own default where a param is absent (artifacts
    written before the option existed)."""
    import inspect

    sig = inspect.signature(train_many).parameters
    return {k: params.get(k, sig[k].default) for k in SHARED_OPTIONS}


def train_many(xs: list[np.ndarray], ys: list[np.ndarray], *, hidden_units: int, epochs: int = 30,
               lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256, seed: int = 0,
               standardize: bool = True, patience: int = 4, threads: int = 1, device: str = "cpu",
               loss: str = "softmax", dropout: float = 0.0, skip: bool = False, schedule: str = "constant",
               warmup: float = 0.0, val_fraction: float = 0.1, min_epochs: int = 0, time_limit: float = 0.0,
               report: dict | None = None) -> list[dict[str, np.ndarray]]:
    """Fit len(xs) networks at once (xs[i]: [N_i, F], ys[i]: multi-hot [N_i, E]; the same F and E for all).

    Validation: the LAST `val_fraction` of each network's rows (in the order given: sequence order for the
    predictors, so these are whole later sequences of the training data, never the evaluation split) picks each
    network's best epoch; training stops when every network has gone `patience` epochs without improving (after
    at least `min_epochs`), or after `epochs`. schedule "cosine": the learning rate decays from lr to lr/100
    over `epochs` epochs after a linear warm-up of `warmup` epochs (fractions allowed); "constant": lr all along.
    Each step takes `batch_size` rows of every network. time_limit > 0: a safety net for time-boxed runs, no new
    epoch after that many seconds (off by default; then results depend on the machine's speed). `report`, when
    given, is filled with what happened: epochs run, each network's best epoch and validation loss, why it
    stopped, seconds. Returns one network dict per input (see `forward`)."""
    torch = require_torch()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train_many(torch, xs, ys, hidden_units=hidden_units, epochs=epochs, lr=lr,
                           weight_decay=weight_decay, batch_size=batch_size, seed=seed, standardize=standardize,
                           patience=patience, device=_device(torch, device), loss=loss, dropout=dropout,
                           skip=skip, schedule=schedule, warmup=warmup, val_fraction=val_fraction,
                           min_epochs=min_epochs, time_limit=time_limit, report=report)
    finally:
        torch.set_num_threads(old_threads)


STATS_CHUNK = 1 << 18  # rows per step of column_stats


def column_stats(x, chunk: int = STATS_CHUNK):
    """Per-column mean and standard deviation (+ 1e-3) of a 2-D tensor, in float64, a chunk of rows at a time.
    Whole-input float64 copies (four times the float16 input, two at once) ran the GPU out of memory when three
    fits of 2.4M rows x 512 inputs shared it (session 10's device call)."""
    import torch

    n = x.shape[0]
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for a in range(0, n, chunk):
        total += x[a: a + chunk].double().sum(dim=0)
    mu = total / n
    sq = torch.zeros_like(total)
    for a in range(0, n, chunk):
        sq += ((x[a: a + chunk].double() - mu) ** 2).sum(dim=0)
    return mu, (sq / n).sqrt() + 1e-3


def _train_many(torch, xs, ys, *, hidden_units, epochs, lr, weight_decay, batch_size, seed, standardize, patience,
                device, loss="softmax", dropout=0.0, skip=False, schedule="constant", warmup=0.0,
                val_fraction=0.1, min_epochs=0, time_limit=0.0, report=None):
    import math
    import time

    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for the fit (inference is numpy float32)

    if loss not in ("softmax", "bce"):
        raise ValueError(f"loss must be 'softmax' or 'bce', got {loss!r}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    m = len(xs)
    if m == 0:
        return []
    f, e = xs[0].shape[1], ys[0].shape[1]
    if any(x.shape[1] != f for x in xs) or any(y.shape[1] != e for y in ys):
        raise ValueError("train_many: every network needs the same number of inputs and outputs")
    sizes = [len(x) for x in xs]
    nmax = max(sizes)
    # stacked, padded data on the device: X [M, Nmax, F] (the given dtype, e.g. float16, converted per batch),
    # targets [M, Nmax, E]; rows past a network's N_i are never drawn
    dt = torch.float16 if all(x.dtype == np.float16 for x in xs) else torch.float32
    xt = torch.zeros((m, nmax, f), dtype=dt, device=device)
    yt = torch.zeros((m, nmax, e), dtype=torch.float32, device=device)
    mus, sigmas = [], []
    for i, (x, y) in enumerate(zip(xs, ys)):
        xi = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        if standardize:
            mu, sigma = column_stats(xi)
            mus.append(mu.float())
            sigmas.append(sigma.float())
        xt[i, : len(x)] = xi.to(dt)
        y = np.asarray(y, dtype=np.float32)
        if loss == "softmax":
            y = y / np.maximum(y.sum(axis=1, keepdims=True), 1.0)
        yt[i, : len(y)] = torch.from_numpy(y).to(device)
        del xi
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the per-layer uploads' blocks back to the GPU, for the fits beside this one
    if standardize:
        mu_t = torch.stack(mus)[:, None, :]
        sig_t = torch.stack(sigmas)[:, None, :]
    n_val = [max(1, int(round(n * val_fraction))) if n >= 20 and val_fraction > 0 else 0 for n in sizes]
    n_tr = [n - v for n, v in zip(sizes, n_val)]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    u = hidden_units

    def param(*shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return torch.nn.Parameter((torch.rand(*shape, generator=gen) * 2 - 1).mul_(bound).to(device))

    params = {}
    if u > 0:
        params["w1"] = param(m, f, u, fan_in=f)
        params["b1"] = param(m, 1, u, fan_in=f)
        params["w2"] = param(m, u, e, fan_in=u)
        params["b2"] = param(m, 1, e, fan_in=u)
    else:
        params["w2"] = param(m, f, e, fan_in=f)
        params["b2"] = param(m, 1, e, fan_in=f)
    if skip and u > 0:
        params["ws"] = torch.nn.Parameter(torch.zeros(m, f, e, device=device))
    decay = [params[k] for k in ("w1", "w2", "ws") if k in params]
    no_decay = [params[k] for k in ("b1", "b2")  if k in params]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=device.type == "cuda")

    def inputs(idx):  # idx: long [M, B] row indices per network
        x = torch.gather(xt, 1, idx[:, :, None].expand(-1, -1, f)).float()
        if standardize:
            x = (x - mu_t) / sig_t
        return x

    def logits_of(x, train_mode, p=params):  # p: the parameters of all networks, or of a slice of them
        if u > 0:
            h = torch.relu(torch.baddbmm(p["b1"], x, p["w1"]))
            if dropout > 0 and train_mode:
                h = torch.nn.functional.dropout(h, dropout, training=True)
            out = torch.baddbmm(p["b2"], h, p["w2"])
        else:
            out = torch.baddbmm(p["b2"], x, p["w2"])
        if "ws" in p:
            out = out + torch.bmm(x, p["ws"])
        return out

    def loss_terms(logits, tgt):  # bce: per output [M, B, E]; softmax: per row [M, B]
        if loss == "bce":
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, tgt, reduction="none")
        return -(tgt * torch.log_softmax(logits, dim=2)).sum(2)

    def losses(idx, train_mode):  # per network mean loss [M]
        terms = loss_terms(logits_of(inputs(idx), train_mode), torch.gather(yt, 1, idx[:, :, None].expand(-1, -1, e)))
        return terms.mean((1, 2)) if loss == "bce" else terms.mean(1)

    def val_losses():
        out = torch.zeros(m, dtype=torch.float64)
        chunk = 65536
        with torch.no_grad():
            for i in range(m):
                if not n_val[i]:
                    continue
                tot = 0.0
                for s0 in range(n_tr[i], sizes[i], chunk):
                    idx = torch.arange(s0, min(sizes[i], s0 + chunk), device=device)
                    x = xt[i: i + 1, idx].float()
                    if standardize:
                        x = (x - mu_t[i: i + 1]) / sig_t[i: i + 1]
                    terms = loss_terms(logits_of(x, False, {k: v[i: i + 1] for k, v in params.items()}),
                                       yt[i: i + 1, idx])
                    tot += float(terms.mean(2).sum() if loss == "bce" else terms.sum())
                out[i] = tot / n_val[i]
        return out

    def snapshot(i):
        return {k: v[i].detach().clone() for k, v in params.items()}

    best = [snapshot(i) for i in range(m)]
    best_loss = [float("inf")] * m
    best_epoch = [0] * m
    bad = [0] * m
    stopped, epochs_run = "epochs", 0
    batch_size = max(1, min(batch_size, max(n_tr)))  # no step larger than the largest training set
    steps_per_epoch = max(1, math.ceil(max(n_tr) / batch_size))
    total = steps_per_epoch * epochs
    warm = warmup * steps_per_epoch
    step = 0
    for epoch in range(epochs):
        if time_limit and time.perf_counter() - t_start > time_limit:
            stopped = "time_limit"
            break
        epochs_run = epoch + 1
        # one permutation of its training rows per network; a network with fewer rows cycles through its own
        perms = [torch.randperm(n, generator=gen) for n in n_tr]
        pos = torch.arange(steps_per_epoch * batch_size)
        order = torch.stack([p[pos % len(p)] for p in perms]).to(device)  # [M, steps * B]
        for s0 in range(0, max(n_tr), batch_size):
            if schedule == "cosine":
                lr_t = lr * min(1.0, (step + 1) / warm) if warm and step < warm else \
                    lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm)))))
                for g in opt.param_groups:
                    g["lr"] = lr_t
            idx = order[:, s0: s0 + batch_size]
            opt.zero_grad(set_to_none=True)
            losses(idx, True).sum().backward()
            opt.step()
            step += 1
        if not any(n_val):
            best = [snapshot(i) for i in range(m)]
            continue
        v = val_losses()
        for i in range(m):
            if not n_val[i]:
                best[i] = snapshot(i)
            elif v[i] < best_loss[i] - 1e-5:
                best[i], best_loss[i], bad[i], best_epoch[i] = snapshot(i), float(v[i]), 0, epoch + 1
            else:
                bad[i] += 1
        if epoch + 1 >= min_epochs and all(b >= patience for b, nv in zip(bad, n_val) if nv):
            stopped = "patience"
            break
    if report is not None:
        report.update({"networks": m, "rows": sizes, "validation_rows": n_val, "epochs_run": epochs_run,
                       "steps": step, "best_epoch": best_epoch,
                       "best_val_loss": [round(b, 5) if b != float("inf") else None for b in best_loss],
                       "stopped": stopped, "seconds": round(time.perf_counter() - t_start, 2),
                       "device": str(device)})
    nets = []
    for i in range(m):
        net = {}
        if standardize:
            net["mu"] = mus[i].cpu().numpy()
            net["sigma"] = sigmas[i].cpu().numpy()
        for k, v in best[i].items():
            arr = v.cpu().numpy().astype(np.float32)
            net[k] = arr.reshape(-1) if k in ("b1", "b2") else arr
        nets.append(net)
    return nets


def multi_hot(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """experts: int [N, k] (-1 ignored) -> float32 [N, n_experts]."""
    n = experts.shape[0]
    out = np.zeros((n, n_experts), dtype=np.float32)
    rows, cols = np.nonzero(experts >= 0)
    out[rows, experts[rows, cols].astype(np.int64)] = 1.0
    return out


WEIGHTS = ("w1", "w2", "ws")


def round_weights(net: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """The network with its weight matrices rounded to `dtype` ("float16": what `pack` then stores; "float32":
    unchanged), kept as float32 for numpy inference, so a fitted network predicts exactly as its saved artifact."""
    if dtype == "float32":
        return net
    if dtype != "float16":
        raise ValueError(f"weights_dtype must be 'float16' or 'float32', got {dtype!r}")
    return {k: (v.astype(np.float16).astype(np.float32) if k in WEIGHTS else v) for k, v in net.items()}


def pack(nets: dict[str, dict[str, np.ndarray]], weights_dtype: str = "float32") -> dict[str, np.ndarray]:
    """{"l3_d1": net} -> flat {"l3_d1/w1": array} for an .npz artifact. weights_dtype "float16" stores the weight
    matrices (w1, w2, ws) as float16, half the size (biases and standardization stay float32); `unpack` reads
    either as float32."""
    return {f"{name}/{k}": (v.astype(np.float16) if weights_dtype == "float16" and k in WEIGHTS else v)
            for name, net in nets.items() for k, v in net.items()}


def unpack(state: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    nets: dict[str, dict[str, np.ndarray]] = {}
    for key, v in state.items():
        if "/" in key:
            name, k = key.split("/", 1)
            nets.setdefault(name, {})[k] = np.asarray(v, dtype=np.float32)
    return nets
