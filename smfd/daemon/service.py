"""The daemon: sources feed the journal, the learner thread turns the journal into memory.

Threads:
- the main thread waits for signals, pets the systemd watchdog while workers are healthy,
  and reloads the config on SIGHUP;
- the APScheduler "default" executor polls sources (watch folders, feeds), from before the model
  is loaded, and never touches the model;
- the APScheduler "learner" executor is the model's one thread (smfd.learn.gate): start-up,
  updates, probes and the API's generations all run there, so they never race, and PyTorch keeps
  one OpenMP team (a second one on a small machine slows every op).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor as ThreadPool
from datetime import datetime
from pathlib import Path

import structlog
from apscheduler.executors.pool import BasePoolExecutor, ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from smfd.config import SmfdConfig, load_config, validate_model_path
from smfd.daemon.health import HEARTBEAT_STALE_SECONDS, Heartbeats
from smfd.daemon.probing import Probing
from smfd.daemon.recovery import recover_interrupted_documents, remove_leftovers, settle_rolled_back
from smfd.daemon.runtime import open_runtime
from smfd.daemon.sources import Sources
from smfd.errors import ConfigError, SmfdError
from smfd.ingest.intake import Intake
from smfd.ingest.journal import DocState, Journal, JournalDamaged
from smfd.learn.gate import ModelGate
from smfd.learn.learner import CommitFailed, Learner, LearnSettings, UpdateOutcome
from smfd.observe import systemd_notify
from smfd.observe.http_server import MetricsServer
from smfd.observe.logs import configure_logging
from smfd.observe.metrics import Metrics
from smfd.observe.startup import StartupProgress
from smfd.paths import StatePaths
from smfd.serve.server import ApiServer
from smfd.store.checkpoint import CheckpointStore
from smfd.store.upgrade import upgrade_dense_state

log = structlog.get_logger("smfd.daemon.service")
EX_TEMPFAIL = 75  # sysexits: `--once` could not write its checkpoint (disk full...); run it again later


def _skip_expected_overlap(record: logging.LogRecord) -> bool:
    """Drop APScheduler's "still running" warning: the learner drains the queue in one long run."""
    return "maximum number of running instances reached" not in record.getMessage()


