"""Governed scenario sets: the files, their typed form, their versions.

A cluster keeps its scenarios in ``<cluster>/scenarios/core/`` and
``<cluster>/scenarios/held-out/`` as YAML (``*.yaml``/``*.yml``: a list of scenarios, or a
mapping ``{scenarios: [...]}``) or JSONL (``*.jsonl``: one scenario per line). Files are decoded
strictly into :class:`Scenario` Structs; a bad file is refused whole with a
:class:`~modelsmith.errors.ValidationError` whose ``data`` names ``file``, ``line`` (where known),
``field`` (a path such as ``scenarios[3].rubric.criteria[1].pattern``) and ``kind`` (a stable
word: ``syntax``, ``unknown_field``, ``wrong_type``, ``duplicate_id`` ...).

A set's version is the sha256 of its canonical content (the scenarios sorted by id, JSON with
sorted keys, defaults filled in), so formatting, ordering and comments of the files do not change
it and any change of content does. :func:`scenario_hash` fingerprints one scenario;
:func:`prompt_hash` fingerprints only what a model is shown, so a held-out prompt copied into
training under another id is still recognised.

Limits (documented in ``docs/scenarios.md``): a file over :data:`MAX_SCENARIO_FILE_BYTES` is
refused by its size before a byte is parsed (kind ``too_large``); YAML is bounded while composing
(:mod:`~modelsmith.loop.scoring.yaml_lines`); a prompt over ``max_prompt_bytes`` (by default
:data:`MAX_PROMPT_BYTES`, or :func:`prompt_byte_limit` of the cluster's ``max_model_len``) is
refused (kind ``prompt_too_long``).

The file format is documented for users in ``docs/scenarios.md``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

from modelsmith.errors import NotFound, ValidationError
from modelsmith.loop.scoring.criteria import (
    ChoiceCriterion,
    InvalidField,
    NumericCriterion,
    Rubric,
    parse_reference_number,
)
from modelsmith.loop.scoring.judge_names import JUDGE_CLUSTER_ENGINE, unknown_judge_engine
from modelsmith.loop.scoring.yaml_lines import NodePath, load_yaml_with_lines, path_key
from modelsmith.loop.scoring.yaml_lines import file_error as _error

__all__ = [
    "BYTES_PER_TOKEN",
    "JUDGE_CLUSTER_ENGINE",
    "MAX_PROMPT_BYTES",
    "MAX_SCENARIO_FILE_BYTES",
    "SCENARIO_SUFFIXES",
    "SET_NAMES",
    "ChatMessage",
    "Scenario",
    "ScenarioCatalog",
    "ScenarioSet",
    "SetName",
    "canonical_json",
    "load_catalog",
    "parse_scenarios",
    "parse_scenarios_located",
    "prompt_byte_limit",
    "prompt_hash",
    "prompt_messages",
    "prompt_text",
    "scenario_hash",
    "set_version",
]

SetName = Literal["core", "held-out", "synthetic"]
SET_NAMES: Final[tuple[SetName, ...]] = ("core", "held-out", "synthetic")
SCENARIO_SUFFIXES: Final = (".yaml", ".yml", ".jsonl")

#: A scenario file larger than this is refused by its size, before it is read or parsed.
MAX_SCENARIO_FILE_BYTES: Final = 8 * 1024 * 1024
#: A prompt (UTF-8, all messages together) larger than this is refused when nothing better is known.
MAX_PROMPT_BYTES: Final = 256 * 1024
#: Bytes per token assumed when a prompt's size is checked against ``max_model_len``.
BYTES_PER_TOKEN: Final = 4


def prompt_byte_limit(max_model_len: int) -> int:
    """The largest prompt (bytes) a cluster with ``max_model_len`` tokens of context accepts:
    ``BYTES_PER_TOKEN * max_model_len``, and never more than :data:`MAX_PROMPT_BYTES`."""
    return min(MAX_PROMPT_BYTES, BYTES_PER_TOKEN * max_model_len)


# \A...\Z, not ^...$: `$` also matches before a trailing newline.
ScenarioId = Annotated[str, Meta(pattern=r"\A[A-Za-z0-9._-]+\Z", min_length=1, max_length=200)]
NonEmptyText = Annotated[str, Meta(min_length=1)]
#: One line of printable text: no newline, no control character.
Label = Annotated[str, Meta(pattern=r"\A[^\x00-\x1f\x7f]+\Z", min_length=1, max_length=200)]
Weight = Annotated[float, Meta(gt=0)]


class ChatMessage(Struct, frozen=True, forbid_unknown_fields=True):
    """One message of a chat prompt."""

    role: Literal["system", "user", "assistant"]
    content: str


class Scenario(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One governed test case: a prompt, its ground truth and the rubric that grades answers."""

    id: ScenarioId
    set: SetName
    domain: Label
    tags: tuple[Label, ...] = ()
    prompt: NonEmptyText | Annotated[tuple[ChatMessage, ...], Meta(min_length=1)]
    reference: str | None = None
    rubric: Rubric
    weight: Weight = 1.0

    def __post_init__(self) -> None:
        if not self.weight < float("inf"):
            raise InvalidField("bad_weight", "weight", "must be a finite number > 0")
        if not isinstance(self.prompt, str) and not any(
            message.role == "user" for message in self.prompt
        ):
            raise InvalidField("invalid_value", "prompt", "a chat prompt needs a user message")
        for index, criterion in enumerate(self.rubric.criteria):
            if not criterion.needs_reference():
                continue
            where = f"rubric.criteria[{index}] ({criterion.kind})"
            if self.reference is None:
                raise InvalidField("missing_reference", "reference", f"{where} compares against it")
            if isinstance(criterion, NumericCriterion):
                try:
                    parse_reference_number(self.reference)
                except ValueError as exc:
                    raise InvalidField(
                        "invalid_value", "reference", f"{where} needs a number"
                    ) from exc
            if isinstance(criterion, ChoiceCriterion) and criterion.normalize(
                self.reference
            ) not in {criterion.normalize(label) for label in criterion.labels}:
                raise InvalidField("invalid_value", "reference", f"{where}: not one of its labels")


