"""A cheap look at the machine's state beside each real run: how fast the host runs Python and launches kernels,
how fast the GPU computes and the link copies right now. Repeated runs of one config vary (a median spread of
12-21 % on the H200 machine); recording these next to each repeat's time tells what moved, so the noise can be
attributed instead of guessed at."""

from __future__ import annotations

import os
import time

_PINNED: dict = {}
PROBE_BYTES = 64 << 20


def host_loop_us(n: int = 20000) -> float:
    """Microseconds for a fixed pure-Python loop (dict and attribute work, like the runtime's bookkeeping)."""
    d: dict = {}
    t = time.perf_counter()
    for i in range(n):
        d[i & 255] = d.get((i - 1) & 255, 0) + 1
    return (time.perf_counter() - t) * 1e6


def h2d_gbps(device) -> float | None:
    """One 64 MiB copy from pinned host memory, timed with CUDA events (None on the CPU)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    if dev not in _PINNED:
        _PINNED[dev] = (torch.empty(PROBE_BYTES, dtype=torch.uint8, pin_memory=True),
                        torch.empty(PROBE_BYTES, dtype=torch.uint8, device=dev))
    src, dst = _PINNED[dev]
    return PROBE_BYTES / (_once_ms(dev, lambda: dst.copy_(src, non_blocking=True)) * 1e-3) / 1e9


def launch_us(device, n: int = 200) -> float | None:
    """Host microseconds to launch n tiny kernels (in-place adds on a 1-element tensor; None on the CPU): the
    runtime's own host path (Python -> torch -> the CUDA driver), which a pure-Python loop does not see."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    x = torch.zeros(1, device=dev)
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1.0)
    dt = time.perf_counter() - t
    torch.cuda.synchronize(dev)
    return dt * 1e6


def gpu_us(device, n: int = 20, size: int = 2048) -> float | None:
    """GPU microseconds (CUDA events) of n bf16 matrix products of size x size: the GPU's own speed (its clocks),
    apart from the host (None on the CPU)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    a = torch.ones(size, size, dtype=torch.bfloat16, device=dev)

    def products():
        for _ in range(n):
            torch.mm(a, a)

    return _once_ms(dev, products) * 1e3


def _once_ms(dev, fn) -> float:
    """One timing of fn with CUDA events, no warm-up (a probe's state is the point): calibrate's Timer."""
    from executor.calibrate import Timer

    return Timer(dev, repeats=1, warmup=0).ms(fn)


def cpu_steal_ms() -> float | None:
    """CPU time the hypervisor gave to other guests, summed over this machine's CPUs since boot (/proc/stat's
    `steal`; None where there is no such file): a virtual machine's host that is busy elsewhere shows here."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) * 1000.0 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_probe(device) -> dict:
    return {"host_loop_us": round(host_loop_us(), 1), "launch_us": _round(launch_us(device)),
            "gpu_us": _round(gpu_us(device)), "h2d_gbps": h2d_gbps(device), "steal_ms": cpu_steal_ms()}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def steal_during(probes: list[dict], end: float | None) -> None:
    """Turn each probe's cumulative `steal_ms` into the steal during its run (up to the next probe, the last one up
    to `end`, a reading taken after it), in place."""
    marks = [p.get("steal_ms") for p in probes] + [end]
    for p, a, b in zip(probes, marks, marks[1:]):
        p["steal_ms"] = round(b - a, 1) if a is not None and b is not None else None
