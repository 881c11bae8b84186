"""The SimPy model: link (copy engines), GPU compute stream (layer loop), prefetcher, metrics, batch schedule."""

from sim.engine.core import Simulation
from sim.engine.metrics import COUNT_NAMES, METRIC_NAMES

__all__ = ["COUNT_NAMES", "METRIC_NAMES", "Simulation"]
