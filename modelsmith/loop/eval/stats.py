"""Statistics of an eval: intervals on weighted scores and exact paired tests between two evals.

Scenarios, not answers, are the unit of sampling: a scenario set is one draw of the prompts a
model will meet, so the uncertainty of a composite is the spread of the weighted mean over
resampled scenario sets.

``bootstrap_ci95``
    Percentile bootstrap of the weighted mean ``sum(w_i * s_i) / sum(w_i)``: draw ``n`` scenarios
    with replacement (each keeps its own weight), ``resamples`` times, from a seeded generator;
    the interval is the 2.5th and 97.5th percentile of the resampled means, widened to the point
    estimate should a degenerate resampling leave it outside (so it always contains the point).
``mcnemar_p``
    Exact two-sided McNemar test on pass/fail pairs: with ``b`` fixed and ``c`` regressed
    scenarios (the discordant pairs), ``p = min(1, 2 * P(X <= min(b, c)))``, ``X ~ Bin(b + c, 1/2)``.
``sign_p``
    Exact two-sided sign test on per-scenario score deltas, ties (delta 0) dropped: the same
    binomial tail on the counts of positive and negative deltas.
``paired_test``
    Both tests plus the weighted mean delta and its bootstrap interval, as a :class:`PairedTest`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from modelsmith.rpc.schema.evals import PairedTest

__all__ = [
    "DEFAULT_RESAMPLES",
    "PairedOutcome",
    "binomial_two_sided_p",
    "bootstrap_ci95",
    "mcnemar_p",
    "paired_test",
    "resampled_means",
    "sign_p",
    "significantly_worse",
]

DEFAULT_RESAMPLES = 2000
_LOW, _HIGH = 2.5, 97.5
_DIGITS = 6


def resampled_means(
    scores: npt.ArrayLike, weights: npt.ArrayLike, indices: npt.NDArray[np.intp]
) -> npt.NDArray[np.float64]:
    """The weighted mean of each resample; ``indices`` has one row of scenario indices per
    resample (exposed so a test can give the rows by hand)."""
    s = np.asarray(scores, dtype=np.float64)[indices]
    w = np.asarray(weights, dtype=np.float64)[indices]
    totals = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (s * w).sum(axis=1) / totals
    result: npt.NDArray[np.float64] = np.where(totals > 0, means, 0.0)
    return result


def _point(scores: Sequence[float], weights: Sequence[float]) -> float:
    total = math.fsum(weights)
    return math.fsum(s * w for s, w in zip(scores, weights, strict=True)) / total if total else 0.0


def bootstrap_ci95(
    scores: Sequence[float], weights: Sequence[float], *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> list[float] | None:
    """``[low, high]`` of the weighted mean of ``scores`` (see the module doc); None when empty."""
    if len(scores) != len(weights):
        raise ValueError("scores and weights differ in length")
    if not scores:
        return None
    point = _point(scores, weights)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(scores), size=(max(1, resamples), len(scores)))
    means = resampled_means(scores, weights, indices)
    low, high = np.percentile(means, [_LOW, _HIGH])
    return [round(min(float(low), point), _DIGITS), round(max(float(high), point), _DIGITS)]


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p of ``k`` successes in ``n`` fair trials: ``min(1, 2 P(X <= min(k, n-k)))``."""
    if n <= 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / (1 << n))


def mcnemar_p(fixed: int, regressed: int) -> float:
    """Exact McNemar p-value from the discordant pairs (fail->pass ``fixed``, pass->fail ``regressed``)."""
    return binomial_two_sided_p(fixed, fixed + regressed)


def sign_p(deltas: Sequence[float]) -> float:
    """Exact sign-test p-value of paired score deltas; zero deltas (ties) are dropped."""
    up = sum(1 for d in deltas if d > 0)
    down = sum(1 for d in deltas if d < 0)
    return binomial_two_sided_p(up, up + down)


PairedOutcome = tuple[float, bool, float, bool, float]
"""One scenario in both evals: (score a, passed a, score b, passed b, weight)."""


def paired_test(pairs: Sequence[PairedOutcome], *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
                ) -> PairedTest:
    """Eval ``b`` against eval ``a`` on the scenarios both ran (``pairs``)."""
    fixed = sum(1 for _, pa, _, pb, _ in pairs if not pa and pb)
    regressed = sum(1 for _, pa, _, pb, _ in pairs if pa and not pb)
    deltas = [sb - sa for sa, _, sb, _, _ in pairs]
    weights = [w for *_, w in pairs]
    interval = bootstrap_ci95(deltas, weights, resamples=resamples, seed=seed)
    return PairedTest(
        n=len(pairs), fixed=fixed, regressed=regressed,
        mcnemar_p=mcnemar_p(fixed, regressed), sign_p=sign_p(deltas),
        mean_delta=round(_point(deltas, weights), _DIGITS),
        delta_ci95=interval if interval is not None else [0.0, 0.0],
        improved=sum(1 for d in deltas if d > 0), worsened=sum(1 for d in deltas if d < 0),
    )


def significantly_worse(test: PairedTest, alpha: float) -> bool:
    """True when ``b`` is worse than ``a`` at level ``alpha``: more regressions than fixes with
    McNemar's p below it, or more scores down than up with the sign test's p below it."""
    return ((test.regressed > test.fixed and test.mcnemar_p < alpha)
            or (test.worsened > test.improved and test.sign_p < alpha))