class Daemon:
    def __init__(self, config_path: Path, environ: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.environ = environ
        self.cfg = self._load()
        self.paths = StatePaths(self.cfg.state_dir)
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.wake = threading.Event()
        self.metrics = Metrics()
        self.heartbeats = Heartbeats()
        self.ready = False
        self.commit_failures = 0  # consecutive failed checkpoint writes (see _commit_failed)
        self.retry_updates_at = 0.0  # time.monotonic() before which no update starts
        self.server: MetricsServer | None = None
        self.api: ApiServer | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.learner: Learner | None = None
        self.probing = Probing(self.cfg, self.metrics, self.heartbeats, stop=self.stop_event.is_set)
        self.gate = ModelGate(yield_to_requests=self.cfg.serve.during_update == "pause_learner")
        self.sources: Sources | None = None
        self.startup = StartupProgress(self.paths.startup)

    def _load(self) -> SmfdConfig:
        cfg = load_config(self.config_path, self.environ)
        validate_model_path(cfg)
        return cfg

    # ---- start-up ----------------------------------------------------------------------
    def start(self) -> None:
        """Intake, then the model (`run_forever` polls the sources in between, so nothing waits for the model)."""
        self.open_intake()
        self.open_learner()
        self.mark_ready()

    def open_intake(self) -> None:
        """Journal, recovery, metrics endpoint and sources: what takes files in, with no model needed."""
        configure_logging(self.cfg.logging.level, self.cfg.logging.json_format)
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # one line per 1 s poll is noise
        logging.getLogger("apscheduler.scheduler").addFilter(_skip_expected_overlap)
        self.paths.create()
        self.journal = Journal(self.paths.journal, max_attempts=self.cfg.sources.max_attempts)
        store = CheckpointStore(self.paths.memory)
        upgrade_dense_state(self.paths.memory)  # a state of an earlier smfd, before anything reads it
        remove_leftovers(self.paths.root, store)
        recover_interrupted_documents(self.journal, store)
        self.intake = Intake(self.journal, self.paths.spool, self.paths.quarantine, self.cfg.sources.max_file_bytes)
        if self.cfg.metrics.enabled:
            self.server = MetricsServer(
                self.metrics,
                self.cfg.metrics.host,
                self.cfg.metrics.port,
                ready=self._readiness,
                alive=lambda: self.heartbeats.healthy(HEARTBEAT_STALE_SECONDS),
            )
            self.server.start()
        self.sources = Sources(self.cfg, self.intake, self.journal, self.metrics, self.heartbeats, self.paths)
        self.sources.build(self.cfg)

    def open_learner(self) -> None:
        """Load the model and memory on the model's thread (minutes when the state is new)."""
        self.gate.run(self._start_learner)  # all model work on one thread: smfd.learn.gate
        last = self.journal.last_update()
        if last is not None:
            self.metrics.restore_last_update(last.timestamp)
        self.metrics.set_learner_up(True)
        self._report_memory()

    def mark_ready(self) -> None:
        """/readyz answers 200 from here on: after the model and, when serving, the API (a client that waited
        for readiness must not find the API's port closed)."""
        self.ready = True
        self.startup.ready()

    def _start_learner(self) -> None:
        """Load the model and memory, plan the batch, take the probe suites (on the model's thread)."""
        runtime = open_runtime(self.cfg, progress=self.startup)
        settle_rolled_back(self.journal, runtime.version)
        self.startup.stage("collecting the retain set")
        self.learner = runtime.learner(self.cfg, self.journal, self.gate)
        self.learner.plan_batch_size()
        self.probing.start(runtime.model, self.journal.recent_verdicts(self.cfg.guard.warn_window))
        self.metrics.set_checkpoint(runtime.version, time.time())
        self.metrics.set_memory_fill(self.learner.fill())

    def run_probes(self) -> None:
        """The full probe set, on a schedule (learner thread only; served requests wait for it)."""
        assert self.learner is not None
        with self.learner.gate.learner():
            self.probing.run_full(self.learner.store.version)

    def _readiness(self) -> tuple[bool, str]:
        """(ready, why not) for /readyz: not before the model is loaded, not while the journal is damaged."""
        if self.journal is not None and self.journal.damage is not None:
            return False, f"journal damaged: {self.journal.damage}"
        return self.ready, "starting: loading the model"

    def poll_sources(self, settle: bool = True) -> None:
        """Take what the sources have (default executor); enough pending work starts an update early.

        Nothing is taken while the journal is damaged: files stay where they are until it is repaired.
        """
        if self.journal.damage is not None:
            return
        try:
            self.sources.poll(settle)
        except JournalDamaged as exc:
            log.error("journal_damaged", reason=str(exc))
            systemd_notify.status("journal damaged: intake stopped")
            return
        if settle and self._pending_work() >= self.cfg.schedule.pending_chunks_trigger and self.scheduler:
            job = self.scheduler.get_job("update")
            if job is not None and job.next_run_time and job.next_run_time.timestamp() > time.time() + 1:
                job.modify(next_run_time=_now(self.scheduler))

    def _pending_work(self) -> int:
        return self.journal.counts()[DocState.QUEUED] + self.journal.pending_chunk_count()

    def run_update(self) -> UpdateOutcome | None:
        """Learn what is pending, one update (up to train.max_documents documents) after another (learner thread only).

        Draining here, rather than one update per scheduler tick, keeps small updates (one document
        each, so the guard can reject a harmful document alone) from idling between ticks.
        """
        assert self.learner is not None
        if time.monotonic() < self.retry_updates_at:
            return None
        self.probing.establish()  # the first run after a start: the guard's base results, before anything trains
        self.heartbeats.busy.add("learner")
        try:
            outcome = None
            while self._pending_work() and not self.stop_event.is_set():
                systemd_notify.status("learning")
                outcome = self.learner.update(self.stop_event.is_set, guard=self.probing.check)
                self._record(outcome)
                self.heartbeats.beat("learner")
                self.commit_failures = 0
                if not (outcome.chunks_learned or outcome.chunks_known or outcome.documents):
                    break
            return outcome
        except CommitFailed as exc:
            self._commit_failed(exc)
            return None
        except JournalDamaged as exc:
            log.error("journal_damaged", reason=str(exc))
            systemd_notify.status("journal damaged: learning stopped")
            return None
        except Exception as exc:  # noqa: BLE001 - the learner thread must survive; the batch is retried, then quarantined
            log.exception("update_failed", reason=str(exc))
            self.metrics.record_update("failed", 0.0)
            for doc in self.journal.documents(state=DocState.PROCESSING):
                if self.intake.fail_document(doc.id, f"update failed: {exc}") == "failed":
                    self.metrics.document(doc.source if doc.source in ("watch", "feed") else "watch", "failed")
            return None
        finally:
            self.heartbeats.busy.discard("learner")
            self.heartbeats.beat("learner")
            systemd_notify.status("idle" if not self.stop_event.is_set() else "stopping")

    def _commit_failed(self, exc: CommitFailed) -> None:
        """A checkpoint write failed (disk full...): the documents go back to the queue (no attempt counted)
        and updates pause, 5 s doubling up to 5 minutes, so a full disk is not retrained in a loop."""
        self.commit_failures += 1
        delay = min(5.0 * 2 ** (self.commit_failures - 1), 300.0)
        self.retry_updates_at = time.monotonic() + delay
        requeued = self.journal.requeue_processing()
        log.error("update_commit_failed", reason=str(exc), documents_requeued=requeued, retry_in_seconds=delay)
        self.metrics.record_update("failed", 0.0)
        systemd_notify.status(f"checkpoint write failed; retrying in {delay:g} s")

    def _record(self, outcome: UpdateOutcome) -> None:
        if outcome.stopped:
            return
        if outcome.chunks_known:
            self.metrics.skipped_known(outcome.chunks_known)
        self.metrics.observe_token_surprise(outcome.surprise)
        if outcome.chunks_learned:
            self.metrics.record_update(
                "accepted" if outcome.accepted else "rolled_back",
                outcome.seconds,
                rows_updated=outcome.rows_updated,
                slots_selected=outcome.slots_selected,
            )
        if outcome.accepted:
            self.metrics.set_checkpoint(outcome.version or 0, time.time())
            if outcome.fill is not None:
                self.metrics.set_memory_fill(outcome.fill)
            self.probing.add_recall(outcome.recall_items)
        for source, settled in outcome.documents_settled:
            self.metrics.document(source if source in ("watch", "feed") else "watch", settled)
        self.metrics.set_queue(self.journal.pending_chunk_count(), self.journal.pending_token_count())
        self._report_memory()

    def _report_memory(self) -> None:
        assert self.learner is not None
        budget = self.learner.budget
        self.metrics.set_memory(budget.device_label, budget.peak_bytes(), budget.limit_bytes)

    # ---- modes ---------------------------------------------------------------------------
    def run_once(self) -> int:
        """Take everything pending, learn it, checkpoint, exit."""
        self.start()
        self.poll_sources(settle=False)
        self.gate.run(self.run_update)
        self.gate.run(self.run_probes)
        self.shutdown()
        return EX_TEMPFAIL if self.commit_failures else 0

    def run_forever(self) -> int:
        # While starting (model load, background statistics) SIGTERM keeps its default action: nothing is
        # in flight that could be lost, and the handler's stop flag would only be seen once start-up ends.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.open_intake()
        assert self.sources is not None
        self.sources.start_watchers()
        self.scheduler = self._build_scheduler()
        self.scheduler.start()  # dropped files are journaled while the model loads
        self.open_learner()
        if self.cfg.serve.enabled:  # not in --once: a batch run answers no one
            self.api = ApiServer(self.learner, self.cfg.serve, self.metrics.api)
            self.api.start()
        self.mark_ready()
        self._install_signals()
        self._schedule_learning(self.scheduler)
        systemd_notify.ready()
        systemd_notify.status("serving")
        log.info("daemon_ready", config=str(self.config_path), watch=[str(w.path) for w in self.cfg.sources.watch])
        interval = min(systemd_notify.watchdog_interval_seconds() or 5.0, 5.0)
        while not self.stop_event.is_set():
            self.wake.wait(interval)
            self.wake.clear()
            if self.reload_event.is_set() and not self.stop_event.is_set():
                self.reload_event.clear()
                self.reload()
            if self.heartbeats.healthy(HEARTBEAT_STALE_SECONDS):
                systemd_notify.watchdog()
        self.shutdown()
        return 0

    def _build_scheduler(self) -> BackgroundScheduler:
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(1), "learner": _ModelThreadExecutor(self.gate.pool)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        scheduler.add_job(self.poll_sources, "interval", seconds=1.0, id="sources", executor="default")
        return scheduler

    def _schedule_learning(self, scheduler: BackgroundScheduler) -> None:
        """Updates and probe runs, once the learner is ready."""
        scheduler.add_job(
            self.run_update,
            "interval",
            seconds=self.cfg.schedule.interval_seconds,
            id="update",
            executor="learner",
            next_run_time=_now(scheduler),
        )
        scheduler.add_job(
            self.run_probes,
            "interval",
            seconds=self.cfg.schedule.probe_interval_seconds,
            id="probes",
            executor="learner",
        )

    def _install_signals(self) -> None:
        def stop(*_: object) -> None:
            self.stop_event.set()
            self.wake.set()

        def reload(*_: object) -> None:
            self.reload_event.set()
            self.wake.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def reload(self) -> None:
        """SIGHUP: re-read sources, schedules and thresholds; the model and memory shape stay."""
        systemd_notify.reloading()
        try:
            cfg = self._load()
        except (ConfigError, SmfdError) as exc:
            log.error("reload_rejected", reason=str(exc))
            systemd_notify.ready()
            return
        if cfg.memory != self.cfg.memory or cfg.model != self.cfg.model or cfg.state_dir != self.cfg.state_dir:
            log.warning("reload_partial", reason="model, memory and state_dir changes need a restart")
        self.cfg = self.cfg.model_copy(
            update={
                k: getattr(cfg, k)
                for k in ("sources", "schedule", "train", "chunking", "surprise", "guard", "probes", "logging")
            }
        )
        assert self.learner is not None and self.scheduler is not None
        self.scheduler.add_job(
            self._reconfigure_learner, args=[LearnSettings.from_config(self.cfg)], executor="learner"
        )
        self.scheduler.get_job("sources").pause()
        assert self.sources is not None
        self.sources.build(self.cfg)
        self.sources.start_watchers()
        self.probing.reconfigure(self.cfg)
        self.scheduler.get_job("sources").resume()
        self.scheduler.reschedule_job("update", trigger="interval", seconds=self.cfg.schedule.interval_seconds)
        self.scheduler.reschedule_job("probes", trigger="interval", seconds=self.cfg.schedule.probe_interval_seconds)
        log.info("config_reloaded", config=str(self.config_path))
        systemd_notify.ready()

    def _reconfigure_learner(self, settings: LearnSettings) -> None:
        """On the learner thread, between updates: a reload the memory budget cannot fit keeps the old settings."""
        assert self.learner is not None
        try:
            self.learner.reconfigure(settings)
        except SmfdError as exc:
            log.error("reload_rejected", reason=str(exc))

    def shutdown(self) -> None:
        systemd_notify.stopping()
        self.stop_event.set()
        if self.sources is not None:
            self.sources.stop()
        if self.api is not None:
            self.api.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        self.gate.shutdown()
        if self.server is not None:
            self.server.stop()
        self.metrics.set_learner_up(False)
        self.journal.close()
        log.info("daemon_stopped")


class _ModelThreadExecutor(BasePoolExecutor):
    """APScheduler's "learner" executor: its jobs (updates, probes, reloads) run on the model's one thread."""

    def __init__(self, pool: ThreadPool) -> None:  # the base class leaves __init__ abstract
        super().__init__(pool)


def _now(scheduler: BackgroundScheduler) -> datetime:
    return datetime.now(scheduler.timezone)
