"""Where a chunk group's host issue time goes on a GPU machine: `python -m executor.issue_bench [--n 2000]`.

Times, per call, the parts `_CudaCopier.copy_group` is made of (event creation, event record, a stream waiting on
an event, the driver copy, `Tensor.copy_` under a stream switch) on one expert-sized pinned buffer, so that the
runtime's measured per-group issue cost (`host_copy_issue_ms / copy_issues`) can be split. Prints one JSON line
(microseconds per call, median of 5 rounds)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv=None) -> int:
    import torch

    from executor.buffers import chunk_ranges
    from executor.transfer import Transfer, _CudaCopier, driver_memcpy, issue_chunk_copies

    ap = argparse.ArgumentParser(prog="python -m executor.issue_bench")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--numel", type=int, default=3 * 2048 * 768, help="elements of one expert (default Qwen3's)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("executor.issue_bench: needs a CUDA GPU (it times the copy stream's issue path)", file=sys.stderr)
        return 2
    dev = torch.device("cuda", torch.cuda.current_device())
    src = torch.randn(args.numel).to(torch.bfloat16).pin_memory()
    dst = torch.empty(args.numel, dtype=torch.bfloat16, device=dev)
    s = torch.cuda.Stream(device=dev)
    guard = torch.cuda.Event()
    guard.record()
    memcpy = driver_memcpy()
    t = Transfer((0, 0), src, dst, src.numel() * 2, chunk_ranges(args.numel, 3), high=True, speculative=False,
                 cached=True, seq=0, guards=[guard])
    tiny = Transfer((0, 1), src[:256], dst[:256], 512, [(0, 256)], high=True, speculative=False, cached=True, seq=1)
    copiers = {api: _CudaCopier(dev, 1, threaded=False, api=api) for api in ("driver", "torch")}

    def ev_create():
        torch.cuda.Event(enable_timing=True)

    def ev_create_record():
        torch.cuda.Event(enable_timing=True).record(s)

    def wait_event():
        s.wait_event(guard)

    def driver_copy_tiny():
        issue_chunk_copies(memcpy, tiny, 0, 1, s.cuda_stream)

    def torch_copy_tiny():
        with torch.cuda.stream(s):
            tiny.dst.copy_(tiny.src, non_blocking=True)

    def stream_switch():
        with torch.cuda.stream(s):
            pass

    def group(api, c0, c1, big=False):
        cp = copiers[api]
        tr = t if big else tiny
        return lambda: cp.copy_group(0, tr, c0, c1)

    parts = {"event_create": ev_create, "event_create_record": ev_create_record, "stream_wait_event": wait_event,
             "stream_switch": stream_switch, "driver_copy_256_elems": driver_copy_tiny,
             "torch_copy_256_elems": torch_copy_tiny,
             "group_driver_tiny_guarded": group("driver", 0, 1), "group_torch_tiny_guarded": group("torch", 0, 1),
             "group_driver_3_chunks_guarded": group("driver", 0, 3, True),
             "group_torch_3_chunks_guarded": group("torch", 0, 3, True),
             "group_driver_1_chunk": group("driver", 1, 2, True), "group_torch_1_chunk": group("torch", 1, 2, True)}
    out = {}
    for name, fn in parts.items():
        n = args.n if "3_chunks" not in name and "1_chunk" not in name else max(50, args.n // 20)
        rounds = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            rounds.append((time.perf_counter() - t0) / n * 1e6)
            torch.cuda.synchronize()
        out[name] = round(statistics.median(rounds), 2)
    print(json.dumps({"us_per_call": out, "cpu_threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
