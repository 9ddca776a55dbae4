"""An :class:`~modelsmith.gpu.engine.Engine` over any OpenAI-compatible HTTP server.

For comparing against an external server (``vllm serve``, another box) or a frontier API. It
sends chat messages to ``/v1/chat/completions``: the server applies its own chat template (with
the request's ``chat_template_kwargs``, which vLLM servers accept as an extra field). The
``model`` field is the served model's name (``[engine] model``; ``--served-model-name``), or a
named adapter, as ``vllm serve --lora-modules name=path`` expects; a model the server does not
serve (its 404) is an EngineError naming it.

Resources and their handling: :meth:`OpenAIEngine.run` owns the HTTP client (closed, shielded
and time-bounded, when it is cancelled) and checks ``GET /v1/models`` periodically: the engine
is warm while the server answers and dead while it does not. At most ``concurrency`` requests
are in flight (a capacity limiter held across a request's retries, so a rate-limited server sees
fewer). A request is retried up to ``max_retries`` times after HTTP 429, a 5xx, or a failure to
connect, waiting an exponential backoff with jitter, or the server's ``Retry-After`` (seconds or
an HTTP date), capped at ``retry_max_delay``; every other failure is an EngineError at once, and
one that is still failing after the retries is an EngineError with ``attempts`` in its data.

The API key is read from the environment variable ``api_key_env`` names for each request and
goes only into that request's ``Authorization`` header: it is never stored on the engine,
logged, or put in an error (server text quoted in an error has it masked).
"""

from __future__ import annotations

import email.utils
import math
import os
import random
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import structlog

from modelsmith.errors import ConflictError, EngineError, NotFound, ValidationError
from modelsmith.gpu.engine import (
    Completion,
    EngineInfo,
    EngineLifecycle,
    EngineState,
    PromptInput,
    Sampling,
    TokenCompletion,
    generate_concurrently,
)
from modelsmith.gpu.prompting import messages_for

__all__ = ["OpenAIEngine", "retry_after_seconds"]

log = structlog.get_logger("modelsmith.engines")

_BODY_EXCERPT = 300
_MASK = "***"


def _retryable(status: int) -> bool:
    return status == 429 or 500 <= status <= 599


