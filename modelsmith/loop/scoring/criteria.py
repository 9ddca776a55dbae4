"""Rubric criteria: what a scenario's answer is graded on, as user-written data.

A :class:`Rubric` is a list of weighted criteria and a ``pass_mark``. Each criterion is a msgspec
Struct in a union tagged on the field ``type`` (``exact``, ``contains``, ``not_contains``,
``regex``, ``json``, ``numeric``, ``choice``, ``length``, ``llm_judge``; ``similarity`` in
:mod:`~modelsmith.loop.scoring.similarity`, ``label`` and ``rubric_judge`` in
:mod:`~modelsmith.loop.scoring.judges`). Everything that can be
checked without an answer is checked when the criterion is decoded (``__post_init__``): regexes
compile, JSON schemas are valid, weights are positive, options fit together. So a ``Rubric`` that
exists is a rubric that can score; scoring itself lives in :mod:`modelsmith.loop.scoring.rubric`.

Problems found at decode time are raised as :class:`InvalidField` (a ``ValueError``, which msgspec
turns into a ``msgspec.ValidationError`` with the path of the offending object); the scenario
loader reads ``kind`` and ``field`` back from the exception's ``__cause__`` to name the exact field.
"""

from __future__ import annotations

import functools
import math
import re
import string
from typing import Annotated, Any, ClassVar, Final, Literal

import jsonschema
import jsonschema.exceptions
import jsonschema.protocols
import jsonschema.validators
import msgspec
import regex
from msgspec import UNSET, Meta, Struct, UnsetType

from modelsmith.loop.scoring.bounded import bounded_validator_class, schema_problem
from modelsmith.loop.scoring.criterion_base import (
    Count,
    CriterionBase,
    InvalidField,
    NonEmptyText,
    NonNegative,
    Weight,
)
from modelsmith.loop.scoring.formula import FormulaError, check_formula
from modelsmith.loop.scoring.judges import LabelCriterion, RubricJudgeCriterion
from modelsmith.loop.scoring.similarity import SimilarityCriterion

__all__ = [
    "DEFAULT_JUDGE_TEMPLATE",
    "ChoiceCriterion",
    "ContainsCriterion",
    "CountsAs",
    "Criterion",
    "ExactCriterion",
    "InvalidField",
    "JsonCriterion",
    "LabelCriterion",
    "LengthCriterion",
    "LlmJudgeCriterion",
    "NotContainsCriterion",
    "NumericCriterion",
    "RegexCriterion",
    "Rubric",
    "RubricJudgeCriterion",
    "SimilarityCriterion",
    "compiled_pattern",
    "counts_as_of",
    "json_path_segments",
    "normalize_label",
    "normalize_text",
    "parse_reference_number",
    "schema_validator",
]

DEFAULT_JUDGE_TEMPLATE: Final = (
    "You are grading an answer.\n\n"
    "Question:\n{prompt}\n\n"
    "Reference answer:\n{reference}\n\n"
    "Answer to grade:\n{response}\n\n"
    "Reply with your reasoning, then a final line of the form `SCORE: <number>` "
    "with a number from 0 (wrong) to {scale} (fully correct)."
)

# Placeholders a judge template may use; anything else ({response.__class__}, {0}) is refused
# at load time, so formatting a template can never reach into objects.
JUDGE_PLACEHOLDERS: Final = frozenset({"prompt", "response", "reference", "scale"})


# ---------------------------------------------------------------------------------------------
# Normalisation shared by criteria and their scorers


_WHITESPACE_RUN: Final = re.compile(r"\s+")
_ASCII_PUNCTUATION: Final = str.maketrans("", "", string.punctuation)
_EDGE_PUNCTUATION: Final = "".join(sorted(set(string.punctuation) | set("“”‘’«»…")))


def _strip_punctuation(text: str) -> str:
    if text.isascii():
        return text.translate(_ASCII_PUNCTUATION)
    import unicodedata  # only non-ASCII answers pay for it

    # The ASCII set (symbols like "+" included) and Unicode punctuation: the same answer whether
    # or not the text happens to hold a non-ASCII character, so normalising twice changes nothing.
    return "".join(ch for ch in text
                   if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))


