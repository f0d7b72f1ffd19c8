"""Feed source against a real local HTTP server: conditional GETs, dedup, errors, backoff, state."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from smfd import __version__
from smfd.errors import ConfigError, SmfdError
from smfd.ingest.feed_entries import html_to_text, parse_retry_after
from smfd.ingest.feeds import FeedSource

RSS_TEMPLATE = """<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0"><channel><title>Test feed</title><link>http://example.org/</link>
<description>tests</description>{items}</channel></rss>"""

RSS_ITEM = """<item><title>{title}</title><link>http://example.org/{guid}</link><guid>{guid}</guid>
<pubDate>Mon, 0{day} Jan 2024 10:00:00 GMT</pubDate><description>{description}</description></item>"""

ATOM_FEED = b"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>Atom test</title><id>urn:feed</id>
<updated>2024-01-02T00:00:00Z</updated>
<entry><title>Atom entry one</title><id>urn:entry:1</id><link href="http://example.org/a1"/>
<updated>2024-01-01T00:00:00Z</updated><summary>Short summary.</summary>
<content type="html">&lt;p&gt;Full &lt;em&gt;content&lt;/em&gt; here.&lt;/p&gt;
&lt;p&gt;Second paragraph.&lt;/p&gt;</content>
</entry>
<entry><title>Atom entry two</title><id>urn:entry:2</id><link href="http://example.org/a2"/>
<updated>2024-01-02T00:00:00Z</updated><summary>Only a summary.</summary></entry>
</feed>"""


def rss(*items: tuple[str, str, str]) -> bytes:
    """RSS bytes from (guid, title, description) triples."""
    rendered = [
        RSS_ITEM.format(guid=guid, title=title, description=description, day=index + 1)
        for index, (guid, title, description) in enumerate(items)
    ]
    return RSS_TEMPLATE.format(items="".join(rendered)).encode("utf-8")


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    etag: str | None = None
    hang: bool = False


@dataclass
class ServerState:
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        state.requests.append({key.lower(): value for key, value in self.headers.items()})
        route = state.routes.get(self.path)
        if route is None:
            self._reply(404, b"not found", {})
        elif route.hang:
            state.release.wait(10)
        elif route.etag and self.headers.get("If-None-Match") == route.etag:
            self._reply(304, b"", {"ETag": route.etag})
        else:
            headers = dict(route.headers)
            if route.etag:
                headers["ETag"] = route.etag
            self._reply(route.status, route.body, headers)

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if status != 304:
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if status != 304:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass


@dataclass
class FeedServer:
    base_url: str
    state: ServerState

    def serve(self, path: str, **route: object) -> str:
        self.state.routes[path] = Route(**route)  # type: ignore[arg-type]
        return self.base_url + path


