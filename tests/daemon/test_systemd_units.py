"""The systemd units: the directives the daemon relies on, and systemd's own tools accept them."""

from __future__ import annotations

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


def test_the_service_may_open_the_nvidia_devices_and_no_others(service: Unit) -> None:
    assert one(service, "Service", "DevicePolicy") == "closed"
    allowed = {v.split()[0]: v.split()[1] for v in service["Service"]["DeviceAllow"]}
    assert allowed["char-nvidia-frontend"] == "rw"  # /dev/nvidia0 ... /dev/nvidiaN
    assert allowed["/dev/nvidiactl"] == "rw"
    assert allowed["/dev/nvidia-uvm"] == "rw"
    assert all(device.startswith(("char-nvidia", "/dev/nvidia")) for device in allowed)


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
