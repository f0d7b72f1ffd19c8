"""Kill -9 campaign: the daemon (tiny model) killed over and over while files arrive, half of the kills
aimed at the moments the checkpoint on disk changes, half at random. After a clean final run every
text dropped is learned exactly once: documents done = distinct texts = checkpoint version, each
document with its own version, no temporary file left behind.

SMFD_KILLS sets the number of kills (default 8 keeps the suite quick; the closing figures use 50).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from test_daemon import write_config

from smfd.ingest.journal import Journal
from smfd.store.checkpoint import CheckpointStore

KILLS = int(os.environ.get("SMFD_KILLS", "8"))
WORDS = "amber cobalt violet granite willow harbour lantern meadow falcon copper orchard beacon".split()


def document_text(index: int) -> str:
    rng = random.Random(index)
    first, second, third = rng.sample(WORDS, 3)
    return (
        f"Record {index}. The {first} tower of {second} ford was built in {1700 + index} by a {third} guild. "
        f"Its keeper counted {index * 7 + 3} ships in one winter and wrote each name in a {second} book."
    )


def _manifest_mtime(memory: Path) -> int:
    manifest = memory / "manifest.json"
    return manifest.stat().st_mtime_ns if manifest.exists() else 0


def _writing(memory: Path) -> bool:
    return memory.is_dir() and any(memory.rglob(".*.tmp"))


def _kill_at(process: subprocess.Popen, memory: Path, moment: str, timeout: float) -> bool:
    """Kill as soon as a checkpoint file is being written ("write") or a commit has landed ("commit");
    True if that moment came before `timeout` (else the process is killed anyway)."""
    start = _manifest_mtime(memory)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if _writing(memory) if moment == "write" else _manifest_mtime(memory) != start:
            process.kill()
            return True
        time.sleep(0.001)
    process.kill()
    return False


def test_kill_9_at_any_moment_loses_nothing_and_learns_nothing_twice(tmp_path, tiny_model_dir):
    config = write_config(
        tmp_path,
        tiny_model_dir,
        train={"max_documents": 1},
        metrics={"enabled": False},
        sources={"settle_seconds": 0.1},
        probes={"builtin": False},
    )
    inbox, memory, log_path = tmp_path / "inbox", tmp_path / "state" / "memory", tmp_path / "daemon.log"
    rng = random.Random(0)
    dropped: list[str] = []

    def drop() -> None:
        text = document_text(len(dropped))
        (inbox / f"doc{len(dropped):03d}.txt").write_text(text)
        dropped.append(text)

    def daemon(*extra: str) -> subprocess.Popen:
        with open(log_path, "a") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "smfd", "--config", str(config), *extra], stdout=log, stderr=subprocess.STDOUT
            )

    for _ in range(3):
        drop()
    aimed_hits = 0
    for kill in range(KILLS):
        if kill % 3 == 0:
            drop()  # some kills land during intake
        process = daemon()
        if kill % 2 == 0:
            aimed_hits += _kill_at(process, memory, "write" if kill % 4 == 0 else "commit", timeout=30)
        else:
            time.sleep(rng.uniform(0.5, 6.0))
            process.kill()
        process.wait()

    assert daemon("--once").wait(timeout=300) == 0, log_path.read_text()[-3000:]

    with Journal(tmp_path / "state" / "journal.sqlite", readonly=True) as journal:
        done = journal.documents("done")
        counts = journal.counts()
    expected = {hashlib.sha256(text.encode()).hexdigest() for text in dropped}
    version = CheckpointStore(memory).version
    events = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    settled = sum(e.get("count", 0) for e in events if e.get("event") == "documents_settled")
    print(
        f"kills={KILLS} aimed_hits={aimed_hits} texts={len(dropped)} done={len(done)} version={version} "
        f"settled_from_checkpoint={settled} counts={counts}"
    )
    assert {doc.content_hash for doc in done} == expected, "every text dropped is learned (none lost)"
    assert len(done) == len(dropped) == version, "one update per document: none learned twice"
    assert sorted(doc.checkpoint_version for doc in done) == list(range(1, version + 1))
    assert counts["queued"] == counts["processing"] == counts["failed"] == 0
    assert not list((tmp_path / "state").rglob(".*.tmp")), "no temporary file of an interrupted write is left"
    assert not list(inbox.glob("*.txt")), "every dropped file was taken"
