"""Canaries: proof that an engine serves the adapter the trainer saved, not a stale one.

After training, the trainer writes ``<adapter>/canaries.json``: for a few training prompts, the
exact model text (after the chat template), the greedy completion, its token ids and each
token's log-probability under the trained adapter. After the adapter is loaded into an engine
(a hot load after training, a rollback, a daemon restart that loads the champion),
:func:`verify_canaries` replays every canary greedily through that engine: the token ids must be
equal and every token's log-probability within the file's ``tolerance``. Engines have served
stale adapters after a reload (a prefix cache kept across a same-name reload, a request
answered with another adapter); this check turns that into an error before an eval or a
promotion uses the adapter.

Outcomes (:class:`CanaryCheck`): ``verified``; ``unverified`` when there is nothing to check
against (no ``canaries.json``: adapters trained before canaries existed; or an engine that
cannot replay token log-probabilities), which is recorded but not a failure. A mismatch raises
:class:`~modelsmith.errors.EngineError` with ``data["reason"] == "canary_mismatch"`` naming the
canary (its ``scenario_id``) and what differed.

Tolerance: the file's own, as the trainer measured it (bf16 training vs. an fp16/bf16 engine
differs by about 1e-2 per token; float32 on the CPU by about 1e-4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import msgspec

from modelsmith.errors import EngineError, ValidationError
from modelsmith.gpu.engine import Engine, ReplaysTokens, Sampling

__all__ = [
    "CANARIES_FILE",
    "Canary",
    "CanaryCheck",
    "CanaryFile",
    "read_canaries",
    "verify_canaries",
    "write_canaries",
]

CANARIES_FILE = "canaries.json"
CANARY_FORMAT = 1


class Canary(msgspec.Struct, frozen=True, kw_only=True):
    """One greedy answer the trainer recorded under the adapter it saved."""

    scenario_id: str
    prompt_text: str  # exact model text, after the chat template
    completion_text: str
    completion_token_ids: list[int]
    token_logprobs: list[float]


class CanaryFile(msgspec.Struct, frozen=True, kw_only=True):
    """``canaries.json``: ``format`` 1."""

    format: int
    tolerance: float
    canaries: list[Canary]


@dataclass(frozen=True, slots=True)
class CanaryCheck:
    """What a verification found: ``verified`` or ``unverified`` (with why)."""

    status: Literal["verified", "unverified"]
    canaries: int = 0
    max_logprob_diff: float | None = None
    tolerance: float | None = None
    reason: str | None = None


_decoder = msgspec.json.Decoder(CanaryFile)


def read_canaries(adapter_dir: Path) -> CanaryFile | None:
    """The adapter's canaries; None when it has none; ValidationError when the file is bad."""
    path = Path(adapter_dir) / CANARIES_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        canaries = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise ValidationError(
            f"{path}: not a canaries file: {exc}", data={"file": str(path)}
        ) from exc
    if canaries.format != CANARY_FORMAT:
        raise ValidationError(
            f"{path}: canaries format {canaries.format} is not {CANARY_FORMAT}",
            data={"file": str(path), "field": "format"},
        )
    if not (math.isfinite(canaries.tolerance) and canaries.tolerance >= 0):
        raise ValidationError(
            f"{path}: tolerance must be a finite number >= 0",
            data={"file": str(path), "field": "tolerance"},
        )
    for canary in canaries.canaries:
        if len(canary.token_logprobs) != len(canary.completion_token_ids):
            raise ValidationError(
                f"{path}: canary {canary.scenario_id!r} has "
                f"{len(canary.completion_token_ids)} token ids but "
                f"{len(canary.token_logprobs)} log-probabilities",
                data={"file": str(path), "canary": canary.scenario_id},
            )
    return canaries


def write_canaries(adapter_dir: Path, canaries: CanaryFile) -> Path:
    """Write ``canaries.json`` into ``adapter_dir`` durably (what the trainer calls)."""
    from modelsmith.atomic import atomic_write_bytes

    path = Path(adapter_dir) / CANARIES_FILE
    atomic_write_bytes(path, msgspec.json.format(msgspec.json.encode(canaries), indent=2))
    return path


