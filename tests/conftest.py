"""Fixtures shared by every test folder. Keep this small: heavy fixtures live next to their tests.

``tests/`` is on ``sys.path`` while pytest runs, so helpers import as ``support.<module>``
(see ``tests/support/daemon_process.py`` for the real-daemon helper).
"""

from __future__ import annotations

import os

# No test may reach a model hub, whatever a library tries: set before anything imports them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon_process import short_tmp_dir

# One daemon with a warm engine for the whole session, whichever modules use it.
pytest_plugins = ("support.cluster_daemon",)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh directory with a short path (Unix socket paths must stay under 108 bytes)."""
    with short_tmp_dir() as path:
        yield path
