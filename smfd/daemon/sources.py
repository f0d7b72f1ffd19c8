"""The daemon's sources: watch folders and feeds, polled on the default executor (never the model).

Each poll takes what the sources have into the intake and counts the outcomes; the daemon
decides from the returned queue size whether to start an update early.
"""

from __future__ import annotations

import time

from smfd.config import SmfdConfig
from smfd.daemon.health import Heartbeats
from smfd.ingest.feeds import FeedSource
from smfd.ingest.intake import Intake, IntakeResult
from smfd.ingest.journal import Journal
from smfd.ingest.watch_folder import WatchFolderSource
from smfd.observe.metrics import DOCUMENT_OUTCOMES, Metrics
from smfd.paths import StatePaths


class Sources:
    """Watch folders and feeds built from the config's `sources` section (rebuilt on reload)."""

    def __init__(
        self,
        cfg: SmfdConfig,
        intake: Intake,
        journal: Journal,
        metrics: Metrics,
        heartbeats: Heartbeats,
        paths: StatePaths,
    ) -> None:
        self.cfg, self.intake, self.journal, self.metrics, self.heartbeats, self.paths = (
            cfg,
            intake,
            journal,
            metrics,
            heartbeats,
            paths,
        )
        self.watchers: list[WatchFolderSource] = []
        self.feeds: list[FeedSource] = []

    def build(self, cfg: SmfdConfig) -> None:
        """(Re)create every source from `cfg`; watchers of an earlier build are stopped first."""
        self.stop()
        self.cfg = cfg
        s = cfg.sources
        self.watchers = [
            WatchFolderSource(
                w.path,
                self.intake,
                recursive=w.recursive,
                include=w.include,
                exclude=w.exclude,
                polling=w.polling,
                settle_seconds=s.settle_seconds,
                rescan_seconds=s.rescan_seconds,
                move=w.move,
                jsonl_field=w.jsonl_field,
            )
            for w in s.watch
        ]
        for w in s.watch:
            w.path.mkdir(parents=True, exist_ok=True)
        self.feeds = [
            FeedSource(
                f.url,
                self.intake.submit_text,
                f.interval_seconds,
                f.timeout_seconds,
                self.paths.feeds / f"feed-{index}.json",
            )
            for index, f in enumerate(s.feeds)
        ]

    def start_watchers(self) -> None:
        """File-system events (hints) for the long-running daemon; `--once` only scans."""
        for watcher in self.watchers:
            watcher.start()

    def stop(self) -> None:
        for watcher in self.watchers:
            watcher.stop()

    def poll(self, settle: bool = True) -> None:
        """Take what the sources have; `settle` False takes every file now (`--once`)."""
        self.heartbeats.beat("sources")
        for watcher in self.watchers:
            before = watcher.rescans_total
            results = watcher.poll() if settle else watcher.scan_once(settle=False)
            for _ in range(watcher.rescans_total - before):
                self.metrics.watcher_rescan()
            self._count(results, "watch")
        now = time.monotonic()
        for feed in self.feeds:
            if not settle or feed.next_due() <= now:
                result = feed.poll_once()
                if result.error:
                    self.metrics.feed_fetch_error(_feed_error_label(result.error))
                self._count(list(result.intake_results), "feed")
        self.metrics.set_queue(self.journal.pending_chunk_count(), self.journal.pending_token_count())

    def _count(self, results: list[IntakeResult], source: str) -> None:
        for result in results:
            if result.outcome in DOCUMENT_OUTCOMES:
                self.metrics.document(source, result.outcome)


def _feed_error_label(error: str) -> str:
    if error.startswith("timeout"):
        return "timeout"
    if error.startswith("http"):
        return "http"
    if error.startswith("malformed") or error.startswith("not a feed"):
        return "malformed"
    return "other"