async def verify_canaries(engine: Engine, adapter: str, adapter_dir: Path) -> CanaryCheck:
    """Replay ``adapter_dir``'s canaries on ``engine`` through its loaded adapter ``adapter``.

    Returns ``verified`` or ``unverified`` (see the module docstring); raises EngineError
    (``reason`` "canary_mismatch") when the engine answers otherwise, and ValidationError when
    the canaries file is malformed.
    """
    canaries = await anyio.to_thread.run_sync(read_canaries, Path(adapter_dir))
    if canaries is None:
        return CanaryCheck(status="unverified", reason=f"no {CANARIES_FILE} in the adapter")
    if not canaries.canaries:
        return CanaryCheck(status="unverified", reason=f"{CANARIES_FILE} lists no canaries")
    if not isinstance(engine, ReplaysTokens):
        return CanaryCheck(
            status="unverified",
            reason=f"engine kind {getattr(engine, 'kind', type(engine).__name__)!r} cannot "
            "replay token log-probabilities",
        )
    worst = 0.0
    for canary in canaries.canaries:
        # Exactly as many tokens as were recorded: a longer answer is caught at its last token.
        sampling = Sampling(temperature=0.0, max_tokens=max(1, len(canary.completion_token_ids)))
        replay = await engine.generate_tokens(canary.prompt_text, sampling, adapter=adapter)
        base = {"adapter": adapter, "canary": canary.scenario_id, "reason": "canary_mismatch"}
        expected_ids = canary.completion_token_ids
        compared = len(canary.token_logprobs)
        if expected_ids and replay.token_ids != expected_ids:
            position = next(
                (i for i, (a, b) in enumerate(zip(replay.token_ids, expected_ids, strict=False))
                 if a != b),
                min(len(replay.token_ids), len(expected_ids)),
            )
            if _near_tie(replay.token_logprobs, canary.token_logprobs, position,
                         canaries.tolerance):
                # Two tokens this close in probability flip between a float32 trainer and a
                # bf16 engine; the prefix up to here is the proof, what follows differs anyway.
                compared = position + 1
            else:
                raise EngineError(
                    f"adapter {adapter!r} failed canary {canary.scenario_id!r}: the engine's "
                    f"greedy answer differs from the trainer's at token {position} "
                    f"({replay.text!r} instead of {canary.completion_text!r})",
                    data={**base, "mismatch": "tokens", "position": position},
                )
        if not expected_ids and replay.text != canary.completion_text:
            raise EngineError(
                f"adapter {adapter!r} failed canary {canary.scenario_id!r}: the engine answered "
                f"{replay.text!r} instead of {canary.completion_text!r}",
                data={**base, "mismatch": "text"},
            )
        if len(replay.token_logprobs) < compared:
            raise EngineError(
                f"adapter {adapter!r}: canary {canary.scenario_id!r} replay returned "
                f"{len(replay.token_logprobs)} log-probabilities, {len(canary.token_logprobs)} "
                "were recorded",
                data={**base, "mismatch": "logprob_count"},
            )
        for position, (got, want) in enumerate(
            zip(replay.token_logprobs[:compared], canary.token_logprobs[:compared], strict=False)
        ):
            diff = abs(got - want) if math.isfinite(got) and math.isfinite(want) else math.inf
            worst = max(worst, diff)
            if diff > canaries.tolerance:
                raise EngineError(
                    f"adapter {adapter!r} failed canary {canary.scenario_id!r}: token {position}'s "
                    f"log-probability is {got:.6f} in the engine, {want:.6f} in the trainer "
                    f"(tolerance {canaries.tolerance:g})",
                    data={**base, "mismatch": "logprob", "position": position,
                          "difference": diff, "tolerance": canaries.tolerance},
                )
    return CanaryCheck(
        status="verified",
        canaries=len(canaries.canaries),
        max_logprob_diff=worst,
        tolerance=canaries.tolerance,
    )


def _near_tie(got: list[float], want: list[float], position: int, tolerance: float) -> bool:
    """Whether the engine's and the trainer's different tokens at ``position`` were equally
    likely within ``tolerance`` (each under its own run): a numerical flip, not another adapter."""
    if position >= len(got) or position >= len(want):
        return False
    a, b = got[position], want[position]
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tolerance
