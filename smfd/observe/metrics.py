"""Prometheus metrics for the daemon, held in one object with its own registry.

Why its own registry: the default global registry would make every test and
every embedded use share state; an instance per daemon keeps them apart.

Naming follows Prometheus conventions: one ``smfd_`` prefix, base units as
suffixes, counters end in ``_total``, "last success" is a ``_timestamp_seconds``
gauge. Every label has a small, fixed set of values (checked here), so a bad
caller cannot explode the series count with paths or document ids.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from smfd import __version__
from smfd.model.slot_stats import MemoryFill
from smfd.observe.api_metrics import ApiMetrics

if TYPE_CHECKING:
    from smfd.guard.verdict import VerdictTally

DOCUMENT_SOURCES = ("watch", "feed")
DOCUMENT_OUTCOMES = ("queued", "duplicate", "quarantined", "done", "failed", "rejected")
UPDATE_OUTCOMES = ("accepted", "rolled_back", "failed")
ROLLBACK_REASONS = ("accuracy", "nll", "drift", "error")
MEMORY_DEVICES = ("cpu", "cuda")
FEED_ERROR_REASONS = ("timeout", "http", "malformed", "other")

# Probe suite names come from configuration; keep them short identifiers and few.
SUITE_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
MAX_PROBE_SUITES = 16

# Per-token surprise (negative log-likelihood) in nats: ~0.5 is well known text,
# ~16 is near-random for a large vocabulary.
SURPRISE_BUCKETS_NATS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0)
# One sparse update takes from about a second (tiny model, few chunks) to tens of minutes.
UPDATE_BUCKETS_SECONDS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0)
# A probe pass over the retention suites: well under a second to a few minutes.
PROBE_BUCKETS_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Exposition content type of render(): the classic text format that every Prometheus accepts.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


def _check_label(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """Reject label values outside the fixed set, so series stay bounded."""
    if value not in allowed:
        raise ValueError(f"metric label {name}={value!r} is not one of {', '.join(allowed)}")
    return value


class Metrics:
    """All smfd metric families, registered in a private CollectorRegistry.

    The metric objects are public attributes for callers that need the raw
    prometheus_client API; the methods below are thin helpers that also
    validate label values.
    """

    def __init__(self, version: str = __version__, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if process_metrics:
            # process_* (CPU, RSS, open fds, start time) and python_info, in our registry only.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._probe_suites: set[str] = set()
        self._define_ingestion()
        self._define_learning()
        self._define_retention()
        self._define_health()
        self.api = ApiMetrics(self.registry)  # the OpenAI-compatible API's families (zero while serving is off)
        self.build_info.info({"version": version})
        self._initialise_bounded_series()

    # ----------------------------------------------------------------- families
    def _define_ingestion(self) -> None:
        reg = self.registry
        self.documents = Counter(
            "smfd_documents_total",
            "Documents seen by intake, by source and outcome.",
            ["source", "outcome"],
            registry=reg,
        )
        self.queue_chunks = Gauge("smfd_queue_chunks", "Chunks waiting for a memory update.", registry=reg)
        self.queue_tokens = Gauge("smfd_queue_tokens", "Tokens waiting for a memory update.", registry=reg)
        self.chunks_skipped_known = Counter(
            "smfd_chunks_skipped_known_total",
            "Chunks skipped because the model already predicts them well (low surprise).",
            registry=reg,
        )
        self.feed_fetch_errors = Counter(
            "smfd_feed_fetch_errors_total", "Failed feed fetches, by reason.", ["reason"], registry=reg
        )
        self.watcher_rescans = Counter(
            "smfd_watcher_rescans_total", "Full rescans of the watch folders (startup and periodic).", registry=reg
        )

    def _define_learning(self) -> None:
        reg = self.registry
        self.token_surprise = Histogram(
            "smfd_token_surprise_nats",
            "Per-token surprise (negative log-likelihood) of incoming text, in nats.",
            buckets=SURPRISE_BUCKETS_NATS,
            registry=reg,
        )
        self.updates = Counter("smfd_updates_total", "Memory updates, by outcome.", ["outcome"], registry=reg)
        self.update_duration = Histogram(
            "smfd_update_duration_seconds",
            "Wall time of one memory update including its probes.",
            buckets=UPDATE_BUCKETS_SECONDS,
            registry=reg,
        )
        self.memory_rows_updated = Counter(
            "smfd_memory_rows_updated_total", "Memory-table rows changed by accepted updates.", registry=reg
        )
        self.slots_selected_last = Gauge(
            "smfd_slots_selected_last", "Memory slots selected for training by the last update.", registry=reg
        )
        self.rollbacks = Counter("smfd_rollbacks_total", "Updates rolled back, by reason.", ["reason"], registry=reg)
        self.last_update_timestamp = Gauge(
            "smfd_last_update_timestamp_seconds", "Unix time of the last accepted memory update.", registry=reg
        )
        self.checkpoint_version = Gauge(
            "smfd_checkpoint_version", "Version number of the memory checkpoint on disk.", registry=reg
        )
        self.checkpoint_timestamp = Gauge(
            "smfd_checkpoint_timestamp_seconds", "Unix time the current memory checkpoint was written.", registry=reg
        )

    def _define_retention(self) -> None:
        reg = self.registry
        self.probe_accuracy = Gauge(
            "smfd_probe_accuracy_ratio",
            "Retention probe accuracy (0..1) after the last update.",
            ["suite"],
            registry=reg,
        )
        self.probe_nll = Gauge(
            "smfd_probe_nll_nats",
            "Retention probe mean negative log-likelihood per token.",
            ["suite"],
            registry=reg,
        )
        self.probe_base_accuracy = Gauge(
            "smfd_probe_base_accuracy_ratio",
            "Probe accuracy of the untouched base model (reference).",
            ["suite"],
            registry=reg,
        )
        self.probe_base_nll = Gauge(
            "smfd_probe_base_nll_nats",
            "Probe NLL of the untouched base model (reference).",
            ["suite"],
            registry=reg,
        )
        self.recall_accuracy = Gauge(
            "smfd_recall_accuracy_ratio", "Accuracy on recall probes built from newly learned text.", registry=reg
        )
        self.recall_kind_accuracy = Gauge(
            "smfd_recall_kind_accuracy_ratio",
            "Accuracy on recall probes of newly learned text, by probe kind (e.g. verbatim, reworded, cloze).",
            ["kind"],
            registry=reg,
        )
        self.drift_kl = Gauge(
            "smfd_drift_kl_nats", "KL divergence of current vs base model on the drift probe set.", registry=reg
        )
        self.probe_duration = Histogram(
            "smfd_probe_duration_seconds",
            "Wall time of one probe pass.",
            buckets=PROBE_BUCKETS_SECONDS,
            registry=reg,
        )

    def _define_health(self) -> None:
        reg = self.registry
        self.peak_memory = Gauge(
            "smfd_peak_memory_bytes", "Peak memory used by the last update, by device.", ["device"], registry=reg
        )
        self.memory_budget = Gauge(
            "smfd_memory_budget_bytes", "Configured memory budget, by device.", ["device"], registry=reg
        )
        self.learner_up = Gauge("smfd_learner_up", "1 while the learner worker is healthy, else 0.", registry=reg)
        self.memory_rows_trained = Gauge(
            "smfd_memory_rows_trained", "Memory value rows ever trained (all layers).", registry=reg
        )
        self.memory_rows = Gauge("smfd_memory_rows", "Memory value rows in all layers, trained or not.", registry=reg)
        self.memory_background_read_share = Gauge(
            "smfd_memory_background_read_share",
            "Share of ordinary text's memory reads that land on trained rows (0..1).",
            registry=reg,
        )
        self.memory_row_retrainings = Gauge(
            "smfd_memory_row_retrainings",
            "Rows trained again by a later update (each such training counted), over the current memory's updates.",
            registry=reg,
        )
        self.guard_rejected_share = Gauge(
            "smfd_guard_recent_rejected_ratio",
            "Share of the last guard.warn_window updates that the guard rolled back (0..1).",
            registry=reg,
        )
        self.build_info = Info("smfd_build", "Version of the running daemon.", registry=reg)

    def _initialise_bounded_series(self) -> None:
        """Create every counter child at 0 so rate() and alerts see them from the first scrape."""
        for source in DOCUMENT_SOURCES:
            for outcome in DOCUMENT_OUTCOMES:
                self.documents.labels(source=source, outcome=outcome)
        for outcome in UPDATE_OUTCOMES:
            self.updates.labels(outcome=outcome)
        for reason in ROLLBACK_REASONS:
            self.rollbacks.labels(reason=reason)
        for reason in FEED_ERROR_REASONS:
            self.feed_fetch_errors.labels(reason=reason)

    # ---------------------------------------------------------------- ingestion
    def document(self, source: str, outcome: str) -> None:
        """Count one document reaching an intake outcome."""
        self.documents.labels(
            source=_check_label("source", source, DOCUMENT_SOURCES),
            outcome=_check_label("outcome", outcome, DOCUMENT_OUTCOMES),
        ).inc()

    def set_queue(self, chunks: int, tokens: int) -> None:
        """Record the current queue depth."""
        self.queue_chunks.set(chunks)
        self.queue_tokens.set(tokens)

    def skipped_known(self, chunks: int = 1) -> None:
        """Count chunks skipped as already known."""
        self.chunks_skipped_known.inc(chunks)

    def observe_token_surprise(self, nats: Iterable[float]) -> None:
        """Add per-token (or per-chunk mean) surprise values to the histogram."""
        for value in nats:
            self.token_surprise.observe(float(value))

    def feed_fetch_error(self, reason: str) -> None:
        """Count one failed feed fetch."""
        self.feed_fetch_errors.labels(reason=_check_label("reason", reason, FEED_ERROR_REASONS)).inc()

    def watcher_rescan(self) -> None:
        """Count one full watch-folder rescan."""
        self.watcher_rescans.inc()

    # ----------------------------------------------------------------- learning
    def record_update(
        self,
        outcome: str,
        duration_seconds: float,
        rows_updated: int = 0,
        slots_selected: int | None = None,
        finished_at: float | None = None,
    ) -> None:
        """Record one finished update.

        Rows and the last-update timestamp move only for accepted updates, since
        a rolled-back or failed update left the memory as it was.
        """
        self.updates.labels(outcome=_check_label("outcome", outcome, UPDATE_OUTCOMES)).inc()
        self.update_duration.observe(duration_seconds)
        if slots_selected is not None:
            self.slots_selected_last.set(slots_selected)
        if outcome == "accepted":
            self.memory_rows_updated.inc(rows_updated)
            self.last_update_timestamp.set(time.time() if finished_at is None else finished_at)

    def rollback(self, reason: str) -> None:
        """Count one rollback and why it happened."""
        self.rollbacks.labels(reason=_check_label("reason", reason, ROLLBACK_REASONS)).inc()

    def set_checkpoint(self, version: int, written_at: float) -> None:
        """Record the checkpoint now on disk (also call at startup after loading it)."""
        self.checkpoint_version.set(version)
        self.checkpoint_timestamp.set(written_at)

    def restore_last_update(self, finished_at: float) -> None:
        """Set the last-update time from persisted state at startup, without counting an update."""
        self.last_update_timestamp.set(finished_at)

    # ---------------------------------------------------------------- retention
    def _suite(self, suite: str) -> str:
        """Validate a probe suite name and cap the number of distinct suites."""
        if not SUITE_NAME_PATTERN.match(suite):
            raise ValueError(f"probe suite name {suite!r} must match {SUITE_NAME_PATTERN.pattern}")
        if suite not in self._probe_suites and len(self._probe_suites) >= MAX_PROBE_SUITES:
            raise ValueError(f"too many probe suites (max {MAX_PROBE_SUITES}); cannot add {suite!r}")
        self._probe_suites.add(suite)
        return suite

    def set_probe(self, suite: str, accuracy: float | None, nll_nats: float) -> None:
        """Record the current model's result on one probe suite (accuracy None: an NLL-only suite)."""
        name = self._suite(suite)
        if accuracy is not None:
            self.probe_accuracy.labels(suite=name).set(accuracy)
        self.probe_nll.labels(suite=name).set(nll_nats)

    def set_probe_base(self, suite: str, accuracy: float | None, nll_nats: float) -> None:
        """Record the base model's result on one probe suite (the reference line)."""
        name = self._suite(suite)
        if accuracy is not None:
            self.probe_base_accuracy.labels(suite=name).set(accuracy)
        self.probe_base_nll.labels(suite=name).set(nll_nats)

    def set_recall_accuracy(self, ratio: float, by_kind: dict[str, float] | None = None) -> None:
        """Record accuracy on recall probes of newly learned text, overall and per probe kind."""
        self.recall_accuracy.set(ratio)
        for kind, kind_ratio in (by_kind or {}).items():
            self.recall_kind_accuracy.labels(kind=kind).set(kind_ratio)

    def set_drift_kl(self, nats: float) -> None:
        """Record KL drift from the base model."""
        self.drift_kl.set(nats)

    def observe_probe_duration(self, seconds: float) -> None:
        """Record the wall time of one probe pass."""
        self.probe_duration.observe(seconds)

    # ---------------------------------------------------------------- resources
    def set_memory(self, device: str, peak_bytes: int, budget_bytes: int | None = None) -> None:
        """Record peak memory of the last update and, if known, the budget for that device."""
        name = _check_label("device", device, MEMORY_DEVICES)
        self.peak_memory.labels(device=name).set(peak_bytes)
        if budget_bytes is not None:
            self.memory_budget.labels(device=name).set(budget_bytes)

    def set_memory_fill(self, fill: MemoryFill) -> None:
        """Record how full the memory is (after start-up and after every accepted update)."""
        self.memory_rows_trained.set(fill.rows_trained)
        self.memory_rows.set(fill.rows_total)
        self.memory_background_read_share.set(fill.background_read_share)
        self.memory_row_retrainings.set(fill.row_retrainings)

    def set_guard_tally(self, tally: VerdictTally) -> None:
        """Record the guard's recent verdicts (after start-up and after every update it judged)."""
        self.guard_rejected_share.set(tally.rejected_share)

    def set_learner_up(self, up: bool) -> None:
        """Record whether the learner worker is healthy."""
        self.learner_up.set(1 if up else 0)

    # --------------------------------------------------------------- exposition
    def render(self) -> bytes:
        """Return the text exposition (content type CONTENT_TYPE) of this registry."""
        return generate_latest(self.registry)
