"""The error root: one class per code, and one envelope for every boundary."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import modelsmith
from modelsmith import errors
from modelsmith.errors import (
    ConflictError,
    InternalError,
    InvalidRequest,
    ModelsmithError,
    NotFound,
    ProtocolError,
    error_class_for_code,
    error_envelope,
    registered_codes,
)

# Packages whose import needs the GPU extras (torch, vLLM): they define no error classes.
_HEAVY = ("modelsmith.gpu",)


def every_error_class() -> list[type[ModelsmithError]]:
    """The package's whole tree, after importing every module that may add to it."""
    for module in pkgutil.walk_packages(modelsmith.__path__, "modelsmith."):
        if not module.name.startswith(_HEAVY):
            importlib.import_module(module.name)
    found: list[type[ModelsmithError]] = []
    stack: list[type[ModelsmithError]] = [ModelsmithError]
    while stack:
        cls = stack.pop()
        if cls.__module__.startswith("modelsmith."):
            found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


def test_no_two_classes_anywhere_in_the_package_declare_the_same_code() -> None:
    table = registered_codes(every_error_class())
    assert table == {code: error_class_for_code(code) for code in table}


def test_declaring_a_code_twice_is_refused_naming_both_classes() -> None:
    class First(ModelsmithError):
        code = 1999

    class Second(ModelsmithError):
        code = 1999

    with pytest.raises(RuntimeError, match=r"First.*Second"):
        registered_codes([First, Second])


def test_every_code_names_the_exact_class_that_declares_it() -> None:
    for cls in every_error_class():
        if "code" in vars(cls) and cls is not ProtocolError:
            assert error_class_for_code(cls.code) is cls, cls.__name__


def test_a_subclass_that_only_renames_travels_as_its_parents_code() -> None:
    class IllegalMove(ConflictError):
        name = "illegal_move"

    assert error_class_for_code(IllegalMove.code) is ConflictError


def test_the_protocol_family_reads_back_as_invalid_request() -> None:
    assert error_class_for_code(ProtocolError.code) is InvalidRequest


def test_an_unknown_code_gives_the_root() -> None:
    assert error_class_for_code(4242) is ModelsmithError
    assert error_class_for_code(ModelsmithError.code) is ModelsmithError


def test_the_envelope_carries_code_name_message_and_a_copy_of_the_data() -> None:
    exc = NotFound("no cluster 'nope'", data={"cluster": "nope"})
    envelope = error_envelope(exc)
    assert envelope == {"code": 1001, "name": "not_found", "message": "no cluster 'nope'",
                        "data": {"cluster": "nope"}}
    envelope["data"]["cluster"] = "changed"
    assert exc.data == {"cluster": "nope"}


def test_a_foreign_exception_becomes_an_internal_error_without_its_text() -> None:
    envelope = error_envelope(PermissionError("/root/secret"))
    assert envelope["code"] == InternalError.code
    assert envelope["name"] == InternalError.name
    assert "secret" not in envelope["message"]
    assert envelope["data"] == {"type": "PermissionError"}


def test_the_module_docstring_draws_every_class_of_the_module() -> None:
    tree = errors.__doc__ or ""
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, ModelsmithError):
            assert cls.__name__ in tree, cls.__name__
