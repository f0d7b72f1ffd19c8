"""The systemd notify protocol (sd_notify) without the systemd Python package.

Why hand-written: the protocol is one datagram to the AF_UNIX socket named by
NOTIFY_SOCKET, and the binding would add a C dependency to every install.
Outside systemd (NOTIFY_SOCKET unset) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("smfd.systemd")


def _socket_address(raw: str) -> str | bytes | None:
    """Translate NOTIFY_SOCKET into a connect() address; a leading "@" means the abstract namespace."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None


def notify(message: str) -> bool:
    """Send one notify message (e.g. "READY=1"); True when it was delivered.

    Returns False without error when not running under systemd. Delivery
    failures are logged, not raised: a lost status line must not stop the daemon.
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    address = _socket_address(raw)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a path or abstract socket; notification dropped", raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            # Never block: a receiver that stops reading must not stall the learner or the watchdog loop.
            sock.send(message.encode(), socket.MSG_DONTWAIT)
    except OSError as error:
        log.warning("could not notify systemd at %r: %s", raw, error)
        return False
    return True


def ready() -> bool:
    """Tell systemd start-up is complete (Type=notify waits for this)."""
    return notify("READY=1")


def status(text: str) -> bool:
    """Set the one-line status shown by `systemctl status`."""
    one_line = " ".join(text.split())
    return notify(f"STATUS={one_line}")


def watchdog() -> bool:
    """Pet the watchdog; call only while every worker is known to be healthy."""
    return notify("WATCHDOG=1")


def stopping() -> bool:
    """Tell systemd shutdown has begun."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """Tell systemd a configuration reload (SIGHUP) has begun; send ready() when done."""
    return notify("RELOADING=1")


def extend_timeout(seconds: float) -> bool:
    """Ask for more start/stop time, e.g. while a large model loads."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def watchdog_interval_seconds() -> float | None:
    """How often to pet the watchdog: half of WATCHDOG_USEC, or None when disabled.

    Honours WATCHDOG_PID: when it names another process (the variable was
    inherited), the watchdog is not ours and None is returned.
    """
    usec_text = os.environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = os.environ.get("WATCHDOG_PID")
    if pid_text and pid_text.strip() != str(os.getpid()):
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec_text)
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 / 2
