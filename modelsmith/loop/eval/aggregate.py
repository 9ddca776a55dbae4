"""From answers to scenarios: format versus substance per answer, and repeated trials folded.

Format versus substance. Each criterion counts as ``format``, ``substance`` or (a ``choice``)
``both`` (:func:`modelsmith.loop.scoring.criteria.counts_as_of`). An answer's format score is the
weighted mean of the credit of its format criteria, its substance score that of its substance
criteria; a ``choice`` gives format credit 1 for any valid label (0 for none) and substance credit
for the right one. Criteria whose scoring or judge failed count in neither, as in the score.

Repeated trials. ``results.jsonl`` has one line per scenario and trial. :func:`by_scenario`
folds the trials of each scenario into one result: its score (and format and substance scores)
is the mean over trials, and it counts as passed when at least half of its trials passed, so
that one flaky trial neither makes nor breaks a scenario. With one trial it is that trial.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from modelsmith.loop.scoring.criteria import CountsAs, Rubric, counts_as_of
from modelsmith.loop.scoring.rubric import RubricScore
from modelsmith.rpc.schema.evals import ScenarioResult

__all__ = ["TrialStats", "answer_split", "by_scenario", "mean_of", "trial_stats"]

_NOT_COUNTED = frozenset({"judge_failure", "scoring_timeout", "scoring_error"})
_NO_LABEL = frozenset({"wrong_format", "refusal_or_empty"})
_DIGITS = 6


def answer_split(rubric: Rubric, rs: RubricScore) -> tuple[float | None, float | None, list[CountsAs | None]]:
    """``(format score, substance score, each criterion's class)`` of one scored answer."""
    if len(rs.criteria) != len(rubric.criteria):  # scoring failed as a whole: no criteria ran
        return None, None, [None] * len(rs.criteria)
    pools: dict[str, list[tuple[float, float]]] = {"format": [], "substance": []}
    classes: list[CountsAs | None] = []
    for criterion, outcome in zip(rubric.criteria, rs.criteria, strict=True):
        kind = counts_as_of(criterion)
        classes.append(kind)
        if outcome.error_kind in _NOT_COUNTED:
            continue
        if kind == "both":
            label_ok = 0.0 if outcome.error_kind in _NO_LABEL else 1.0
            pools["format"].append((criterion.weight, label_ok))
            pools["substance"].append((criterion.weight, outcome.score))
        else:
            pools[kind].append((criterion.weight, outcome.score))
    return _weighted(pools["format"]), _weighted(pools["substance"]), classes


def _weighted(items: Sequence[tuple[float, float]]) -> float | None:
    total = sum(w for w, _ in items)
    return sum(w * x for w, x in items) / total if total > 0 else None


def mean_of(results: Sequence[ScenarioResult], attribute: str) -> float | None:
    """The scenario-weighted mean of ``format_score`` or ``substance_score`` over the results that
    have one; None when none has."""
    items = [(r.weight, value) for r in results if (value := getattr(r, attribute)) is not None]
    value = _weighted(items)
    return round(value, _DIGITS) if value is not None else None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def by_scenario(results: Sequence[ScenarioResult]) -> list[ScenarioResult]:
    """One result per scenario, its trials folded (see the module doc); sorted by id."""
    trials: dict[str, list[ScenarioResult]] = {}
    for r in results:
        trials.setdefault(r.scenario_id, []).append(r)
    folded: list[ScenarioResult] = []
    for sid in sorted(trials):
        runs = sorted(trials[sid], key=lambda r: r.trial)
        if len(runs) == 1:
            folded.append(runs[0])
            continue
        passes = sum(r.passed for r in runs)
        folded.append(msgspec.structs.replace(
            runs[0],
            score=sum(r.score for r in runs) / len(runs),
            passed=2 * passes >= len(runs),
            judge_error=any(r.judge_error for r in runs),
            format_score=_mean([r.format_score for r in runs]),
            substance_score=_mean([r.substance_score for r in runs]),
        ))
    return folded


@dataclass(frozen=True, slots=True)
class TrialStats:
    """How a scenario set fared over repeated trials."""

    repeats: int  # the most trials any scenario had
    pass_at_k: float | None  # share of scenarios that passed every trial (pass^K); None: no trials
    flaky: list[str]  # passed some trials and failed others
    pass_rates: dict[str, float]  # passed trials / trials, per scenario


def trial_stats(results: Sequence[ScenarioResult]) -> TrialStats:
    runs: dict[str, list[bool]] = {}
    for r in results:
        runs.setdefault(r.scenario_id, []).append(r.passed)
    if not runs:
        return TrialStats(repeats=1, pass_at_k=None, flaky=[], pass_rates={})
    rates = {sid: round(sum(p) / len(p), _DIGITS) for sid, p in sorted(runs.items())}
    return TrialStats(
        repeats=max(len(p) for p in runs.values()),
        pass_at_k=round(sum(all(p) for p in runs.values()) / len(runs), _DIGITS),
        flaky=sorted(sid for sid, p in runs.items() if any(p) and not all(p)),
        pass_rates=rates,
    )