# ---------------------------------------------------------------------------------------------
# Hashes and versions


def _encode(value: Any) -> bytes:
    return msgspec.json.encode(value, order="sorted")


def scenario_hash(scenario: Scenario) -> str:
    """sha256 (hex) of one scenario's canonical content (every field, defaults filled in)."""
    return hashlib.sha256(_encode(scenario)).hexdigest()


def prompt_hash(scenario: Scenario) -> str:
    """sha256 (hex) of only the prompt: what training would show a model. Leakage checks compare
    these, so a held-out prompt reused under another id or set is still caught."""
    return hashlib.sha256(_encode(scenario.prompt)).hexdigest()


def canonical_json(scenarios: Iterable[Scenario]) -> bytes:
    """The canonical bytes of a set: scenarios sorted by id, sorted keys, defaults filled in."""
    encoded = sorted((s.id, _encode(s)) for s in scenarios)
    return b"[" + b",".join(body for _, body in encoded) + b"]"


def set_version(scenarios: Iterable[Scenario]) -> str:
    """sha256 (hex) of :func:`canonical_json`: a set's version."""
    return hashlib.sha256(canonical_json(scenarios)).hexdigest()


def prompt_text(scenario: Scenario) -> str:
    """The prompt as plain text (a chat is rendered ``role: content``), e.g. for judges."""
    if isinstance(scenario.prompt, str):
        return scenario.prompt
    return "\n\n".join(f"{message.role}: {message.content}" for message in scenario.prompt)


def prompt_messages(scenario: Scenario) -> list[dict[str, str]]:
    """The prompt as chat messages (a text prompt is one user message)."""
    if isinstance(scenario.prompt, str):
        return [{"role": "user", "content": scenario.prompt}]
    return [{"role": m.role, "content": m.content} for m in scenario.prompt]


# ---------------------------------------------------------------------------------------------
# Errors that name where


_AT_PATH: Final = re.compile(r"^(?P<problem>.*) - at `\$(?P<path>[^`]*)`$", re.DOTALL)
_NAMED_FIELD: Final = re.compile(r"^Object (?:contains unknown|missing required) field `([^`]*)`")


