"""The anyio client: typed errors raised inside a connection reach the caller unwrapped."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from support.daemon_process import start_daemon, write_cluster

from modelsmith.errors import NotFound
from modelsmith.rpc.client import connect


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
