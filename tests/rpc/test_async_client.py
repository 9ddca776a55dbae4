"""The clients: typed errors raised inside a connection reach the caller unwrapped, and an
answer of the wrong shape is a typed error too."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest
from support.daemon_process import start_daemon, write_cluster

from modelsmith.errors import InternalError, NotFound
from modelsmith.rpc.client import RpcClient, connect


def test_errors_raised_inside_connect_reach_the_caller(short_tmp: Path) -> None:
    home = short_tmp / "home"
    write_cluster(home, "c1")
    with start_daemon(home) as d:
        async def main() -> None:
            async with connect(d.socket_path) as rpc:
                await rpc.call("fleet.status", {"cluster": "nope"})
        with pytest.raises(NotFound):
            anyio.run(main)
        async def main2() -> dict[str, object]:
            async with connect(d.socket_path) as rpc:
                result: dict[str, object] = await rpc.call("daemon.ping", {})
                return result
        assert anyio.run(main2)["pong"]


class _NotAPing(msgspec.Struct):
    cluster: str


def test_an_answer_of_another_shape_is_an_internal_error_naming_the_method(short_tmp: Path) -> None:
    home = short_tmp / "home"
    write_cluster(home, "c1")
    with start_daemon(home) as d:
        with RpcClient(d.socket_path) as rpc, pytest.raises(InternalError) as blocking:
            rpc.call("daemon.ping", {}, result_type=_NotAPing)
        assert blocking.value.data == {"method": "daemon.ping"}

        async def main() -> None:
            async with connect(d.socket_path) as rpc:
                await rpc.call("daemon.ping", {}, result_type=_NotAPing)

        with pytest.raises(InternalError) as concurrent:
            anyio.run(main)
        assert concurrent.value.data == {"method": "daemon.ping"}
