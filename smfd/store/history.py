"""Reading a checkpoint's update history: which versions the current one descends from, what they hold.

The manifest's history lists every version ever written, rolled-back ones included; a rollback
entry (`rollback_from`) drops the versions above its target, and a version number written again
after a rollback replaces the one it reuses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CommittedDocument:
    """A document whose chunks an accepted update learned: the version that holds it and those chunks."""

    version: int
    chunk_ids: tuple[int, ...]


def last_fill(history: list[dict]) -> dict | None:
    """How full the memory was after the current version's update (recorded at commit), or None."""
    return next((entry["fill"] for entry in reversed(_lineage(history)) if "fill" in entry), None)


def committed_in(history: list[dict]) -> dict[int, CommittedDocument]:
    """Every document learned by a version the current one descends from (rolled-back versions excluded)."""
    committed: dict[int, CommittedDocument] = {}
    for entry in _lineage(history):
        for doc_id, chunk_ids in (entry.get("documents") or {}).items():
            committed[int(doc_id)] = CommittedDocument(int(entry["version"]), tuple(int(i) for i in chunk_ids))
    return committed


def _lineage(history: list[dict]) -> list[dict]:
    """The history entries the current version is built from: a rollback drops the versions above its target,
    and a version number written again after a rollback replaces the one it reuses."""
    alive: list[dict] = []
    for entry in history:
        version = int(entry["version"])
        if "rollback_from" in entry:
            alive = [e for e in alive if int(e["version"]) <= version]
        else:
            alive = [e for e in alive if int(e["version"]) < version] + [entry]
    return alive
