"""OpenAI grader JSON into governed scenarios: each grader kind becomes a native criterion.

``convert(graders_json, items_jsonl, options)`` reads the graders (one grader object, a list of
them, ``{"testing_criteria": [...]}`` as an eval defines them, or ``{"grader": {...}}`` as the
graders API takes one) and the dataset items (JSONL; a line ``{"item": {...}}`` is unwrapped),
and returns one scenario per item, its rubric built from the graders with the item's fields
rendered in. Nothing is written here (see :mod:`modelsmith.loop.graders.service`).

The mapping (docs/scenarios.md has the table):

- ``string_check``: ``eq`` -> ``exact`` (case-sensitive, edges trimmed; ``json`` field_equals on
  ``{{sample.output_json.F}}``), ``ne``/``neq`` -> a full-match ``regex`` that refuses exactly the
  reference, ``like`` -> ``contains`` (case-sensitive), ``ilike`` -> ``contains``;
- ``text_similarity`` -> ``similarity`` with the same metric and ``pass_threshold``;
- ``score_model`` -> ``rubric_judge`` with one criterion ``result`` on ``range``;
- ``label_model`` -> ``label`` with its ``labels`` and ``passing_labels``;
- ``multi`` -> its graders as named criteria and ``calculate_output`` as the rubric's ``formula``;
- ``python`` -> refused: it is arbitrary code.

Every problem is a ValidationError whose ``data`` names the grader (``grader``: its path in the
file, e.g. ``graders.email``), the ``field`` and, for a rendering problem, the item's ``line``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import regex

from modelsmith.errors import ValidationError
from modelsmith.loop.graders.templates import (
    TemplateProblem,
    as_text,
    item_value,
    parse_template,
    render_items,
    sole_sample_ref,
)
from modelsmith.loop.scoring.formula import FORMULA_FUNCTIONS, FormulaError, check_formula
from modelsmith.loop.scoring.judges import escape_literal
from modelsmith.loop.scoring.similarity import METRICS

__all__ = ["MAX_ITEMS", "Conversion", "ImportOptions", "MappedGrader", "convert"]

MAX_ITEMS: Final = 10_000
DEFAULT_PASS_MARK: Final = 0.7
_NAME: Final = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_SUPPORTED: Final = ("string_check", "text_similarity", "score_model", "label_model", "multi")


@dataclass(frozen=True, slots=True)
class ImportOptions:
    name: str
    set: str
    judge_engine: str | None = None
    prompt: str = "{{item.input}}"
    reference: str | None = None
    domain: str | None = None
    pass_mark: float | None = None


@dataclass(frozen=True, slots=True)
class MappedGrader:
    """How one grader was mapped: its path in the file, its OpenAI type, the native criterion."""

    grader: str
    type: str
    criterion: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class Conversion:
    scenarios: list[dict[str, Any]]
    mapping: list[MappedGrader]


def _fail(message: str, *, grader: str | None = None, field: str | None = None,
          line: int | None = None, file: str = "graders") -> ValidationError:
    data: dict[str, Any] = {"file": file}
    for key, value in (("grader", grader), ("field", field), ("line", line)):
        if value is not None:
            data[key] = value
    where = f"grader {grader}" if grader else file
    if field:
        where += f", field {field}"
    if line is not None:
        where += f", item line {line}"
    return ValidationError(f"{where}: {message}", data=data)


def _text(grader: dict[str, Any], key: str, path: str) -> str:
    value = grader.get(key)
    if not isinstance(value, str):
        raise _fail(f"`{key}` must be a string", grader=path, field=key)
    return value


# -- one grader -> a criterion builder ---------------------------------------------------------
# Checking happens once per grader (so a bad grader is named before any item is read); the
# builder then renders each item's fields into the criterion.


@dataclass(frozen=True, slots=True)
class _Built:
    build: Any  # (item, line) -> criterion dict
    mapped: MappedGrader
    pass_mark: float
    reference: str | None  # the reference template, for the scenario's reference
    value_range: tuple[float, float] = (0.0, 1.0)


def _graded_sides(grader: dict[str, Any], path: str, *, swap: bool) -> tuple[str | None, str]:
    """(the answer's JSON field or None for the whole answer, the reference template)."""
    text_in, text_ref = _text(grader, "input", path), _text(grader, "reference", path)
    try:
        in_sample, in_field = sole_sample_ref(text_in)
    except TemplateProblem as exc:
        raise _fail(str(exc), grader=path, field="input") from None
    try:
        ref_sample = any(r.namespace == "sample" for r in parse_template(text_ref))
        if not in_sample and swap and ref_sample:
            # eq/ne are symmetric: OpenAI's tool-call example puts the answer in `reference`
            in_sample, in_field = sole_sample_ref(text_ref)
            text_ref = text_in
            ref_sample = False
    except TemplateProblem as exc:
        raise _fail(str(exc), grader=path, field="reference") from None
    if not in_sample:
        raise _fail("`input` grades no model output: it names no {{sample.output_text}}",
                    grader=path, field="input")
    if ref_sample:
        raise _fail("`reference` may use item fields only, not {{sample...}}",
                    grader=path, field="reference")
    return in_field, text_ref


def _renderer(template: str, path: str, field: str) -> Any:
    def render(item: Any, line: int) -> str:
        try:
            return render_items(template, item)
        except TemplateProblem as exc:
            raise _fail(str(exc), grader=path, field=field, line=line) from None
    return render


def _string_check(grader: dict[str, Any], path: str, name: str) -> _Built:
    operation = grader.get("operation")
    if operation == "neq":
        operation = "ne"
    if operation not in ("eq", "ne", "like", "ilike"):
        raise _fail(f"unknown operation {operation!r}: eq, ne, like or ilike",
                    grader=path, field="operation")
    field, reference = _graded_sides(grader, path, swap=operation in ("eq", "ne"))
    if field is not None and operation != "eq":
        raise _fail(f"`{operation}` on a JSON field of the answer is not imported (only eq is): "
                    "grade {{sample.output_text}} instead", grader=path, field="input")
    render = _renderer(reference, path, "reference")

    def build(item: Any, line: int) -> dict[str, Any]:
        value = render(item, line)
        if operation == "eq" and field is not None:
            return {"type": "json", "name": name, "mode": "field_equals", "field": field,
                    "value": value}
        if operation == "eq":
            return {"type": "exact", "name": name, "value": value, "case_sensitive": True,
                    "collapse_whitespace": False}
        if operation == "ne":
            pattern = "(?!" + regex.escape(value.strip()) + r"\Z)(?s:.*)"
            return {"type": "regex", "name": name, "pattern": pattern, "must_match": "full",
                    "counts_as": "substance"}
        if not value:
            raise _fail("the reference renders empty: every answer would contain it",
                        grader=path, field="reference", line=line)
        return {"type": "contains", "name": name, "value": value,
                "case_sensitive": operation == "like"}

    kind = {"eq": "json" if field else "exact", "ne": "regex", "like": "contains",
            "ilike": "contains"}[operation]
    return _Built(build, MappedGrader(path, "string_check", kind, f"operation {operation}"), 1.0,
                  reference)


def _threshold(grader: dict[str, Any], path: str, default: float | None) -> float | None:
    value = grader.get("pass_threshold", default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail("`pass_threshold` must be a number", grader=path, field="pass_threshold")
    return float(value)


def _text_similarity(grader: dict[str, Any], path: str, name: str) -> _Built:
    metric = grader.get("evaluation_metric")
    if metric == "cosine":
        raise _fail("metric cosine needs an embedding engine, and no modelsmith engine serves "
                    "embeddings yet: use fuzzy_match, bleu, gleu or a rouge_* metric, or a "
                    "score_model grader for meaning", grader=path, field="evaluation_metric")
    if metric == "meteor":
        raise _fail("metric meteor needs NLTK's WordNet data, which modelsmith does not ship: "
                    "use bleu, gleu or a rouge_* metric", grader=path, field="evaluation_metric")
    if metric not in METRICS:
        raise _fail(f"unknown evaluation_metric {metric!r}: one of " + ", ".join(METRICS),
                    grader=path, field="evaluation_metric")
    threshold = _threshold(grader, path, 0.5)
    assert threshold is not None
    if not 0.0 <= threshold <= 1.0:
        raise _fail("`pass_threshold` must be within 0..1", grader=path, field="pass_threshold")
    field, reference = _graded_sides(grader, path, swap=False)
    render = _renderer(reference, path, "reference")

    def build(item: Any, line: int) -> dict[str, Any]:
        criterion: dict[str, Any] = {"type": "similarity", "name": name, "metric": metric,
                                     "value": render(item, line), "pass_threshold": threshold}
        if field is not None:
            criterion["field"] = field
        return criterion

    return _Built(build, MappedGrader(path, "text_similarity", "similarity", f"metric {metric}"),
                  threshold, reference)


def _messages_template(grader: dict[str, Any], path: str) -> str:
    """The grader's ``input`` messages as one judge template (roles as headings), still with
    its ``{{ }}`` references."""
    messages = grader.get("input")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise _fail("`input` must be a non-empty list of messages", grader=path, field="input")
    blocks: list[str] = []
    for index, message in enumerate(messages):
        where = f"input[{index}]"
        if not isinstance(message, dict) or message.get("role") not in (
                "system", "developer", "user", "assistant"):
            raise _fail("a message needs a role: system, developer, user or assistant",
                        grader=path, field=where)
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        texts: list[str] = []
        for part in parts:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("input_text", "output_text") \
                    and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise _fail("only text content is imported (no images or audio)",
                            grader=path, field=f"{where}.content")
        blocks.append(f"[{message['role']}]\n" + "\n".join(texts))
    return "\n\n".join(blocks)


def _judge_template(grader: dict[str, Any], path: str) -> Any:
    text = _messages_template(grader, path)
    try:
        refs = parse_template(text)
    except TemplateProblem as exc:
        raise _fail(str(exc), grader=path, field="input") from None
    if not any(r.namespace == "sample" for r in refs):
        raise _fail("the messages never show the answer: add {{sample.output_text}}",
                    grader=path, field="input")

    def render(item: Any, line: int) -> str:
        try:
            return render_items(text, item, sample="{response}", escape=escape_literal)
        except TemplateProblem as exc:
            raise _fail(str(exc), grader=path, field="input", line=line) from None
    return render


def _engine(options: ImportOptions, path: str) -> str:
    if options.judge_engine is None:
        raise _fail("a model grader needs a judge engine: give --judge-engine NAME (a named "
                    "engine of modelsmith.toml, or cluster)", grader=path, field="model")
    return options.judge_engine


def _score_model(grader: dict[str, Any], path: str, name: str, options: ImportOptions) -> _Built:
    engine = _engine(options, path)
    bounds = grader.get("range", [0, 1])
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b)
                       for b in bounds) or bounds[0] >= bounds[1]):
        raise _fail("`range` must be [low, high] with low < high", grader=path, field="range")
    low, high = float(bounds[0]), float(bounds[1])
    threshold = _threshold(grader, path, None)
    if threshold is not None and not low <= threshold <= high:
        raise _fail("`pass_threshold` must lie within `range`", grader=path, field="pass_threshold")
    normalised = None if threshold is None else (threshold - low) / (high - low)
    render = _judge_template(grader, path)

    def build(item: Any, line: int) -> dict[str, Any]:
        criterion: dict[str, Any] = {
            "type": "rubric_judge", "name": name, "engine": engine,
            "template": render(item, line),
            "criteria": [{"name": "result", "description": "the score the instructions above ask "
                          "for", "min": low, "max": high}],
        }
        if normalised is not None:
            criterion["pass_threshold"] = normalised
        return criterion

    note = f"range [{low:g}, {high:g}] on engine {engine} (was model {grader.get('model')!r})"
    return _Built(build, MappedGrader(path, "score_model", "rubric_judge", note),
                  DEFAULT_PASS_MARK if normalised is None else normalised, None, (low, high))


