"""Shared, heavy fixtures for the gpu/ tests: one tiny model per session, one warm vLLM engine."""

from __future__ import annotations

import os

# Never reach a model hub, whatever a library tries: set before transformers or vLLM is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest

from modelsmith.gpu.tinymodel import build_tiny_model

ADTECH_CORPUS: tuple[str, ...] = (
    "What is the click-through rate of a campaign with 40 clicks and 2000 impressions? 0.02",
    "The bid floor for the premium display inventory is 1.25 USD CPM.",
    "Budget pacing spreads a daily budget of 500 USD evenly across 24 hours.",
    "Conversion rate equals conversions divided by clicks.",
    "A second-price auction charges the winner the second highest bid plus one cent.",
    "Frequency capping limits a user to 3 impressions per day for this line item.",
    'Return JSON: {"campaign": "spring-sale", "status": "paused", "cpm": 2.5}',
    "Viewability requires 50% of pixels in view for at least one second.",
    "Which channel performs best: search, display or video? Answer with one word.",
    "Effective CPM is revenue divided by impressions times 1000.",
)


@pytest.fixture(scope="session")
def corpus() -> tuple[str, ...]:
    return ADTECH_CORPUS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama + tokenizer built once per session (read-only for tests: copy to mutate)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", ADTECH_CORPUS * 4)
