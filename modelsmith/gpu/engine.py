"""The inference engine contract: what the daemon and loop/ talk to, and its plain types.

An :class:`Engine` is a long-running service (``await tg.start(engine.run)``) that serves
generations for a model, optionally through a named LoRA adapter. Implementations:
:class:`modelsmith.gpu.vllm_engine.VllmEngine` (in-process vLLM ``AsyncLLM``) and
:class:`modelsmith.gpu.openai_engine.OpenAIEngine` (any OpenAI-compatible HTTP server).

This module imports neither vLLM nor torch: loop/ imports it freely.

Lifecycle (:class:`EngineState`)::

    cold ──run()──► loading ──► warm ◄──wake_up()── sleeping
                       ▲          │  └──sleep()──────►
                       │          ▼
                       └─backoff─ dead        (run() cancelled: back to cold)

Every failure an engine reports is a :class:`modelsmith.errors.EngineError` (NotFound for an
unknown adapter, ValidationError for a malformed prompt or sampling value).
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectSendStream

from modelsmith.errors import EngineError, ModelsmithError, ValidationError

__all__ = [
    "Completion",
    "Engine",
    "EngineInfo",
    "EngineLifecycle",
    "EngineState",
    "PromptInput",
    "ReplaysTokens",
    "Sampling",
    "TemplateValue",
    "TokenCompletion",
    "generate_concurrently",
]

PromptInput = str | Sequence[Mapping[str, str]]
"""A text prompt (one user message) or chat messages with 'role' and 'content'."""


class EngineState(enum.StrEnum):
    COLD = "cold"  # not started, or stopped cleanly
    LOADING = "loading"
    WARM = "warm"  # serving
    SLEEPING = "sleeping"  # memory released for a trainer; wake_up() before generating
    DEAD = "dead"  # failed; run() restarts it after a backoff


TemplateValue = bool | int | float | str
"""A value passed to a chat template as a keyword (``enable_thinking = false``)."""


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    """How to sample one completion. ``seed`` makes sampling at temperature > 0 repeatable.

    ``chat_template_kwargs`` travel with the request rather than the engine because one engine
    serves every cluster on the same base model, and each cluster chooses its own (for example
    ``{"enable_thinking": False}`` for Qwen3-style models).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    chat_template_kwargs: dict[str, TemplateValue] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValidationError("temperature must be >= 0", data={"field": "temperature"})
        if not (0 < self.top_p <= 1):
            raise ValidationError("top_p must be in (0, 1]", data={"field": "top_p"})
        if self.max_tokens < 1:
            raise ValidationError("max_tokens must be >= 1", data={"field": "max_tokens"})


class Completion(msgspec.Struct, frozen=True):
    """One generated answer. ``finish_reason`` is "stop" (eos or a stop string) or "length".

    ``reasoning`` is the reasoning text a server returned apart from the answer (vLLM's
    ``reasoning_content`` under a reasoning parser); None when it sent none.

    The measurements are None where an engine does not report them: ``latency_s`` is the time
    from sending the request to the whole answer (retries included, waiting for a concurrency
    slot not), ``ttft_s`` the time to the first token (only when the engine streams), and
    ``prompt_tokens`` / ``completion_tokens`` the server's own count (its ``usage``).
    """

    text: str
    token_count: int
    finish_reason: str
    reasoning: str | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class TokenCompletion(msgspec.Struct, frozen=True, kw_only=True):
    """A completion with its token ids and each sampled token's log-probability."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    finish_reason: str


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of an engine for status displays. ``pid`` is the engine-core process, if any;
    ``node`` and ``node_gpus`` say where Ray placed it (None and empty for a local engine)."""

    name: str
    model: str
    kind: str
    state: EngineState
    load_seconds: float | None = None
    restarts: int = 0
    adapters: list[str] = msgspec.field(default_factory=list)
    last_error: str | None = None
    pid: int | None = None
    node: str | None = None  # where a Ray-placed engine runs (modelsmith.gpu.ray_engine)
    node_gpus: list[str] = msgspec.field(default_factory=list)  # its GPU ids on that node


