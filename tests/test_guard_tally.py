"""The guard's verdicts along the stream: a daemon that rolls back most of its updates has mostly
stopped learning, and must say so (log at warning, metric, `smfd status`)."""

from __future__ import annotations

import pytest
import structlog

from smfd.config import GuardSection
from smfd.guard.verdict import VerdictTally, VerdictWindow

SECTION = GuardSection(warn_window=4, warn_rejected_share=0.5)


def test_tally_counts_the_last_window_of_verdicts_and_their_reasons() -> None:
    verdicts = [(False, "drift")] * 3 + [(True, None), (False, "accuracy"), (False, None)]
    tally = VerdictTally.of(verdicts, SECTION)
    assert (tally.accepted, tally.rejected) == (1, 3), "only the last four count"
    assert tally.reasons == {"drift": 1, "accuracy": 1, "rejected": 1}
    assert tally.rejected_share == pytest.approx(0.75) and tally.alarming


@pytest.mark.parametrize(
    ("verdicts", "alarming"),
    [
        ([(False, "drift")] * 2 + [(True, None)] * 2, False),  # half rejected: not more than the share
        ([(False, "drift")] * 3, True),  # three of a window of four rejected, even before the window is full
        ([(True, None)] * 10, False),
        ([], False),
    ],
)
def test_alarm_when_more_than_the_share_of_a_window_is_rolled_back(verdicts, alarming: bool) -> None:
    assert VerdictTally.of(verdicts, SECTION).alarming is alarming


def test_window_warns_while_most_updates_are_rolled_back_and_stops_when_learning_resumes() -> None:
    window = VerdictWindow(SECTION, [(True, None)])
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            window.add(False, "drift")  # the third makes three of the last four
        window.add(True, None)  # still three of four: warns again
        tally = window.add(True, None)  # two of four
    warnings = [entry for entry in logs if entry["event"] == "most_updates_rolled_back"]
    assert len(warnings) == 2, "warned after the third rollback and the update after it, not before or since"
    assert all(entry["log_level"] == "warning" for entry in warnings)
    assert warnings[-1]["rejected"] == 3 and warnings[-1]["reasons"] == {"drift": 3}
    assert not tally.alarming and tally.rejected == 2
