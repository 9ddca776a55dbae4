"""bench/gpu_check.py passes its own CPU dry run (the same flow as on a CUDA box)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelsmith.gpu.vllm_engine import cpu_engine_env

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def test_the_gpu_check_dry_run_trains_sleeps_wakes_and_verifies_the_hot_load() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True,
                          text=True, timeout=900, env=cpu_engine_env(), check=False)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert lines[-1] == "gpu_check: ok"
    assert any(line.startswith("trainer ") and "cpu float32" in line for line in lines)
    assert any(line.startswith("sleep/wake ") and "exercised" in line for line in lines)
    assert any(line.startswith("adapter hot-load ") and "canaries" in line for line in lines)
