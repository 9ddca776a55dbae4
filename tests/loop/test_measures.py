"""The eval summary's measurements: nearest-rank percentiles, tokens/s, cost per 1,000."""

from __future__ import annotations

import pytest

from modelsmith.gpu.named_engines import EnginePrices
from modelsmith.loop.eval.measures import measure, percentile
from modelsmith.rpc.schema.evals import ScenarioResult


def _result(latency: float | None, prompt: int | None, completion: int | None) -> ScenarioResult:
    return ScenarioResult(
        scenario_id="s", set="core", domain="d", tags=[], weight=1.0, scenario_hash="h",
        prompt="p", response="r", reference=None, score=1.0, passed=True, pass_mark=0.5,
        judge_error=False, criteria=[], finish_reason="stop", completion_tokens=completion,
        latency_s=latency, prompt_tokens=prompt)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 50) == 10.0
    assert percentile(values, 95) == 19.0
    assert percentile([3.0], 95) == 3.0
    assert percentile([], 50) is None


def test_measures_of_answers_with_and_without_reports() -> None:
    results = [_result(1.0, 100, 10), _result(3.0, 100, 30), _result(None, None, None)]
    m = measure(results, EnginePrices(usd_per_mtok_in=2.0, usd_per_mtok_out=10.0))
    assert (m.latency_p50_s, m.latency_p95_s) == (1.0, 3.0)
    assert m.tokens_per_s == 10.0  # 40 tokens over 4 s
    # per answer: 100 x $2 + 20 (mean) x $10 per million -> $0.0004; x 1000
    assert m.cost_per_1k_scenarios_usd == pytest.approx(0.4)
    assert measure(results, EnginePrices(usd_per_mtok_in=2.0)).cost_per_1k_scenarios_usd is None
    assert measure(results, None).cost_per_1k_scenarios_usd is None
    empty = measure([_result(None, None, None)], None)
    assert (empty.latency_p50_s, empty.tokens_per_s) == (None, None)
