"""The house rules on imports (docs/architecture.md, "Rules of the house"), checked as tests.

Every module under ``modelsmith/`` is parsed (never imported) and every import statement in it
is collected, including the lazy ones inside functions. An import under ``if TYPE_CHECKING:`` is
type-only: it counts for every rule except import cycles, which are about what runs. Two rules
are also checked by importing for real, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "modelsmith"

HEAVY = frozenset({"torch", "vllm", "trl", "transformers", "peft"})
"""What loop/ never imports: it is pure domain logic, and the CLI never loads them either."""

CLI_NEVER_LOADS = HEAVY | {"pydantic", "structlog", "mcp"}
"""The CLI's hot path (DESIGN: "never imports torch, vllm, transformers, pydantic, structlog or
mcp"), plus the rest of :data:`HEAVY`."""

MAX_MODULE_LINES = 600

SCORING_MAY_IMPORT = frozenset(
    {"modelsmith.errors", "modelsmith.hashing", "modelsmith.clock", "modelsmith.atomic"}
)
CLI_MAY_IMPORT = frozenset(
    {"modelsmith.rpc.client", "modelsmith.rpc.address", "modelsmith.rpc.protocol",
     "modelsmith.rpc.schema", "modelsmith.errors", "modelsmith.clients"}
)
"""Besides the standard library and msgspec; ``modelsmith.rpc.schema`` includes its modules.
A module of clients/ imported at module level joins the CLI's path and is held to the same rule."""


