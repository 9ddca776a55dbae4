"""Per-answer measurements of an eval, summarised: latency percentiles, tokens/s and cost.

Each result carries what its engine reported (:class:`~modelsmith.gpu.engine.Completion`):
``latency_s``, ``ttft_s``, ``prompt_tokens``, ``completion_tokens`` (None where unreported).
Over an eval's answers (every trial of every scenario):

- ``latency_p50_s`` / ``latency_p95_s``: nearest-rank percentiles of ``latency_s``;
- ``tokens_per_s``: completion tokens over the summed latencies of the answers that report
  both (the speed one request sees, not the engine's batched throughput);
- ``cost_per_1k_scenarios_usd``: the mean cost of one answer (prompt and completion tokens at
  the engine's prices) times 1,000; None without both prices or without token counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from modelsmith.gpu.engine import Completion
from modelsmith.gpu.named_engines import EnginePrices
from modelsmith.rpc.schema.evals import ScenarioResult

__all__ = ["EvalMeasures", "measure", "percentile", "with_measures"]


class EvalMeasures(msgspec.Struct, frozen=True, kw_only=True):
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    tokens_per_s: float | None = None
    cost_per_1k_scenarios_usd: float | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def measure(results: Sequence[ScenarioResult], prices: EnginePrices | None) -> EvalMeasures:
    """The summary's measurements of ``results`` (see the module doc)."""
    latencies = [r.latency_s for r in results if r.latency_s is not None]
    timed = [(r.completion_tokens, r.latency_s) for r in results
             if r.completion_tokens is not None and r.latency_s is not None]
    seconds = sum(latency for _, latency in timed)
    tokens_per_s = round(sum(tokens for tokens, _ in timed) / seconds, 3) if seconds > 0 else None
    cost = None
    if prices is not None and prices.known:
        costs = [prices.cost_usd(r.prompt_tokens, r.completion_tokens) for r in results
                 if r.prompt_tokens is not None and r.completion_tokens is not None]
        known = [c for c in costs if c is not None]
        if known:
            cost = round(sum(known) / len(known) * 1000, 6)
    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
    return EvalMeasures(
        latency_p50_s=round(p50, 4) if p50 is not None else None,
        latency_p95_s=round(p95, 4) if p95 is not None else None,
        tokens_per_s=tokens_per_s,
        cost_per_1k_scenarios_usd=cost,
    )


def with_measures(result: ScenarioResult, completion: Completion) -> ScenarioResult:
    """``result`` with what the engine reported for its answer."""
    return msgspec.structs.replace(
        result, latency_s=completion.latency_s, ttft_s=completion.ttft_s,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=(completion.completion_tokens if completion.completion_tokens is not None
                           else result.completion_tokens))
