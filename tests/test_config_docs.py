"""docs/configuration.md is generated from the Settings dataclass and must match it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from gpuwatch.config import Settings
from gpuwatch.config_docs import config_reference

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_committed_configuration_reference_is_up_to_date() -> None:
    assert PAGE.exists(), "docs/configuration.md is missing: run python scripts/gen-config-docs.py"
    assert PAGE.read_text() == config_reference(), (
        "docs/configuration.md is out of date with gpuwatch/config.py: run python scripts/gen-config-docs.py"
    )


def test_every_setting_is_documented_with_its_variable() -> None:
    text = config_reference()
    for f in fields(Settings):
        assert f.metadata.get("doc"), f"setting {f.name} has no doc metadata"
        assert f"| `{f.name}` | `GPUWATCH_{f.name.upper()}` |" in text
