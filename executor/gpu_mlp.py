"""learned_mlp's networks evaluated on the GPU, for the executor's runs.

Why: the numpy forward pass is most of a prediction's host time in a run. On the H200 host a call took 212-272 us
in the copy-bound suite (docs/executor.md, Status session 12) against 160-170 us in the calibration's tight loop:
the layer's other host work evicts the network's 1 MB of weights and numpy's code between calls, and each numpy
call then costs about 5 us. On the GPU one CUDA graph per network does the whole call: it copies the input row from
pinned memory, runs the two layers and the skip path, sorts the experts by score and copies the order back; the
host writes the row, replays the graph on a stream of its own and waits for its event.

Same networks (the predictor's own weights, float32) and the same ranking as `LearnedMLPPredictor.predict` for one
row: softmax is monotonic, so sorting the logits (stable, descending: ties by lower id, as `rank_counts`) orders the
experts as the numpy path's softmax scores do, except where two logits are so close that float rounding orders
them differently on the two devices. A batch of several rows (prefill, batch sizes above 1) runs eagerly on the
same stream: softmax per row, summed, sorted (the sum's rounding may order two nearly equal experts differently
from numpy's). Layers without a network go through the numpy path. On the CPU (tests) the same torch code runs
eagerly.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from predictors.base import Prediction
from predictors.learned_mlp import LearnedMLPPredictor


def _best_first(scores: torch.Tensor) -> torch.Tensor:
    """Expert ids by score, best first, ties by lower id (as `rank_counts`)."""
    return torch.sort(scores, descending=True, stable=True).indices


def _forward(net: dict, x: torch.Tensor) -> torch.Tensor:
    """`predictors._torchfit.forward` in torch: the logits of x's rows."""
    if "mu" in net:
        x = (x - net["mu"]) / net["sigma"]
    h = torch.relu(x @ net["w1"] + net["b1"]) if "w1" in net else x
    y = h @ net["w2"] + net["b2"]
    if "ws" in net:
        y = y + x @ net["ws"]
    return y


class _Graphed:
    """One network: pinned input row -> device -> logits -> expert order -> pinned output, as one CUDA graph
    (eager torch on the CPU)."""

    def __init__(self, net: dict, device: torch.device, stream):
        self.device = device
        self.net = {k: torch.as_tensor(np.asarray(v, dtype=np.float32), device=device) for k, v in net.items()}
        width = self.net["w1" if "w1" in self.net else "w2"].shape[0]
        cuda = device.type == "cuda"
        self.x_host = torch.zeros((1, width), dtype=torch.float32, pin_memory=cuda)
        self.x_np = self.x_host.numpy()
        self.order_host = torch.zeros(self.net["b2"].shape[0], dtype=torch.int64, pin_memory=cuda)
        self.order_np = self.order_host.numpy()
        self.graph = None
        self.stream = stream
        if cuda:
            self.x_dev = torch.zeros((1, width), dtype=torch.float32, device=device)
            self.done = torch.cuda.Event()
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up before the capture (lazy initialisations happen here, not in it)
                    self._body()
            stream.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the runtime's main thread may poll its copy events while its predictor thread captures
            with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
                self._body()
            stream.synchronize()

    def _body(self) -> None:
        self.x_dev.copy_(self.x_host, non_blocking=True)
        self.order_host.copy_(_best_first(_forward(self.net, self.x_dev)[0]), non_blocking=True)

    def order(self, x: np.ndarray) -> np.ndarray:
        """The experts of this network's layer, best first, for one input row."""
        self.x_np[...] = x
        if self.graph is None:
            return _best_first(_forward(self.net, torch.from_numpy(self.x_np))[0]).numpy().copy()
        with torch.cuda.stream(self.stream):
            self.graph.replay()
            self.done.record(self.stream)
        self.done.synchronize()
        return self.order_np.copy()

    def order_rows(self, x: np.ndarray) -> np.ndarray:
        """The experts by the network's softmax summed over several rows (a prefill batch), best first: eager
        kernels on the same stream (the row count varies from call to call)."""
        with torch.cuda.stream(self.stream) if self.graph is not None else contextlib.nullcontext():
            xt = torch.from_numpy(np.array(x, dtype=np.float32)).to(self.device)  # (a writable copy: views are not)
            scores = torch.softmax(_forward(self.net, xt), dim=1).sum(dim=0)
            return _best_first(scores).cpu().numpy()


class GpuLearnedMLP(LearnedMLPPredictor):
    """A fitted LearnedMLPPredictor whose predictions run on `device` (see the module docstring). Every network is
    put on the device (and its graph captured) when the runtime is built, not in a timed run, and shared by every
    runtime of one predictor object (`for_device`)."""

    def predict(self, view, distance, future=None) -> Prediction:
        net = self.net_for(view.layer, distance)  # (raises for a distance without networks)
        if net is None:  # a layer without training rows: the numpy path's empty prediction
            return super().predict(view, distance, future)
        g = self._graphed[id(net)]
        x = self.mlp_input(view, distance)
        experts = g.order(x) if len(x) == 1 else g.order_rows(x)
        return Prediction(experts, np.empty(0))  # (the prefetcher reads the order only)

    @classmethod
    def for_device(cls, predictor: LearnedMLPPredictor, device) -> GpuLearnedMLP:
        """`predictor` (fitted) with its predictions on `device`; the same object for the same predictor
        and device, so its graphs are captured once per run group."""
        cache = predictor.__dict__.setdefault("_gpu_backends", {})
        device = torch.device(device)
        gpu = cache.get(str(device))
        if gpu is None:
            gpu = cls.__new__(cls)
            gpu.__dict__.update({k: v for k, v in predictor.__dict__.items() if k != "_gpu_backends"})
            gpu._device = device
            gpu._stream = torch.cuda.Stream(device=device, priority=-1) if device.type == "cuda" else None
            # by network (net_for finds it; the predictor's dict holds every network, so their ids stay theirs)
            gpu._graphed = {id(net): _Graphed(net, device, gpu._stream) for net in predictor._nets.values()}
            cache[str(device)] = gpu
        return gpu


def on_device(predictor, device):
    """The predictor the runtime should call: learned_mlp itself (not a subclass with other scores) on `device`
    via GpuLearnedMLP; any other predictor unchanged."""
    if type(predictor) is LearnedMLPPredictor:
        return GpuLearnedMLP.for_device(predictor, device)
    return predictor
