"""A real ``vllm serve`` process on the tiny model, for tests whose daemons restart often.

The daemon's OpenAI-compatible engine talks to it over HTTP, so a daemon restart costs no engine
load. Runtime LoRA loading is on (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), as the engine needs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SERVE_TIMEOUT_S = 400.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class VllmServer:
    url: str
    model: str
    process: subprocess.Popen[bytes]
    log_path: Path


@contextlib.contextmanager
def vllm_serve(model_dir: Path, log_dir: Path, *, max_model_len: int = 256,
               served_name: str | None = None) -> Iterator[VllmServer]:
    """Serve ``model_dir``; its model name is ``served_name`` (``--served-model-name``) when
    given, else the directory as vLLM names it. ``log_dir`` gets ``vllm-serve-PORT.log``."""
    port = free_port()
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TRANSFORMERS_OFFLINE": "1"}
    log_path = log_dir / f"vllm-serve-{port}.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--enable-lora", "--max-lora-rank", "8",
               "--max-loras", "4", "--max-model-len", str(max_model_len), "--enforce-eager",
               "--dtype", "float32", *(["--served-model-name", served_name] if served_name else [])]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while True:  # the server's only readiness signal is its HTTP answer
            if process.poll() is not None:
                raise AssertionError(f"vllm serve exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vllm serve not ready in {SERVE_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield VllmServer(url=url, model=served_name or str(model_dir), process=process,
                         log_path=log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
