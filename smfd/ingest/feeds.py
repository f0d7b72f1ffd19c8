"""RSS/Atom feed source: polls one feed politely and hands new entries to the intake.

Why it is built this way:

* feedparser has no timeouts of its own (a hung fetch can block a scheduler thread
  forever), so the HTTP fetch is done with httpx and explicit timeouts, and only the
  bytes are handed to ``feedparser.parse``.
* Conditional requests (``If-None-Match`` / ``If-Modified-Since``) make an unchanged
  feed cost one tiny 304 response.
* A feed is never dropped for good: every failure becomes an error result and a
  later, exponentially backed-off (capped) poll time. ``Retry-After`` is honoured.
* Entries are deduplicated by id (or a hash of link + title + date); the seen ids and
  the HTTP validators live in a small JSON state file, written atomically, so a
  restart neither loses nor repeats entries. Delivery is at-least-once: if the
  process dies between ``submit`` and the state write, those entries are submitted
  again after restart, so the intake should deduplicate by content.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog

from smfd import __version__
from smfd.durable import atomic_write_json
from smfd.errors import SmfdError
from smfd.ingest.feed_entries import (
    _entries_oldest_first,
    _entry_name,
    _Fetched,
    _has_substance,
    _parse_feed,
    _PollFailed,
    _validate_settings,
    entry_key,
    entry_text,
    parse_retry_after,
)

SubmitFn = Callable[[str, str, str], object]

STATE_FORMAT_VERSION = 1
DEFAULT_MAX_SEEN_IDS = 5000
DEFAULT_MAX_BACKOFF_SECONDS = 3600.0
DEFAULT_JITTER_RATIO = 0.1
DEFAULT_MAX_FEED_BYTES = 10 * 1024 * 1024
# A Retry-After beyond this is treated as this long, so a bogus header cannot park a feed forever.


@dataclass(frozen=True)
class FeedPollResult:
    """What one poll did. ``error`` is None on success (including 304 Not Modified)."""

    url: str
    status_code: int | None
    not_modified: bool
    entries_in_feed: int
    submitted: int
    duplicates: int
    error: str | None
    retry_after_seconds: float | None
    next_due: float
    intake_results: tuple[object, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the poll succeeded (a 304 counts as success)."""
        return self.error is None


