"""Where things live: the state folder's layout and the text files shipped with smfd."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path


def builtin_file(name: str) -> Path:
    """A text file shipped inside the package (probe suites, prompts): `smfd/data/NAME`."""
    return Path(str(resources.files("smfd") / "data" / name))


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-blank line (drift prompts, background sampling prompts)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class StatePaths:
    """The state folder's layout, in one place: every component asks here instead of joining names."""

    root: Path

    @property
    def journal(self) -> Path:
        return self.root / "journal.sqlite"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def feeds(self) -> Path:
        return self.root / "feeds"

    @property
    def memory(self) -> Path:
        """Checkpoints of the memory (smfd.store.checkpoint)."""
        return self.root / "memory"

    @property
    def probes(self) -> Path:
        """The base model's probe results, the last run's and the recall probes (smfd.guard.retention)."""
        return self.root / "probes"

    @property
    def lock(self) -> Path:
        return self.root / "smfd.lock"

    @property
    def model_cache(self) -> Path:
        """Where a converted model is cached unless `model.cache_dir` says otherwise."""
        return self.root / "model-cache"

    @property
    def startup(self) -> Path:
        """The stage a starting daemon is in (smfd.observe.startup), for `smfd status`."""
        return self.root / "startup.json"

    @property
    def probe_base(self) -> Path:
        return self.probes / "base.json"

    @property
    def probe_last(self) -> Path:
        return self.probes / "last.json"

    @property
    def recall(self) -> Path:
        return self.probes / "recall.jsonl"

    def create(self) -> None:
        for folder in (self.root, self.spool, self.quarantine, self.feeds):
            folder.mkdir(parents=True, exist_ok=True)
