"""The systemd units: the directives the daemon relies on, and systemd's own tools accept them."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
SERVICE = SYSTEMD_DIR / "modelsmith.service"
SOCKET = SYSTEMD_DIR / "modelsmith.socket"
SYSUSERS = SYSTEMD_DIR / "modelsmith.sysusers.conf"
TMPFILES = SYSTEMD_DIR / "modelsmith.tmpfiles.conf"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections -> key -> every value given (keys like DeviceAllow= repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a directive: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}= given {len(values)} times"
    return values[0]


@pytest.fixture(scope="module")
def service() -> Unit:
    return parse_unit(SERVICE)


@pytest.fixture(scope="module")
def socket_unit() -> Unit:
    return parse_unit(SOCKET)


def test_the_service_is_a_notify_service_with_a_watchdog_restarted_on_failure(service: Unit) -> None:
    assert one(service, "Service", "Type") == "notify"
    assert one(service, "Service", "NotifyAccess") == "main"
    assert one(service, "Service", "WatchdogSec")
    assert one(service, "Service", "Restart") == "on-failure"
    assert one(service, "Service", "KillSignal") == "SIGTERM"
    assert one(service, "Service", "TimeoutStartSec")
    assert one(service, "Service", "TimeoutStopSec")


def test_the_service_runs_the_daemon_as_its_own_user_with_home_and_socket_set(service: Unit) -> None:
    assert one(service, "Service", "ExecStart").split()[-2:] == ["modelsmith", "daemon"]
    assert one(service, "Service", "User") == "modelsmith"
    assert one(service, "Service", "Group") == "modelsmith"
    environment = dict(v.split("=", 1) for v in service["Service"]["Environment"])
    assert environment["MODELSMITH_HOME"] == "/var/lib/modelsmith"
    assert environment["MODELSMITH_SOCKET"] == "/run/modelsmith/modelsmith.sock"
    assert one(service, "Service", "StateDirectory") == "modelsmith"
    assert one(service, "Service", "RuntimeDirectory") == "modelsmith"
    # Without this, stopping the service would delete the socket the socket unit still holds.
    assert one(service, "Service", "RuntimeDirectoryPreserve") == "yes"


def test_the_service_is_sandboxed(service: Unit) -> None:
    assert one(service, "Service", "NoNewPrivileges") == "yes"
    assert one(service, "Service", "PrivateTmp") == "yes"
    assert one(service, "Service", "ProtectSystem") == "strict"


def test_the_service_drops_every_capability_and_filters_system_calls(service: Unit) -> None:
    # Empty values: no capability in the bounding set, none ambient.
    assert one(service, "Service", "CapabilityBoundingSet") == ""
    assert one(service, "Service", "AmbientCapabilities") == ""
    assert service["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert one(service, "Service", "SystemCallErrorNumber") == "EPERM"
    assert one(service, "Service", "SystemCallArchitectures") == "native"
    for key in ("PrivateMounts", "RemoveIPC", "LockPersonality", "RestrictRealtime", "RestrictNamespaces",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectClock",
                "ProtectHostname", "ProtectControlGroups", "RestrictSUIDSGID"):
        assert one(service, "Service", key) == "yes", key
    assert one(service, "Service", "ProtectProc") == "invisible"
    assert int(one(service, "Service", "LimitNOFILE")) >= 65536


def test_the_relaxations_a_gpu_process_needs_stay_relaxed(service: Unit) -> None:
    keys = service["Service"]
    # CUDA's PTX JIT, Triton and torch.compile map W+X memory.
    assert "MemoryDenyWriteExecute" not in keys
    # NVML reads /proc/driver/nvidia; torch and vLLM read /proc/cpuinfo and /proc/meminfo.
    assert "ProcSubset" not in keys
    # /dev/nvidia* must stay visible.
    assert keys.get("PrivateDevices", ["no"]) == ["no"]
    # SO_PEERCRED of the CLI's users must keep their real uid/gid.
    assert keys.get("PrivateUsers", ["no"]) == ["no"]
    # @resources (mbind, set_mempolicy, sched_setaffinity, setrlimit) is not filtered out.
    assert not any("@resources" in value for value in keys["SystemCallFilter"] if value.startswith("~"))


def test_the_service_reaches_localhost_only(service: Unit) -> None:
    assert one(service, "Service", "IPAddressDeny") == "any"
    assert one(service, "Service", "IPAddressAllow") == "localhost"
    # Rendezvous on the host's own LAN address would be dropped: vLLM, NCCL and gloo use loopback.
    environment = dict(v.split("=", 1) for v in service["Service"]["Environment"])
    assert environment["VLLM_HOST_IP"] == "127.0.0.1"
    assert environment["NCCL_SOCKET_IFNAME"] == "lo"
    assert environment["GLOO_SOCKET_IFNAME"] == "lo"
    families = one(service, "Service", "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"]


def test_the_service_may_open_the_nvidia_devices_and_no_others(service: Unit) -> None:
    assert one(service, "Service", "DevicePolicy") == "closed"
    allowed = {v.split()[0]: v.split()[1] for v in service["Service"]["DeviceAllow"]}
    # /proc/devices names: major 195 is "nvidia" from driver 550.40 on, "nvidia-frontend" before.
    assert allowed["char-nvidia"] == "rw"  # /dev/nvidia0 ... /dev/nvidiaN, /dev/nvidiactl
    assert allowed["char-nvidia-frontend"] == "rw"
    assert allowed["char-nvidia-uvm"] == "rw"
    assert allowed["char-nvidia-caps"] == "r"
    for node in ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"):
        assert allowed[node] == "rw", node
    assert all(device.startswith(("char-nvidia", "/dev/nvidia")) for device in allowed)


def test_the_uvm_nodes_are_created_before_start_outside_the_sandbox(service: Unit) -> None:
    # NoNewPrivileges= stops CUDA from running the setuid nvidia-modprobe itself: "+" runs it
    # as root before the daemon, "-" lets hosts without it start anyway.
    pre = one(service, "Service", "ExecStartPre")
    prefix, _, command = pre.partition("/")
    assert set(prefix) == {"+", "-"}
    assert ("/" + command).split() == ["/usr/bin/nvidia-modprobe", "-u", "-c=0"]


def test_the_socket_unit_listens_on_the_services_socket_with_group_access(
    service: Unit, socket_unit: Unit
) -> None:
    environment = dict(v.split("=", 1) for v in service["Service"]["Environment"])
    assert one(socket_unit, "Socket", "ListenStream") == environment["MODELSMITH_SOCKET"]
    assert one(socket_unit, "Socket", "SocketMode") == "0660"
    assert one(socket_unit, "Socket", "SocketUser") == "modelsmith"
    assert one(socket_unit, "Socket", "SocketGroup") == "modelsmith"
    assert one(socket_unit, "Socket", "DirectoryMode") == "0750"
    assert one(socket_unit, "Install", "WantedBy") == "sockets.target"
    assert "modelsmith.socket" in one(service, "Unit", "Requires")


def test_systemd_analyze_verify_accepts_both_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    for unit in (SERVICE, SOCKET):
        shutil.copy(unit, tmp_path / unit.name)
    run = subprocess.run(
        [analyze, "verify", "--man=no", "modelsmith.socket", "modelsmith.service"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    complaints = [line for line in run.stderr.splitlines() if "modelsmith." in line]
    assert complaints == []


OVERALL = re.compile(r"Overall exposure level for modelsmith\.service: (\d+(?:\.\d+)?) (\S+)")
MAX_EXPOSURE = 2.0


def test_systemd_analyze_security_scores_the_service_at_most_2_0() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (make setup installs Debian's systemd)")
    # --threshold= is the overall exposure times ten (5.5 -> 55): above it, the command fails.
    run = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", f"--threshold={int(MAX_EXPOSURE * 10)}", str(SERVICE)],
        capture_output=True, text=True, timeout=60,
    )
    match = OVERALL.search(run.stdout)
    assert match is not None, run.stdout + run.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, run.stdout
    assert run.returncode == 0, run.stdout + run.stderr


def test_sysusers_and_tmpfiles_create_the_user_and_its_0750_directories(tmp_path: Path) -> None:
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if sysusers is None or tmpfiles is None:
        pytest.skip("systemd-sysusers / systemd-tmpfiles are not installed")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", root / "etc" / name)
    subprocess.run([sysusers, f"--root={root}", str(SYSUSERS)], check=True, capture_output=True, timeout=60)
    entry = next(
        line.split(":")
        for line in (root / "etc" / "passwd").read_text().splitlines()
        if line.startswith("modelsmith:")
    )
    uid = int(entry[2])
    assert entry[5] == "/var/lib/modelsmith"
    subprocess.run([tmpfiles, f"--root={root}", "--create", str(TMPFILES)], check=True, capture_output=True, timeout=60)
    for directory in ("run/modelsmith", "var/lib/modelsmith"):
        info = (root / directory).stat()
        assert stat.S_IMODE(info.st_mode) == 0o750, directory
        assert info.st_uid == uid, directory
