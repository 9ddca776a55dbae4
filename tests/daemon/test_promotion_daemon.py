"""The promotion gate through a real daemon process and the real CLI, with a real SSH key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.daemon_process import DaemonProcess, start_daemon
from support.promotion_home import CLUSTER, PromotionHome, allow_signers, make_reviewer


def cli(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``modelsmith ARGS --socket S`` in its own process, as a person or an agent runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSMITH_")}
    return subprocess.run(
        [sys.executable, "-m", "modelsmith.clients.cli", *args, "--socket",
         str(daemon.socket_path)],
        capture_output=True, text=True, timeout=60, check=False, env=env)


def test_an_agent_requests_a_reviewer_approves_with_ssh_and_the_champion_survives_a_restart(
    short_tmp: Path,
) -> None:
    home = PromotionHome(short_tmp / "home")
    home.trained_candidate()
    alice = make_reviewer(short_tmp / "keys", "alice")
    allow_signers(home.home, f"alice {alice.public_line}")

    with start_daemon(home.home) as daemon:
        assert (home.home / "keys" / "daemon_ed25519").is_file()  # created on first start
        checked = cli(daemon, "policy", "check", CLUSTER)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "Result: PASS" in checked.stdout

        promoted = cli(daemon, "promote", CLUSTER, "--note", "ready for review")
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        lines = promoted.stdout.splitlines()
        assert lines[:10] == [
            "  Promotion request",
            f"    Cluster:   {CLUSTER}",
            "    Model:     tiny-llama",
            "    Iteration: 1",
            "    Composite: 88.9%",
            "    Eval tag:  iter-1-full",
            f"    Adapter:   {home.root / 'adapters' / 'iter-1'}",
            "  Promotion record written.",
            f"    Directory: {home.root / 'promotions'}/",
            lines[9],
        ]
        latest = lines[9].split("Latest:")[1].strip()
        request_id = latest[len("YYYY-MM-DD-"):-len(".json")]
        assert (home.root / "promotions" / latest).is_file()
        assert f"    modelsmith approve {CLUSTER} {request_id}" in lines
        assert daemon.call("cluster.status", {"cluster": CLUSTER})["phase"] == "awaiting_approval"

        again = cli(daemon, "promote", CLUSTER)
        assert again.returncode == 4  # a pending request blocks a new one (ConflictError)
        assert "conflict 1003" in again.stderr

        approved = cli(daemon, "approve", CLUSTER, request_id, "--key", str(alice.key_path))
        assert approved.returncode == 0, approved.stdout + approved.stderr
        assert "Approved by alice" in approved.stdout
        status = daemon.call("cluster.status", {"cluster": CLUSTER})
        assert (status["champion"], status["phase"], status["pending_promotion"]) == (
            "iter-1", "idle", None)

        bundled = cli(daemon, "bundle", CLUSTER, request_id)
        assert bundled.returncode == 0, bundled.stdout + bundled.stderr
        tarball = home.root / "bundles" / request_id / "bundle.tar.gz"
        assert tarball.is_file()

    # Offline: no daemon is running now.
    verified = subprocess.run(
        [sys.executable, "-m", "modelsmith.clients.cli", "bundle", "verify", str(tarball),
         "--home", str(home.home)], capture_output=True, text=True, timeout=60, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    with start_daemon(home.home) as restarted:
        status = restarted.call("cluster.status", {"cluster": CLUSTER})
        assert (status["champion"], status["pending_promotion"]) == ("iter-1", None)
        refused = cli(restarted, "promote", CLUSTER)
        assert refused.returncode == 1  # the gate: no candidate left to promote
        assert "candidate" in refused.stdout
