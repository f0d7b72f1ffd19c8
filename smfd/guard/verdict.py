"""The guard's verdict on an update: accepted, or rolled back for a named reason.

The guard compares the fast probe measures after an update with those of the last accepted
state (`judge`) and the learner acts on the `Verdict`: an update that is not accepted is reverted
exactly and its document counted as rejected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import structlog

from smfd.config import GuardSection
from smfd.guard.retention import Measures, RetentionProbes

log = structlog.get_logger("smfd.guard")


class RollbackReason(str, Enum):
    """Which guard threshold an update crossed (a metric label and a log field)."""

    ACCURACY = "accuracy"  # a fact suite lost more than guard.max_accuracy_drop
    NLL = "nll"  # held-out or choice NLL rose more than guard.max_nll_increase_ratio
    DRIFT = "drift"  # next-token KL from the base rose more than guard.max_drift_kl


@dataclass(frozen=True)
class Verdict:
    """What the guard decided about one update, with the measures it decided on."""

    accepted: bool
    reason: RollbackReason | None = None  # the threshold crossed; also set when guard.action "alert" accepted anyway
    measures: dict[str, Any] = field(default_factory=dict)  # before / after / probe_seconds

    @classmethod
    def unguarded(cls) -> Verdict:
        """No guard configured: every update is accepted."""
        return cls(True)


GuardCheck = Callable[[], Verdict]


def judge(before: Measures, after: Measures, guard: GuardSection) -> RollbackReason | None:
    """Compare a post-update measurement with the last accepted one; the threshold crossed, or None.

    A suite with an accuracy is judged by it; its answer NLL is reported but not judged, because a
    known answer's NLL is small (about 0.6 nats) and a ratio of it turns a harmless 0.02-nat shift
    into a rejection. The NLL ratio judges the suites whose measure is a likelihood: held-out text,
    and choice suites in the fast check (the right ending's NLL).
    """
    for suite, now in after.items():
        then = before.get(suite, {})
        if "accuracy" in now and "accuracy" in then:
            if then["accuracy"] - now["accuracy"] > guard.max_accuracy_drop:
                return RollbackReason.ACCURACY
        elif "nll" in now and "nll" in then and now["nll"] > then["nll"] * (1 + guard.max_nll_increase_ratio):
            return RollbackReason.NLL
        if "kl" in now and now["kl"] - then.get("kl", 0.0) > guard.max_drift_kl:
            return RollbackReason.DRIFT
    return None


class Guard:
    """The post-update check, on the learner thread: fast probes against the last accepted state."""

    def __init__(self, probes: RetentionProbes, section: GuardSection) -> None:
        self.probes = probes
        self.section = section
        self.accepted: Measures = probes.measure(fast=True)

    def check(self) -> Verdict:
        """Measure the model as the update left it and judge it; an accepted state becomes the reference.

        With `guard.action: alert` a crossed threshold is logged and the update kept (the verdict
        still names the reason, so it is counted).
        """
        started = time.perf_counter()
        after = self.probes.measure(fast=True)
        reason = judge(self.accepted, after, self.section)
        measures = {"before": self.accepted, "after": after, "probe_seconds": time.perf_counter() - started}
        accepted = reason is None or self.section.action == "alert"
        if reason is not None and accepted:
            log.warning("retention_alert", reason=reason.value, measures=measures)
        if accepted:
            self.accepted = after
        return Verdict(accepted, reason, measures)
