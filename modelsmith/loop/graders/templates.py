"""OpenAI grader templates: ``{{ item.field }}`` (a dataset row) and ``{{ sample.output_text }}``.

A template is text with ``{{ namespace.path }}`` references; the namespaces are ``item`` and
``sample`` and the path is JSON-path-like (``a.b[0].c``). Item references are rendered when a
grader is imported (each item becomes a scenario); sample references name the answer being
graded: ``sample.output_text`` (the whole answer) and ``sample.output_json.<path>`` (a field of
the answer read as JSON). Anything else (another namespace, ``sample.output_tools``,
``sample.choices``, an unclosed ``{{``) is refused with :class:`TemplateProblem`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import msgspec

__all__ = [
    "Ref",
    "TemplateProblem",
    "parse_template",
    "render_items",
    "sole_sample_ref",
]

_REF: Final = re.compile(r"\{\{\s*(?P<ns>[A-Za-z_][A-Za-z0-9_]*)\s*\.\s*(?P<path>[^{}]*?)\s*\}\}")
_SEGMENT: Final = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_-]*)|\[(?P<index>[0-9]{1,6})\]|\[\"(?P<quoted>[^\"]*)\"\]")
MAX_TEMPLATE_CHARS: Final = 256 * 1024


class TemplateProblem(ValueError):
    """A template that cannot be imported; the message says why."""


@dataclass(frozen=True, slots=True)
class Ref:
    """One ``{{ ns.path }}`` reference: where it is in the text and what it names."""

    namespace: str
    path: tuple[str | int, ...]
    start: int
    end: int

    @property
    def dotted(self) -> str:
        """The path as a modelsmith JSON field path (``a.b.0``)."""
        return ".".join(str(part) for part in self.path)

    def shown(self) -> str:
        return "{{" + self.namespace + "." + self.dotted + "}}"


def _path(text: str) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    position = 0
    while position < len(text):
        if text[position] == "." and parts:
            position += 1
        match = _SEGMENT.match(text, position)
        if match is None:
            raise TemplateProblem(f"cannot read the path {text!r} (at character {position})")
        if match.group("key") is not None:
            parts.append(match.group("key"))
        elif match.group("index") is not None:
            parts.append(int(match.group("index")))
        else:
            parts.append(match.group("quoted"))
        position = match.end()
    if not parts:
        raise TemplateProblem("an empty path")
    return tuple(parts)


def parse_template(text: str) -> list[Ref]:
    """The references of ``text``, in order. TemplateProblem for an unknown namespace, a path
    that is not a plain JSON path, or a ``{{`` that opens no reference."""
    if len(text) > MAX_TEMPLATE_CHARS:
        raise TemplateProblem(f"longer than {MAX_TEMPLATE_CHARS} characters")
    refs: list[Ref] = []
    covered = 0
    for match in _REF.finditer(text):
        if "{{" in text[covered:match.start()]:
            raise TemplateProblem("a `{{` that is not a {{ item.field }} or {{ sample.field }} reference")
        namespace = match.group("ns")
        if namespace not in ("item", "sample"):
            raise TemplateProblem(f"unknown namespace {namespace!r} in {match.group(0)!r}: "
                                  "only item and sample")
        refs.append(Ref(namespace, _path(match.group("path")), match.start(), match.end()))
        covered = match.end()
    if "{{" in text[covered:]:
        raise TemplateProblem("a `{{` that is not a {{ item.field }} or {{ sample.field }} reference")
    return refs


def sample_field(ref: Ref) -> str | None:
    """``None`` for ``sample.output_text`` (the whole answer), the JSON field path for
    ``sample.output_json.<path>``; TemplateProblem for any other sample variable."""
    head, rest = ref.path[0], ref.path[1:]
    if head == "output_text" and not rest:
        return None
    if head == "output_json" and rest:
        return ".".join(str(part) for part in rest)
    raise TemplateProblem(
        f"{ref.shown()}: modelsmith grades the answer's text ({{{{sample.output_text}}}}) or a field "
        "of it read as JSON ({{sample.output_json.FIELD}}); tool calls, choices and audio are not "
        "imported")


def sole_sample_ref(text: str) -> tuple[bool, str | None]:
    """Whether ``text`` is exactly one sample reference (and nothing else), and its JSON field
    (None: the whole answer). ``(False, None)`` when ``text`` names no sample at all."""
    refs = parse_template(text)
    samples = [ref for ref in refs if ref.namespace == "sample"]
    if not samples:
        return False, None
    if len(refs) != 1 or text[: refs[0].start].strip() or text[refs[0].end :].strip():
        raise TemplateProblem(
            f"{text[:80]!r}: the graded side must be exactly one {{{{sample...}}}} reference, "
            "with no other text")
    return True, sample_field(samples[0])


def _lookup(item: Any, path: tuple[str | int, ...]) -> Any:
    value = item
    for part in path:
        if isinstance(part, int) and isinstance(value, list) and 0 <= part < len(value):
            value = value[part]
        elif isinstance(value, dict) and str(part) in value:
            value = value[str(part)]
        else:
            raise KeyError(part)
    return value


def item_value(item: Any, ref: Ref) -> Any:
    """The raw value ``ref`` names in ``item``; TemplateProblem when the item has no such field."""
    try:
        return _lookup(item, ref.path)
    except KeyError:
        raise TemplateProblem(f"{ref.shown()}: the item has no field {ref.dotted!r}") from None


def as_text(value: Any) -> str:
    """How a referenced value reads inside text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def render_items(text: str, item: Any, *, sample: str | None = None,
                 escape: Any = None) -> str:
    """``text`` with every item reference replaced by the item's value (``escape``d when given);
    each sample reference becomes ``sample`` (TemplateProblem when ``sample`` is None)."""
    out: list[str] = []
    position = 0
    for ref in parse_template(text):
        literal = text[position:ref.start]
        out.append(escape(literal) if escape else literal)
        if ref.namespace == "item":
            value = as_text(item_value(item, ref))
            out.append(escape(value) if escape else value)
        else:
            if sample is None:
                raise TemplateProblem(f"{ref.shown()} cannot appear here: only item fields can")
            if sample_field(ref) is not None:
                raise TemplateProblem(
                    f"{ref.shown()}: a judge is shown the whole answer ({{{{sample.output_text}}}}), "
                    "not a field of it")
            out.append(sample)
        position = ref.end
    tail = text[position:]
    out.append(escape(tail) if escape else tail)
    return "".join(out)
