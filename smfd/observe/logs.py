"""Logging setup: structlog events and library logs in one format, secrets redacted.

Why through stdlib logging: apscheduler, watchdog and httpx log with the
standard library; routing structlog through the same handler gives one stream
of one-line JSON objects. Under journald each line gets a ``<N>`` syslog
priority prefix so `journalctl -p warning` filters correctly.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog

from smfd.errors import ConfigError

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

REDACTED = "[REDACTED]"

# Key words that mark a value as secret wherever they appear in a key ("db_password", "X-Auth-Secret").
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "auth",
        "authorization",
        "cookie",
        "apikey",
        "credential",
        "credentials",
        "privatekey",
    }
)
_KEY_SPLIT = re.compile(r"[^a-z0-9]+")
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s]+@")
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&](?:access_token|token|api_key|apikey|key|password|secret|auth|sig|signature)=)[^&#\s]+",
    re.IGNORECASE,
)
# Bearer credentials of any shape; Basic only when it looks like base64 (not "Basic settings").
_BEARER = re.compile(
    r"\b(?:(?P<scheme>Bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"
    r"|(?P<basic>Basic)\s+(?=[A-Za-z0-9+/]*(?:[0-9+/=]|[a-z][A-Z]))[A-Za-z0-9+/]{8,}=*)"
)

_HANDLER_MARK = "_smfd_handler"


def _is_secret_key(key: object) -> bool:
    """True for keys that name credentials: password, token, authorization, api key, ..."""
    words = [w for w in _KEY_SPLIT.split(str(key).lower()) if w]
    if not words:
        return False
    joined_pairs = {a + b for a, b in zip(words, words[1:])}  # "api","key" -> "apikey"
    if _SECRET_WORDS & (set(words) | joined_pairs):
        return True
    # "token" marks a secret only as the last word ("access_token"), so counters such as
    # "queue_tokens" or "token_count" stay readable. A bare "key" is too common ("cache_key").
    if words[-1] == "token":
        return True
    return words[-1] == "key" and len(words) > 1 and words[-2] in {"api", "private", "secret", "access"}


def redact_text(text: str) -> str:
    """Remove URL userinfo, secret query parameters and bearer tokens from free text."""
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m.group('name')}{REDACTED}", text)
    return _BEARER.sub(lambda m: f"{m.group('scheme') or m.group('basic')} {REDACTED}", text)


def redact_value(value: Any) -> Any:
    """Redact secrets inside strings, mappings and sequences (recursively)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret_key(k) else redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # rendered as JSON arrays either way
        return [redact_value(v) for v in value]
    return value


def redact_secrets(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: never let a credential reach the log stream."""
    return {key: REDACTED if _is_secret_key(key) else redact_value(value) for key, value in event_dict.items()}


def syslog_priority(levelno: int) -> int:
    """Map a logging level to a syslog priority (debug 7, info 6, warning 4, error 3, critical 2)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stream_is_journald(stream: TextIO) -> bool:
    """True when `stream` is the journald stream named by JOURNAL_STREAM ("dev:inode")."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = expected.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no real file descriptor (e.g. StringIO)
        return False
    return info.st_dev == int(device) and info.st_ino == int(inode)


class _Formatter(structlog.stdlib.ProcessorFormatter):
    """ProcessorFormatter that can prefix every output line with a syslog priority."""

    def __init__(self, *args: Any, journald: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journald:
            return text
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def _shared_processors() -> list[Any]:
    """Processors applied to both structlog events and foreign (stdlib) records."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _build_handler(stream: TextIO, json: bool) -> logging.Handler:
    """A stream handler whose formatter renders JSON (or console text) after redaction."""
    renderer: Any = (
        structlog.processors.JSONRenderer(default=str) if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = _Formatter(
        # Tracebacks become a string before redaction, so secrets in them are caught too.
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        foreign_pre_chain=_shared_processors(),
        journald=stream_is_journald(stream),
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    return handler


def configure_logging(level: str = "info", json: bool = True, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (default stderr) in one format.

    Calling it again replaces the handler it installed earlier; handlers added
    by others (e.g. test harnesses) are left alone. Raises ConfigError for an
    unknown level name.
    """
    levelno = LEVELS.get(str(level).lower())
    if levelno is None:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    root.addHandler(_build_handler(sys.stderr if stream is None else stream, json))
    root.setLevel(levelno)
    logging.captureWarnings(True)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a logger bound before configure_logging() (e.g. at import) must still
        # pick up this configuration.
        cache_logger_on_first_use=False,
    )
