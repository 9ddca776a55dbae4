"""docs/configuration.md is generated from the config models and must match them."""

from __future__ import annotations

from pathlib import Path

from modelsmith.clients.commands_config import config_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_configuration_reference_is_what_the_models_generate() -> None:
    assert DOC.read_text(encoding="utf-8").strip() == config_reference().strip(), (
        "docs/configuration.md is stale: run `modelsmith config docs > docs/configuration.md`")
