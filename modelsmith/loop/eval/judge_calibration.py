"""Judge calibration sets: ``<cluster>/judges/<name>.yaml``, human-labelled examples of a judge.

A calibration file names the judge it calibrates exactly as a rubric's ``llm_judge`` criterion
does, so the two can be matched::

    judge:                       # the criterion's fields (weight, name: not part of a judge)
      engine: grader             # [engines.NAME] of modelsmith.toml, or cluster
      template: "..."            # or template_file: relative to judges/; neither: the default
      scale: 5
    pass_mark: 0.7               # pass at score / scale >= pass_mark (a rubric's pass mark)
    repeats: 3                   # verdicts per example, for self-consistency (1..10)
    examples:
      - id: ex-1
        prompt: "What is CPM?"
        response: "Cost per mille."
        reference: "Cost per thousand impressions."   # optional
        human_score: 5           # on the judge's scale, 0..scale
        labeller: alice

A criterion *matches* a calibration set when its ``engine``, ``template`` (the text) and
``scale`` are the set's. The judge's identity, which a check is recorded under and the promotion
gate asks for, is :func:`judge_identity`: the engine name and its model, the template's sha256
and the calibration set's version (the sha256 of its canonical content: the resolved template,
scale, pass mark, repeats and the examples sorted by id). Change any of them and the judge needs
a new check.

Hostile files are refused with a ValidationError naming file, line and field (kinds: ``syntax``,
``too_large``, ``unknown_field``, ``missing_field``, ``invalid_value``, ``duplicate_id``,
``bad_template_file``), before anything is asked of an engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta, Struct

from modelsmith.errors import NotFound, ValidationError
from modelsmith.hashing import sha256_hex
from modelsmith.loop.scoring.criteria import InvalidField, LlmJudgeCriterion
from modelsmith.loop.scoring.yaml_lines import file_error, load_yaml_with_lines

__all__ = [
    "CALIBRATION_DIR",
    "CalibrationExample",
    "CalibrationSet",
    "JudgeSpec",
    "calibration_names",
    "judge_identity",
    "load_calibration",
    "load_calibrations",
    "matches",
]

CALIBRATION_DIR: Final = "judges"
MAX_FILE_BYTES: Final = 4 * 1024 * 1024
MAX_EXAMPLES: Final = 5000
MAX_TEMPLATE_BYTES: Final = 64 * 1024
_NAME: Final = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,62}\Z")
_AT_PATH: Final = re.compile(r"^(?P<problem>.*) - at `\$(?P<path>[^`]*)`$")
_NAMED_FIELD: Final = re.compile(r"^Object (?:contains unknown|missing required) field `([^`]*)`")

Text = Annotated[str, Meta(max_length=256 * 1024)]


class JudgeSpec(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    engine: Annotated[str, Meta(min_length=1, max_length=200)]
    template: str | None = None
    template_file: Annotated[str, Meta(min_length=1, max_length=500)] | None = None
    scale: Annotated[float, Meta(gt=0, le=1_000_000)] = 1.0


class CalibrationExample(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    id: Annotated[str, Meta(min_length=1, max_length=200)]
    prompt: Text
    response: Text
    human_score: Annotated[float, Meta(ge=0)]
    labeller: Annotated[str, Meta(min_length=1, max_length=200)]
    reference: Text | None = None


class _RawFile(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    judge: JudgeSpec
    examples: Annotated[list[CalibrationExample], Meta(min_length=1, max_length=MAX_EXAMPLES)]
    pass_mark: Annotated[float, Meta(ge=0, le=1)] = 0.7
    repeats: Annotated[int, Meta(ge=1, le=10)] = 3


@dataclass(frozen=True)
class CalibrationSet:
    """One calibration file, read and checked; ``criterion`` is the judge it calibrates."""

    name: str
    file: Path
    criterion: LlmJudgeCriterion
    pass_mark: float
    repeats: int
    examples: tuple[CalibrationExample, ...]
    version: str  # sha256 of the canonical content

    @property
    def template_sha256(self) -> str:
        return sha256_hex(self.criterion.template.encode())


def _describe(exc: msgspec.ValidationError) -> tuple[str, str, str]:
    text = str(exc)
    match = _AT_PATH.match(text)
    problem, path = (match["problem"], match["path"].lstrip(".")) if match else (text, "")
    named = _NAMED_FIELD.match(problem)
    if named:
        kind = "unknown_field" if "unknown" in problem else "missing_field"
        return kind, f"{path}.{named[1]}" if path else named[1], problem
    return "invalid_value", path, problem


def load_calibration(path: Path, *, cluster_root: Path) -> CalibrationSet:
    """Read ``judges/<name>.yaml``; ValidationError naming file, line and field if it is bad."""
    name = path.stem
    filename = str(path)
    if not _NAME.fullmatch(name):
        raise file_error("invalid_value", "a calibration file's name is lowercase letters, digits, "
                         "., _, - (at most 63 characters)", file=filename)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise file_error("too_large", f"{size} bytes; at most {MAX_FILE_BYTES}", file=filename)
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise file_error("syntax", "not UTF-8 text", file=filename) from exc
    except OSError as exc:
        raise file_error("unreadable", f"cannot read: {exc.strerror}", file=filename) from exc
    lined = load_yaml_with_lines(text, filename=filename)
    if lined is None or not isinstance(lined.document, dict):
        raise file_error("invalid_value", "a calibration file is a mapping with `judge` and "
                         "`examples`", file=filename, line=1)
    try:
        raw = msgspec.convert(lined.document, _RawFile, strict=True)
    except msgspec.ValidationError as exc:
        kind, field, problem = _describe(exc)
        raise file_error(kind, problem, file=filename, line=lined.line_of(field) if field else None,
                         field=field or None) from exc
    template = _template(raw.judge, path, cluster_root, filename, lined.line_of("judge"))
    try:
        criterion = LlmJudgeCriterion(engine=raw.judge.engine, template=template,
                                      scale=raw.judge.scale)
    except InvalidField as exc:
        field = f"judge.{'template_file' if raw.judge.template_file else exc.field}"
        raise file_error(exc.kind, exc.problem, file=filename, line=lined.line_of(field),
                         field=field) from exc
    seen: set[str] = set()
    for index, example in enumerate(raw.examples):
        where = f"examples[{index}]"
        if example.id in seen:
            raise file_error("duplicate_id", f"id {example.id!r} appears twice", file=filename,
                             line=lined.line_of(f"{where}.id"), field=f"{where}.id")
        seen.add(example.id)
        if example.human_score > criterion.scale:
            raise file_error("invalid_value", f"human_score {example.human_score:g} is outside "
                             f"the judge's scale 0..{criterion.scale:g}", file=filename,
                             line=lined.line_of(f"{where}.human_score"), field=f"{where}.human_score")
    examples = tuple(sorted(raw.examples, key=lambda e: e.id))
    canonical = msgspec.json.encode({
        "judge": {"engine": criterion.engine, "template": criterion.template,
                  "scale": criterion.scale},
        "pass_mark": raw.pass_mark, "repeats": raw.repeats,
        "examples": [msgspec.to_builtins(e) for e in examples],
    }, order="sorted")
    return CalibrationSet(name=name, file=path, criterion=criterion, pass_mark=raw.pass_mark,
                          repeats=raw.repeats, examples=examples, version=sha256_hex(canonical))


def _template(judge: JudgeSpec, path: Path, cluster_root: Path, filename: str,
              line: int | None) -> str:
    if judge.template is not None and judge.template_file is not None:
        raise file_error("invalid_value", "give `template` or `template_file`, not both",
                         file=filename, line=line, field="judge.template_file")
    if judge.template_file is None:
        return judge.template if judge.template is not None else LlmJudgeCriterion(engine="x").template
    target = (path.parent / judge.template_file).resolve()
    root = cluster_root.resolve()
    if root not in target.parents:
        raise file_error("bad_template_file", "template_file must stay inside the cluster",
                         file=filename, line=line, field="judge.template_file")
    try:
        data = target.read_bytes()[: MAX_TEMPLATE_BYTES + 1]
        if len(data) > MAX_TEMPLATE_BYTES:
            raise file_error("too_large", f"template_file over {MAX_TEMPLATE_BYTES} bytes",
                             file=filename, line=line, field="judge.template_file")
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise file_error("bad_template_file", f"cannot read {judge.template_file}: {exc}",
                         file=filename, line=line, field="judge.template_file") from exc


def calibration_names(cluster_root: Path) -> list[str]:
    """The calibration sets of a cluster (``judges/*.yaml``), sorted."""
    folder = cluster_root / CALIBRATION_DIR
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml") if p.is_file())


def load_calibrations(cluster_root: Path, only: str | None = None) -> list[CalibrationSet]:
    """Every calibration set of the cluster (or only ``only``; NotFound if there is none)."""
    names = calibration_names(cluster_root)
    if only is not None:
        if only not in names:
            raise NotFound(f"no calibration set {only!r} in {cluster_root / CALIBRATION_DIR}",
                           data={"judge": only, "known": names})
        names = [only]
    return [load_calibration(cluster_root / CALIBRATION_DIR / f"{n}.yaml", cluster_root=cluster_root)
            for n in names]


def matches(criterion: Any, calibration: CalibrationSet) -> bool:
    """Does this rubric criterion ask the judge the calibration set calibrates?"""
    return (isinstance(criterion, LlmJudgeCriterion)
            and criterion.engine == calibration.criterion.engine
            and criterion.template == calibration.criterion.template
            and criterion.scale == calibration.criterion.scale)


def judge_identity(calibration: CalibrationSet, engine_model: str) -> str:
    """The judge a check is of: engine name and model, template hash, calibration version."""
    if not engine_model:
        raise ValidationError("a judge's identity needs its engine's model", data={"field": "engine"})
    return sha256_hex(msgspec.json.encode({
        "engine": calibration.criterion.engine, "model": engine_model,
        "template_sha256": calibration.template_sha256, "calibration": calibration.version,
    }, order="sorted"))
