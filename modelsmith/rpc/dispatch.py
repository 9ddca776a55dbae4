"""The method table: one registry of every RPC method, its params/result types and handler.

Handlers live next to the service they expose and register themselves here. Params are decoded
into the method's msgspec Struct; Structs of mutating methods are declared with
``forbid_unknown_fields=True`` (see :class:`MutatingParams`) so a typo is refused, not ignored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from modelsmith.errors import InvalidParams, MethodNotFound
from modelsmith.rpc.context import CallContext

P = TypeVar("P", bound=msgspec.Struct)
R = TypeVar("R")


class QueryParams(msgspec.Struct, kw_only=True):
    """Params of a read-only method: unknown fields are ignored (forward compatible)."""


class MutatingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Params of a method that changes state: unknown fields are refused."""


class Empty(QueryParams):
    pass


Handler = Callable[[Any, CallContext], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class MethodSpec(Generic[P]):
    name: str
    params_type: type[P]
    handler: Handler
    summary: str
    inline: bool = False

    def decode_params(self, raw: bytes) -> P:
        try:
            return msgspec.json.decode(raw, type=self.params_type)
        except msgspec.ValidationError as exc:
            # msgspec's message names the field path, e.g. "Expected `int`, got `str` - at `$.n`".
            raise InvalidParams(f"{self.name}: {exc}", data={"method": self.name}) from exc
        except msgspec.DecodeError as exc:
            raise InvalidParams(f"{self.name}: params are not valid JSON: {exc}") from exc


class MethodTable:
    """Name -> :class:`MethodSpec`. Registering a name twice is a programming error."""

    def __init__(self) -> None:
        self._methods: dict[str, MethodSpec[Any]] = {}

    def add(
        self, name: str, params_type: type[P], handler: Handler, summary: str = "", *, inline: bool = False
    ) -> None:
        """Register ``name``. ``inline`` handlers run on the connection's read loop without a task
        of their own: only for handlers that never wait (status reads), it saves a task per call."""
        if name in self._methods:
            raise RuntimeError(f"RPC method {name!r} registered twice")
        self._methods[name] = MethodSpec(name, params_type, handler, summary, inline)

    def is_inline(self, name: str) -> bool:
        spec = self._methods.get(name)
        return spec is not None and spec.inline

    def method(
        self, name: str, params_type: type[P], summary: str = ""
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.add(name, params_type, handler, summary)
            return handler

        return register

    def get(self, name: str) -> MethodSpec[Any]:
        try:
            return self._methods[name]
        except KeyError:
            raise MethodNotFound(f"unknown method {name!r}", data={"method": name}) from None

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods
