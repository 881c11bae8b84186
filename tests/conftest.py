"""Shared test fixtures (keep minimal)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_TRACES = REPO / "data" / "traces"
_CANDIDATES = [Path(os.environ["PUBLIC_TRACES"])] if os.environ.get("PUBLIC_TRACES") else []
_CANDIDATES += [REPO.parent / "shared" / "data" / "public-traces", REPO / "shared" / "data" / "public-traces"]
PUBLIC_TRACES = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])


@pytest.fixture
def public_traces() -> Path:
    """The public source files ($PUBLIC_TRACES, ../shared/data/public-traces or shared/data/public-traces); tests
    that need them skip where they are absent (the embedded copies in data/traces are tested everywhere)."""
    if not PUBLIC_TRACES.is_dir():
        pytest.skip(f"public traces not found at {PUBLIC_TRACES}")
    return PUBLIC_TRACES


@pytest.fixture
def embedded_traces() -> Path:
    return EMBEDDED_TRACES


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (OpenMP spin-waiting on a shared 2-core machine makes tiny matmuls
    erratic); use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