def normalize_text(
    text: str,
    *,
    case_sensitive: bool = False,
    strip: bool = True,
    collapse_whitespace: bool = True,
    strip_punctuation: bool = False,
) -> str:
    """The form ``exact`` compares: optionally case-folded, de-punctuated, whitespace-collapsed."""
    if not case_sensitive:
        text = text.casefold()
    if strip_punctuation:
        text = _strip_punctuation(text)
    if collapse_whitespace:
        text = _WHITESPACE_RUN.sub(" ", text)
    if strip:
        text = text.strip()
    return text


def normalize_label(text: str, *, case_sensitive: bool = False) -> str:
    """The form ``choice`` compares: trimmed of whitespace, quotes and edge punctuation."""
    text = _WHITESPACE_RUN.sub(" ", text).strip().strip(_EDGE_PUNCTUATION).strip()
    return text if case_sensitive else text.casefold()


@functools.lru_cache(maxsize=4096)
def compiled_pattern(pattern: str, flags: int) -> regex.Pattern[str]:
    """A compiled regex (the ``regex`` package, so matching takes a timeout), cached: scoring
    100k answers must not recompile per answer. ``flags`` are :mod:`re` flag values."""
    return regex.compile(pattern, flags)


def _schema_key(schema: dict[str, Any]) -> bytes:
    return msgspec.json.encode(schema, order="sorted")