def _label_model(grader: dict[str, Any], path: str, name: str, options: ImportOptions) -> _Built:
    engine = _engine(options, path)
    labels, passing = grader.get("labels"), grader.get("passing_labels")
    for key, value in (("labels", labels), ("passing_labels", passing)):
        if not isinstance(value, list) or not value or not all(
                isinstance(v, str) and v for v in value):
            raise _fail(f"`{key}` must be a non-empty list of labels", grader=path, field=key)
    assert isinstance(labels, list) and isinstance(passing, list)
    unknown = [p for p in passing if p not in labels]
    if unknown:
        raise _fail(f"passing label(s) {unknown} are not in `labels`", grader=path,
                    field="passing_labels")
    render = _judge_template(grader, path)

    def build(item: Any, line: int) -> dict[str, Any]:
        return {"type": "label", "name": name, "engine": engine, "template": render(item, line),
                "labels": labels, "passing_labels": passing}

    note = f"{len(labels)} labels on engine {engine} (was model {grader.get('model')!r})"
    return _Built(build, MappedGrader(path, "label_model", "label", note), 1.0, None)


def _one(grader: Any, path: str, name: str, options: ImportOptions, *, nested: bool) -> _Built:
    if not isinstance(grader, dict):
        raise _fail("a grader must be a JSON object", grader=path)
    kind = grader.get("type")
    if kind == "python":
        raise _fail(
            "python graders are refused: they run arbitrary code, which modelsmith never "
            "executes. Express the check as string_check or text_similarity graders (combined "
            "with a multi formula), or write the native criteria (regex, json, numeric, "
            "similarity) in a scenario file", grader=path, field="type")
    if kind == "multi":
        if nested:
            raise _fail("a multi grader cannot hold another multi grader", grader=path,
                        field="type")
        raise AssertionError("multi is handled by its caller")
    if kind == "string_check":
        return _string_check(grader, path, name)
    if kind == "text_similarity":
        return _text_similarity(grader, path, name)
    if kind == "score_model":
        return _score_model(grader, path, name, options)
    if kind == "label_model":
        return _label_model(grader, path, name, options)
    raise _fail(f"unknown grader type {kind!r}: one of " + ", ".join((*_SUPPORTED, "python")),
                grader=path, field="type")


