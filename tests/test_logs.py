"""Log output: one JSON object per line, journald priority prefixes, secrets never written."""

from __future__ import annotations

import json
import logging
import os
import warnings

import pytest
import structlog

from smfd.errors import ConfigError
from smfd.observe.logs import configure_logging


@pytest.fixture()
def log_file(tmp_path, monkeypatch):
    """A real file as the log stream; restores logging and structlog afterwards."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved_level = root.level
    path = tmp_path / "smfd.log"
    with path.open("w", encoding="utf-8") as stream:
        yield path, stream
    for handler in list(root.handlers):
        if getattr(handler, "_smfd_handler", False):
            root.removeHandler(handler)
    root.setLevel(saved_level)
    logging.captureWarnings(False)
    structlog.reset_defaults()


def _lines(path, stream) -> list[str]:
    stream.flush()
    return path.read_text(encoding="utf-8").splitlines()


def test_structlog_and_library_logs_are_one_json_object_per_line(log_file):
    path, stream = log_file
    configure_logging("info", json=True, stream=stream)
    structlog.get_logger("smfd.learn.learner").info("update accepted", rows=12, note="two\nlines")
    logging.getLogger("apscheduler.scheduler").warning("job %s missed", "train")
    logging.getLogger("httpx").debug("below the level, dropped")
    try:
        raise ValueError("bad chunk")
    except ValueError:
        structlog.get_logger("smfd.learn.learner").exception("update failed")
    events = [json.loads(line) for line in _lines(path, stream)]
    assert [(e["logger"], e["level"], e["event"]) for e in events] == [
        ("smfd.learn.learner", "info", "update accepted"),
        ("apscheduler.scheduler", "warning", "job train missed"),
        ("smfd.learn.learner", "error", "update failed"),
    ]
    assert events[0]["rows"] == 12 and events[0]["note"] == "two\nlines"
    assert "ValueError: bad chunk" in events[2]["exception"]
    assert all("timestamp" in e for e in events)


def test_journald_stream_gets_syslog_priority_prefixes(log_file, monkeypatch):
    path, stream = log_file
    info = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
    configure_logging("debug", json=True, stream=stream)
    log = structlog.get_logger("smfd")
    log.debug("d")
    log.info("i")
    logging.getLogger("watchdog.observers").warning("w")
    log.error("e")
    log.critical("c")
    lines = _lines(path, stream)
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["d", "i", "w", "e", "c"]


def test_other_stream_gets_no_prefix(log_file, monkeypatch):
    path, stream = log_file
    info = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino + 1}")
    configure_logging("info", json=True, stream=stream)
    structlog.get_logger("smfd").info("plain")
    (line,) = _lines(path, stream)
    assert json.loads(line)["event"] == "plain"


SECRETS = ("hunter2", "sk-live-123456", "abcdef0123456789", "s3cr3tpass", "feedkey987", "ghp_tokenvalue42")


def test_secrets_are_redacted(log_file):
    path, stream = log_file
    configure_logging("info", json=True, stream=stream)
    log = structlog.get_logger("smfd.feeds")
    log.info(
        "fetching https://reader:s3cr3tpass@example.org/feed.xml?key=feedkey987&page=2",
        password="hunter2",
        api_key="sk-live-123456",
        headers={"Authorization": "Bearer abcdef0123456789", "Accept": "application/rss+xml"},
        queue_tokens=4096,
    )
    logging.getLogger("httpx").info("retry with token", extra={"access_token": "ghp_tokenvalue42"})
    lines = _lines(path, stream)
    text = "\n".join(lines)
    for secret in SECRETS:
        assert secret not in text
    first = json.loads(lines[0])
    assert first["queue_tokens"] == 4096  # counts that merely mention tokens stay readable
    assert first["headers"]["Accept"] == "application/rss+xml"
    assert first["event"] == "fetching https://[REDACTED]@example.org/feed.xml?key=[REDACTED]&page=2"


def test_secret_in_exception_text_is_redacted(log_file):
    path, stream = log_file
    configure_logging("info", json=True, stream=stream)
    try:
        raise ConnectionError("cannot reach https://bot:hunter2@example.org/feed")
    except ConnectionError:
        logging.getLogger("smfd.feeds").exception("fetch failed")
    (line,) = _lines(path, stream)
    assert "hunter2" not in line
    assert "ConnectionError" in json.loads(line)["exception"]


def test_reconfiguring_replaces_the_handler(log_file):
    path, stream = log_file
    configure_logging("info", json=True, stream=stream)
    configure_logging("warning", json=True, stream=stream)
    structlog.get_logger("smfd").info("hidden now")
    structlog.get_logger("smfd").warning("once")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    events = [json.loads(line) for line in _lines(path, stream)]
    assert events[0]["event"] == "once"
    assert len(events) == 2 and events[1]["logger"] == "py.warnings"


def test_unknown_level_is_a_config_error(log_file):
    _, stream = log_file
    with pytest.raises(ConfigError, match="'verbose'"):
        configure_logging("verbose", json=True, stream=stream)


def test_console_format_for_humans(log_file):
    path, stream = log_file
    configure_logging("info", json=False, stream=stream)
    structlog.get_logger("smfd").info("started", password="hunter2")
    (line,) = _lines(path, stream)
    assert "started" in line and "hunter2" not in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_scheduler_tick_during_a_draining_update_is_not_a_warning_but_other_scheduler_warnings_are():
    from smfd.daemon.service import _skip_expected_overlap

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("apscheduler.scheduler", logging.WARNING, __file__, 1, message, (), None)

    overlap = 'Execution of job "Daemon.run_update" skipped: maximum number of running instances reached (1)'
    assert not _skip_expected_overlap(record(overlap))
    assert _skip_expected_overlap(record('Run time of job "Daemon.run_probes" was missed by 0:00:05'))