@functools.lru_cache(maxsize=1024)
def _validator_for_key(key: bytes) -> jsonschema.protocols.Validator:
    schema = msgspec.json.decode(key)
    cls = bounded_validator_class(jsonschema.validators.validator_for(schema))
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def schema_validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A ready validator for ``schema``, built once per distinct schema and then reused."""
    return _validator_for_key(_schema_key(schema))


def json_path_segments(path: str) -> tuple[str, ...]:
    """``bid.price`` -> ``("bid", "price")``; a numeric segment indexes a list."""
    return tuple(path.split("."))


def parse_reference_number(text: str) -> float:
    """A reference used as a numeric target: one number, thousands commas allowed."""
    value = float(text.strip().replace(",", ""))
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


# ---------------------------------------------------------------------------------------------
# Criteria


_CriterionBase = CriterionBase  # the base of every kind (criterion_base.py)


class ExactCriterion(_CriterionBase, frozen=True, tag="exact"):
    """The normalised answer equals ``value`` (or the reference)."""

    kind: ClassVar[str] = "exact"
    value: str | None = None
    case_sensitive: bool = False
    strip: bool = True
    collapse_whitespace: bool = True
    strip_punctuation: bool = False

    def needs_reference(self) -> bool:
        return self.value is None

    def normalize(self, text: str) -> str:
        return normalize_text(
            text,
            case_sensitive=self.case_sensitive,
            strip=self.strip,
            collapse_whitespace=self.collapse_whitespace,
            strip_punctuation=self.strip_punctuation,
        )


def _needles(value: str | None, values: tuple[str, ...]) -> tuple[str, ...]:
    return ((value,) if value is not None else ()) + values


def _check_needles(value: str | None, values: tuple[str, ...], *, required: bool) -> None:
    if value is not None and value == "":
        raise InvalidField("invalid_value", "value", "must not be empty")
    for index, needle in enumerate(values):
        if needle == "":
            raise InvalidField("invalid_value", f"values[{index}]", "must not be empty")
    if required and value is None and not values:
        raise InvalidField("missing_field", "value", "give `value` or `values`")


class ContainsCriterion(_CriterionBase, frozen=True, tag="contains"):
    """The answer contains the needle(s): all of them (``mode: all``) or any (``mode: any``).

    Without ``value``/``values`` the needle is the scenario's reference. Partial credit in
    ``all`` mode: the fraction of needles found.
    """

    kind: ClassVar[str] = "contains"
    value: str | None = None
    values: tuple[str, ...] = ()
    case_sensitive: bool = False
    mode: Literal["all", "any"] = "all"

    def _check(self) -> None:
        _check_needles(self.value, self.values, required=False)

    def needs_reference(self) -> bool:
        return self.value is None and not self.values

    def needles(self) -> tuple[str, ...]:
        return _needles(self.value, self.values)


class NotContainsCriterion(_CriterionBase, frozen=True, tag="not_contains"):
    """The answer contains none of the needle(s); partial credit: the fraction absent."""

    kind: ClassVar[str] = "not_contains"
    value: str | None = None
    values: tuple[str, ...] = ()
    case_sensitive: bool = False

    def _check(self) -> None:
        _check_needles(self.value, self.values, required=True)

    def needles(self) -> tuple[str, ...]:
        return _needles(self.value, self.values)


class RegexCriterion(_CriterionBase, frozen=True, tag="regex"):
    """The answer matches ``pattern``: anywhere (``search``) or whole, once stripped (``full``)."""

    kind: ClassVar[str] = "regex"
    pattern: str
    ignore_case: bool = False
    multiline: bool = False
    dotall: bool = False
    must_match: Literal["search", "full"] = "search"

    def _check(self) -> None:
        try:
            self.compiled()
        except (regex.error, ValueError, OverflowError) as exc:
            raise InvalidField("bad_regex", "pattern", f"does not compile: {exc}") from exc

    @property
    def flags(self) -> int:
        flags = 0
        if self.ignore_case:
            flags |= re.IGNORECASE
        if self.multiline:
            flags |= re.MULTILINE
        if self.dotall:
            flags |= re.DOTALL
        return flags

    def compiled(self) -> regex.Pattern[str]:
        return compiled_pattern(self.pattern, self.flags)


class JsonCriterion(_CriterionBase, frozen=True, tag="json"):
    """The answer is (or contains) a JSON value: ``valid``, matching ``schema``, or with
    ``field`` equal to ``value``.

    With ``allow_surrounding_text`` (the default) the first JSON object inside the answer counts
    when the whole answer is not JSON (prose or a code fence around it).
    """

    kind: ClassVar[str] = "json"
    mode: Literal["valid", "schema", "field_equals"] = "valid"
    schema: dict[str, Any] | None = None
    field: str | None = None
    value: Any | UnsetType = UNSET
    allow_surrounding_text: bool = True

    def _check(self) -> None:
        if self.mode == "schema":
            if self.schema is None:
                raise InvalidField("missing_field", "schema", "mode `schema` needs a `schema`")
            try:
                jsonschema.validators.validator_for(self.schema).check_schema(self.schema)
            except jsonschema.exceptions.SchemaError as exc:
                raise InvalidField(
                    "bad_schema", "schema", f"not a valid JSON schema: {exc.message}"
                ) from exc
            except RecursionError as exc:
                raise InvalidField("bad_schema", "schema", "nested too deeply") from exc
            problem = schema_problem(self.schema)
            if problem is not None:
                where, message = problem
                raise InvalidField("bad_schema_ref", f"schema{where}", message)
            schema_validator(self.schema)  # build it now, once
        elif self.schema is not None:
            raise InvalidField("invalid_value", "schema", "only used with mode `schema`")
        if self.mode == "field_equals":
            if self.field is None:
                raise InvalidField("missing_field", "field", "mode `field_equals` needs `field`")
            if isinstance(self.value, UnsetType):
                raise InvalidField("missing_field", "value", "mode `field_equals` needs `value`")
        else:
            if self.field is not None:
                raise InvalidField("invalid_value", "field", "only used with `field_equals`")
            if not isinstance(self.value, UnsetType):
                raise InvalidField("invalid_value", "value", "only used with `field_equals`")
        if self.field is not None and not all(json_path_segments(self.field)):
            raise InvalidField("invalid_value", "field", "a dotted path like `bid.price`")


class NumericCriterion(_CriterionBase, frozen=True, tag="numeric"):
    """A number from the answer is close to ``value`` (or the reference).

    The number is the first (or last, ``occurrence``) number in the answer, or the JSON field
    ``field``. Within ``max(abs_tol, rel_tol * |target|)`` scores 1; beyond it, credit falls
    linearly to 0 over ``partial_width`` (0: no partial credit), so GRPO gets a gradient.
    """

    kind: ClassVar[str] = "numeric"
    value: float | None = None
    field: str | None = None
    occurrence: Literal["first", "last"] = "first"
    abs_tol: NonNegative = 0.0
    rel_tol: NonNegative = 0.0
    partial_width: NonNegative = 0.0

    def _check(self) -> None:
        for name in ("value", "abs_tol", "rel_tol", "partial_width"):
            number = getattr(self, name)
            if number is not None and not math.isfinite(number):
                raise InvalidField("invalid_value", name, "must be a finite number")
        if self.field is not None and not all(json_path_segments(self.field)):
            raise InvalidField("invalid_value", "field", "a dotted path like `bid.price`")

    def needs_reference(self) -> bool:
        return self.value is None

    def tolerance(self, target: float) -> float:
        return max(self.abs_tol, self.rel_tol * abs(target))


class ChoiceCriterion(_CriterionBase, frozen=True, tag="choice"):
    """The answer is one of ``labels`` (normalised) and equals ``value`` (or the reference)."""

    kind: ClassVar[str] = "choice"
    labels: Annotated[tuple[NonEmptyText, ...], Meta(min_length=1)]
    value: str | None = None
    case_sensitive: bool = False

    def _check(self) -> None:
        seen: set[str] = set()
        for index, label in enumerate(self.labels):
            normal = self.normalize(label)
            if not normal:
                raise InvalidField("invalid_value", f"labels[{index}]", "empty once normalised")
            if normal in seen:
                raise InvalidField("invalid_value", f"labels[{index}]", "duplicate label")
            seen.add(normal)
        if self.value is not None and self.normalize(self.value) not in seen:
            raise InvalidField("invalid_value", "value", "must be one of `labels`")

    def needs_reference(self) -> bool:
        return self.value is None

    def normalize(self, text: str) -> str:
        return normalize_label(text, case_sensitive=self.case_sensitive)


class LengthCriterion(_CriterionBase, frozen=True, tag="length"):
    """The answer's length (stripped) in characters and/or words is within bounds.

    Partial credit: ``actual/min`` when too short, ``max/actual`` when too long.
    """

    kind: ClassVar[str] = "length"
    min_chars: Count | None = None
    max_chars: Count | None = None
    min_words: Count | None = None
    max_words: Count | None = None

    def _check(self) -> None:
        bounds = (self.min_chars, self.max_chars, self.min_words, self.max_words)
        if all(bound is None for bound in bounds):
            raise InvalidField("missing_field", "max_chars", "give at least one bound")
        for low, high, field in (
            (self.min_chars, self.max_chars, "max_chars"),
            (self.min_words, self.max_words, "max_words"),
        ):
            if low is not None and high is not None and low > high:
                raise InvalidField("invalid_value", field, "smaller than its minimum")


class LlmJudgeCriterion(_CriterionBase, frozen=True, tag="llm_judge"):
    """An engine grades the answer. ``template`` may use {prompt} {response} {reference} {scale};
    the judge must reply with a line ``SCORE: <0..scale>``, anything else is a judge failure.
    """

    kind: ClassVar[str] = "llm_judge"
    engine: NonEmptyText
    template: str = DEFAULT_JUDGE_TEMPLATE
    scale: Weight = 1.0

    def _check(self) -> None:
        if not math.isfinite(self.scale):
            raise InvalidField("invalid_value", "scale", "must be a finite number > 0")
        names: set[str] = set()
        try:
            for _, field_name, format_spec, conversion in string.Formatter().parse(self.template):
                if field_name is None:
                    continue
                if field_name not in JUDGE_PLACEHOLDERS or format_spec or conversion:
                    raise InvalidField(
                        "invalid_value",
                        "template",
                        f"unknown placeholder {{{field_name}}}; use "
                        + ", ".join(f"{{{name}}}" for name in sorted(JUDGE_PLACEHOLDERS))
                        + " (double literal braces: {{ }})",
                    )
                names.add(field_name)
        except ValueError as exc:
            if isinstance(exc, InvalidField):
                raise
            raise InvalidField("invalid_value", "template", f"bad braces: {exc}") from exc
        if "response" not in names:
            raise InvalidField("invalid_value", "template", "must contain {response}")

    def render(self, *, prompt: str, response: str, reference: str | None) -> str:
        return self.template.format(
            prompt=prompt,
            response=response,
            reference=reference if reference is not None else "(no reference answer given)",
            scale=f"{self.scale:g}",
        )


Criterion = (
    ExactCriterion
    | ContainsCriterion
    | NotContainsCriterion
    | RegexCriterion
    | JsonCriterion
    | NumericCriterion
    | ChoiceCriterion
    | LengthCriterion
    | LlmJudgeCriterion
    | SimilarityCriterion
    | LabelCriterion
    | RubricJudgeCriterion
)

CRITERION_TYPES: Final = (
    "exact",
    "contains",
    "not_contains",
    "regex",
    "json",
    "numeric",
    "choice",
    "length",
    "llm_judge",
    "similarity",
    "label",
    "rubric_judge",
)

#: The kinds scored from a judge engine's reply (their ``engine`` names it).
JUDGE_KINDS: Final = (LlmJudgeCriterion, LabelCriterion, RubricJudgeCriterion)


CountsAs = Literal["format", "substance", "both"]
"""What a criterion's credit measures: the answer's form, its content, or (a ``choice``) both:
a valid label is form, the right label is content."""

_FORMAT_KINDS: Final = frozenset({"regex", "length"})


def counts_as_of(criterion: Criterion) -> CountsAs:
    """The criterion's own ``counts_as``, else its kind's: ``json`` valid/schema, ``length`` and
    ``regex`` (a shape) are format; ``choice`` is both; ``json`` field_equals, ``exact``,
    ``contains``, ``not_contains``, ``numeric`` and ``llm_judge`` are substance."""
    if criterion.counts_as is not None:
        return criterion.counts_as
    if criterion.kind in _FORMAT_KINDS:
        return "format"
    if isinstance(criterion, JsonCriterion):
        return "substance" if criterion.mode == "field_equals" else "format"
    if isinstance(criterion, ChoiceCriterion):
        return "both"
    return "substance"


class Rubric(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Weighted criteria; the scenario's score is their weighted mean, passed at ``pass_mark``."""

    criteria: Annotated[tuple[Criterion, ...], Meta(min_length=1)]
    pass_mark: Annotated[float, Meta(ge=0, le=1)] = 0.7
    #: combines the criteria's scores instead of the weighted mean (see loop/scoring/formula.py);
    #: its names are the criteria's ``name``s
    formula: str | None = None

    def __post_init__(self) -> None:
        if self.formula is None:
            return
        names = [criterion.label for criterion in self.criteria]
        for index, criterion in enumerate(self.criteria):
            if criterion.name is None:
                raise InvalidField("missing_field", f"criteria[{index}].name",
                                   "a rubric with a `formula` names every criterion")
            if names.count(criterion.label) > 1:
                raise InvalidField("invalid_value", f"criteria[{index}].name", "duplicate name")
        try:
            check_formula(self.formula, names)
        except FormulaError as exc:
            raise InvalidField("bad_formula", "formula", str(exc)) from exc

    def needs_reference(self) -> bool:
        return any(criterion.needs_reference() for criterion in self.criteria)

    def judge_indices(self) -> tuple[int, ...]:
        """Indices of the criteria a judge engine scores (``llm_judge``, ``label``,
        ``rubric_judge``: the keys of ``judge_verdicts``)."""
        return tuple(
            index
            for index, criterion in enumerate(self.criteria)
            if isinstance(criterion, JUDGE_KINDS)
        )
