"""The guard's verdict on an update: accepted, or rolled back for a named reason.

The guard compares the fast probe measures after an update with those of the last accepted
state (`judge`) and the learner acts on the `Verdict`: an update that is not accepted is reverted
exactly and its document counted as rejected.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
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

    @property
    def rollback_reason(self) -> str | None:
        """Why the update was rolled back ("rejected" when no threshold is named); None when accepted."""
        if self.accepted:
            return None
        return self.reason.value if self.reason is not None else "rejected"

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


@dataclass(frozen=True)
class VerdictTally:
    """The guard's verdicts over a window of recent updates: how many it accepted and rolled back, and why.

    `alarming`: more than `guard.warn_rejected_share` of a full window of `guard.warn_window`
    updates were rolled back. A daemon in that state has mostly stopped learning (a memory so full
    that ordinary text reads what it learned, or thresholds too tight for the stream), and says so.
    """

    window: int
    accepted: int
    rejected: int
    reasons: dict[str, int]
    alarming: bool

    @property
    def rejected_share(self) -> float:
        total = self.accepted + self.rejected
        return self.rejected / total if total else 0.0

    @classmethod
    def of(cls, verdicts: Iterable[tuple[bool, str | None]], section: GuardSection) -> VerdictTally:
        """Tally (accepted, rollback reason) pairs, newest last; only the last `section.warn_window` count."""
        recent = list(verdicts)[-section.warn_window :]
        rejected = [reason or "rejected" for accepted, reason in recent if not accepted]
        alarming = len(rejected) > section.warn_rejected_share * section.warn_window
        return cls(section.warn_window, len(recent) - len(rejected), len(rejected), dict(Counter(rejected)), alarming)

    def as_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "rejected_share": self.rejected_share,
            "reasons": self.reasons,
            "alarming": self.alarming,
        }


class VerdictWindow:
    """The last `guard.warn_window` verdicts of a running daemon, seeded from the journal at start-up."""

    def __init__(self, section: GuardSection, earlier: Iterable[tuple[bool, str | None]] = ()) -> None:
        self.section = section
        self.verdicts: deque[tuple[bool, str | None]] = deque(earlier, maxlen=section.warn_window)

    def add(self, accepted: bool, reason: str | None) -> VerdictTally:
        """Record one update's verdict; warns (log level warning) while most recent updates are rolled back."""
        self.verdicts.append((accepted, reason))
        tally = self.tally()
        if tally.alarming:
            log.warning(
                "most_updates_rolled_back",
                rejected=tally.rejected,
                window=tally.window,
                reasons=tally.reasons,
                hint="the daemon has mostly stopped learning: see the memory fill and the guard's thresholds",
            )
        return tally

    def tally(self) -> VerdictTally:
        return VerdictTally.of(self.verdicts, self.section)
