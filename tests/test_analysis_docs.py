"""The generated configuration reference is up to date, and the README's links and figure exist."""

from __future__ import annotations

import re
from pathlib import Path

from analysis import config_reference

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_up_to_date():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == config_reference.render(), (
        "docs/configuration.md is stale: run `python -m analysis.config_reference > docs/configuration.md`")


def test_configuration_reference_covers_every_key():
    from sim.config import RunConfig, known_keys

    internal = {n for n, f in RunConfig.model_fields.items() if f.exclude}  # base_dir, source_file
    text = config_reference.render()
    for key in known_keys() - internal:
        assert f"`{key}`" in text, key


def test_readme_links_resolve():
    for doc in ("README.md", "docs/CONTRIBUTING.md", "docs/hardware-profiles.md"):
        text = (ROOT / doc).read_text()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if target.startswith("http"):
                continue
            assert ((ROOT / doc).parent / target).exists(), f"{doc}: broken link {target}"


def test_readme_has_the_two_setup_commands_and_the_figure():
    text = (ROOT / "README.md").read_text()
    assert "bash scripts/main.sh" in text and "bash scripts/test.sh" in text
    assert "docs/figures/hit_rate_qwen3.png" in text
    assert (ROOT / "docs" / "figures" / "hit_rate_qwen3.png").read_bytes()[:4] == b"\x89PNG"
