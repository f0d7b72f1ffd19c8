"""A full disk during a checkpoint write fails the update, not the documents: the update is undone
in memory, its documents wait in the queue (no attempt counted), updates pause instead of
retraining in a loop, and once space returns the documents are learned and committed exactly once,
with the memory on disk equal to base + patches."""

from __future__ import annotations

import errno
import os
import time

from test_daemon import NEW_TEXT, write_config

from smfd.daemon.service import Daemon
from smfd.store import checkpoint
from smfd.store.checkpoint import CheckpointStore


def test_disk_full_at_commit_requeues_pauses_and_commits_once_space_returns(
    tmp_path, tiny_model_dir, make_memory_model, monkeypatch, snapshot_values
):
    config = write_config(tmp_path, tiny_model_dir, metrics={"enabled": False})
    daemon = Daemon(config)
    daemon.start()
    try:
        (tmp_path / "inbox" / "lighthouse.txt").write_text(NEW_TEXT)
        os.utime(tmp_path / "inbox" / "lighthouse.txt", (time.time() - 60,) * 2)
        daemon.poll_sources(settle=False)
        before = snapshot_values(daemon.learner.model)
        real_write = checkpoint.atomic_write

        def disk_full(path, write):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(checkpoint, "atomic_write", disk_full)
        assert daemon.run_update() is None
        [document] = daemon.journal.documents()
        assert (document.state, document.attempts) == ("queued", 0), "a full disk is not the document's fault"
        values = snapshot_values(daemon.learner.model)
        assert all(values[layer].equal(before[layer]) for layer in before), "the update was undone in memory"

        trained = []
        real_update = daemon.learner.update
        daemon.learner.update = lambda *a, **k: trained.append(1) or real_update(*a, **k)
        assert daemon.run_update() is None and trained == [], "updates pause after a failed write"

        monkeypatch.setattr(checkpoint, "atomic_write", real_write)  # space is back
        daemon.retry_updates_at = 0.0  # skip the 5 s pause
        outcome = daemon.run_update()
        assert outcome is not None and outcome.version == 1 and trained == [1]
        assert daemon.journal.documents()[0].state == "done"
        running = snapshot_values(daemon.learner.model)
    finally:
        daemon.shutdown()

    store = CheckpointStore(tmp_path / "state" / "memory")
    reloaded = make_memory_model()
    assert store.load_into(reloaded)[0] == 1
    replayed = snapshot_values(reloaded)
    assert all(replayed[layer].equal(running[layer]) for layer in running), "base + patches = the running memory"
