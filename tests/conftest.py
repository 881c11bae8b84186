"""Shared test fixtures (keep minimal)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_TRACES = REPO / "data" / "traces"
PUBLIC_TRACES = REPO.parent / "shared" / "data" / "public-traces"


@pytest.fixture
def public_traces() -> Path:
    """The public source files (../shared/data/public-traces); tests that need them skip where they are absent."""
    if not PUBLIC_TRACES.is_dir():
        pytest.skip(f"public traces not found at {PUBLIC_TRACES}")
    return PUBLIC_TRACES


@pytest.fixture
def embedded_traces() -> Path:
    return EMBEDDED_TRACES
