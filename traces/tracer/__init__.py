"""Tracer for Hugging Face transformers MoE models: hooks on router modules, prefill + decode recording."""

from traces.tracer.capture import LayerCapture, RouterCapture
from traces.tracer.routers import RouterSite, find_routers

__all__ = ["LayerCapture", "RouterCapture", "RouterSite", "find_routers"]
