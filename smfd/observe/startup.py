"""Start-up progress: the stage a starting daemon is in, for the log, systemd's STATUS= and `smfd status`.

A first start prepares a new state (text of the model's own, healing, background statistics)
and can take minutes on a small machine; without a word in between, a user cannot tell
a slow start from a stuck one. Each stage is logged (`startup_progress`, with a percentage), sent as
systemd's one-line status and written to `<state_dir>/startup.json`, which `smfd status` reads.

The percentage is where the stage starts in a first start's time, from the shares measured on a
2-core CPU with the embedded model, whose prepared memory is shipped (56 s to ready: the model 17 s,
the retain set 36 s). The middle stages run only when no prepared memory is kept for the model,
settings and text (`smfd.learn.prepared`): then they take minutes at 32-35%, and a restart skips
them as well. An approximation, not a clock.
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog

from smfd.durable import atomic_write_json
from smfd.observe import systemd_notify

log = structlog.get_logger("smfd.startup")

# (stage, share of a first start's time); the middle ones run only to prepare a memory no file keeps.
STAGES: tuple[tuple[str, float], ...] = (
    ("loading the model", 0.32),
    ("collecting general text (memory.background_text, or text of the model's own: kept or sampled)", 0.01),
    ("collecting the model's statements of fact (kept or sampled)", 0.01),
    ("healing the memory and counting background reads", 0.01),
    ("collecting the retain set", 0.65),
)
READY = "ready"


def stage_percent(stage: str) -> int:
    """Where `stage` starts, in percent of a first start (100 for "ready")."""
    if stage == READY:
        return 100
    names = [name for name, _ in STAGES]
    if stage not in names:
        raise ValueError(f"unknown start-up stage {stage!r}; stages: {names}")
    return round(100 * sum(share for _, share in STAGES[: names.index(stage)]))


class StartupProgress:
    """Reports each start-up stage as it begins; `path` (optional) keeps the latest for `smfd status`."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.started = time.time()

    def stage(self, name: str) -> None:
        percent = stage_percent(name)
        elapsed = time.time() - self.started
        log.info("startup_progress", stage=name, percent=percent, elapsed_seconds=round(elapsed, 1))
        systemd_notify.status(f"starting: {name} ({percent}%)" if name != READY else "ready")
        if self.path is not None:
            record = {"stage": name, "percent": percent, "started_at": self.started, "updated_at": time.time()}
            atomic_write_json(self.path, record)

    def ready(self) -> None:
        self.stage(READY)
