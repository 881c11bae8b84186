"""Cache eviction policies, one module each, registered by name (see base.py for the hooks)."""

from sim.policies import belady, fifo, lfu, libcachesim_adapter, lru, static  # noqa: F401  (register)
from sim.policies.base import (
    Key,
    Policy,
    available_policies,
    make_policy,
    policy_class,
    register_policy,
)

__all__ = ["Key", "Policy", "available_policies", "make_policy", "policy_class", "register_policy"]
