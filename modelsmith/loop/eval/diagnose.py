"""Diagnose: group an eval's failures into patterns an agent or operator can act on.

A pattern is (failing criterion type, kind of failure), e.g. ``json / wrong_format`` or
``numeric / out_of_tolerance``; scenarios whose answer was empty or a refusal, and judge
failures, form their own patterns. Patterns are ranked by the score they lost, then by count,
and carry a few examples (response against reference).

With repeated trials a scenario that failed every trial is a consistent failure (patterns are
built from those, one answer each); one that passed some trials and failed others is *flaky*
and listed apart with its pass rate: it needs a steadier answer, not a new skill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from modelsmith.errors import NotFound
from modelsmith.loop.cluster.fleet import ClusterRuntime
from modelsmith.loop.eval.aggregate import trial_stats
from modelsmith.rpc.schema.evals import ScenarioResult
from modelsmith.rpc.schema.train import Diagnosis, FailureExample, FailurePattern

EXAMPLES_PER_PATTERN = 3
EXAMPLE_CHARS = 300


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= EXAMPLE_CHARS:
        return text
    return text[: EXAMPLE_CHARS - 1] + "…"


@dataclass
class _Bucket:
    criterion: str
    kind: str
    lost: float = 0.0
    ids: list[str] = field(default_factory=list)
    tags: dict[str, int] = field(default_factory=dict)
    examples: list[FailureExample] = field(default_factory=list)


def classify(result: ScenarioResult) -> list[tuple[str, str, str]]:
    """(criterion type, kind, detail) for each way this scenario failed."""
    if result.judge_error:
        return [("llm_judge", "judge_failure", "the judge's reply could not be parsed")]
    failing = [c for c in result.criteria if not c.passed]
    kinds = {c.error_kind for c in failing}
    if "refusal_or_empty" in kinds or not result.response.strip():
        return [("any", "refusal_or_empty", "empty answer or refusal")]
    if not failing:
        return [("rubric", "below_pass_mark", f"score {result.score:.2f} < pass mark {result.pass_mark:.2f}")]
    return [(c.type, c.error_kind or "wrong_value", c.detail) for c in failing]


def diagnose(cluster: str, tag: str, results: Sequence[ScenarioResult], *, near_miss_margin: float = 0.05) -> Diagnosis:
    stats = trial_stats(results)
    flaky = set(stats.flaky)
    failed: list[ScenarioResult] = []
    seen: set[str] = set()
    for r in sorted(results, key=lambda x: (x.scenario_id, x.trial)):
        if not r.passed and r.scenario_id not in flaky and r.scenario_id not in seen:
            seen.add(r.scenario_id)
            failed.append(r)
    buckets: dict[tuple[str, str], _Bucket] = {}
    by_tag: dict[str, int] = {}
    for r in failed:
        for tag_name in r.tags:
            by_tag[tag_name] = by_tag.get(tag_name, 0) + 1
        ways = classify(r)
        for criterion, kind, detail in ways:
            bucket = buckets.setdefault((criterion, kind), _Bucket(criterion, kind))
            bucket.lost += r.weight * (1.0 - r.score) / len(ways)
            bucket.ids.append(r.scenario_id)
            for tag_name in r.tags:
                bucket.tags[tag_name] = bucket.tags.get(tag_name, 0) + 1
            if len(bucket.examples) < EXAMPLES_PER_PATTERN:
                bucket.examples.append(FailureExample(
                    scenario_id=r.scenario_id, score=r.score, detail=detail,
                    response=_clip(r.response) or "", reference=_clip(r.reference)))
    patterns = [
        FailurePattern(
            pattern=f"{b.criterion}/{b.kind}", criterion=b.criterion, kind=b.kind, count=len(b.ids),
            lost_score=round(b.lost, 4), tags=dict(sorted(b.tags.items(), key=lambda kv: -kv[1])),
            scenario_ids=sorted(b.ids), examples=b.examples,
        )
        for b in buckets.values()
    ]
    patterns.sort(key=lambda p: (-p.lost_score, -p.count, p.pattern))
    near = len({r.scenario_id for r in results
                if r.passed and r.scenario_id not in flaky and r.score < r.pass_mark + near_miss_margin})
    return Diagnosis(cluster=cluster, tag=tag, scenarios=len(stats.pass_rates), failed=len(failed),
                     near_misses=near, patterns=patterns,
                     by_tag=dict(sorted(by_tag.items(), key=lambda kv: -kv[1])),
                     repeats=stats.repeats, consistent_failures=sorted(seen), flaky=stats.flaky,
                     pass_rates={sid: stats.pass_rates[sid] for sid in stats.flaky})


def near_miss_margin_of(runtime: ClusterRuntime) -> float:
    """The margin both the manual (``diagnose.run``) and the autonomous path use."""
    return max(runtime.cluster.config.training.near_miss_margin, 0.05)


def diagnose_eval(runtime: ClusterRuntime, tag: str) -> Diagnosis:
    """Diagnose one stored eval of ``runtime`` (blocking: run it in a worker thread)."""
    from modelsmith.loop.eval.run import RESULTS_FILE, eval_dir, read_results

    path = eval_dir(runtime, tag) / RESULTS_FILE
    if not path.exists():
        raise NotFound(f"no eval {tag!r} in cluster {runtime.cluster.name}", data={"tag": tag})
    return diagnose(runtime.cluster.name, tag, read_results(path),
                    near_miss_margin=near_miss_margin_of(runtime))