@pytest.fixture
def server() -> Iterator[FeedServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    try:
        yield FeedServer(f"http://{host}:{port}", httpd.state)  # type: ignore[attr-defined]
    finally:
        httpd.state.release.set()  # type: ignore[attr-defined]
        httpd.shutdown()
        httpd.server_close()


class Intake:
    """Records what the feed hands over, like the real intake's submit_text."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []

    def __call__(self, text: str, name: str, source: str) -> str:
        self.items.append((text, name, source))
        return f"doc-{len(self.items)}"


class FixedClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_source(url: str, tmp_path: Path, intake: Intake, **options: object) -> FeedSource:
    settings: dict[str, object] = {"interval_seconds": 60, "timeout_seconds": 5, "rng": random.Random(7)}
    settings.update(options)
    return FeedSource(url, intake, state_path=tmp_path / "state" / "feed.json", **settings)  # type: ignore[arg-type]


# ------------------------------------------------------------------ fetching and parsing


def test_rss_entries_are_submitted_as_plain_text(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve(
        "/rss",
        body=rss(
            ("id-1", "First post", "&lt;p&gt;Hello &lt;b&gt;world&lt;/b&gt;.&lt;/p&gt;&lt;p&gt;Second para.&lt;/p&gt;"),
            ("id-2", "Second post", "Plain words."),
        ),
    )
    intake = Intake()
    result = make_source(url, tmp_path, intake).poll_once()
    assert result.ok and result.status_code == 200
    assert result.submitted == 2 and result.intake_results == ("doc-1", "doc-2")
    assert intake.items == [
        ("First post\n\nHello world.\n\nSecond para.", "http://example.org/id-1", "feed"),
        ("Second post\n\nPlain words.", "http://example.org/id-2", "feed"),
    ]
    assert server.state.requests[0]["user-agent"] == f"smfd/{__version__}"


def test_atom_entries_prefer_full_content(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve("/atom", body=ATOM_FEED)
    intake = Intake()
    result = make_source(url, tmp_path, intake).poll_once()
    assert result.ok and result.submitted == 2
    assert [text for text, _, _ in intake.items] == [
        "Atom entry one\n\nFull content here.\n\nSecond paragraph.",
        "Atom entry two\n\nOnly a summary.",
    ]


def test_redirects_are_followed(server: FeedServer, tmp_path: Path) -> None:
    server.serve("/rss", body=rss(("id-1", "Moved", "Still here.")))
    old_url = server.serve("/old", status=301, headers={"Location": "/rss"})
    intake = Intake()
    result = make_source(old_url, tmp_path, intake).poll_once()
    assert result.ok and result.submitted == 1


def test_oversized_feed_is_refused(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve("/big", body=rss(("id-1", "Big", "word " * 2000)))
    intake = Intake()
    result = make_source(url, tmp_path, intake, max_feed_bytes=4096).poll_once()
    assert result.error == "feed too large" and intake.items == []


def test_html_to_text_drops_script_and_style_and_keeps_paragraphs() -> None:
    html = (
        "<style>p {color: red}</style><h1>Title</h1><p>One &amp; <i>two</i></p>"
        "<script>var x = '<p>hidden</p>';</script><ul>\n  <li>a</li>\n  <li>b</li>\n</ul>line<br>break"
        "<div><p>Nested   para\nwrapped.</p></div>"
    )
    assert html_to_text(html) == "Title\n\nOne & two\n\na\nb\n\nline\nbreak\n\nNested para wrapped."


def test_second_poll_sends_etag_and_gets_304_submitting_nothing(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve(
        "/rss",
        body=rss(("id-1", "First", "Body one.")),
        etag='"v1"',
        headers={"Last-Modified": "Mon, 01 Jan 2024 10:00:00 GMT"},
    )
    intake = Intake()
    source = make_source(url, tmp_path, intake)
    assert source.poll_once().submitted == 1
    second = source.poll_once()
    assert second.ok and second.not_modified and second.status_code == 304
    assert second.submitted == 0 and len(intake.items) == 1
    assert server.state.requests[1]["if-none-match"] == '"v1"'
    assert server.state.requests[1]["if-modified-since"] == "Mon, 01 Jan 2024 10:00:00 GMT"


def test_entries_seen_before_are_submitted_once(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve("/rss", body=rss(("id-1", "First", "One."), ("id-2", "Second", "Two.")))
    intake = Intake()
    source = make_source(url, tmp_path, intake)
    source.poll_once()
    server.serve("/rss", body=rss(("id-1", "First", "One."), ("id-2", "Second", "Two."), ("id-3", "Third", "Three.")))
    result = source.poll_once()
    assert result.submitted == 1 and result.duplicates == 2
    assert [name for _, name, _ in intake.items] == [
        "http://example.org/id-1",
        "http://example.org/id-2",
        "http://example.org/id-3",
    ]


def test_entries_without_id_are_deduplicated_by_link_title_and_date(server: FeedServer, tmp_path: Path) -> None:
    body = RSS_TEMPLATE.format(
        items=(
            "<item><title>No id</title><link>http://example.org/x</link>"
            "<pubDate>Mon, 01 Jan 2024 10:00:00 GMT</pubDate><description>Text.</description></item>"
        )
    ).encode()
    url = server.serve("/rss", body=body)
    intake = Intake()
    source = make_source(url, tmp_path, intake)
    source.poll_once()
    assert source.poll_once().duplicates == 1
    assert len(intake.items) == 1


def test_bozo_feed_with_entries_is_not_an_error(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve("/rss", body=rss(("id-1", "Fish & chips", "Tasty.")))  # unescaped "&": not well-formed
    intake = Intake()
    result = make_source(url, tmp_path, intake).poll_once()
    assert result.ok and result.submitted == 1
    assert intake.items[0][0].startswith("Fish & chips")


# ------------------------------------------------------------------ errors and scheduling


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        ({"status": 500, "body": b"boom"}, "http 500"),
        ({"body": b"<rss><channel><item><title>cut off"}, "malformed feed"),
        ({"body": b"this is not xml at all"}, "malformed feed"),
        ({"body": b"<html><body><p>Please log in</p></body></html>"}, "not a feed"),
    ],
)
def test_failures_become_error_results(server: FeedServer, tmp_path: Path, route: dict, reason: str) -> None:
    url = server.serve("/feed", **route)
    intake = Intake()
    source = make_source(url, tmp_path, intake)
    result = source.poll_once()
    assert not result.ok and result.error == reason
    assert source.errors_total == 1 and intake.items == []


def test_hung_server_times_out(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve("/slow", hang=True)
    source = make_source(url, tmp_path, Intake(), timeout_seconds=0.5)
    started = time.monotonic()
    result = source.poll_once()
    assert result.error == "timeout"
    assert time.monotonic() - started < 3
    assert source.errors_total == 1


def test_unreachable_server_is_an_error_not_an_exception(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = make_source(f"http://127.0.0.1:{port}/feed", tmp_path, Intake())
    assert source.poll_once().error == "connection failed"


def test_backoff_doubles_is_capped_and_resets_on_success(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve("/feed", status=500)
    clock = FixedClock()
    source = make_source(
        url, tmp_path, Intake(), interval_seconds=10, max_backoff_seconds=35, jitter_ratio=0.1, clock=clock
    )
    delays = [source.poll_once().next_due - clock.now for _ in range(4)]
    assert delays == [10, 20, 35, 35]
    assert source.errors_total == 4 and source.next_due() == clock.now + 35
    server.serve("/feed", body=rss(("id-1", "Back", "Up again.")))
    result = source.poll_once()
    assert result.ok and source.consecutive_errors == 0 and source.errors_total == 4
    assert 9 <= result.next_due - clock.now <= 11


def test_regular_interval_is_jittered(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve("/rss", body=rss(("id-1", "One", "Text.")), etag='"e"')
    clock = FixedClock()
    source = make_source(url, tmp_path, Intake(), interval_seconds=100, jitter_ratio=0.2, clock=clock)
    delays = {source.poll_once().next_due - clock.now for _ in range(5)}
    assert all(80 <= delay <= 120 for delay in delays)
    assert len(delays) > 1


def test_retry_after_seconds_is_honoured(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve("/feed", status=503, headers={"Retry-After": "120"})
    clock = FixedClock()
    source = make_source(url, tmp_path, Intake(), interval_seconds=1, clock=clock)
    result = source.poll_once()
    assert result.error == "http 503" and result.retry_after_seconds == 120
    assert source.next_due() == clock.now + 120


def test_retry_after_http_date_is_honoured(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve("/feed", status=429, headers={"Retry-After": formatdate(time.time() + 300, usegmt=True)})
    clock = FixedClock()
    source = make_source(url, tmp_path, Intake(), interval_seconds=1, clock=clock)
    source.poll_once()
    assert 295 <= source.next_due() - clock.now <= 301


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after("30") == 30
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412420.0) == 60
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412600.0) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_failed_intake_leaves_entries_for_the_next_poll(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve("/rss", body=rss(("id-1", "One", "Text one."), ("id-2", "Two", "Text two.")), etag='"v1"')
    calls: list[str] = []

    def flaky_intake(text: str, name: str, source: str) -> str:
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full")
        return "ok"

    source = make_source(url, tmp_path, flaky_intake)  # type: ignore[arg-type]
    failed = source.poll_once()
    assert failed.error == "submit failed: OSError" and source.errors_total == 1
    retried = source.poll_once()  # no 304: the ETag was not kept while an entry was undelivered
    assert retried.ok and retried.submitted == 1 and retried.duplicates == 1
    assert calls == ["http://example.org/id-1", "http://example.org/id-2", "http://example.org/id-2"]


# ------------------------------------------------------------------ persistent state


def test_state_survives_a_new_instance(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve("/rss", body=rss(("id-1", "One", "Text.")), etag='"v1"')
    first_intake = Intake()
    make_source(url, tmp_path, first_intake).poll_once()
    server.serve("/rss", body=rss(("id-1", "One", "Text."), ("id-2", "Two", "More.")))  # ignores ETags
    second_intake = Intake()
    restarted = make_source(url, tmp_path, second_intake)
    result = restarted.poll_once()
    assert server.state.requests[-1]["if-none-match"] == '"v1"'
    assert result.submitted == 1 and result.duplicates == 1
    assert [name for _, name, _ in second_intake.items] == ["http://example.org/id-2"]


def test_state_file_is_json_bounded_to_the_newest_ids(server: FeedServer, tmp_path: Path) -> None:
    url = server.serve("/rss", body=rss(*[(f"id-{n}", f"T{n}", "x.") for n in range(1, 6)]))
    source = make_source(url, tmp_path, Intake(), max_seen_ids=3)
    source.poll_once()
    state = json.loads(source.state_path.read_text())
    assert state["url"] == url
    # Oldest entries (by date) are evicted first; feedparser resolves the relative guids.
    assert [key.rsplit("/", 1)[-1] for key in state["seen_ids"]] == ["id-3", "id-4", "id-5"]
    assert [path.name for path in source.state_path.parent.iterdir()] == ["feed.json"]  # no temp files left


def test_corrupt_state_file_is_a_loud_error(tmp_path: Path) -> None:
    state_path = tmp_path / "state" / "feed.json"
    state_path.parent.mkdir()
    state_path.write_text("{not json")
    with pytest.raises(SmfdError, match="feed.json"):
        FeedSource("http://127.0.0.1:9/feed", Intake(), 60, 5, state_path)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/feed", "not a url"])
def test_non_http_urls_are_rejected(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="http"):
        FeedSource(url, Intake(), 60, 5, tmp_path / "feed.json")
