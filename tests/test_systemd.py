"""sd_notify over real AF_UNIX datagram sockets, and the systemd unit file."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from smfd.observe import systemd_notify

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "smfd.service"
INSTALLED_BINARY = "/usr/local/bin/smfd"


@pytest.fixture()
def path_socket(tmp_path, monkeypatch):
    """A datagram socket bound to a file path, advertised as NOTIFY_SOCKET."""
    address = tmp_path / "notify.sock"
    assert len(str(address)) < 100, "AF_UNIX path too long for this test"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(address))
        receiver.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(address))
        yield receiver


@pytest.fixture()
def abstract_socket(monkeypatch):
    """A datagram socket in the abstract namespace, advertised with a leading '@'."""
    name = f"smfd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(b"\0" + name.encode())
        receiver.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
        yield receiver


def test_messages_reach_a_path_socket(path_socket):
    assert systemd_notify.ready() is True
    assert path_socket.recv(4096) == b"READY=1"
    assert systemd_notify.status("loading model\n  step 2") is True
    assert path_socket.recv(4096) == b"STATUS=loading model step 2"
    assert systemd_notify.watchdog() is True
    assert path_socket.recv(4096) == b"WATCHDOG=1"
    assert systemd_notify.stopping() is True
    assert path_socket.recv(4096) == b"STOPPING=1"


def test_messages_reach_an_abstract_socket(abstract_socket):
    assert systemd_notify.ready() is True
    assert abstract_socket.recv(4096) == b"READY=1"
    assert systemd_notify.extend_timeout(90) is True
    assert abstract_socket.recv(4096) == b"EXTEND_TIMEOUT_USEC=90000000"
    assert systemd_notify.reloading() is True
    assert abstract_socket.recv(4096) == b"RELOADING=1"


def test_no_socket_means_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd_notify.ready() is False
    assert systemd_notify.notify("WATCHDOG=1") is False


def test_unreachable_socket_returns_false_instead_of_raising(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert systemd_notify.ready() is False
    assert "could not notify systemd" in caplog.text
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd_notify.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("120000000", None, 60.0),
        ("120000000", "self", 60.0),
        ("120000000", "other", None),  # inherited from another process: not our watchdog
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            pids = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}
            monkeypatch.setenv(name, pids.get(value, value))
    assert systemd_notify.watchdog_interval_seconds() == expected


def _unit_settings() -> dict[str, list[str]]:
    """Key -> values of the unit file (keys may repeat, e.g. DeviceAllow)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_keeps_the_gpu_reachable_and_config_errors_final():
    settings = _unit_settings()
    assert settings["Type"] == ["notify"]
    assert settings["RestartPreventExitStatus"] == ["78"]
    assert settings["WatchdogSec"] == ["120"]
    assert settings["DevicePolicy"] == ["closed"]
    assert {"/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "char-nvidia* rw"} <= set(settings["DeviceAllow"])
    assert "PrivateDevices" not in settings and "MemoryDenyWriteExecute" not in settings
    assert settings["Environment"].count("SMFD_STATE_DIR=%S/smfd") == 1
    assert settings["ExecStart"] == [f"{INSTALLED_BINARY} --config /etc/smfd/edge.yaml"]


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not on PATH")
    return path


def _verifiable_copy(directory: Path, text: str) -> Path:
    """The unit with ExecStart pointing at a binary that exists here (verify checks it is executable)."""
    assert text.count(f"ExecStart={INSTALLED_BINARY} ") == 1
    copy = directory / "smfd.service"
    copy.write_text(text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={shutil.which('true')} "))
    return copy


def _verify(analyze: str, unit: Path) -> str:
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    return (result.stdout + result.stderr).strip()


def test_unit_file_verifies_cleanly(tmp_path):
    """systemd-analyze verify exits 0 even on unknown keys, so any output at all is a failure."""
    analyze = _analyze()
    assert _verify(analyze, _verifiable_copy(tmp_path, UNIT.read_text())) == ""


def test_verify_would_catch_a_misspelled_key(tmp_path):
    """Guards the test above: in this environment verify does report a bad key."""
    analyze = _analyze()
    broken = UNIT.read_text().replace("WatchdogSec=120", "WatchdogSecs=120")
    assert "WatchdogSecs" in _verify(analyze, _verifiable_copy(tmp_path, broken))


def test_unit_hardening_score_stays_low(tmp_path):
    """Exposure must stay at or below 2.5 (of 10) so hardening cannot silently regress."""
    analyze = _analyze()
    unit = _verifiable_copy(tmp_path, UNIT.read_text())
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=25", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_notify_never_blocks_when_the_receiver_stops_reading(tmp_path, monkeypatch):
    import time as _time

    path = tmp_path / "full.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    started = _time.monotonic()
    results = [systemd_notify.status("x" * 200) for _ in range(2000)]  # far more than the socket queue holds
    assert _time.monotonic() - started < 10
    assert results[0] is True and results[-1] is False  # dropped once the queue is full, never stuck
    receiver.close()