def _describe_msgspec_error(exc: msgspec.ValidationError, prefix: str) -> tuple[str, str, str]:
    """(kind, field path, problem) for msgspec's error on one scenario at ``prefix``."""
    text = str(exc)
    match = _AT_PATH.match(text)
    problem, path = (match["problem"], match["path"]) if match else (text, "")
    field = prefix + path
    cause = exc.__cause__
    if isinstance(cause, InvalidField):
        return cause.kind, f"{field}.{cause.field}", cause.problem
    named = _NAMED_FIELD.match(problem)
    if named:
        kind = "unknown_field" if "unknown" in problem else "missing_field"
        return kind, f"{field}.{named[1]}", problem
    if problem.startswith("Invalid value") and field.endswith(".type") and ".criteria[" in field:
        return "unknown_criterion", field, problem
    if problem.startswith("Expected `float` >") and field.endswith("weight"):
        return "bad_weight", field, problem
    if problem.startswith("Expected `") and ", got `" in problem:
        return "wrong_type", field, problem
    return "invalid_value", field, problem


# ---------------------------------------------------------------------------------------------
# Parsing one file


@dataclass(frozen=True)
class _RawScenario:
    """One scenario's undecoded object and where it came from."""

    index: int
    line: int | None
    value: Any
    lines: dict[NodePath, int] = field(default_factory=dict)

    def line_of(self, field_path: str) -> int | None:
        key = path_key(field_path)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.line


def _read_yaml(text: str, filename: str) -> Iterator[_RawScenario]:
    loaded = load_yaml_with_lines(text, filename=filename, list_root="scenarios")
    if loaded is None:
        return
    document, lines = loaded.document, loaded.lines
    if isinstance(document, dict):
        for key in document:
            if key != "scenarios":
                raise _error(
                    "unknown_field",
                    "a scenario file's top level is a list, or a mapping with only `scenarios`",
                    file=filename,
                    line=lines.get((str(key),)),
                    field=str(key),
                )
        document = document.get("scenarios", [])
    if not isinstance(document, list):
        raise _error(
            "wrong_type", "expected a list of scenarios", file=filename, line=1, field="scenarios"
        )
    for index, value in enumerate(document):
        yield _RawScenario(index, lines.get(("scenarios", index)), value, lines)


def _read_jsonl(text: str, filename: str) -> Iterator[_RawScenario]:
    index = 0
    # Split on "\n" only: a JSON string may legally hold U+2028 and friends raw.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            raise _error(
                "syntax", f"JSON: {exc}", file=filename, line=number, field=f"scenarios[{index}]"
            ) from exc
        except RecursionError as exc:
            raise _error(
                "too_large",
                "nested too deeply",
                file=filename,
                line=number,
                field=f"scenarios[{index}]",
            ) from exc
        yield _RawScenario(index, number, value)
        index += 1


