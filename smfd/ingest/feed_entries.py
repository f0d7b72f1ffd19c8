"""What a feed says: the fetched bytes parsed, each entry's identity, name and text (HTML reduced to plain
text), the HTTP Retry-After header a feed server may send, and the checks on a feed's settings."""

from __future__ import annotations

import email.utils
import hashlib
import io
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import feedparser

from smfd.errors import ConfigError

MAX_RETRY_AFTER_SECONDS = 24 * 3600.0  # a server asking for more is capped at a day
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class _Fetched:
    """Outcome of the HTTP part of a poll, before parsing."""

    status_code: int | None
    body: bytes | None = None
    headers: Mapping[str, str] | None = None
    final_url: str = ""
    error: str | None = None
    retry_after_seconds: float | None = None


class _PollFailed(Exception):
    """Internal: carries a short reason from a poll step to ``poll_once``."""

    def __init__(self, reason: str, status_code: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code
        self.retry_after = retry_after


def _validate_settings(
    url: str, interval: float, timeout: float, max_backoff: float, jitter: float, max_seen: int
) -> None:
    """Reject settings that would make the feed misbehave, naming the bad value."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"feed url must be an http(s) URL, got {url!r}")
    if not interval > 0:
        raise ConfigError(f"feed interval_seconds must be > 0, got {interval!r} for {url}")
    if not timeout > 0:
        raise ConfigError(f"feed timeout_seconds must be > 0, got {timeout!r} for {url}")
    if not max_backoff > 0:
        raise ConfigError(f"feed max_backoff_seconds must be > 0, got {max_backoff!r} for {url}")
    if not 0 <= jitter < 1:
        raise ConfigError(f"feed jitter_ratio must be in [0, 1), got {jitter!r} for {url}")
    if max_seen < 1:
        raise ConfigError(f"feed max_seen_ids must be >= 1, got {max_seen!r} for {url}")


def _parse_feed(fetched: _Fetched) -> Any:
    """Parse bytes with feedparser.

    A bozo (malformed) feed is an error only when it yields no usable entries (a
    truncated document can yield one empty entry). A well-formed document that is not
    a feed at all (an HTML login page, say) is an error too, rather than a silent
    "no news".
    """
    # Only headers that describe the (already decoded) body: encoding and base URL.
    received = fetched.headers or {}
    headers = {name: received[name] for name in ("content-type", "content-language") if name in received}
    headers["content-location"] = fetched.final_url
    # BytesIO: feedparser treats raw bytes/str as a possible file name or URL.
    parsed = feedparser.parse(io.BytesIO(fetched.body or b""), response_headers=headers)
    has_entries = any(_has_substance(entry) for entry in parsed.entries)
    if parsed.get("bozo") and not has_entries:
        raise _PollFailed("malformed feed", status_code=fetched.status_code)
    if not parsed.get("version") and not has_entries:
        raise _PollFailed("not a feed", status_code=fetched.status_code)
    return parsed


def _has_substance(entry: Mapping[str, Any]) -> bool:
    return any(entry.get(field) for field in ("id", "link", "title", "summary", "content"))


def _entries_oldest_first(entries: list[Any]) -> list[Any]:
    """Feeds list newest first; submit oldest first. Sort by date when every entry has one."""
    ordered = list(reversed(entries))
    dates = [entry.get("published_parsed") or entry.get("updated_parsed") for entry in ordered]
    if ordered and all(dates):
        order = sorted(range(len(ordered)), key=lambda index: tuple(dates[index])[:6])
        ordered = [ordered[index] for index in order]
    return ordered


def entry_key(entry: Mapping[str, Any]) -> str:
    """Dedup key: the entry id, else a SHA-256 of link + title + published date."""
    entry_id = (entry.get("id") or "").strip()
    if entry_id:
        return entry_id
    date = entry.get("published") or entry.get("updated") or ""
    material = "\n".join([entry.get("link") or "", entry.get("title") or "", date])
    return "sha256:" + hashlib.sha256(material.encode("utf-8")).hexdigest()


def _entry_name(entry: Mapping[str, Any], key: str) -> str:
    name = (entry.get("link") or "").strip() or (entry.get("title") or "").strip() or key
    return name[:MAX_NAME_CHARS]


def entry_text(entry: Mapping[str, Any]) -> str:
    """Title, blank line, then the body (content if present, else summary) as plain text."""
    title = _detail_text(entry.get("title"), entry.get("title_detail"))
    body = _best_body(entry)
    return "\n\n".join(part for part in (title, body) if part)


def _best_body(entry: Mapping[str, Any]) -> str:
    """The longest content block, falling back to the summary when there is no content."""
    bodies = [_detail_text(item.get("value"), item) for item in entry.get("content") or []]
    bodies = [body for body in bodies if body]
    if bodies:
        return max(bodies, key=len)
    return _detail_text(entry.get("summary"), entry.get("summary_detail"))


def _detail_text(value: str | None, detail: Mapping[str, Any] | None) -> str:
    """Plain text from a feedparser value; HTML (or unknown type) is reduced to text."""
    if not value:
        return ""
    content_type = (detail or {}).get("type") or "text/html"
    if "html" in content_type:
        return html_to_text(value)
    return value.strip()


class _TextExtractor(HTMLParser):
    """Collects visible text, dropping script/style, turning block elements into line breaks.

    Adjacent breaks merge (the strongest wins), so ``</li><li>`` is one line break and
    ``</p><p>`` one blank line, however the markup nests.
    """

    SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "head", "iframe", "svg"})
    LINE_TAGS = frozenset({"br", "li", "tr", "dt", "dd"})
    PARAGRAPH_TAGS = frozenset(
        {
            "p",
            "div",
            "section",
            "article",
            "header",
            "footer",
            "aside",
            "blockquote",
            "pre",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "ul",
            "ol",
            "dl",
            "table",
            "figure",
            "figcaption",
            "hr",
        }
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._pending_break = ""
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP_TAGS:
            self._skip_depth += 1
        else:
            self._break(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.SKIP_TAGS:
            self._break(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP_TAGS:
            self._skip_depth = max(self._skip_depth - 1, 0)
        else:
            self._break(tag)

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        text = re.sub(r"\s+", " ", data)
        if not text.strip():
            if not self._pending_break:
                self.parts.append(" ")
            return
        if self._pending_break:
            self.parts.append(self._pending_break)
            self._pending_break = ""
        self.parts.append(text)

    def _break(self, tag: str) -> None:
        if tag in self.PARAGRAPH_TAGS:
            self._pending_break = "\n\n"
        elif tag in self.LINE_TAGS and not self._pending_break:
            self._pending_break = "\n"


def html_to_text(html: str) -> str:
    """Reduce an HTML fragment to plain text with paragraphs kept as blank-line-separated blocks."""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    lines = [line.strip() for line in "".join(extractor.parts).split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent/invalid."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    wall_now = time.time() if now is None else now
    return min(max(when.timestamp() - wall_now, 0.0), MAX_RETRY_AFTER_SECONDS)