@dataclass(frozen=True)
class Import:
    """One imported name as written in ``source`` (a module), resolved to an absolute name."""

    source: str
    target: str
    line: int
    lazy: bool  # inside a function: runs when called, not when the module is imported
    type_only: bool  # under ``if TYPE_CHECKING:``: never runs

    @property
    def top(self) -> str:
        return self.target.partition(".")[0]

    def where(self) -> str:
        kind = " (type-only)" if self.type_only else " (lazy)" if self.lazy else ""
        return f"{self.source}:{self.line} imports {self.target}{kind}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def module_files() -> dict[str, Path]:
    """Every module of the package, by dotted name (packages by their ``__init__``)."""
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))
            if "__pycache__" not in p.parts}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, source: str, is_package: bool, known: Iterable[str]) -> None:
        self.source = source
        # The package a relative import is relative to.
        self.package = source if is_package else source.rpartition(".")[0]
        self.known = frozenset(known)
        self.function_depth = 0
        self.type_only_depth = 0
        self.imports: list[Import] = []

    def _add(self, target: str, node: ast.stmt) -> None:
        self.imports.append(Import(self.source, target, node.lineno,
                                   lazy=self.function_depth > 0,
                                   type_only=self.type_only_depth > 0))

    def _in_function(self, node: ast.AST) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _in_function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self.type_only_depth += 1
        for statement in node.body:
            self.visit(statement)
        self.type_only_depth -= 1
        for statement in node.orelse:
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            module = ".".join([*base, node.module] if node.module else base)
        else:
            module = node.module or ""
        if module == "__future__":
            return
        for alias in node.names:
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` mod.
            submodule = f"{module}.{alias.name}"
            self._add(submodule if submodule in self.known else module, node)


def collect_imports(source: str, text: str, *, is_package: bool,
                    known: Iterable[str]) -> list[Import]:
    collector = _ImportCollector(source, is_package, known)
    collector.visit(ast.parse(text))
    return collector.imports


@cache
def all_imports() -> tuple[Import, ...]:
    files = module_files()
    found: list[Import] = []
    for name, path in files.items():
        found += collect_imports(name, path.read_text(encoding="utf-8"),
                                 is_package=path.name == "__init__.py", known=files)
    return tuple(found)


def imports_of(prefix: str) -> Iterator[Import]:
    """The imports written in ``prefix`` or any module under it."""
    return (i for i in all_imports() if within(i.source, prefix))


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def listing(problems: Iterable[str]) -> str:
    return "\n  " + "\n  ".join(sorted(problems))


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter on this checkout; its last line of output."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------ the scanner


def test_the_scanner_sees_lazy_relative_from_and_type_only_imports() -> None:
    text = textwrap.dedent("""\
        from __future__ import annotations
        import os.path
        from typing import TYPE_CHECKING
        from . import sibling
        from .sibling import helper
        from .. import errors
        if TYPE_CHECKING:
            import torch
        else:
            import json
        class Thing:
            import re
        def later():
            from modelsmith.loop.scoring import rubric
    """)
    known = {"modelsmith.errors", "modelsmith.gpu.sibling", "modelsmith.loop.scoring.rubric"}
    found = {(i.target, i.lazy, i.type_only)
             for i in collect_imports("modelsmith.gpu.mod", text, is_package=False, known=known)}
    assert found == {
        ("os.path", False, False), ("typing", False, False),
        ("modelsmith.gpu.sibling", False, False), ("modelsmith.errors", False, False),
        ("torch", False, True), ("json", False, False), ("re", False, False),
        ("modelsmith.loop.scoring.rubric", True, False),
    }


def test_the_scanner_finds_every_module_and_the_imports_known_to_be_there() -> None:
    assert {"modelsmith.errors", "modelsmith.gpu.engines", "modelsmith.loop.scoring.rubric",
            "modelsmith.clients.cli"} <= set(module_files())
    lazy_in_trainer = {i.target for i in imports_of("modelsmith.gpu.trainer") if i.lazy}
    assert "modelsmith.loop.scoring.rubric" in lazy_in_trainer


# ------------------------------------------------------------------------------------- the rules


def test_loop_never_imports_torch_vllm_trl_transformers_or_peft_not_even_lazily() -> None:
    offending = [i.where() for i in imports_of("modelsmith.loop") if i.top in HEAVY]
    assert not offending, f"loop/ imports a heavy library:{listing(offending)}"


def test_importing_every_loop_module_loads_none_of_torch_vllm_trl_transformers_or_peft() -> None:
    loop_modules = sorted(m for m in module_files() if within(m, "modelsmith.loop"))
    code = textwrap.dedent(f"""\
        import importlib, json, sys
        heavy = {sorted(HEAVY)!r}
        blame = {{}}
        for name in {loop_modules!r}:
            importlib.import_module(name)
            for lib in heavy:
                if lib in sys.modules and lib not in blame:
                    blame[lib] = name
        print(json.dumps(blame))
    """)
    blame = json.loads(run_python(code))
    offending = [f"{lib} (first loaded by importing {module})" for lib, module in blame.items()]
    assert not offending, f"importing loop/ loads a heavy library:{listing(offending)}"


def test_gpu_imports_nothing_of_loop_but_the_scoring_leaf() -> None:
    offending = [i.where() for i in imports_of("modelsmith.gpu")
                 if within(i.target, "modelsmith.loop")
                 and not within(i.target, "modelsmith.loop.scoring")]
    assert not offending, f"gpu/ imports loop/ beyond loop.scoring:{listing(offending)}"


def test_the_scoring_leaf_imports_nothing_of_modelsmith_but_errors_hashing_clock_and_atomic(
) -> None:
    offending = [i.where() for i in imports_of("modelsmith.loop.scoring")
                 if i.top == "modelsmith" and i.target not in SCORING_MAY_IMPORT
                 and not within(i.target, "modelsmith.loop.scoring")]
    assert not offending, f"loop/scoring is not a leaf:{listing(offending)}"


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module, or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        components.append(sorted(component))
    return components


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], Import]]:
    """Modules and what they import at run time, lazily or not. Importing ``a.b.c`` runs
    ``a/__init__`` and ``a/b/__init__`` first, so those are imported too."""
    modules = module_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    evidence: dict[tuple[str, str], Import] = {}
    for found in all_imports():
        if found.type_only or found.top != "modelsmith":
            continue
        parts = found.target.split(".")
        for depth in range(1, len(parts) + 1):
            target = ".".join(parts[:depth])
            if target in modules and not within(found.source, target):
                graph[found.source].add(target)
                evidence.setdefault((found.source, target), found)
    return graph, evidence


def test_no_modelsmith_modules_import_each_other_in_a_cycle() -> None:
    graph, evidence = import_graph()
    reports = []
    for component in _strongly_connected(graph):
        members = set(component)
        edges = [evidence[(a, b)].where() for a in component for b in sorted(graph[a] & members)]
        reports.append(" <-> ".join(component) + ":" + "".join(f"\n      {e}" for e in edges))
    assert not reports, f"import cycles among modelsmith modules:{listing(reports)}"


def test_no_module_is_longer_than_600_lines() -> None:
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines())
               for name, path in module_files().items()}
    offending = [f"{name}: {n} lines" for name, n in lengths.items() if n > MAX_MODULE_LINES]
    assert not offending, f"modules over {MAX_MODULE_LINES} lines (split by concept):{listing(offending)}"


def cli_path() -> set[str]:
    """The CLI's modules, and the clients/ modules they import at module level."""
    def on_path(name: str) -> bool:
        leaf = name.rpartition(".")[2]
        return within(name, "modelsmith.clients") and (
            leaf in {"cli", "common", "render", "watch"} or leaf.startswith("commands_"))

    path = {name for name in module_files() if on_path(name)}
    grew = True
    while grew:
        reached = {i.target for i in all_imports() if i.source in path and not i.lazy
                   and within(i.target, "modelsmith.clients") and i.target in module_files()}
        grew = not reached <= path
        path |= reached
    return path


def _cli_may_import(target: str) -> bool:
    top = target.partition(".")[0]
    if top in sys.stdlib_module_names or top == "msgspec":
        return True
    if target == "modelsmith.rpc.schema" or within(target, "modelsmith.rpc.schema"):
        return True
    return target in CLI_MAY_IMPORT or within(target, "modelsmith.clients")


def test_the_cli_path_imports_only_the_stdlib_msgspec_the_rpc_client_and_wire_structs() -> None:
    path = cli_path()
    assert "modelsmith.clients.cli" in path
    offending = [i.where() for i in all_imports()
                 if i.source in path and not i.lazy and not _cli_may_import(i.target)]
    assert not offending, f"the CLI's path imports beyond its rule at module level:{listing(offending)}"


def test_starting_the_cli_loads_none_of_torch_vllm_transformers_pydantic_structlog_or_mcp(
) -> None:
    code = textwrap.dedent(f"""\
        import json, sys
        from modelsmith.clients import cli
        cli.build_parser()
        never = set({sorted(CLI_NEVER_LOADS)!r})
        print(json.dumps(sorted({{m.partition(".")[0] for m in sys.modules}} & never)))
    """)
    loaded = json.loads(run_python(code))
    assert not loaded, f"building the CLI's parser loads:{listing(loaded)}"