def _parse_with_lines(
    data: bytes,
    *,
    filename: str,
    default_set: str | None,
    max_prompt_bytes: int | None = None,
    judge_engines: Collection[str] | None = None,
) -> list[tuple[Scenario, int | None]]:
    _check_file_size(len(data), filename)
    prompt_limit = MAX_PROMPT_BYTES if max_prompt_bytes is None else max_prompt_bytes
    if default_set is not None and default_set not in SET_NAMES:
        raise _error("invalid_value", f"unknown set {default_set!r}", file=filename, field="set")
    suffix = Path(filename).suffix.lower()
    if suffix not in SCENARIO_SUFFIXES:
        raise _error(
            "unsupported_file",
            f"scenario files end in {', '.join(SCENARIO_SUFFIXES)}",
            file=filename,
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _error("encoding", f"not UTF-8: {exc.reason}", file=filename) from exc
    raw_items = _read_jsonl(text, filename) if suffix == ".jsonl" else _read_yaml(text, filename)

    parsed: list[tuple[Scenario, int | None]] = []
    first_seen: dict[str, int | None] = {}
    for raw in raw_items:
        prefix = f"scenarios[{raw.index}]"
        value = raw.value
        if isinstance(value, dict) and "set" not in value and default_set is not None:
            value = {**value, "set": default_set}
        try:
            scenario = msgspec.convert(value, Scenario, strict=True)
        except msgspec.ValidationError as exc:
            kind, field_path, problem = _describe_msgspec_error(exc, prefix)
            line = raw.line_of(field_path)
            raise _error(kind, problem, file=filename, line=line, field=field_path) from exc
        except RecursionError as exc:
            raise _error(
                "too_large", "nested too deeply", file=filename, line=raw.line, field=prefix
            ) from exc
        prompt_bytes = _prompt_bytes(scenario)
        if prompt_bytes > prompt_limit:
            field_path = f"{prefix}.prompt"
            raise _error(
                "prompt_too_long",
                f"the prompt is {prompt_bytes} bytes; at most {prompt_limit} fit",
                file=filename,
                line=raw.line_of(field_path),
                field=field_path,
                limit=prompt_limit,
            )
        if default_set is not None and scenario.set != default_set:
            field_path = f"{prefix}.set"
            raise _error(
                "set_mismatch",
                f"set {scenario.set!r} in a {default_set!r} folder",
                file=filename,
                line=raw.line_of(field_path),
                field=field_path,
            )
        if scenario.id in first_seen:
            field_path = f"{prefix}.id"
            raise _error(
                "duplicate_id",
                f"id {scenario.id!r} is used twice",
                file=filename,
                line=raw.line_of(field_path),
                field=field_path,
                first_file=filename,
                first_line=first_seen[scenario.id],
            )
        if judge_engines is not None and (
            unknown := unknown_judge_engine(scenario.rubric.criteria, judge_engines)
        ):
            index, name, known = unknown
            field_path = f"{prefix}.rubric.criteria[{index}].engine"
            raise _error(
                "unknown_engine",
                f"no engine {name!r}: a judge names one of {', '.join(known)} "
                "([engines.NAME] in modelsmith.toml, or cluster for the cluster's own engine)",
                file=filename, line=raw.line_of(field_path), field=field_path, engine=name,
                known=known,
            )
        first_seen[scenario.id] = raw.line
        parsed.append((scenario, raw.line))
    return parsed


def _prompt_bytes(scenario: Scenario) -> int:
    if isinstance(scenario.prompt, str):
        return len(scenario.prompt.encode("utf-8", "surrogatepass"))
    return sum(len(m.content.encode("utf-8", "surrogatepass")) for m in scenario.prompt)


def _check_file_size(size: int, filename: str) -> None:
    if size > MAX_SCENARIO_FILE_BYTES:
        raise _error(
            "too_large",
            f"{size} bytes; a scenario file holds at most {MAX_SCENARIO_FILE_BYTES}",
            file=filename,
            limit=MAX_SCENARIO_FILE_BYTES,
        )


def parse_scenarios(
    data: bytes,
    *,
    filename: str,
    default_set: str | None = None,
    max_prompt_bytes: int | None = None,
    judge_engines: Collection[str] | None = None,
) -> list[Scenario]:
    """Decode one scenario file's bytes (YAML or JSONL, by ``filename``'s suffix).

    ``default_set`` is the set of the folder the file lives in: it fills an omitted ``set`` and a
    different ``set`` is refused. ``max_prompt_bytes`` bounds each prompt (default
    :data:`MAX_PROMPT_BYTES`; a cluster passes :func:`prompt_byte_limit` of its
    ``max_model_len``). ``judge_engines``, when given, are the engine names a judge criterion
    may use besides ``cluster``; another is refused (``unknown_engine``, with the known ones).
    Raises ValidationError naming file, line and field.
    """
    parsed = _parse_with_lines(
        data, filename=filename, default_set=default_set, max_prompt_bytes=max_prompt_bytes,
        judge_engines=judge_engines,
    )
    return [s for s, _ in parsed]


def parse_scenarios_located(
    data: bytes,
    *,
    filename: str,
    default_set: str | None = None,
    max_prompt_bytes: int | None = None,
    judge_engines: Collection[str] | None = None,
) -> list[tuple[Scenario, int | None]]:
    """:func:`parse_scenarios`, each scenario with the line it starts at (None where unknown)."""
    return _parse_with_lines(
        data, filename=filename, default_set=default_set, max_prompt_bytes=max_prompt_bytes,
        judge_engines=judge_engines,
    )


def _read_bytes(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            _check_file_size(os.fstat(fh.fileno()).st_size, str(path))
            data = fh.read(MAX_SCENARIO_FILE_BYTES + 1)  # a file still growing stays bounded
    except FileNotFoundError as exc:
        raise NotFound(f"no scenario file {path}", data={"file": str(path)}) from exc
    except OSError as exc:
        raise _error("unreadable", f"cannot read: {exc.strerror}", file=str(path)) from exc
    _check_file_size(len(data), str(path))
    return data


# ---------------------------------------------------------------------------------------------
# Sets and the catalog


class ScenarioSet(Struct, frozen=True, kw_only=True):
    """One governed set: its scenarios sorted by id, its version and the files it came from."""

    name: SetName
    scenarios: tuple[Scenario, ...]
    version: str
    files: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, name: SetName, scenarios: Iterable[Scenario], files: Iterable[str] = ()
    ) -> ScenarioSet:
        """A set of ``scenarios`` with its version computed."""
        ordered = tuple(sorted(scenarios, key=lambda s: (s.id, _encode(s))))
        return cls(
            name=name, scenarios=ordered, version=set_version(ordered), files=tuple(sorted(files))
        )

    def __len__(self) -> int:
        return len(self.scenarios)

    def ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.scenarios)


