"""Worker liveness: the systemd watchdog and /livez are fed only while every worker is fresh."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

HEARTBEAT_STALE_SECONDS = 600.0


@dataclass
class Heartbeats:
    """Last time each worker proved it was alive; the systemd watchdog is only fed while all are fresh."""

    beats: dict[str, float] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)

    def beat(self, name: str) -> None:
        self.beats[name] = time.monotonic()

    def healthy(self, stale_after: float) -> bool:
        now = time.monotonic()
        return all(name in self.busy or now - t < stale_after for name, t in self.beats.items())
