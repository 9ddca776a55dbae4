"""Agreement statistics of a judge against human labels, with intervals.

The unit of sampling is a labelled example: intervals are percentile bootstraps over examples
(seeded, ``resamples`` draws; a resample on which a statistic is undefined is left out).

A *judge failure* (no well-formed verdict) is never dropped from the figures that can count it:

``exact_rate``
    Share of all examples whose judge score, rounded, equals the human score, rounded (a
    failure is not a match). Interval: :func:`modelsmith.loop.eval.stats.bootstrap_ci95`.
``within_one_rate``
    Share of all examples whose judge score is within 1 point (on the judge's scale) of the
    human's (a failure is not).
``kappa``
    Cohen's kappa of pass/fail at the pass mark (``score / scale >= pass_mark``) over all
    examples; a failure counts as the judge saying the opposite of the human (the worst case,
    so a judge cannot raise its kappa by failing on the hard examples). ``kappa = (p_o - p_e) /
    (1 - p_e)``; undefined (None) when both raters give one label throughout (``p_e = 1``).
``spearman``
    Spearman's rank correlation (``scipy.stats.spearmanr``, ties averaged) of judge and human
    scores over the examples the judge answered (a rank needs a score); None with fewer than 3
    answered examples or when either side is constant. ``answered`` says how many it is over.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from modelsmith.loop.eval.stats import DEFAULT_RESAMPLES, bootstrap_ci95

__all__ = ["Agreement", "agreement", "cohen_kappa", "consistency", "spearman"]

_DIGITS = 6
_LOW, _HIGH = 2.5, 97.5

FloatArray = npt.NDArray[np.float64]


def cohen_kappa(a: Sequence[bool] | npt.NDArray[np.bool_], b: Sequence[bool] | npt.NDArray[np.bool_]
                ) -> float | None:
    """Cohen's kappa of two raters' binary labels; None when it is undefined (``p_e = 1``)."""
    x = np.asarray(a, dtype=bool)
    y = np.asarray(b, dtype=bool)
    if x.size == 0 or x.size != y.size:
        return None
    observed = float(np.mean(x == y))
    px, py = float(np.mean(x)), float(np.mean(y))
    expected = px * py + (1 - px) * (1 - py)
    if expected >= 1.0 - 1e-12:
        return None
    return (observed - expected) / (1 - expected)


def spearman(x: Sequence[float] | FloatArray, y: Sequence[float] | FloatArray) -> float | None:
    """Spearman's rho (scipy), or None when undefined (n < 3, or a constant side)."""
    from scipy import stats

    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.size < 3 or a.size != b.size or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(stats.spearmanr(a, b).statistic)
    return rho if math.isfinite(rho) else None


def _bootstrap(statistic: Callable[[npt.NDArray[np.intp]], float | None], n: int, point: float | None,
               *, resamples: int, seed: int) -> list[float] | None:
    """Percentile interval of ``statistic(indices)`` over resampled example indices, widened to
    contain the point; None when the point is undefined or every resample is."""
    if point is None or n == 0:
        return None
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, size=n)) for _ in range(max(1, resamples))]
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return None
    low, high = np.percentile(finite, [_LOW, _HIGH])
    return [round(min(float(low), point), _DIGITS), round(max(float(high), point), _DIGITS)]


@dataclass(frozen=True, slots=True)
class Agreement:
    """A judge against human labels (see the module doc for each figure)."""

    examples: int
    answered: int
    exact_rate: float | None
    exact_ci95: list[float] | None
    within_one_rate: float | None
    within_one_ci95: list[float] | None
    kappa: float | None
    kappa_ci95: list[float] | None
    spearman: float | None
    spearman_ci95: list[float] | None
    human_pass_rate: float | None
    judge_pass_rate: float | None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, _DIGITS)


def agreement(human: Sequence[float], judge: Sequence[float | None], *, scale: float,
              pass_mark: float, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Agreement:
    """``human[i]`` and ``judge[i]`` (None: a judge failure) are scores on ``0..scale``."""
    if len(human) != len(judge):
        raise ValueError("human and judge scores differ in length")
    n = len(human)
    h = np.asarray(human, dtype=np.float64)
    answered = np.array([j is not None for j in judge], dtype=bool)
    j = np.array([np.nan if v is None else v for v in judge], dtype=np.float64)
    exact = [1.0 if ok and round(jv) == round(hv) else 0.0 for ok, jv, hv in zip(answered, j, h, strict=True)]
    within = [1.0 if ok and abs(jv - hv) <= 1.0 + 1e-9 else 0.0
              for ok, jv, hv in zip(answered, j, h, strict=True)]
    ones = [1.0] * n
    human_pass = h / scale >= pass_mark - 1e-12
    judge_said = np.where(answered, j / scale >= pass_mark - 1e-12, ~human_pass)  # failure: opposite
    kappa = cohen_kappa(human_pass, judge_said)
    hs, js = h[answered], j[answered]
    rho = spearman(hs, js)

    def kappa_of(idx: npt.NDArray[np.intp]) -> float | None:
        return cohen_kappa(human_pass[idx], judge_said[idx])

    def rho_of(idx: npt.NDArray[np.intp]) -> float | None:
        return spearman(hs[idx], js[idx])

    return Agreement(
        examples=n,
        answered=int(answered.sum()),
        exact_rate=_round(float(np.mean(exact))) if n else None,
        exact_ci95=bootstrap_ci95(exact, ones, resamples=resamples, seed=seed),
        within_one_rate=_round(float(np.mean(within))) if n else None,
        within_one_ci95=bootstrap_ci95(within, ones, resamples=resamples, seed=seed),
        kappa=_round(kappa),
        kappa_ci95=_bootstrap(kappa_of, n, kappa, resamples=resamples, seed=seed),
        spearman=_round(rho),
        spearman_ci95=_bootstrap(rho_of, int(answered.sum()), rho, resamples=resamples, seed=seed),
        human_pass_rate=_round(float(np.mean(human_pass))) if n else None,
        judge_pass_rate=(_round(float(np.mean(j[answered] / scale >= pass_mark - 1e-12)))
                         if answered.any() else None),
    )


def consistency(repeats: Sequence[Sequence[float | None]]) -> tuple[float | None, float | None, float | None, int]:
    """Self-consistency of K verdicts per example (scores on the judge's scale, None: failure):
    (mean per-example spread (max - min of the answered ones), the largest spread, the share of
    examples whose answered verdicts all agree, failures among all verdicts). Examples with
    fewer than 2 answered verdicts have no spread and are left out of the first three."""
    spreads: list[float] = []
    failures = 0
    for verdicts in repeats:
        scores = [v for v in verdicts if v is not None]
        failures += len(verdicts) - len(scores)
        if len(scores) >= 2:
            spreads.append(max(scores) - min(scores))
    if not spreads:
        return None, None, None, failures
    return (_round(float(np.mean(spreads))), _round(max(spreads)),
            _round(float(np.mean([s <= 1e-9 for s in spreads]))), failures)
