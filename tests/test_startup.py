"""Start-up progress: a starting daemon names its stage with a percentage that only grows."""

from __future__ import annotations

import json

import pytest

from smfd.observe.startup import READY, STAGES, StartupProgress, stage_percent


def test_percentages_grow_stage_by_stage_from_0_to_100(tmp_path) -> None:
    percents = [stage_percent(name) for name, _ in STAGES] + [stage_percent(READY)]
    assert percents[0] == 0 and percents[-1] == 100 and percents == sorted(set(percents))
    progress = StartupProgress(tmp_path / "startup.json")
    progress.stage(STAGES[2][0])
    record = json.loads((tmp_path / "startup.json").read_text())
    assert record["stage"] == STAGES[2][0] and record["percent"] == percents[2]


def test_an_unknown_stage_is_named() -> None:
    with pytest.raises(ValueError, match="unknown start-up stage 'warming up'"):
        stage_percent("warming up")