class FeedSource:
    """One RSS/Atom feed, polled on demand by a scheduler via ``poll_once``/``next_due``.

    ``submit(text, name, source)`` is the intake callback. ``name`` is the entry's link
    (else its title, else its dedup key); ``source`` is the constant ``source`` argument
    ("feed"), kept small because metrics use it as a label.
    """

    def __init__(
        self,
        url: str,
        submit: SubmitFn,
        interval_seconds: float,
        timeout_seconds: float,
        state_path: str | os.PathLike[str],
        *,
        max_backoff_seconds: float = DEFAULT_MAX_BACKOFF_SECONDS,
        jitter_ratio: float = DEFAULT_JITTER_RATIO,
        max_seen_ids: int = DEFAULT_MAX_SEEN_IDS,
        max_feed_bytes: int = DEFAULT_MAX_FEED_BYTES,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        source: str = "feed",
    ) -> None:
        _validate_settings(url, interval_seconds, timeout_seconds, max_backoff_seconds, jitter_ratio, max_seen_ids)
        self.url = url
        self.source = source
        self.interval_seconds = float(interval_seconds)
        self.timeout_seconds = float(timeout_seconds)
        self.max_backoff_seconds = max(float(max_backoff_seconds), self.interval_seconds)
        self.jitter_ratio = float(jitter_ratio)
        self.max_seen_ids = int(max_seen_ids)
        self.max_feed_bytes = int(max_feed_bytes)
        self.state_path = Path(state_path)
        self.errors_total = 0
        self.consecutive_errors = 0
        self._submit = submit
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._log = structlog.get_logger().bind(feed_url=url)
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._seen: dict[str, None] = {}
        self._next_due = clock()
        self._load_state()

    # ----------------------------------------------------------------- public API

    def next_due(self) -> float:
        """Monotonic time (same clock as ``clock``) at which the next poll should run."""
        return self._next_due

    def poll_once(self) -> FeedPollResult:
        """Fetch the feed once and submit new entries. Never raises for network or feed problems."""
        with self._lock:
            try:
                return self._poll_locked()
            except _PollFailed as failure:
                return self._record_error(failure)
            except OSError as exc:  # the state file could not be written (disk full, permissions)
                self._log.error("feed_state_write_failed", path=str(self.state_path), error=repr(exc))
                return self._record_error(_PollFailed(f"state write failed: {exc.strerror or exc}"))
            except Exception as exc:  # last resort: a bug here must not kill the scheduler thread
                self._log.exception("feed_poll_crashed")
                return self._record_error(_PollFailed(f"internal error: {type(exc).__name__}"))

    # ------------------------------------------------------------------- polling

    def _poll_locked(self) -> FeedPollResult:
        fetched = self._fetch()
        if fetched.status_code == 304:
            self._log.info("feed_fetched", status=304, not_modified=True, entries=0, submitted=0)
            return self._record_success(304, not_modified=True, entries=0, submitted=0, duplicates=0, results=())
        parsed = _parse_feed(fetched)
        entries = _entries_oldest_first([entry for entry in parsed.entries if _has_substance(entry)])
        submitted, duplicates, results, submit_error = self._submit_new(entries)
        if submit_error is None:
            # Only remember validators once every new entry reached the intake; otherwise
            # the next poll would get a 304 and never retry the entries that failed.
            self._etag = fetched.headers.get("etag") if fetched.headers else None
            self._last_modified = fetched.headers.get("last-modified") if fetched.headers else None
        self._save_state()
        self._log.info(
            "feed_fetched",
            status=fetched.status_code,
            final_url=fetched.final_url,
            entries=len(entries),
            submitted=submitted,
            duplicates=duplicates,
        )
        if submit_error is not None:
            raise _PollFailed(submit_error, status_code=fetched.status_code)
        return self._record_success(
            fetched.status_code,
            not_modified=False,
            entries=len(entries),
            submitted=submitted,
            duplicates=duplicates,
            results=tuple(results),
        )

    def _fetch(self) -> _Fetched:
        """GET the feed with timeouts, conditional headers and a size cap."""
        timeout = httpx.Timeout(
            connect=self.timeout_seconds,
            read=self.timeout_seconds,
            write=self.timeout_seconds,
            pool=self.timeout_seconds,
        )
        try:
            with httpx.Client(timeout=timeout, follow_redirects=True, max_redirects=10) as client:
                with client.stream("GET", self.url, headers=self._request_headers()) as response:
                    return self._read_response(response)
        except httpx.TimeoutException as exc:
            raise _PollFailed("timeout") from exc
        except httpx.TooManyRedirects as exc:
            raise _PollFailed("too many redirects") from exc
        except httpx.ConnectError as exc:
            raise _PollFailed("connection failed") from exc
        except httpx.HTTPError as exc:
            raise _PollFailed(f"http error: {type(exc).__name__}") from exc

    def _request_headers(self) -> dict[str, str]:
        headers = {
            "User-Agent": f"smfd/{__version__}",
            "Accept": "application/rss+xml, application/atom+xml, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.1",
        }
        if self._etag:
            headers["If-None-Match"] = self._etag
        if self._last_modified:
            headers["If-Modified-Since"] = self._last_modified
        return headers

    def _read_response(self, response: httpx.Response) -> _Fetched:
        status = response.status_code
        if status == 304:
            return _Fetched(status_code=304)
        if not 200 <= status < 300:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            raise _PollFailed(f"http {status}", status_code=status, retry_after=retry_after)
        body = bytearray()
        for piece in response.iter_bytes():
            body.extend(piece)
            if len(body) > self.max_feed_bytes:
                raise _PollFailed("feed too large", status_code=status)
        return _Fetched(
            status_code=status,
            body=bytes(body),
            headers={key.lower(): value for key, value in response.headers.items()},
            final_url=str(response.url),
        )

    def _submit_new(self, entries: list[Any]) -> tuple[int, int, list[object], str | None]:
        """Submit entries not seen before. Stops at the first intake failure (it will retry next poll)."""
        submitted, duplicates, results = 0, 0, []
        for entry in entries:
            key = entry_key(entry)
            if key in self._seen:
                duplicates += 1
                self._remember(key)
                continue
            text = entry_text(entry)
            name = _entry_name(entry, key)
            if text:
                try:
                    results.append(self._submit(text, name, self.source))
                except Exception as exc:  # the intake is outside our control; keep the feed alive
                    self._log.error("feed_submit_failed", entry=name, error=repr(exc), exc_info=True)
                    return submitted, duplicates, results, f"submit failed: {type(exc).__name__}"
                submitted += 1
                self._log.info("feed_entry_submitted", entry=name, chars=len(text))
            else:
                self._log.warning("feed_entry_empty", entry=name)
            self._remember(key)
        return submitted, duplicates, results, None

    def _remember(self, key: str) -> None:
        """Mark an id as seen (most recent last) and keep only the newest ``max_seen_ids``."""
        self._seen.pop(key, None)
        self._seen[key] = None
        while len(self._seen) > self.max_seen_ids:
            del self._seen[next(iter(self._seen))]

    # --------------------------------------------------------------- scheduling

    def _record_success(
        self,
        status: int | None,
        *,
        not_modified: bool,
        entries: int,
        submitted: int,
        duplicates: int,
        results: tuple[object, ...],
    ) -> FeedPollResult:
        self.consecutive_errors = 0
        jitter = self._rng.uniform(-self.jitter_ratio, self.jitter_ratio)
        self._next_due = self._clock() + self.interval_seconds * (1.0 + jitter)
        return FeedPollResult(
            url=self.url,
            status_code=status,
            not_modified=not_modified,
            entries_in_feed=entries,
            submitted=submitted,
            duplicates=duplicates,
            error=None,
            retry_after_seconds=None,
            next_due=self._next_due,
            intake_results=results,
        )

    def _record_error(self, failure: _PollFailed) -> FeedPollResult:
        self.errors_total += 1
        self.consecutive_errors += 1
        delay = self.backoff_seconds(self.consecutive_errors)
        if failure.retry_after is not None:
            delay = max(delay, failure.retry_after)
        self._next_due = self._clock() + delay
        self._log.warning(
            "feed_error",
            reason=failure.reason,
            status=failure.status_code,
            consecutive_errors=self.consecutive_errors,
            retry_in_seconds=round(delay, 3),
        )
        return FeedPollResult(
            url=self.url,
            status_code=failure.status_code,
            not_modified=False,
            entries_in_feed=0,
            submitted=0,
            duplicates=0,
            error=failure.reason,
            retry_after_seconds=failure.retry_after,
            next_due=self._next_due,
        )

    def backoff_seconds(self, consecutive_errors: int) -> float:
        """Delay after the n-th error in a row: the interval, doubled per further error, capped.

        The first retry is no sooner than a regular poll (polite to a struggling server).
        """
        exponent = min(max(consecutive_errors - 1, 0), 32)
        return min(self.max_backoff_seconds, self.interval_seconds * (2.0**exponent))

    # --------------------------------------------------------------------- state

    def _load_state(self) -> None:
        """Read seen ids and validators. A corrupt file is a loud error, not a silent reset."""
        try:
            raw = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SmfdError(f"cannot read feed state file {self.state_path}: {exc}") from exc
        try:
            state = json.loads(raw)
            seen = state["seen_ids"]
            if not isinstance(seen, list) or not all(isinstance(item, str) for item in seen):
                raise TypeError("seen_ids must be a list of strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise SmfdError(
                f"feed state file {self.state_path} is corrupt ({exc}); delete it to start this feed afresh"
            ) from exc
        for key in seen[-self.max_seen_ids :]:
            self._seen[key] = None
        if state.get("url") == self.url:
            # Validators belong to one URL; seen ids stay valid when a feed moves (http -> https).
            self._etag = state.get("etag") or None
            self._last_modified = state.get("last_modified") or None

    def _save_state(self) -> None:
        state = {
            "version": STATE_FORMAT_VERSION,
            "url": self.url,
            "etag": self._etag,
            "last_modified": self._last_modified,
            "seen_ids": list(self._seen),
        }
        atomic_write_json(self.state_path, state)


# ------------------------------------------------------------------ helpers