def retry_after_seconds(value: str | None) -> float | None:
    """The wait a ``Retry-After`` header asks for (delay-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class OpenAIEngine:
    """An Engine that talks to an OpenAI-compatible server at ``base_url``.

    ``base_url`` is the server's root or its ``/v1`` URL. ``api_key_env`` names the environment
    variable holding a bearer token (read at each request, never stored). At most
    ``concurrency`` requests are in flight at once; each attempt may take ``request_timeout``
    seconds; ``max_retries``, ``retry_backoff`` (the first backoff, doubled each retry) and
    ``retry_max_delay`` shape the retries (module docstring).
    """

    kind = "openai"

    def __init__(
        self,
        name: str,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        concurrency: int = 32,
        request_timeout: float = 300.0,
        connect_timeout: float = 10.0,
        max_retries: int = 3,
        retry_backoff: float = 0.5,
        retry_max_delay: float = 60.0,
        health_interval: float = 10.0,
        health_timeout: float = 5.0,
    ) -> None:
        if concurrency < 1:
            raise ValidationError("concurrency must be >= 1", data={"field": "concurrency"})
        if max_retries < 0:
            raise ValidationError("max_retries must be >= 0", data={"field": "max_retries"})
        self.name = name
        self.model = model
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else f"{root}/v1"
        self._api_key_env = api_key_env
        self._concurrency = concurrency
        self._timeout = httpx.Timeout(request_timeout, connect=connect_timeout)
        self._max_retries = max_retries
        self._retry_backoff = retry_backoff
        self._retry_max_delay = retry_max_delay
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._health_interval = health_interval
        self._health_timeout = health_timeout
        self._lifecycle = EngineLifecycle(name)
        self._client: httpx.AsyncClient | None = None
        self._adapters: dict[str, Path] = {}
        self._load_seconds: float | None = None
        self._restarts = 0

    # -- status ---------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        """A snapshot of the engine (no pid: the server is not our process)."""
        return EngineInfo(
            name=self.name,
            model=self.model,
            kind=self.kind,
            state=self._lifecycle.state,
            load_seconds=self._load_seconds,
            restarts=self._restarts,
            adapters=sorted(self._adapters),
            last_error=self._lifecycle.last_error,
        )

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109 (the Engine contract)
        """Return once the server answers; EngineError if it does not within ``timeout``."""
        await self._lifecycle.wait_ready(timeout)

    async def health(self) -> bool:
        """True when ``GET /v1/models`` answers 200 within the health timeout."""
        return await self._probe() is None

    async def _probe(self) -> str | None:
        """None when the server is healthy, else why not."""
        client = self._client
        if client is None:
            return "engine is not running"
        try:
            headers = self._auth_headers()
            with anyio.fail_after(self._health_timeout):
                response = await client.get("/models", headers=headers)
        except EngineError as exc:
            return exc.message
        except TimeoutError:
            return f"no answer from {self.base_url}/models within {self._health_timeout:g} s"
        except httpx.HTTPError as exc:
            return f"{self.base_url}/models: {type(exc).__name__}: {self._masked(str(exc))}"
        if response.status_code != 200:
            return f"{self.base_url}/models answered HTTP {response.status_code}"
        return None

    # -- generation -----------------------------------------------------------------------
    async def generate(
        self, prompt: PromptInput, sampling: Sampling, *, adapter: str | None = None
    ) -> Completion:
        """One chat completion; EngineError on any transport or server failure."""
        self._lifecycle.require(EngineState.WARM)
        model = self._model_for(adapter)
        body: dict[str, Any] = {
            "model": model,
            "messages": messages_for(prompt),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.chat_template_kwargs:
            # vLLM's OpenAI server passes this extra field to the model's chat template.
            body["chat_template_kwargs"] = dict(sampling.chat_template_kwargs)
        payload, latency_s = await self._post("/chat/completions", body)
        try:
            choice = payload["choices"][0]
            message = choice["message"]
            text = message["content"] or ""
            # vLLM under --reasoning-parser sends the thinking apart (older: reasoning_content).
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            finish_reason = str(choice.get("finish_reason") or "stop")
            usage = payload.get("usage") or {}
            completion_tokens = _optional_int(usage.get("completion_tokens"))
            prompt_tokens = _optional_int(usage.get("prompt_tokens"))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise EngineError(
                f"engine {self.name!r}: unexpected completion shape from {self.base_url}",
                data={"engine": self.name, "reason": "bad_response"},
            ) from exc
        if not isinstance(text, str) or not isinstance(reasoning, str | None):
            raise EngineError(
                f"engine {self.name!r}: completion content is not text",
                data={"engine": self.name, "reason": "bad_response"},
            )
        return Completion(
            text=text,
            token_count=completion_tokens or 0,
            finish_reason=finish_reason,
            reasoning=reasoning,
            latency_s=latency_s,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    async def generate_tokens(
        self, prompt_text: str, sampling: Sampling, *, adapter: str | None = None
    ) -> TokenCompletion:
        """One ``/v1/completions`` answer to exact model text, with token log-probabilities.

        Token ids come from vLLM's ``return_tokens_as_token_ids`` extension ("token_id:N");
        a server that does not honour it is an EngineError (the canary cannot be checked).
        """
        self._lifecycle.require(EngineState.WARM)
        body: dict[str, Any] = {
            "model": self._model_for(adapter),
            "prompt": prompt_text,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        payload, _ = await self._post("/completions", body)
        try:
            choice = payload["choices"][0]
            text = str(choice["text"])
            logprobs = choice["logprobs"]
            token_ids = [int(str(token).removeprefix("token_id:")) for token in logprobs["tokens"]]
            token_logprobs = [float(value) for value in logprobs["token_logprobs"]]
            finish_reason = str(choice.get("finish_reason") or "stop")
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise EngineError(
                f"engine {self.name!r}: {self.base_url}/completions sent no token ids and "
                "log-probabilities",
                data={"engine": self.name, "reason": "bad_response"},
            ) from exc
        return TokenCompletion(
            text=text,
            token_ids=token_ids,
            token_logprobs=token_logprobs,
            finish_reason=finish_reason,
        )

    async def generate_many(
        self, prompts: Sequence[PromptInput], sampling: Sampling, *, adapter: str | None = None
    ) -> AsyncIterator[tuple[int, Completion]]:
        """All prompts at once, at most ``concurrency`` in flight; completion order."""
        self._lifecycle.require(EngineState.WARM)
        self._model_for(adapter)

        async def generate_one(prompt: PromptInput) -> Completion:
            return await self.generate(prompt, sampling, adapter=adapter)

        # generate() holds the engine's limiter, which also bounds concurrent callers.
        async for item in generate_concurrently(generate_one, prompts):
            yield item

    def _model_for(self, adapter: str | None) -> str:
        if adapter is None:
            return self.model
        if adapter not in self._adapters:
            raise NotFound(
                f"adapter {adapter!r} is not loaded in engine {self.name!r}",
                data={"engine": self.name, "adapter": adapter},
            )
        return adapter

    def _auth_headers(self) -> dict[str, str]:
        """The request's Authorization header, read from the environment now (never stored)."""
        if self._api_key_env is None:
            return {}
        api_key = os.environ.get(self._api_key_env)
        if not api_key:
            raise EngineError(
                f"engine {self.name!r}: environment variable {self._api_key_env} is not set",
                data={"engine": self.name, "reason": "api_key_missing", "env": self._api_key_env},
            )
        return {"Authorization": f"Bearer {api_key}"}

    def _masked(self, text: str) -> str:
        """``text`` (a server's answer, an exception's message) with the API key masked."""
        api_key = os.environ.get(self._api_key_env) if self._api_key_env else None
        return text.replace(api_key, _MASK) if api_key else text

    def _retry_delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            delay = retry_after
        else:
            # Exponential backoff with jitter, so callers rate-limited together spread out.
            delay = self._retry_backoff * 2 ** (retry - 1) * random.uniform(0.5, 1.0)
        return min(delay, self._retry_max_delay)

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[Any, float]:
        """POST JSON (retrying as the module docstring says): the parsed reply and the seconds
        from the first attempt to the answer."""
        client = self._client
        if client is None:
            raise EngineError(f"engine {self.name!r} is not running", data={"engine": self.name})
        async with self._limiter:
            started = time.monotonic()
            attempts = 0
            while True:
                attempts += 1
                retry_after: float | None = None
                failure: str | int = "connect"
                try:
                    response = await client.post(path, json=body, headers=self._auth_headers())
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    if attempts > self._max_retries:
                        reason = f"cannot connect to {self.base_url}: {self._masked(str(exc))}"
                        self._mark_dead(reason)
                        raise EngineError(
                            f"engine {self.name!r} {reason} (after {attempts} attempts)",
                            data={"engine": self.name, "reason": "connect", "attempts": attempts},
                        ) from exc
                except httpx.HTTPError as exc:
                    raise EngineError(
                        f"engine {self.name!r}: {type(exc).__name__} talking to {self.base_url}: "
                        f"{self._masked(str(exc))}",
                        data={"engine": self.name, "reason": "transport", "attempts": attempts},
                    ) from exc
                else:
                    if not _retryable(response.status_code) or attempts > self._max_retries:
                        break
                    failure = response.status_code
                    retry_after = retry_after_seconds(response.headers.get("retry-after"))
                delay = self._retry_delay(attempts, retry_after)
                log.info("engine request retried", engine=self.name, path=path, failure=failure,
                         attempt=attempts, delay_s=round(delay, 3))
                await anyio.sleep(delay)
            latency_s = time.monotonic() - started
        status = response.status_code
        if status == 404 and "model" in body:
            # What OpenAI-compatible servers answer for a model they do not serve.
            raise EngineError(
                f"engine {self.name!r}: {self.base_url} does not serve model {body['model']!r} "
                f"(HTTP 404: {self._excerpt(response)}); set [engine] model to a name that "
                f"{self.base_url}/models lists",
                data={"engine": self.name, "status": 404, "model": body["model"],
                      "attempts": attempts},
            )
        if status >= 400:
            retried = f" after {attempts} attempts" if attempts > 1 else ""
            raise EngineError(
                f"engine {self.name!r}: {self.base_url}{path} answered HTTP {status}{retried}: "
                f"{self._excerpt(response)}",
                data={"engine": self.name, "status": status, "attempts": attempts},
            )
        try:
            return response.json(), latency_s
        except ValueError as exc:
            raise EngineError(
                f"engine {self.name!r}: {self.base_url}{path} did not answer JSON",
                data={"engine": self.name, "reason": "bad_response"},
            ) from exc

    def _excerpt(self, response: httpx.Response) -> str:
        return self._masked(response.text[:_BODY_EXCERPT])

    def _mark_dead(self, reason: str) -> None:
        if self._lifecycle.state is EngineState.WARM:
            self._lifecycle.set(EngineState.DEAD, error=reason)

    # -- adapters -------------------------------------------------------------------------
    async def load_adapter(self, name: str, path: Path) -> None:
        """Make adapter ``name`` usable: load ``path`` through vLLM's runtime LoRA endpoint
        (the server needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), or accept it when the
        server already serves a model of that name (``--lora-modules``). ``path`` is a path on
        the server's machine."""
        self._lifecycle.require(EngineState.WARM)
        if self._adapters.get(name) == Path(path):
            return
        try:
            await self._post("/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        except EngineError as exc:
            if name not in await self._served_models():
                raise EngineError(
                    f"engine {self.name!r}: the server neither loaded adapter {name!r} nor "
                    f"serves it already: {exc.message}",
                    data={"engine": self.name, "adapter": name},
                ) from exc
        self._adapters[name] = Path(path)

    async def unload_adapter(self, name: str) -> None:
        """Unload adapter ``name`` from the server (best effort) and stop using it."""
        if self._adapters.pop(name, None) is None:
            raise NotFound(
                f"adapter {name!r} is not loaded in engine {self.name!r}",
                data={"engine": self.name, "adapter": name},
            )
        try:
            await self._post("/unload_lora_adapter", {"lora_name": name})
        except EngineError:
            pass  # a server started with --lora-modules keeps serving it; we no longer use it

    async def _served_models(self) -> set[str]:
        client = self._client
        if client is None:
            return set()
        try:
            response = await client.get("/models", headers=self._auth_headers())
            return {str(entry["id"]) for entry in response.json().get("data", [])}
        except (EngineError, httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return set()

    # -- memory ---------------------------------------------------------------------------
    async def sleep(self, level: int = 1) -> None:
        """A no-op: the server's accelerator memory is not this process's to release."""

    async def wake_up(self) -> None:
        """A no-op (see :meth:`sleep`)."""

    # -- the service ----------------------------------------------------------------------
    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the HTTP client and watch the server's health until cancelled."""
        if self._client is not None:
            raise ConflictError(f"engine {self.name!r} is running already")
        # No key here: each request reads it (a missing one keeps the engine from warming up).
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=self._timeout,
            limits=httpx.Limits(max_connections=self._concurrency + 2),
        )
        self._lifecycle.set(EngineState.LOADING)
        task_status.started()
        started = time.monotonic()
        try:
            await self._watch_health(started)
        finally:
            client, self._client = self._client, None
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await client.aclose()
            self._lifecycle.set(EngineState.COLD)

    async def _watch_health(self, started: float) -> None:
        # Probe quickly (with backoff) until the server answers, then every health_interval.
        retry_delay = self._retry_backoff
        while True:
            problem = await self._probe()
            state = self._lifecycle.state
            if problem is None:
                retry_delay = self._retry_backoff
                if state is not EngineState.WARM:
                    if self._load_seconds is None:
                        self._load_seconds = time.monotonic() - started
                    elif state is EngineState.DEAD:
                        self._restarts += 1
                    self._lifecycle.set(EngineState.WARM)
                await anyio.sleep(self._health_interval)
                continue
            if state is EngineState.WARM:
                self._lifecycle.set(EngineState.DEAD, error=problem)
            else:
                self._lifecycle.last_error = problem
            await anyio.sleep(min(retry_delay, self._health_interval))
            retry_delay *= 2


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