@runtime_checkable
class Engine(Protocol):
    """An inference engine. All methods raise EngineError when the engine cannot serve."""

    def info(self) -> EngineInfo:
        """A snapshot of the engine's state."""
        ...

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109 (the contract names it)
        """Return once the engine is warm; EngineError if it is not within ``timeout`` seconds."""
        ...

    async def generate(
        self, prompt: PromptInput, sampling: Sampling, *, adapter: str | None = None
    ) -> Completion:
        """One completion for ``prompt``, through ``adapter`` if named (NotFound if unknown)."""
        ...

    def generate_many(
        self, prompts: Sequence[PromptInput], sampling: Sampling, *, adapter: str | None = None
    ) -> AsyncIterator[tuple[int, Completion]]:
        """Completions for all ``prompts`` as ``(index, completion)`` in completion order.

        All prompts are submitted at once so the engine can batch them. The first failure is
        raised and the remaining requests are cancelled. Iterate it to the end or close it
        (``contextlib.aclosing``) so its requests are cancelled in the task that started them.
        """
        ...

    async def load_adapter(self, name: str, path: Path) -> None:
        """Make a LoRA adapter available as ``name`` without restarting the engine."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (NotFound if it is not loaded)."""
        ...

    async def sleep(self, level: int = 1) -> None:
        """Release accelerator memory (for a trainer); generation is refused until wake_up()."""
        ...

    async def wake_up(self) -> None:
        """Undo sleep()."""
        ...

    async def health(self) -> bool:
        """True when the engine is alive and answering (warm, or sleeping on purpose).

        Never raises."""
        ...

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled: report started at once (state loading), load in the
        background, restart after failures with exponential backoff, and release everything
        (shielded, time-bounded) when cancelled."""
        ...


@runtime_checkable
class ReplaysTokens(Protocol):
    """An engine that can answer a prompt given as exact model text, with log-probabilities.

    Used to replay a trainer's canaries after an adapter is hot-loaded
    (:mod:`modelsmith.gpu.canary`); an engine without it leaves the adapter "unverified".
    """

    async def generate_tokens(
        self, prompt_text: str, sampling: Sampling, *, adapter: str | None = None
    ) -> TokenCompletion:
        """One completion of ``prompt_text`` (no chat template applied), with token
        log-probabilities; EngineError when the engine cannot serve."""
        ...


class EngineLifecycle:
    """The state of one engine plus a way to wait for changes (shared by implementations).

    Lives on the event loop thread: state is only changed there, so no lock is needed.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = EngineState.COLD
        self.last_error: str | None = None
        self._changed: anyio.Event | None = None

    def set(self, state: EngineState, *, error: str | None = None) -> None:
        """Move to ``state``; ``error`` (if given) becomes ``last_error``. Wakes all waiters."""
        self.state = state
        if error is not None:
            self.last_error = error
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109 (the contract names it)
        """Return once warm; EngineError after ``timeout`` seconds or if the engine is stopped."""
        try:
            with anyio.fail_after(timeout):
                while self.state is not EngineState.WARM:
                    if self._changed is None:
                        self._changed = anyio.Event()
                    await self._changed.wait()
        except TimeoutError as exc:
            raise EngineError(
                f"engine {self.name!r} not ready after {timeout:g} s (state {self.state.value})"
                + (f": {self.last_error}" if self.last_error else ""),
                data={"engine": self.name, "state": self.state.value},
            ) from exc

    def require(self, wanted: EngineState = EngineState.WARM) -> None:
        """EngineError unless the engine is in state ``wanted``."""
        if self.state is not wanted:
            detail = f": {self.last_error}" if self.last_error else ""
            raise EngineError(
                f"engine {self.name!r} is {self.state.value}, not {wanted.value}{detail}",
                data={"engine": self.name, "state": self.state.value},
            )


_ResultSender = MemoryObjectSendStream[tuple[int, Completion | ModelsmithError]]


async def generate_concurrently(
    generate_one: Callable[[PromptInput], Awaitable[Completion]],
    prompts: Sequence[PromptInput],
    *,
    limit: int | None = None,
) -> AsyncIterator[tuple[int, Completion]]:
    """Run ``generate_one`` for every prompt at once (at most ``limit`` at a time, if given) and
    yield ``(index, completion)`` as each finishes: the body of ``Engine.generate_many``.

    The first failure cancels the other requests and is raised (a plain ModelsmithError, never an
    exception group). Other exceptions from ``generate_one`` are bugs and propagate as they are.
    """
    prompts = list(prompts)
    if not prompts:
        return
    limiter = anyio.CapacityLimiter(limit) if limit is not None else None
    send, receive = anyio.create_memory_object_stream[tuple[int, Completion | ModelsmithError]](
        max_buffer_size=len(prompts)
    )

    async def one(index: int, prompt: PromptInput, results: _ResultSender) -> None:
        async with results:
            try:
                if limiter is None:
                    outcome: Completion | ModelsmithError = await generate_one(prompt)
                else:
                    async with limiter:
                        outcome = await generate_one(prompt)
            except ModelsmithError as exc:
                outcome = exc
            # The buffer holds every result, so this never waits; the reader may have gone
            # (first failure, or the caller stopped iterating), and then the result is moot.
            with contextlib.suppress(anyio.BrokenResourceError):
                results.send_nowait((index, outcome))

    failure: ModelsmithError | None = None
    async with anyio.create_task_group() as tg, receive:
        async with send:
            for index, prompt in enumerate(prompts):
                tg.start_soon(one, index, prompt, send.clone())
        async for index, outcome in receive:
            if isinstance(outcome, ModelsmithError):
                failure = outcome
                tg.cancel_scope.cancel()
                break
            yield index, outcome
    if failure is not None:
        raise failure
