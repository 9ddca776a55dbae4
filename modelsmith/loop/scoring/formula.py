"""A rubric's ``formula``: its criteria's scores combined by an arithmetic expression.

The language is the one OpenAI's multi grader gives ``calculate_output``: numbers, the
criteria's names, ``+ - * /``, ``^`` (power, as there; ``**`` too), parentheses, and the
functions ``min max abs floor ceil exp sqrt log``. Nothing else: no attribute, subscript,
string, comparison, keyword argument or other name. The expression is checked when the rubric
is decoded (:func:`check_formula`, an allow-list over its syntax tree) and evaluated by
simpleeval (a maintained evaluator for untrusted expressions; never Python's ``eval``) with
only those operators and functions, bounded: at most :data:`MAX_FORMULA_CHARS` characters and
:data:`MAX_FORMULA_NODES` nodes, powers with an exponent of at most :data:`MAX_EXPONENT` in
magnitude, computed in floating point, and a non-finite result is an error.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

import simpleeval

__all__ = [
    "FORMULA_FUNCTIONS",
    "MAX_EXPONENT",
    "MAX_FORMULA_CHARS",
    "MAX_FORMULA_NODES",
    "FormulaError",
    "check_formula",
    "evaluate_formula",
    "formula_names",
]

MAX_FORMULA_CHARS: Final = 1000
MAX_FORMULA_NODES: Final = 200
MAX_EXPONENT: Final = 64.0


class FormulaError(ValueError):
    """A formula that cannot be read, or that fails on these scores (``1/0``, ``log(0)``)."""


def _power(base: Any, exponent: Any) -> float:
    if abs(float(exponent)) > MAX_EXPONENT:
        raise FormulaError(f"exponent {exponent!r} is larger than {MAX_EXPONENT:g}")
    try:
        return math.pow(float(base), float(exponent))
    except (OverflowError, ValueError) as exc:
        raise FormulaError(f"{base!r} ^ {exponent!r}: {exc}") from exc


def _log(value: Any, base: Any = None) -> float:
    return math.log(float(value)) if base is None else math.log(float(value), float(base))


def _floor(value: Any) -> float:
    return float(math.floor(float(value)))


def _ceil(value: Any) -> float:
    return float(math.ceil(float(value)))


def _minimum(*values: Any) -> float:
    if not values:
        raise FormulaError("min() of nothing")
    return float(min(float(v) for v in values))


def _maximum(*values: Any) -> float:
    if not values:
        raise FormulaError("max() of nothing")
    return float(max(float(v) for v in values))


def _div(a: Any, b: Any) -> float:
    return float(a) / float(b)


FORMULA_FUNCTIONS: Final[dict[str, Callable[..., float]]] = {
    "min": _minimum,
    "max": _maximum,
    "abs": lambda value: abs(float(value)),
    "floor": _floor,
    "ceil": _ceil,
    "exp": lambda value: math.exp(float(value)),
    "sqrt": lambda value: math.sqrt(float(value)),
    "log": _log,
}

_OPERATORS: Final[dict[type[ast.AST], Callable[..., Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: _div,
    ast.Pow: _power,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}

_ALLOWED_NODES: Final = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Load, ast.Constant,
    *_OPERATORS,
)


def _describe(node: ast.AST) -> str:
    names = {
        ast.Attribute: "attribute access", ast.Subscript: "indexing", ast.Compare: "comparisons",
        ast.BoolOp: "and/or", ast.IfExp: "if/else", ast.Lambda: "lambda",
        ast.Mod: "%", ast.FloorDiv: "//", ast.BitAnd: "&", ast.BitOr: "|",
        ast.LShift: "<<", ast.RShift: ">>", ast.Invert: "~", ast.Not: "not",
        ast.MatMult: "@",
    }
    return names.get(type(node), type(node).__name__)


def _python_syntax(text: str) -> str:
    # `^` is power in calculate_output, binding as in mathematics (2*3^2 is 18, 2^3^2 is 512):
    # exactly Python's `**`. With no strings in the language, every `^` is that operator.
    return text.strip().replace("^", "**")


def _parse(text: str) -> ast.Expression:
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaError(f"longer than {MAX_FORMULA_CHARS} characters")
    if not text.strip():
        raise FormulaError("empty")
    try:
        tree = ast.parse(_python_syntax(text), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise FormulaError(f"not an expression: {getattr(exc, 'msg', None) or exc}") from None
    return tree


def formula_names(text: str) -> set[str]:
    """The criterion names ``text`` uses (the function names aside); FormulaError when the text
    is not a formula of the allowed language."""
    tree = _parse(text)
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_FORMULA_NODES:
        raise FormulaError(f"more than {MAX_FORMULA_NODES} syntax nodes")
    names: set[str] = set()
    for node in nodes:
        if not isinstance(node, _ALLOWED_NODES):
            raise FormulaError(f"{_describe(node)} is not allowed")
        if isinstance(node, ast.Constant) and (
            isinstance(node.value, bool) or not isinstance(node.value, int | float)
        ):
            raise FormulaError(f"only numbers are allowed, not {node.value!r}")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FORMULA_FUNCTIONS:
                shown = node.func.id if isinstance(node.func, ast.Name) else _describe(node.func)
                raise FormulaError(f"unknown function {shown!r}; use "
                                   + ", ".join(sorted(FORMULA_FUNCTIONS)))
            if node.keywords:
                raise FormulaError("keyword arguments are not allowed")
            if any(isinstance(arg, ast.Starred) for arg in node.args):
                raise FormulaError("* arguments are not allowed")
    for node in nodes:
        if isinstance(node, ast.Name) and not _is_function_name(tree, node):
            names.add(node.id)
    return names


def _is_function_name(tree: ast.Expression, name: ast.Name) -> bool:
    return any(isinstance(n, ast.Call) and n.func is name for n in ast.walk(tree))


def check_formula(text: str, known: Collection[str]) -> None:
    """Raise FormulaError unless ``text`` is a formula over ``known`` names only."""
    unknown = sorted(formula_names(text) - set(known))
    if unknown:
        raise FormulaError(
            f"unknown name(s) {', '.join(unknown)}; the criteria are "
            + (", ".join(sorted(known)) or "(none named)")
        )


@functools.lru_cache(maxsize=256)
def _prepared(text: str) -> Any:
    formula_names(text)  # the allow-list, even for a formula that skipped the decode-time check
    evaluator = simpleeval.SimpleEval(operators=dict(_OPERATORS), functions=dict(FORMULA_FUNCTIONS))
    return evaluator.parse(_python_syntax(text))


def evaluate_formula(text: str, values: Mapping[str, float]) -> float:
    """``text`` evaluated with ``values`` for its names: a finite float, or FormulaError."""
    tree = _prepared(text)
    evaluator = simpleeval.SimpleEval(
        operators=dict(_OPERATORS), functions=dict(FORMULA_FUNCTIONS),
        names={name: float(value) for name, value in values.items()},
    )
    try:
        result = evaluator.eval(_python_syntax(text), previously_parsed=tree)
    except FormulaError:
        raise
    except simpleeval.InvalidExpression as exc:
        raise FormulaError(str(exc)) from None
    except (ArithmeticError, ValueError, TypeError) as exc:
        raise FormulaError(f"{type(exc).__name__}: {exc}") from None
    if isinstance(result, bool) or not isinstance(result, int | float):
        raise FormulaError(f"the result is not a number: {result!r}")
    value = float(result)
    if not math.isfinite(value):
        raise FormulaError(f"the result is not finite: {value!r}")
    return value
