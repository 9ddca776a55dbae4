"""The ``similarity`` criterion: how close the answer is to a reference text, by a named metric.

The metrics are the text-similarity metrics OpenAI's ``text_similarity`` grader names, each from
a maintained library (nothing here re-implements one):

- ``fuzzy_match``: rapidfuzz ``fuzz.WRatio`` on ``utils.default_process``-ed text, / 100 (the
  fuzzy match OpenAI's graders guide shows);
- ``bleu``: sacrebleu ``sentence_bleu`` (its default tokenizer and exponential smoothing), / 100;
- ``gleu``: NLTK ``sentence_gleu`` (Google BLEU) on whitespace tokens;
- ``rouge_1`` .. ``rouge_5``, ``rouge_l``: Google's rouge-score F-measure (no stemming; its
  tokenizer's lowercased alphanumeric runs, in every script, not ASCII only).

A metric scores in [0, 1]: the criterion's credit is that value (a smooth GRPO reward), and the
criterion passes at ``pass_threshold``. The score is pure and local, so the GRPO trainer scores
it exactly as the eval does. Answers are bounded before a metric sees them (ROUGE-L is quadratic
in the tokens): past :data:`MAX_TOKENS` tokens (:data:`MAX_LCS_TOKENS` for ROUGE-L,
:data:`MAX_CHARS` characters for the fuzzy match) the text is cut, and the detail says so.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Annotated, Any, ClassVar, Final, Literal

from msgspec import Meta

from modelsmith.loop.scoring.criterion_base import CriterionBase, InvalidField

__all__ = ["MAX_CHARS", "MAX_LCS_TOKENS", "MAX_TOKENS", "METRICS", "SimilarityCriterion", "similarity"]

Metric = Literal[
    "fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"
]
METRICS: Final[tuple[str, ...]] = Metric.__args__  # type: ignore[attr-defined]

#: tokens (whitespace words) a token metric compares at most, per side
MAX_TOKENS: Final = 1000
#: tokens ROUGE-L compares at most, per side (its LCS is quadratic: bench/similarity_cost.py
#: measured 0.54 s per answer at 1,000 tokens, about 35 ms at 256)
MAX_LCS_TOKENS: Final = 256
#: characters the fuzzy match compares at most, per side
MAX_CHARS: Final = 20_000


class SimilarityCriterion(CriterionBase, frozen=True, tag="similarity"):
    """The answer (or its JSON ``field``) is similar to ``value`` (or the reference) by ``metric``;
    credit is the metric's value in [0, 1], passed at ``pass_threshold``."""

    kind: ClassVar[str] = "similarity"
    metric: Metric
    value: str | None = None
    field: str | None = None
    pass_threshold: Annotated[float, Meta(ge=0, le=1)] = 0.5

    def _check(self) -> None:
        if not math.isfinite(self.pass_threshold):
            raise InvalidField("invalid_value", "pass_threshold", "must be a number in 0..1")
        if self.field is not None and not all(self.field.split(".")):
            raise InvalidField("invalid_value", "field", "a dotted path like `bid.price`")

    def needs_reference(self) -> bool:
        return self.value is None


def _cut_tokens(text: str, limit: int = MAX_TOKENS) -> tuple[list[str], bool]:
    tokens = text.split()
    return tokens[:limit], len(tokens) > limit


class _UnicodeWords:
    """rouge-score's default tokenizer, lowercased runs of ``[a-z0-9]``, extended to every
    script: the same tokens for ASCII text, and a non-English answer is not empty to it."""

    _WORD: Final = re.compile(r"[^\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return self._WORD.findall(text.lower())


@functools.lru_cache(maxsize=8)
def _rouge_scorer(key: str) -> Any:
    from rouge_score import rouge_scorer  # NLTK's stemmer module comes with it: import on use

    return rouge_scorer.RougeScorer([key], use_stemmer=False, tokenizer=_UnicodeWords())


def _fuzzy(answer: str, reference: str) -> float:
    from rapidfuzz import fuzz, utils

    return float(fuzz.WRatio(answer, reference, processor=utils.default_process)) / 100.0


def _bleu(answer: list[str], reference: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(" ".join(answer), [" ".join(reference)]).score) / 100.0


def _gleu(answer: list[str], reference: list[str]) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    return float(sentence_gleu([reference], answer))


def _rouge(key: str, answer: list[str], reference: list[str]) -> float:
    scores = _rouge_scorer(key).score(" ".join(reference), " ".join(answer))
    return float(scores[key].fmeasure)


def similarity(metric: str, answer: str, reference: str) -> tuple[float, bool]:
    """``metric``'s value for ``answer`` against ``reference``, clipped to [0, 1], and whether
    either text was cut to the bounds. An empty answer or reference scores 0."""
    if metric not in METRICS:
        raise ValueError(f"unknown similarity metric {metric!r}")
    if not answer.strip() or not reference.strip():
        return 0.0, False
    if metric == "fuzzy_match":
        cut = len(answer) > MAX_CHARS or len(reference) > MAX_CHARS
        value = _fuzzy(answer[:MAX_CHARS], reference[:MAX_CHARS])
    else:
        limit = MAX_LCS_TOKENS if metric == "rouge_l" else MAX_TOKENS
        (a, cut_a), (r, cut_r) = _cut_tokens(answer, limit), _cut_tokens(reference, limit)
        cut = cut_a or cut_r
        if metric == "bleu":
            value = _bleu(a, r)
        elif metric == "gleu":
            value = _gleu(a, r)
        else:
            suffix = metric.removeprefix("rouge_")
            value = _rouge("rougeL" if suffix == "l" else f"rouge{suffix}", a, r)
    if not math.isfinite(value):
        return 0.0, cut
    return min(1.0, max(0.0, value)), cut
