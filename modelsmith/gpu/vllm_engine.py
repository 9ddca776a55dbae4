"""In-process vLLM: an :class:`~modelsmith.gpu.engine.Engine` over ``AsyncLLM``.

Resources and their handling:

- The engine core is a child process that vLLM starts with spawn (code that builds an engine
  must be import-safe: the ``if __name__ == "__main__":`` guard). Building ``AsyncLLM`` blocks
  for ~15 s while that process loads the model, so it is built in a worker thread
  (``anyio.to_thread.run_sync``): the event loop keeps serving meanwhile. That works because
  vLLM's async client binds its asyncio queue and zmq sockets to a loop lazily, on first use on
  the loop thread, and starts its output handler on the first request.
- A dead engine core (crash, OOM kill) is noticed by vLLM's monitor thread; :meth:`run` watches
  the flag it sets, marks the engine dead, fails every request in flight with EngineError, and
  rebuilds the engine after an exponential backoff. Adapters that were loaded are loaded again.
- Cancelling :meth:`run` shuts the engine down shielded and time-bounded (the engine core
  process is gone afterwards). A build in progress is waited for and then shut down, so a
  cancelled load never leaks a process.

Prompts are rendered with the model's own chat template (:mod:`modelsmith.gpu.prompting`),
exactly as the trainer renders them.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from modelsmith.errors import ConflictError, EngineError, ModelsmithError, NotFound, ValidationError
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
from modelsmith.gpu.prompting import load_tokenizer, render_prompt

__all__ = ["VllmEngine", "cpu_engine_env"]

# On CPU the KV cache is plain RAM: 1 GiB is plenty for tiny models and small batches.
_CPU_KVCACHE_GIB = "1"
# A vLLM deployment must not phone home, least of all from a test.
_PRIVACY_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def cpu_engine_env() -> dict[str, str]:
    """The process environment for running vLLM on a CPU in tests and benchmarks.

    A copy of ``os.environ`` plus: a small KV cache (unless one is set), hub access off, usage
    statistics off. Pass it as ``env=`` to a subprocess, or ``os.environ.update()`` with it.
    """
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", _CPU_KVCACHE_GIB)
    env.update(_PRIVACY_ENV)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


class _ConfigurationError(Exception):
    """vLLM refused the engine arguments: rebuilding would fail the same way."""


@dataclass
class _LoadedAdapter:
    int_id: int
    path: Path


class VllmEngine:
    """An Engine running vLLM's ``AsyncLLM`` in this process (its engine core in a child).

    ``enforce_eager=None`` means eager on CPU (no graph capture there) and vLLM's default on a
    GPU. ``restart_backoff`` is the first delay before rebuilding a dead engine; it doubles up
    to ``max_restart_backoff`` and resets once an engine has stayed up for a minute.
    """

    kind = "vllm"

    def __init__(
        self,
        name: str,
        model_dir: Path,
        *,
        max_model_len: int = 2048,
        max_lora_rank: int = 16,
        max_loras: int = 4,
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        enforce_eager: bool | None = None,
        restart_backoff: float = 1.0,
        max_restart_backoff: float = 60.0,
        shutdown_timeout: float = 30.0,
        watch_interval: float = 0.25,
        extra_engine_args: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.model_dir = Path(model_dir)
        self._engine_args: dict[str, Any] = {
            "model": str(self.model_dir),
            "max_model_len": max_model_len,
            "enable_lora": True,
            "max_lora_rank": max_lora_rank,
            "max_loras": max_loras,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "seed": seed,
            "disable_log_stats": True,
            # e.g. a Ray executor and pipeline stages (modelsmith.gpu.ray_engine)
            **(extra_engine_args or {}),
        }
        self._enforce_eager = enforce_eager
        self._restart_backoff = restart_backoff
        self._max_restart_backoff = max_restart_backoff
        self._shutdown_timeout = shutdown_timeout
        self._watch_interval = watch_interval
        self._lifecycle = EngineLifecycle(name)
        self._llm: Any = None  # vllm AsyncLLM while one exists
        self._tokenizer: Any = None
        self._load_seconds: float | None = None
        self._restarts = 0
        self._running = False
        self._adapters: dict[str, _LoadedAdapter] = {}
        self._adapter_ids = itertools.count(1)
        self._request_ids = itertools.count()

    # -- status ---------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        """A snapshot: state, load time, restarts, adapters, last error, engine-core pid."""
        return EngineInfo(
            name=self.name,
            model=str(self.model_dir),
            kind=self.kind,
            state=self._lifecycle.state,
            load_seconds=self._load_seconds,
            restarts=self._restarts,
            adapters=sorted(self._adapters),
            last_error=self._lifecycle.last_error,
            pid=_engine_core_pid(self._llm),
        )

    async def wait_ready(self, timeout: float) -> None:  # noqa: ASYNC109 (the Engine contract)
        """Return once warm; EngineError if not warm within ``timeout`` seconds."""
        await self._lifecycle.wait_ready(timeout)

    async def health(self) -> bool:
        """True when the engine core is alive and answers a request within 5 s."""
        llm = self._llm
        if llm is None or self._lifecycle.state not in (EngineState.WARM, EngineState.SLEEPING):
            return False
        try:
            with anyio.fail_after(5):
                await llm.check_health()
                await llm.list_loras()  # a round trip to the engine core process
        except Exception:
            return False
        return not llm.errored

    # -- generation -----------------------------------------------------------------------
    async def generate(
        self, prompt: PromptInput, sampling: Sampling, *, adapter: str | None = None
    ) -> Completion:
        """One completion; EngineError if the engine is not warm or dies meanwhile."""
        self._lifecycle.require(EngineState.WARM)
        llm, tokenizer = self._llm, self._tokenizer
        lora_request = self._lora_request(adapter)
        text = render_prompt(
            tokenizer, prompt, chat_template_kwargs=sampling.chat_template_kwargs
        )
        started = time.monotonic()
        final = await self._complete(llm, text, _sampling_params(sampling), lora_request)
        latency = time.monotonic() - started
        choice = final.outputs[0]
        prompt_ids = getattr(final, "prompt_token_ids", None)
        return Completion(
            text=choice.text,
            token_count=len(choice.token_ids),
            finish_reason=str(choice.finish_reason or "abort"),
            # Submit to the final output; no ttft: the request is not streamed (FINAL_ONLY).
            latency_s=latency,
            prompt_tokens=len(prompt_ids) if prompt_ids is not None else None,
            completion_tokens=len(choice.token_ids),
        )

    async def generate_tokens(
        self, prompt_text: str, sampling: Sampling, *, adapter: str | None = None
    ) -> TokenCompletion:
        """One completion of exact model text (no chat template), with each sampled token's
        log-probability (the canary replay of :mod:`modelsmith.gpu.canary`)."""
        self._lifecycle.require(EngineState.WARM)
        lora_request = self._lora_request(adapter)
        params = _sampling_params(sampling, logprobs=True)
        choice = (await self._complete(self._llm, prompt_text, params, lora_request)).outputs[0]
        token_ids = [int(token) for token in choice.token_ids]
        logprobs: list[float] = []
        for token, alternatives in zip(token_ids, choice.logprobs or [], strict=False):
            logprobs.append(float(alternatives[token].logprob))
        return TokenCompletion(
            text=choice.text,
            token_ids=token_ids,
            token_logprobs=logprobs,
            finish_reason=str(choice.finish_reason or "abort"),
        )

    async def _complete(self, llm: Any, text: str, params: Any, lora_request: Any) -> Any:
        """Run one request to its end; the final RequestOutput (with at least one output)."""
        request_id = f"{self.name}-{next(self._request_ids)}-{uuid.uuid4().hex[:8]}"
        final: Any = None
        try:
            # The text already holds the template's special tokens (a bos among them): tokenised
            # without adding any, as vLLM's chat endpoint and the trainer's canaries do.
            token_ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
            (engine_input,) = await llm.renderer.render_cmpl_async(
                [{"prompt_token_ids": list(token_ids)}]
            )
            async for output in llm.generate(
                engine_input, params, request_id, lora_request=lora_request
            ):
                final = output
        except ModelsmithError:
            raise
        except Exception as exc:
            raise self._wrap_failure(llm, exc) from exc
        if final is None or not final.outputs:
            raise EngineError(
                f"engine {self.name!r} returned no output", data={"engine": self.name}
            )
        return final

    async def generate_many(
        self, prompts: Sequence[PromptInput], sampling: Sampling, *, adapter: str | None = None
    ) -> AsyncIterator[tuple[int, Completion]]:
        """All prompts submitted at once (vLLM batches them); results in completion order."""
        self._lifecycle.require(EngineState.WARM)
        self._lora_request(adapter)  # an unknown adapter fails before anything is submitted
        generate_one = functools.partial(self._generate_one, sampling=sampling, adapter=adapter)
        async for item in generate_concurrently(generate_one, prompts):
            yield item

    async def _generate_one(
        self, prompt: PromptInput, *, sampling: Sampling, adapter: str | None
    ) -> Completion:
        return await self.generate(prompt, sampling, adapter=adapter)

    def _wrap_failure(self, llm: Any, exc: Exception) -> EngineError:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError) or getattr(llm, "errored", False):
            self._mark_dead(llm, "engine core process died")
            return EngineError(
                f"engine {self.name!r} died while generating; it is being restarted",
                data={"engine": self.name, "reason": "dead"},
            )
        if isinstance(exc, VLLMClientError):
            return EngineError(
                f"engine {self.name!r} rejected the request: {exc}",
                data={"engine": self.name, "reason": "rejected"},
            )
        return EngineError(
            f"engine {self.name!r} failed: {type(exc).__name__}: {exc}",
            data={"engine": self.name, "reason": "failed"},
        )

    def _mark_dead(self, llm: Any, reason: str) -> None:
        # Only the current engine's death matters; a replaced one may still report late.
        if llm is self._llm and self._lifecycle.state is not EngineState.DEAD:
            self._lifecycle.set(EngineState.DEAD, error=reason)

    # -- adapters -------------------------------------------------------------------------
    def _lora_request(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        loaded = self._adapters.get(adapter)
        if loaded is None:
            raise NotFound(
                f"adapter {adapter!r} is not loaded in engine {self.name!r}",
                data={"engine": self.name, "adapter": adapter},
            )
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter, loaded.int_id, str(loaded.path))

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load a PEFT adapter directory as ``name`` into the running engine (no restart).

        Loading the same name and path again is a no-op; a new path for a known name replaces
        the old adapter (under a new vLLM id, since vLLM caches adapters by id).
        """
        path = await anyio.to_thread.run_sync(_adapter_directory, Path(path))
        current = self._adapters.get(name)
        if current is not None and current.path == path:
            return
        self._lifecycle.require(EngineState.WARM)
        llm = self._llm
        loaded = _LoadedAdapter(next(self._adapter_ids), path)
        await self._add_lora(llm, name, loaded)
        self._adapters[name] = loaded
        if current is not None:
            await self._remove_lora(llm, current.int_id)

    async def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name``; NotFound if it is not loaded."""
        loaded = self._adapters.pop(name, None)
        if loaded is None:
            raise NotFound(
                f"adapter {name!r} is not loaded in engine {self.name!r}",
                data={"engine": self.name, "adapter": name},
            )
        if self._lifecycle.state in (EngineState.WARM, EngineState.SLEEPING):
            await self._remove_lora(self._llm, loaded.int_id)

    async def _add_lora(self, llm: Any, name: str, loaded: _LoadedAdapter) -> None:
        from vllm.lora.request import LoRARequest

        try:
            await llm.add_lora(LoRARequest(name, loaded.int_id, str(loaded.path)))
        except Exception as exc:
            raise EngineError(
                f"engine {self.name!r} could not load adapter {name!r}: {exc}",
                data={"engine": self.name, "adapter": name, "file": str(loaded.path)},
            ) from exc

    async def _remove_lora(self, llm: Any, int_id: int) -> None:
        try:
            await llm.remove_lora(int_id)
        except Exception as exc:
            raise EngineError(
                f"engine {self.name!r} could not unload an adapter: {exc}",
                data={"engine": self.name},
            ) from exc

    # -- memory ---------------------------------------------------------------------------
    async def sleep(self, level: int = 1) -> None:
        """Release accelerator memory (real on CUDA, a no-op in effect on CPU)."""
        if self._lifecycle.state is EngineState.SLEEPING:
            return
        self._lifecycle.require(EngineState.WARM)
        try:
            await self._llm.sleep(level)
        except Exception as exc:
            raise self._wrap_failure(self._llm, exc) from exc
        self._lifecycle.set(EngineState.SLEEPING)

    async def wake_up(self) -> None:
        """Undo :meth:`sleep`; a warm engine stays warm."""
        if self._lifecycle.state is EngineState.WARM:
            return
        self._lifecycle.require(EngineState.SLEEPING)
        try:
            await self._llm.wake_up()
        except Exception as exc:
            raise self._wrap_failure(self._llm, exc) from exc
        self._lifecycle.set(EngineState.WARM)

    # -- the service ----------------------------------------------------------------------
    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled (see the module docstring for the resource handling)."""
        if self._running:
            raise ConflictError(f"engine {self.name!r} is running already")
        self._running = True
        self._lifecycle.set(EngineState.LOADING)
        task_status.started()
        backoff = self._restart_backoff
        try:
            while True:
                warm_since: float | None = None
                try:
                    await self._start_engine()
                    warm_since = time.monotonic()
                    await self._wait_engine_dead()
                except _ConfigurationError as exc:
                    await self._stop_engine()
                    self._lifecycle.set(EngineState.DEAD, error=f"bad engine arguments: {exc}")
                    await anyio.sleep_forever()  # retrying cannot help; stays dead until stopped
                except Exception as exc:
                    self._lifecycle.set(
                        EngineState.DEAD, error=f"load failed: {type(exc).__name__}: {exc}"
                    )
                await self._stop_engine()
                if warm_since is not None and time.monotonic() - warm_since > 60:
                    backoff = self._restart_backoff
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, self._max_restart_backoff)
                self._restarts += 1
                self._lifecycle.set(EngineState.LOADING)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._shutdown_timeout):
                await self._stop_engine()
            self._lifecycle.set(EngineState.COLD)
            self._running = False

    async def _start_engine(self) -> None:
        started = time.monotonic()
        # Not abandoned on cancel: a cancelled load waits for the build, and the finally in
        # run() then shuts the finished engine down instead of leaking its process.
        await anyio.to_thread.run_sync(self._build_engine_blocking)
        llm = self._llm
        for name, loaded in list(self._adapters.items()):
            try:
                await self._add_lora(llm, name, loaded)
            except EngineError as exc:
                # The adapter directory went away while the engine was down: forget it.
                del self._adapters[name]
                self._lifecycle.last_error = exc.message
        self._load_seconds = time.monotonic() - started
        self._lifecycle.set(EngineState.WARM)

    def _build_engine_blocking(self) -> None:
        """Build AsyncLLM (blocks ~15 s); runs in a worker thread."""
        for key, value in _PRIVACY_ENV.items():
            os.environ.setdefault(key, value)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", _CPU_KVCACHE_GIB)
        enforce_eager = on_cpu if self._enforce_eager is None else self._enforce_eager
        try:
            args = AsyncEngineArgs(
                **self._engine_args,
                enforce_eager=enforce_eager,
                enable_sleep_mode=current_platform.is_sleep_mode_available(),
            )
            config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        except Exception as exc:
            raise _ConfigurationError(f"{type(exc).__name__}: {exc}") from exc
        tokenizer = load_tokenizer(self.model_dir)
        self._tokenizer = tokenizer
        self._llm = AsyncLLM.from_vllm_config(config, disable_log_stats=True)

    async def _wait_engine_dead(self) -> None:
        # vLLM's own monitor thread flags a dead engine core but offers nothing to await;
        # polling that flag is cheap and needs no thread of ours parked on the process.
        llm = self._llm
        while not llm.errored and self._lifecycle.state is not EngineState.DEAD:  # noqa: ASYNC110
            await anyio.sleep(self._watch_interval)
        self._mark_dead(llm, "engine core process exited unexpectedly")

    async def _stop_engine(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        shutdown = functools.partial(llm.shutdown, timeout=self._shutdown_timeout)
        # Abandoned on cancel so that run()'s time bound holds; the thread still finishes.
        await anyio.to_thread.run_sync(shutdown, abandon_on_cancel=True)


def _sampling_params(sampling: Sampling, *, logprobs: bool = False) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    try:
        return SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            output_kind=RequestOutputKind.FINAL_ONLY,
            # 0: the sampled token's own log-probability, no alternatives.
            logprobs=0 if logprobs else None,
        )
    except ValueError as exc:
        raise ValidationError(
            f"sampling refused by vLLM: {exc}", data={"field": "sampling"}
        ) from exc


def _adapter_directory(path: Path) -> Path:
    path = path.resolve()
    if not (path / "adapter_config.json").is_file():
        raise NotFound(f"no PEFT adapter at {path}", data={"file": str(path)})
    return path


def _engine_core_pid(llm: Any) -> int | None:
    try:
        processes = llm.engine_core.resources.engine_manager.processes
        pid = processes[0].pid
    except (AttributeError, IndexError, TypeError):
        return None
    return pid if isinstance(pid, int) else None
