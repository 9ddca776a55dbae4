"""Safe YAML that remembers where things are, and errors that say where.

User-written files are refused with a :class:`~modelsmith.errors.ValidationError` whose ``data``
names ``file``, ``line`` and ``field`` (a path like ``scenarios[3].rubric.criteria[1].pattern``)
plus a stable ``kind``. To give a line for any path, a YAML document is composed into nodes, the
nodes are walked once to record the 1-based line of every mapping key and sequence item by its
path, and only then is the document constructed - with PyYAML's *safe* constructors only.

Memory stays bounded while parsing: the composer (libyaml's event parser under PyYAML's
composer) counts nodes as it builds them and stops at :data:`MAX_YAML_NODES` or at a nesting
depth of :data:`MAX_YAML_DEPTH`, so a huge document is refused before it is held in memory.
The walk also refuses what PyYAML would silently accept: a key repeated in one mapping, and
documents that alias-expand past the node budget (a "billion laughs" file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import yaml
import yaml.cyaml

from modelsmith.errors import ValidationError

__all__ = [
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "LinedYaml",
    "NodePath",
    "file_error",
    "format_path",
    "load_yaml_with_lines",
    "path_key",
]

NodePath = tuple[str | int, ...]

#: Past this many nodes (counting every alias expansion) a document is refused, not expanded.
MAX_YAML_NODES: Final = 500_000
#: Collections nested deeper than this are refused while composing.
MAX_YAML_DEPTH: Final = 64

# libyaml's event parser when present (several times faster); both keep marks for line numbers.
_Parser: Final[Any] = getattr(yaml.cyaml, "CParser", None) if yaml.__with_libyaml__ else None


class _TooLarge(Exception):
    def __init__(self, problem: str, line: int) -> None:
        super().__init__(problem)
        self.problem = problem
        self.line = line


class _BudgetComposer(yaml.composer.Composer):
    """PyYAML's composer, counting nodes and depth as it goes and stopping at the budget."""

    nodes_composed = 0
    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event: Any = self.peek_event()  # type: ignore[attr-defined]  # the parser's half
        line: int = event.start_mark.line + 1
        self.nodes_composed += 1
        if self.nodes_composed > MAX_YAML_NODES:
            raise _TooLarge(f"more than {MAX_YAML_NODES} YAML nodes", line)
        if isinstance(event, yaml.CollectionStartEvent):
            self.depth += 1
            if self.depth > MAX_YAML_DEPTH:
                raise _TooLarge(f"nested more than {MAX_YAML_DEPTH} levels", line)
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1
        return super().compose_node(parent, index)


if _Parser is not None:

    class _BoundedLoader(
        _BudgetComposer,
        _Parser,  # type: ignore[misc]  # libyaml's parser is typed Any
        yaml.constructor.SafeConstructor,
        yaml.resolver.Resolver,
    ):
        def __init__(self, stream: str) -> None:
            _Parser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

else:  # pragma: no cover - PyYAML without libyaml

    class _BoundedLoader(  # type: ignore[no-redef]
        yaml.reader.Reader,
        yaml.scanner.Scanner,
        yaml.parser.Parser,
        _BudgetComposer,
        yaml.constructor.SafeConstructor,
        yaml.resolver.Resolver,
    ):
        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)


def file_error(
    kind: str,
    problem: str,
    *,
    file: str,
    line: int | None = None,
    field: str | None = None,
    **extra: Any,
) -> ValidationError:
    """A ValidationError for a user-written file: ``file:line: field: problem``, and ``data``
    with ``file``, ``line``, ``field``, ``kind`` and any ``extra`` keys."""
    where = file if line is None else f"{file}:{line}"
    text = f"{where}: {field}: {problem}" if field else f"{where}: {problem}"
    data: dict[str, Any] = {"file": file, "line": line, "field": field, "kind": kind}
    data.update(extra)
    return ValidationError(text, data=data)


def format_path(key: NodePath) -> str:
    """``("scenarios", 3, "rubric")`` -> ``scenarios[3].rubric``."""
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


_PATH_SEGMENT: Final = re.compile(r"\[(\d+)\]|\.?([^.\[\]]+)")


def path_key(field: str) -> NodePath:
    """``scenarios[3].rubric`` -> ``("scenarios", 3, "rubric")``; the inverse of format_path."""
    return tuple(int(index) if index else name for index, name in _PATH_SEGMENT.findall(field))


@dataclass(frozen=True)
class LinedYaml:
    """A constructed YAML document and the line of each key/item path in it."""

    document: Any
    lines: dict[NodePath, int]

    def line_of(self, field: str) -> int | None:
        """The line of ``field``, or of its nearest enclosing path that has one."""
        key = path_key(field)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get(())


def _node_lines(root: yaml.Node, prefix: NodePath, filename: str) -> dict[NodePath, int]:
    lines: dict[NodePath, int] = {prefix: root.start_mark.line + 1}
    stack: list[tuple[yaml.Node, NodePath]] = [(root, prefix)]
    visited = 0
    while stack:  # iterative: deep documents must not exhaust the Python stack here
        node, path = stack.pop()
        visited += 1
        if visited > MAX_YAML_NODES:
            raise file_error("too_large", f"more than {MAX_YAML_NODES} YAML nodes", file=filename)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = str(key_node.value)
                child = (*path, key)
                if key in seen and key != "<<":
                    raise file_error(
                        "duplicate_key",
                        f"key {key!r} appears twice",
                        file=filename,
                        line=key_node.start_mark.line + 1,
                        field=format_path(child),
                    )
                seen.add(key)
                lines.setdefault(child, key_node.start_mark.line + 1)
                stack.append((value_node, child))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                child = (*path, index)
                lines.setdefault(child, item.start_mark.line + 1)
                stack.append((item, child))
    return lines


def load_yaml_with_lines(
    text: str, *, filename: str, list_root: str | None = None
) -> LinedYaml | None:
    """Parse one YAML document safely; None for an empty one.

    When the document is a list and ``list_root`` is given, paths start with that name, so a bare
    list and ``{list_root: [...]}`` have the same paths. Raises ValidationError (kind ``syntax``,
    ``duplicate_key`` or ``too_large``) naming the line where known.
    """
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        is_list = isinstance(root, yaml.SequenceNode)
        prefix: NodePath = (list_root,) if is_list and list_root is not None else ()
        lines = _node_lines(root, prefix, filename)
        document = loader.construct_document(root)
    except _TooLarge as exc:
        raise file_error("too_large", exc.problem, file=filename, line=exc.line) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise file_error("syntax", f"YAML: {exc.problem or exc}", file=filename, line=line) from exc
    except (yaml.YAMLError, RecursionError) as exc:
        raise file_error("syntax", f"YAML: {exc}", file=filename) from exc
    finally:
        loader.dispose()
    return LinedYaml(document, lines)
