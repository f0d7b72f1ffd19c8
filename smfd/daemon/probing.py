"""The daemon's probes: the base model's reference results, the guard after each update, and the
scheduled full probe run, each reported to the metrics. Runs on the learner thread only."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator

import structlog
import torch

from smfd.config import SmfdConfig
from smfd.daemon.health import Heartbeats
from smfd.errors import SmfdError
from smfd.guard.retention import RetentionProbes
from smfd.guard.verdict import Guard, Verdict, VerdictWindow
from smfd.heap import trim
from smfd.model.memory_model import MemoryModel
from smfd.observe.metrics import Metrics

log = structlog.get_logger("smfd.daemon.probing")


class _Stopping(Exception):
    """Raised at a probe run's next forward once the daemon is stopping."""


@contextlib.contextmanager
def _stoppable(model: torch.nn.Module, stop: Callable[[], bool]) -> Iterator[None]:
    """Let `stop` end the model work inside at its next forward pass.

    A base measurement or a full probe run takes minutes on a small CPU; without this, a stop
    waits for it (and systemd kills the daemon after TimeoutStopSec). Every probe writes its
    results only at the end, so a run given up leaves nothing half-written.
    """

    def check(module: torch.nn.Module, args: tuple) -> None:
        if stop():
            raise _Stopping

    handle = model.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


class Probing:
    """Probe runs and the guard, for one daemon; absent suites make every update accepted.

    `stop` (the daemon's stop flag) gives up a probe run at its next forward pass.
    """

    def __init__(
        self, cfg: SmfdConfig, metrics: Metrics, heartbeats: Heartbeats, stop: Callable[[], bool] | None = None
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.heartbeats = heartbeats
        self.stop = stop or (lambda: False)
        self.probes: RetentionProbes | None = None
        self.guard: Guard | None = None
        self.verdicts = VerdictWindow(cfg.guard)

    def start(self, model: MemoryModel, earlier_verdicts: Iterable[tuple[bool, str | None]] = ()) -> None:
        """Take the probe suites and the verdicts so far; the base results are measured later (`establish`).

        `earlier_verdicts`: (accepted, rollback reason) of the journal's last updates, oldest first, so
        a restart does not forget that most recent updates were rolled back.
        """
        self.verdicts = VerdictWindow(self.cfg.guard, earlier_verdicts)
        self.metrics.set_guard_tally(self.verdicts.tally())
        if not (self.cfg.probes.builtin or self.cfg.probes.suites):
            return
        self.probes = RetentionProbes(
            model, self.cfg.probes, self.cfg.state_dir, include_builtin=self.cfg.probes.builtin
        )

    def establish(self) -> None:
        """Measure the base model's probe results (once per state, cached) and the current state as the accepted one.

        Not on the way to readiness: a new state's base results take minutes on a small CPU, and
        nothing needs them before the first update or probe run, which call this first (idempotent).
        """
        if self.probes is None or self.guard is not None:
            return
        self.heartbeats.busy.add("learner")
        try:
            started = time.perf_counter()
            with _stoppable(self.probes.model.model, self.stop):
                base = self.probes.establish_baseline()
            for suite, values in base.items():
                self.metrics.set_probe_base(suite, values.get("accuracy"), values["nll"])
            self.guard = Guard(self.probes, self.cfg.guard)
            log.info("base_probes_measured", seconds=round(time.perf_counter() - started, 1))
            trim()  # scoring every suite once freed tensors of every size
        except _Stopping:
            log.info("base_probes_abandoned", reason="stopping", seconds=round(time.perf_counter() - started, 1))
        finally:
            self.heartbeats.busy.discard("learner")
            self.heartbeats.beat("learner")

    def reconfigure(self, cfg: SmfdConfig) -> None:
        """New thresholds from a reload (the suites stay: they are measured against the base)."""
        self.cfg = cfg
        self.verdicts = VerdictWindow(cfg.guard, self.verdicts.verdicts)
        if self.guard is not None:
            self.guard.section = cfg.guard

    def check(self) -> Verdict:
        """The guard's verdict on the update just made, with its probe time, drift and rollback counted."""
        if self.probes is not None and self.guard is None:
            raise SmfdError("an update was checked before the base probe results were measured (Probing.establish)")
        if self.guard is None or not self.cfg.guard.enabled:
            return Verdict.unguarded()
        verdict = self.guard.check()
        self.metrics.observe_probe_duration(verdict.measures["probe_seconds"])
        if verdict.accepted:
            after = verdict.measures["after"]
            if "drift" in after:
                self.metrics.set_drift_kl(after["drift"]["kl"])
        elif verdict.reason is not None:
            self.metrics.rollback(verdict.reason.value)
        self.metrics.set_guard_tally(self.verdicts.add(verdict.accepted, verdict.rollback_reason))
        return verdict

    def run_full(self, version: int) -> None:
        """The full probe set and the recall of learned documents, on a schedule."""
        if self.probes is None:
            return
        self.establish()
        if self.guard is None:  # stopping before the base was measured
            return
        self.heartbeats.busy.add("learner")
        try:
            started = time.perf_counter()
            try:
                with _stoppable(self.probes.model.model, self.stop):
                    measures = self.probes.measure(fast=False)
                    recall = self.probes.measure_recall()
            except _Stopping:
                log.info("probes_abandoned", reason="stopping", seconds=round(time.perf_counter() - started, 1))
                return
            if recall is not None:
                measures["recall"] = recall
                by_kind = {
                    key.removeprefix("accuracy."): value for key, value in recall.items() if key.startswith("accuracy.")
                }
                self.metrics.set_recall_accuracy(recall["accuracy"], by_kind)
            self.metrics.observe_probe_duration(time.perf_counter() - started)
            for suite, values in measures.items():
                if suite == "drift":
                    self.metrics.set_drift_kl(values["kl"])
                elif suite != "recall":
                    self.metrics.set_probe(suite, values.get("accuracy"), values["nll"])
            self.probes.record_last(measures, version)
            log.info("probes_measured", seconds=round(time.perf_counter() - started, 2), measures=measures)
        finally:
            self.heartbeats.busy.discard("learner")
            self.heartbeats.beat("learner")

    def add_recall(self, items: list) -> None:
        if self.probes is not None:
            self.probes.add_recall(items)
