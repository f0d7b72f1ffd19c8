"""A crash at any point of an update loses nothing and learns nothing twice.

Each case runs a real update on the tiny model and stops it dead at one moment around the commit
(an exception nothing in smfd catches, standing in for `kill -9`: nothing after that moment runs),
then restarts as the daemon does: a fresh journal connection and model loaded from the checkpoint,
start-up recovery, and the next update. Whatever the moment, each document ends learned by exactly
one checkpoint version and the memory equals base + that one patch.
"""

from __future__ import annotations

import pytest
from test_learner import SETTINGS, submit_all

from smfd.daemon.recovery import recover_interrupted_documents, remove_leftovers
from smfd.guard.verdict import Verdict
from smfd.ingest.journal import Journal
from smfd.learn.learner import Learner
from smfd.store import checkpoint as checkpoint_module
from smfd.store.checkpoint import CheckpointStore


class Killed(BaseException):
    """The process dies here: raised past every handler, like a kill -9."""


def accept():
    return Verdict(True, None, {"drift": 0.0})


def _die_after(target, name: str):
    original = getattr(target, name)

    def wrapper(*args, **kwargs):
        original(*args, **kwargs)
        raise Killed(name)

    setattr(target, name, wrapper)


def _die_before(target, name: str):
    def wrapper(*args, **kwargs):
        raise Killed(name)

    setattr(target, name, wrapper)


# Each moment at which the state on disk changes during one update, in order.
CRASH_POINTS = {
    "patch written, manifest not": lambda mp, store, journal: mp.setattr(
        checkpoint_module, "atomic_write_json", lambda *a: (_ for _ in ()).throw(Killed("manifest"))
    ),
    "manifest written (the commit), patches not folded": lambda mp, store, journal: _die_before(
        store, "_fold_old_patches"
    ),
    "committed, chunks not marked": lambda mp, store, journal: _die_after(store, "commit"),
    "chunks marked learned, update not recorded": lambda mp, store, journal: _die_before(journal, "record_update"),
    "update recorded, documents not done": lambda mp, store, journal: _die_before(journal, "mark_done"),
}


@pytest.mark.parametrize("moment", list(CRASH_POINTS))
def test_a_crash_at_any_moment_of_a_commit_learns_each_document_exactly_once(
    moment, tmp_path, tiny_memory_model, make_memory_model, background, store, snapshot_values, bit_identical
):
    journal_path = tmp_path / "journal.db"
    with Journal(journal_path) as journal, pytest.MonkeyPatch.context() as mp:
        doc_ids = submit_all(journal, tmp_path)
        CRASH_POINTS[moment](mp, store, journal)
        with pytest.raises(Killed):
            Learner(tiny_memory_model, background, store, journal, SETTINGS).update(guard=accept)

    # Restart: a new process reads the journal and the checkpoint from disk.
    restarted_store = CheckpointStore(store.folder, keep=store.keep)
    model = make_memory_model()
    version, loaded_background = restarted_store.load_into(model)
    with Journal(journal_path) as journal:
        recovery = recover_interrupted_documents(journal, restarted_store)
        assert recovery.requeued + len(recovery.settled) == len(doc_ids), "every interrupted document is handled"
        outcome = Learner(model, loaded_background, restarted_store, journal, SETTINGS).update(guard=accept)

        assert restarted_store.version == 1, f"one update for the documents, not {restarted_store.version}"
        documents = [journal.get_document(doc_id) for doc_id in doc_ids]
        assert [(d.state, d.checkpoint_version) for d in documents] == [("done", 1)] * len(doc_ids)
        assert {c.state for d in doc_ids for c in journal.chunks_for(d)} == {"learned"}
        if version == 1:  # the crash came after the commit: recovery settled it, nothing was trained again
            assert recovery.settled == doc_ids and outcome.steps == 0
        else:
            assert recovery.requeued == len(doc_ids) and outcome.accepted

    # The memory on disk is base + exactly one patch, and what the running model holds.
    reloaded = make_memory_model()
    assert restarted_store.load_into(reloaded)[0] == 1
    assert bit_identical(snapshot_values(reloaded), snapshot_values(model))


def test_recovery_ignores_the_documents_of_a_rolled_back_version(
    tmp_path, tiny_memory_model, background, store, journal
):
    submit_all(journal, tmp_path)
    Learner(tiny_memory_model, background, store, journal, SETTINGS).update(guard=accept)
    assert set(store.committed_documents()) == {1, 2}

    store.rollback(tiny_memory_model, 0)

    assert store.committed_documents() == {}, "a rolled-back version holds no document any more"


def test_leftovers_of_interrupted_writes_are_removed_at_start_and_nothing_else(
    tmp_path, tiny_memory_model, background, store, journal
):
    submit_all(journal, tmp_path)
    Learner(tiny_memory_model, background, store, journal, SETTINGS).update(guard=accept)
    kept = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    leftovers = [
        store.folder / ".base.safetensors.k2j4x9.tmp",  # a fold of old patches into the base cut short
        store.folder / "patches" / ".00000002.safetensors.q8v1.tmp",
        store.folder / "patches" / "00000002.safetensors",  # a commit that never reached the manifest
        tmp_path / "spool" / ".manifest.json.77ab.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"half written")

    assert remove_leftovers(tmp_path, store) == len(leftovers)

    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == kept
    assert store.version == 1 and (store.folder / "patches" / "00000001.safetensors").is_file()
