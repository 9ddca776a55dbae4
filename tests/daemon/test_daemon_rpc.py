"""The daemon as a real subprocess on a temporary home: the methods registered today, over its socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from support.daemon_process import (
    BAD_CLUSTER_TOML,
    GOOD_CLUSTER_TOML,
    DaemonProcess,
    short_tmp_dir,
    start_daemon,
    write_cluster,
)

from modelsmith.errors import InvalidParams, NotFound
from modelsmith.rpc.client import connect


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """One daemon for the module: a good cluster ``adtech`` and a broken one ``broken``."""
    with short_tmp_dir() as base:
        home = base / "home"
        write_cluster(home, "adtech", GOOD_CLUSTER_TOML)
        write_cluster(home, "broken", BAD_CLUSTER_TOML)
        with start_daemon(home, socket_path=base / "run" / "ms.sock") as process:
            yield process


def test_ping_answers_pong_with_the_version(daemon: DaemonProcess) -> None:
    result = daemon.call("daemon.ping")
    assert result["pong"] is True
    assert result["version"]


def test_daemon_status_reports_its_pid_home_socket_and_clusters(daemon: DaemonProcess) -> None:
    status = daemon.call("daemon.status")
    assert status["pid"] == daemon.pid
    assert Path(status["home"]) == daemon.home
    assert Path(status["socket"]) == daemon.socket_path
    assert status["clusters"] == 1
    assert status["uptime_s"] >= 0
    assert status["engines"] == []
    assert status["jobs"] == []
    assert [e["cluster"] for e in status["cluster_errors"]] == ["broken"]


def test_fleet_status_lists_the_good_cluster_and_reports_the_bad_one_with_file_and_field(
    daemon: DaemonProcess,
) -> None:
    fleet = daemon.call("fleet.status")
    assert [c["cluster"] for c in fleet["clusters"]] == ["adtech"]
    (error,) = fleet["errors"]
    assert error["cluster"] == "broken"
    assert Path(error["file"]) == daemon.home / "broken" / "cluster.toml"
    assert error["field"] == "thresholds.composite"


def test_cluster_status_shows_the_clusters_model_phase_and_thresholds(daemon: DaemonProcess) -> None:
    status = daemon.call("cluster.status", {"cluster": "adtech"})
    assert status["cluster"] == "adtech"
    assert status["model"] == "tiny-llama"
    assert status["domain"] == "adtech"
    assert status["phase"] == "idle"
    assert status["iteration"] == 0
    assert status["composite_threshold"] == 0.8
    assert status["held_out_threshold"] == 0.75


def test_cluster_status_of_an_unknown_cluster_is_not_found(daemon: DaemonProcess) -> None:
    with pytest.raises(NotFound) as caught:
        daemon.call("cluster.status", {"cluster": "no-such-cluster"})
    assert caught.value.code == 1001
    assert caught.value.data["cluster"] == "no-such-cluster"


def test_a_cluster_that_failed_to_load_is_not_found_either(daemon: DaemonProcess) -> None:
    with pytest.raises(NotFound):
        daemon.call("cluster.status", {"cluster": "broken"})


def test_fleet_status_of_one_unknown_cluster_is_not_found(daemon: DaemonProcess) -> None:
    with pytest.raises(NotFound):
        daemon.call("fleet.status", {"cluster": "nope"})


def test_job_list_is_empty_on_a_fresh_daemon(daemon: DaemonProcess) -> None:
    assert daemon.call("job.list") == {"jobs": []}
    assert daemon.call("job.list", {"cluster": "adtech", "state": "running"}) == {"jobs": []}


def test_job_get_of_an_unknown_job_is_not_found(daemon: DaemonProcess) -> None:
    with pytest.raises(NotFound) as caught:
        daemon.call("job.get", {"job_id": "deadbeef"})
    assert caught.value.code == 1001
    assert caught.value.data["job_id"] == "deadbeef"


def test_job_cancel_of_an_unknown_job_is_not_found(daemon: DaemonProcess) -> None:
    with pytest.raises(NotFound):
        daemon.call("job.cancel", {"job_id": "deadbeef"})


def test_job_cancel_with_an_unknown_field_is_refused_as_invalid_params(daemon: DaemonProcess) -> None:
    with pytest.raises(InvalidParams) as caught:
        daemon.call("job.cancel", {"job_id": "deadbeef", "force": True})
    assert caught.value.code == -32602


def test_a_query_method_ignores_unknown_fields(daemon: DaemonProcess) -> None:
    status = daemon.call("cluster.status", {"cluster": "adtech", "verbose": True})
    assert status["cluster"] == "adtech"


async def test_32_concurrent_clients_of_50_calls_each_all_get_their_own_answers(
    daemon: DaemonProcess,
) -> None:
    clients, calls = 32, 50
    answered = 0

    async def one_client(client_no: int) -> None:
        nonlocal answered
        async with connect(daemon.socket_path) as rpc:

            async def one_call(call_no: int) -> None:
                nonlocal answered
                if call_no % 2:
                    # Each error names the job asked for: a reply routed to the wrong request shows.
                    job_id = f"c{client_no}-{call_no}"
                    with pytest.raises(NotFound) as caught:
                        await rpc.call("job.get", {"job_id": job_id})
                    assert caught.value.data["job_id"] == job_id
                else:
                    status: dict[str, Any] = await rpc.call("cluster.status", {"cluster": "adtech"})
                    assert status["cluster"] == "adtech"
                answered += 1

            async with anyio.create_task_group() as calls_tg:
                for call_no in range(calls):
                    calls_tg.start_soon(one_call, call_no)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for client_no in range(clients):
                tg.start_soon(one_client, client_no)
    assert answered == clients * calls
    assert daemon.call("daemon.ping")["pong"] is True
    assert daemon.returncode is None
