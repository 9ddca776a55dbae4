"""Named engines (``[engines.NAME]`` in modelsmith.toml) against real local HTTP servers.

The servers are small threaded ``http.server``s on real sockets, standing in for an
OpenAI-compatible API at the process boundary: each answers by a script (429 then 200, 500
always, slow 200s) and records when each request came and how many were in flight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import msgspec
import pytest
import structlog

from modelsmith.daemon.config import DaemonConfig, engines_reference, load_daemon_config
from modelsmith.errors import EngineError, NotFound, ValidationError, error_envelope
from modelsmith.gpu.engine import Engine, EngineState, Sampling
from modelsmith.gpu.named_engines import EnginePrices, NamedEngines, UnknownEngine
from modelsmith.gpu.openai_engine import retry_after_seconds

GREEDY = Sampling(temperature=0.0, max_tokens=8)
ENGINES_DOC = Path(__file__).resolve().parents[2] / "docs" / "engines.md"

Answer = tuple[int, dict[str, str], bytes]


def chat_answer(text: str = "ok") -> Answer:
    body = {"choices": [{"message": {"content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 1}}
    return 200, {}, json.dumps(body).encode()


@dataclass
class ScriptedServer:
    """An OpenAI-shaped HTTP server: GET /v1/models answers 200; each POST gets
    ``script(n, headers)`` for the n-th POST (from 0), after ``work_s`` of simulated work."""

    script: Callable[[int, dict[str, str]], Answer]
    work_s: float = 0.0
    post_times: list[float] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: one connection per request
            def log_message(self, format: str, *args: object) -> None:
                pass  # the test reads what it needs from the server's records

            def reply(self, answer: Answer) -> None:
                status, headers, body = answer
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self.reply((200, {}, b'{"object": "list", "data": [{"id": "m"}]}'))

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with server.lock:
                    index = len(server.post_times)
                    server.post_times.append(time.monotonic())
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.work_s)  # the server's simulated work, in its own thread
                    answer = server.script(index, dict(self.headers.items()))
                finally:
                    with server.lock:
                        server.in_flight -= 1
                self.reply(answer)

        return Handler


@contextmanager
def serve(script: Callable[[int, dict[str, str]], Answer], *, work_s: float = 0.0
          ) -> Iterator[ScriptedServer]:
    server = ScriptedServer(script, work_s=work_s)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), server.handler())
    httpd.daemon_threads = True
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, name="scripted-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def write_config(home: Path, body: str) -> DaemonConfig:
    home.mkdir(parents=True, exist_ok=True)
    (home / "modelsmith.toml").write_text(body)
    return load_daemon_config(None, home)


def openai_section(name: str, url: str, **extra: object) -> str:
    lines = [f"[engines.{name}]", 'kind = "openai"', f'url = "{url}"', 'model = "m"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def running(named: NamedEngines) -> AsyncIterator[NamedEngines]:
    async with anyio.create_task_group() as tg:
        await tg.start(named.run)
        yield named
        tg.cancel_scope.cancel()


async def ready(named: NamedEngines, name: str) -> Engine:
    engine = named.get(name)
    await engine.wait_ready(timeout=10)
    return engine


# -- config --------------------------------------------------------------------------------
def test_engines_are_read_from_modelsmith_toml_by_kind(tmp_path: Path) -> None:
    config = write_config(tmp_path, openai_section(
        "frontier", "https://api.example.com/v1", api_key_env="FRONTIER_KEY",
        max_concurrency=8, usd_per_mtok_in=2.5, usd_per_mtok_out=10.0)
        + '[engines.local-7b]\nkind = "vllm"\nmodel = "models/base"\nmax_model_len = 2048\n')
    named = NamedEngines.from_config(config, home=tmp_path)
    assert named.names() == ["frontier", "local-7b"]
    assert named.kind("frontier") == "openai" and named.kind("local-7b") == "vllm"
    assert named.max_concurrency("frontier") == 8
    assert named.max_concurrency("local-7b") is None  # in-process vLLM: everything at once
    assert named.prices("frontier") == EnginePrices(2.5, 10.0)
    assert named.prices("frontier").cost_usd(1_000_000, 100_000) == pytest.approx(3.5)
    assert named.prices("local-7b").cost_usd(10, 10) is None
    spec = named.vllm_specs()["local-7b"]
    assert spec.model == (tmp_path / "models" / "base").resolve()
    assert spec.key == f"vllm:{spec.model}" and spec.max_model_len == 2048


@pytest.mark.parametrize(("body", "field"), [
    (openai_section("x", "http://h", max_retries=-1), "engines.x.max_retries"),
    ('[engines.x]\nkind = "openai"\nmodel = "m"\n', "engines.x.url"),
    ('[engines.x]\nkind = "vllm"\nmodel = "m"\nurl = "http://h"\n', "engines.x.url"),
    ('[engines.x]\nkind = "ollama"\n', "engines.x"),
    (openai_section("Bad_Name", "http://h"), "engines"),
    (openai_section("x", "http://h", api_key_env="sk-not-a-variable-name"),
     "engines.x.api_key_env"),
])
def test_a_bad_engine_section_is_refused_naming_file_and_field(
    tmp_path: Path, body: str, field: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        write_config(tmp_path, body)
    assert refused.value.data["file"] == str(tmp_path / "modelsmith.toml")
    assert refused.value.data["field"] == field
    assert f"field {field!r}" in refused.value.message


def test_an_unknown_name_is_not_found_listing_the_known_engines(tmp_path: Path) -> None:
    named = NamedEngines.from_config(
        write_config(tmp_path, openai_section("a", "http://h") + openai_section("b", "http://h")),
        home=tmp_path)
    with pytest.raises(UnknownEngine) as unknown:
        named.get("gpt-9")
    assert isinstance(unknown.value, NotFound) and unknown.value.code == NotFound.code
    assert unknown.value.data == {"engine": "gpt-9", "known": ["a", "b"]}


def test_docs_engines_md_tables_every_engine_field() -> None:
    assert engines_reference() in ENGINES_DOC.read_text(), (
        "docs/engines.md is stale: paste `python -c 'from modelsmith.daemon.config import "
        "engines_reference; print(engines_reference())'` between its markers")


@pytest.mark.parametrize(("header", "seconds"), [
    ("3", 3.0), (" 0.5 ", 0.5), ("-4", 0.0), ("soon", None), (None, None), ("nan", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: retry now
])
def test_retry_after_is_read_as_seconds_or_an_http_date(
    header: str | None, seconds: float | None
) -> None:
    assert retry_after_seconds(header) == seconds


def test_retry_after_as_a_future_http_date_is_the_time_until_it() -> None:
    from email.utils import formatdate

    wait = retry_after_seconds(formatdate(time.time() + 30, usegmt=True))
    assert wait is not None and 28 <= wait <= 30


# -- requests against local servers --------------------------------------------------------
async def test_a_429_with_retry_after_is_retried_once_after_the_delay(tmp_path: Path) -> None:
    def script(n: int, _: dict[str, str]) -> Answer:
        return (429, {"Retry-After": "1"}, b'{"error": "slow down"}') if n == 0 else chat_answer()

    with serve(script) as server:
        named = NamedEngines.from_config(write_config(tmp_path, openai_section("api", server.url)),
                                         home=tmp_path)
        async with running(named):
            engine = await ready(named, "api")
            with anyio.fail_after(30):
                answer = await engine.generate("CTR?", GREEDY)
    assert answer.text == "ok"
    assert (answer.prompt_tokens, answer.completion_tokens, answer.token_count) == (7, 1, 1)
    assert answer.ttft_s is None  # not streamed
    assert answer.latency_s is not None and answer.latency_s >= 0.9  # the retry's wait counts
    assert len(server.post_times) == 2
    assert server.post_times[1] - server.post_times[0] >= 0.9


async def test_a_server_failing_with_500_gives_engine_error_after_max_retries(
    tmp_path: Path,
) -> None:
    with serve(lambda n, _: (500, {}, b'{"error": "boom"}')) as server:
        named = NamedEngines.from_config(
            write_config(tmp_path, openai_section("api", server.url, max_retries=2)),
            home=tmp_path)
        async with running(named):
            engine = await ready(named, "api")
            with anyio.fail_after(30), pytest.raises(EngineError) as failed:
                await engine.generate("CTR?", GREEDY)
    assert failed.value.code == EngineError.code
    assert failed.value.data == {"engine": "api", "status": 500, "attempts": 3}
    assert len(server.post_times) == 3


async def test_a_client_error_is_not_retried(tmp_path: Path) -> None:
    with serve(lambda n, _: (400, {}, b'{"error": "bad request"}')) as server:
        named = NamedEngines.from_config(write_config(tmp_path, openai_section("api", server.url)),
                                         home=tmp_path)
        async with running(named):
            engine = await ready(named, "api")
            with anyio.fail_after(30), pytest.raises(EngineError) as failed:
                await engine.generate("CTR?", GREEDY)
    assert failed.value.data["status"] == 400 and failed.value.data["attempts"] == 1
    assert len(server.post_times) == 1


async def test_an_unreachable_url_gives_engine_error(tmp_path: Path) -> None:
    named = NamedEngines.from_config(
        write_config(tmp_path, openai_section("down", closed_port_url(), max_retries=1)),
        home=tmp_path)
    async with running(named):
        engine = named.get("down")
        with pytest.raises(EngineError) as not_ready:
            await engine.wait_ready(timeout=1.5)
        assert "ConnectError" in (engine.info().last_error or "")
        with pytest.raises(EngineError):
            await engine.generate("CTR?", GREEDY)
    assert not_ready.value.data["engine"] == "down"


async def test_a_server_that_goes_away_gives_engine_error_after_connect_retries(
    tmp_path: Path,
) -> None:
    with contextlib.ExitStack() as server_running:
        server = server_running.enter_context(serve(lambda n, _: chat_answer()))
        named = NamedEngines.from_config(
            write_config(tmp_path, openai_section("api", server.url, max_retries=1)),
            home=tmp_path)
        async with running(named):
            engine = await ready(named, "api")
            assert (await engine.generate("CTR?", GREEDY)).text == "ok"
            server_running.close()  # still warm: the next health probe is seconds away
            with anyio.fail_after(30), pytest.raises(EngineError) as failed:
                await engine.generate("CTR?", GREEDY)
            assert engine.info().state is EngineState.DEAD
    assert failed.value.data == {"engine": "api", "reason": "connect", "attempts": 2}


async def test_max_concurrency_bounds_the_requests_in_flight_at_the_server(
    tmp_path: Path,
) -> None:
    with serve(lambda n, _: chat_answer(f"answer {n}"), work_s=0.05) as server:
        named = NamedEngines.from_config(
            write_config(tmp_path, openai_section("api", server.url, max_concurrency=2)),
            home=tmp_path)
        async with running(named):
            engine = await ready(named, "api")
            with anyio.fail_after(60):
                seen = [index async for index, _ in engine.generate_many(
                    [f"prompt {n}" for n in range(12)], GREEDY)]

                async def one() -> None:
                    await engine.generate("alone", GREEDY)

                # Separate callers share the same bound (the limiter is the engine's own).
                async with anyio.create_task_group() as tg:
                    for _ in range(6):
                        tg.start_soon(one)
    assert sorted(seen) == list(range(12))
    assert len(server.post_times) == 18
    assert server.max_in_flight == 2


async def test_the_api_key_is_sent_but_never_written_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-modelsmith-test-7f3a9c2e51d84b06"
    monkeypatch.setenv("MS_TEST_API_KEY", key)
    seen_keys: set[str] = set()

    def script(n: int, headers: dict[str, str]) -> Answer:
        seen_keys.add(headers.get("Authorization", ""))
        if n % 3 == 0:
            return 429, {"Retry-After": "0"}, b'{"error": "rate limited"}'
        if n % 3 == 1:  # a server that echoes the credential back in its error
            return 401, {}, json.dumps({"error": f"bad key {headers.get('Authorization')}"}).encode()
        return chat_answer()

    home = tmp_path / "home"
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log requests at debug level
    texts: list[str] = []
    with serve(script) as server, structlog.testing.capture_logs() as events:
        named = NamedEngines.from_config(write_config(home, openai_section(
            "api", server.url, api_key_env="MS_TEST_API_KEY", max_retries=1)), home=home)
        async with running(named):
            engine = await ready(named, "api")
            for _ in range(3):
                try:
                    answer = await engine.generate("CTR?", GREEDY)
                    texts.append(msgspec.json.encode(answer).decode())
                except EngineError as exc:
                    texts += [str(exc), repr(exc), json.dumps(error_envelope(exc))]
            texts.append(repr(engine.info()))
        (home / "errors.txt").write_text("\n".join(texts))  # as a result file would hold them
        offline = NamedEngines.from_config(write_config(home, openai_section(
            "api", closed_port_url(), api_key_env="MS_TEST_API_KEY")), home=home)
        async with running(offline):
            with pytest.raises(EngineError) as down:  # a server that cannot be reached
                await offline.get("api").wait_ready(timeout=1)
        texts += [str(down.value), json.dumps(error_envelope(down.value))]
    assert seen_keys == {f"Bearer {key}"}
    assert any(event["event"] == "engine request retried" for event in events)
    assert any("bad key Bearer ***" in text for text in texts)  # the echo is masked
    written = [path.read_text(errors="replace") for path in home.rglob("*") if path.is_file()]
    logged = [caplog.text, *(repr(event) for event in events)]
    for text in [*written, *logged, *texts]:
        assert key not in text