def _criterion_name(raw: Any, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_]+", "_", raw if isinstance(raw, str) else "").strip("_")[:48]
    if not base or not (base[0].isalpha() or base[0] == "_"):
        base = f"grader_{base}" if base else "grader"
    name, counter = base, 2
    while name in taken:
        name, counter = f"{base}_{counter}", counter + 1
    taken.add(name)
    return name


def _scaled_formula(formula: str, ranges: dict[str, tuple[float, float]]) -> str:
    # A score_model's value enters OpenAI's formula on its own range; modelsmith's criterion
    # scores on 0..1, so the formula reads (low + (high - low) * name) for it.
    for key, (low, high) in ranges.items():
        if (low, high) != (0.0, 1.0):
            formula = re.sub(rf"(?<![A-Za-z0-9_.]){re.escape(key)}(?![A-Za-z0-9_])",
                             f"({low!r} + {high - low!r} * {key})", formula)
    return formula


def _multi(grader: dict[str, Any], path: str, options: ImportOptions
           ) -> tuple[list[_Built], str, list[MappedGrader]]:
    subs = grader.get("graders")
    if not isinstance(subs, dict) or not subs:
        raise _fail("`graders` must be an object of named graders", grader=path, field="graders")
    built: list[_Built] = []
    for key, sub in subs.items():
        if not _NAME.match(key) or key in FORMULA_FUNCTIONS:
            raise _fail(f"grader key {key!r} cannot be a formula name (letters, digits, _; "
                        "not a function name)", grader=f"{path}.graders", field=key)
        built.append(_one(sub, f"{path}.graders.{key}", key, options, nested=True))
    formula = grader.get("calculate_output")
    if not isinstance(formula, str):
        raise _fail("`calculate_output` must be a formula", grader=path, field="calculate_output")
    try:
        check_formula(formula, list(subs))
    except FormulaError as exc:
        raise _fail(f"calculate_output: {exc}", grader=path, field="calculate_output") from None
    scaled = _scaled_formula(formula, {b.mapped.grader.rsplit(".", 1)[-1]: b.value_range
                                       for b in built})
    mapping = [MappedGrader(path, "multi", "rubric formula", f"calculate_output {formula!r}")]
    return built, scaled, mapping + [b.mapped for b in built]