@dataclass(frozen=True)
class ScenarioCatalog:
    """A cluster's sets, complete and consistent: ids are unique across all of them."""

    sets: dict[str, ScenarioSet]
    _by_id: dict[str, Scenario] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sets = dict(self.sets)
        for name in SET_NAMES[:2]:  # "synthetic" is a set only where its folder exists
            sets.setdefault(name, ScenarioSet.of(name, ()))
        object.__setattr__(self, "sets", sets)
        by_id: dict[str, Scenario] = {}
        for scenario_set in sets.values():
            for scenario in scenario_set.scenarios:
                if scenario.id in by_id:
                    raise ValidationError(
                        f"scenario id {scenario.id!r} is in two sets",
                        data={"field": "id", "kind": "duplicate_id", "id": scenario.id},
                    )
                by_id[scenario.id] = scenario
        object.__setattr__(self, "_by_id", by_id)

    @property
    def core(self) -> ScenarioSet:
        return self.sets["core"]

    @property
    def held_out(self) -> ScenarioSet:
        return self.sets["held-out"]

    def all(self) -> tuple[Scenario, ...]:
        """Every scenario of every set, sorted by id."""
        return tuple(sorted(self._by_id.values(), key=lambda s: s.id))

    def get(self, scenario_id: str) -> Scenario | None:
        """The scenario with this id, or None."""
        return self._by_id.get(scenario_id)

    def require(self, scenario_id: str) -> Scenario:
        """The scenario with this id; NotFound when there is none."""
        scenario = self._by_id.get(scenario_id)
        if scenario is None:
            raise NotFound(f"no scenario {scenario_id!r}", data={"scenario": scenario_id})
        return scenario

    def versions(self) -> dict[str, str]:
        """Each set's name and version."""
        return {name: scenario_set.version for name, scenario_set in sorted(self.sets.items())}

    def __len__(self) -> int:
        return len(self._by_id)


def _set_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file()
        and not path.name.startswith(".")  # editors' swap files, atomic-write temp files
        and path.suffix.lower() in SCENARIO_SUFFIXES
    )


def load_catalog(
    scenarios_dir: Path,
    *,
    max_prompt_bytes: int | None = None,
    judge_engines: Collection[str] | None = None,
) -> ScenarioCatalog:
    """Load ``<cluster>/scenarios/{core,held-out}/*``: all files or none.

    ``max_prompt_bytes`` and ``judge_engines`` as for :func:`parse_scenarios`.

    A missing set folder is an empty set; a missing ``scenarios_dir`` is NotFound. Any bad file,
    or an id used twice anywhere, raises ValidationError and returns nothing.
    """
    scenarios_dir = Path(scenarios_dir)
    if not scenarios_dir.is_dir():
        raise NotFound(f"no scenarios folder {scenarios_dir}", data={"file": str(scenarios_dir)})
    where_seen: dict[str, tuple[str, int | None]] = {}
    sets: dict[str, ScenarioSet] = {}
    for set_name in (n for n in SET_NAMES if n != "synthetic" or (scenarios_dir / n).is_dir()):
        members: list[Scenario] = []
        files: list[str] = []
        for path in _set_files(scenarios_dir / set_name):
            filename = str(path)
            parsed = _parse_with_lines(
                _read_bytes(path),
                filename=filename,
                default_set=set_name,
                max_prompt_bytes=max_prompt_bytes,
                judge_engines=judge_engines,
            )
            for index, (scenario, line) in enumerate(parsed):
                if scenario.id in where_seen:
                    first_file, first_line = where_seen[scenario.id]
                    raise _error(
                        "duplicate_id",
                        f"id {scenario.id!r} is also in {first_file}",
                        file=filename,
                        line=line,
                        field=f"scenarios[{index}].id",
                        first_file=first_file,
                        first_line=first_line,
                    )
                where_seen[scenario.id] = (filename, line)
                members.append(scenario)
            files.append(path.relative_to(scenarios_dir).as_posix())
        sets[set_name] = ScenarioSet.of(set_name, members, files)
    return ScenarioCatalog(sets)