def _graders_of(document: Any) -> list[tuple[str, Any]]:
    if isinstance(document, dict) and "testing_criteria" in document:
        found = document["testing_criteria"]
        prefix = "testing_criteria"
    elif isinstance(document, dict) and "grader" in document and "type" not in document:
        return [("grader", document["grader"])]
    elif isinstance(document, dict):
        return [("grader", document)]
    else:
        found, prefix = document, ""
    if not isinstance(found, list) or not found:
        raise _fail("expected a grader object, a list of graders or {\"testing_criteria\": [...]}")
    return [(f"{prefix}[{index}]", grader) for index, grader in enumerate(found)]


def read_items(items_jsonl: str) -> list[tuple[int, Any]]:
    """(line number, item) for each non-empty line; a ``{"item": {...}}`` line is unwrapped."""
    items: list[tuple[int, Any]] = []
    for number, line in enumerate(items_jsonl.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = msgspec.json.decode(line)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _fail(f"not JSON: {str(exc)[:120]}", file="items", line=number) from None
        if isinstance(value, dict) and set(value) <= {"item", "sample"} and "item" in value:
            value = value["item"]
        if not isinstance(value, dict):
            raise _fail("an item must be a JSON object", file="items", line=number)
        items.append((number, value))
        if len(items) > MAX_ITEMS:
            raise _fail(f"more than {MAX_ITEMS} items", file="items", line=number)
    if not items:
        raise _fail("no items: each item becomes a scenario", file="items")
    return items


def _prompt(template: str, item: Any, line: int) -> Any:
    try:
        refs = parse_template(template)
        if any(r.namespace == "sample" for r in refs):
            raise TemplateProblem("the prompt cannot name {{sample...}}: it is what is sent")
        if len(refs) == 1 and not template[:refs[0].start].strip() \
                and not template[refs[0].end:].strip():
            value = item_value(item, refs[0])
            if isinstance(value, list):
                return [{"role": "system" if m.get("role") == "developer" else m.get("role"),
                         "content": as_text(m.get("content"))} if isinstance(m, dict) else m
                        for m in value]
        text = render_items(template, item)
    except TemplateProblem as exc:
        raise _fail(str(exc), file="items", field="prompt", line=line) from None
    if not text.strip():
        raise _fail("the prompt renders empty", file="items", field="prompt", line=line)
    return text


def _grader_names(graders: list[tuple[str, Any]]) -> dict[str, str]:
    """Each grader's path -> its own ``name`` (capped), for the errors."""
    names: dict[str, str] = {}
    for path, grader in graders:
        if not isinstance(grader, dict):
            continue
        if isinstance(grader.get("name"), str):
            names[path] = grader["name"][:100]
        subs = grader.get("graders")
        if isinstance(subs, dict):
            for key, sub in subs.items():
                if isinstance(sub, dict) and isinstance(sub.get("name"), str):
                    names[f"{path}.graders.{key}"] = sub["name"][:100]
    return names


def convert(graders_json: str, items_jsonl: str, options: ImportOptions) -> Conversion:
    """The scenarios (plain dicts, in the scenario file format) and how each grader mapped.
    A problem with one grader is a ValidationError whose ``data`` has its ``grader`` path and,
    when it has one, its ``grader_name``."""
    try:
        document = msgspec.json.decode(graders_json)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _fail(f"not JSON: {str(exc)[:160]}") from None
    graders = _graders_of(document)
    try:
        return _convert(graders, items_jsonl, options)
    except ValidationError as exc:
        name = _grader_names(graders).get(str(exc.data.get("grader")))
        if name is None:
            raise
        path = exc.data["grader"]
        raise ValidationError(exc.message.replace(f"grader {path}", f"grader {path} ({name!r})", 1),
                              data={**exc.data, "grader_name": name}) from None


def _convert(graders: list[tuple[str, Any]], items_jsonl: str, options: ImportOptions
             ) -> Conversion:
    built: list[_Built] = []
    mapping: list[MappedGrader] = []
    formula: str | None = None
    taken: set[str] = set()
    for path, grader in graders:
        if isinstance(grader, dict) and grader.get("type") == "multi":
            if len(graders) > 1:
                raise _fail("a multi grader must be the file's only grader", grader=path)
            built, formula, mapping = _multi(grader, path, options)
        else:
            one = _one(grader, path, _criterion_name(
                grader.get("name") if isinstance(grader, dict) else None, taken), options,
                nested=False)
            built.append(one)
            mapping.append(one.mapped)
    pass_mark = options.pass_mark
    if pass_mark is None:
        pass_mark = DEFAULT_PASS_MARK if formula is not None else (
            sum(b.pass_mark for b in built) / len(built))
    reference = options.reference or next((b.reference for b in built if b.reference), None)
    scenarios = []
    for index, (line, item) in enumerate(read_items(items_jsonl), start=1):
        rubric: dict[str, Any] = {"criteria": [b.build(item, line) for b in built],
                                  "pass_mark": round(pass_mark, 6)}
        if formula is not None:
            rubric["formula"] = formula
        scenario: dict[str, Any] = {
            "id": f"{options.name}-{index:04d}", "set": options.set,
            "domain": options.domain or options.name, "tags": ["openai-grader"],
            "prompt": _prompt(options.prompt, item, line), "rubric": rubric,
        }
        if reference is not None:
            scenario["reference"] = _renderer(reference, "reference", "reference")(item, line)
        scenarios.append(scenario)
    return Conversion(scenarios, mapping)
