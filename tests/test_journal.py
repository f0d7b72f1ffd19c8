"""The journal is the daemon's memory of what it has seen: it must survive crashes and be
readable by `smfd status` from another process."""

import sqlite3
import subprocess
import sys
import threading

import pytest

from smfd.errors import SmfdError
from smfd.ingest.journal import DOCUMENT_STATES, ChunkState, Journal


@pytest.fixture
def journal(tmp_path):
    with Journal(tmp_path / "journal.db") as opened:
        yield opened


def test_same_content_hash_is_recorded_as_duplicate_and_not_queued(journal):
    first, first_dup = journal.add_document("h1", "watch", "a.txt", "/spool/h1.txt", 10)
    second, second_dup = journal.add_document("h1", "feed", "Entry title", "/spool/h1.txt", 10)

    assert (first_dup, second_dup) == (False, True)
    assert journal.get_document(second).duplicate_of == first
    assert [row.id for row in journal.documents("queued", 10)] == [first]
    counts = journal.counts()
    assert set(counts) == set(DOCUMENT_STATES)
    assert counts["queued"] == 1 and counts["duplicate"] == 1


def test_processing_rows_are_requeued_by_a_new_instance_after_a_crash(tmp_path):
    path = tmp_path / "journal.db"
    crashed = Journal(path)
    a, _ = crashed.add_document("ha", "watch", "a.txt", None, 1)
    b, _ = crashed.add_document("hb", "watch", "b.txt", None, 1)
    claimed = crashed.claim_queued(1)
    assert [row.id for row in claimed] == [a]
    assert claimed[0].state == "processing"
    # No close(): the process "dies" with the connection open.

    restarted = Journal(path)
    assert restarted.requeue_processing() == 1
    assert [row.id for row in restarted.documents("queued", 10)] == [a, b]
    assert restarted.counts()["processing"] == 0
    restarted.close()
    crashed.close()


def test_mark_failed_retries_until_max_attempts_then_content_may_come_back(journal):
    doc_id, _ = journal.add_document("hf", "watch", "f.txt", None, 1)
    assert journal.mark_failed(doc_id, "tokenizer exploded", max_attempts=2) == "queued"
    assert journal.mark_failed(doc_id, "tokenizer exploded again", max_attempts=2) == "failed"
    row = journal.get_document(doc_id)
    assert (row.state, row.attempts, row.reason) == ("failed", 2, "tokenizer exploded again")

    again, duplicate = journal.add_document("hf", "watch", "f.txt", None, 1)
    assert not duplicate and journal.get_document(again).state == "queued"


def test_quarantined_content_arriving_again_is_a_duplicate(journal):
    doc_id, _ = journal.add_document("hq", "watch", "q.txt", None, 1)
    journal.mark_quarantined(doc_id, "looks like a password dump")
    assert journal.get_document(doc_id).reason == "looks like a password dump"
    _, duplicate = journal.add_document("hq", "watch", "q2.txt", None, 1)
    assert duplicate


def test_chunk_lifecycle_and_done_only_from_processing(journal):
    doc_id, _ = journal.add_document("hc", "watch", "c.txt", None, 100)
    other, _ = journal.add_document("hd", "watch", "d.txt", None, 100)
    assert [row.id for row in journal.claim_queued(1)] == [doc_id]
    ids = journal.add_chunks(doc_id, [("first chunk", 7), ("second chunk", 5)])

    assert journal.pending_chunk_count() == 2
    assert journal.pending_token_count() == 12
    assert [chunk.text for chunk in journal.pending_chunks(limit=1)] == ["first chunk"]
    assert journal.finished_processing_ids() == []

    assert journal.set_chunk_state(ids, ChunkState.LEARNED) == 2
    assert [chunk.state for chunk in journal.chunks_for(doc_id)] == ["learned", "learned"]
    assert journal.finished_processing_ids() == [doc_id]
    assert journal.pending_token_count() == 0

    assert journal.mark_done([doc_id, other], checkpoint_version=4) == 1  # `other` is still queued
    assert journal.get_document(doc_id).checkpoint_version == 4
    assert journal.get_document(other).state == "queued"


def test_add_chunks_replaces_chunks_of_a_rechunked_document(journal):
    doc_id, _ = journal.add_document("hr", "watch", "r.txt", None, 1)
    first_ids = journal.add_chunks(doc_id, [("old a", 1), ("old b", 1), ("old c", 1)])
    journal.set_chunk_state(first_ids[:1], "learned")
    journal.add_chunks(doc_id, [("new a", 2)])
    assert [(c.text, c.state) for c in journal.chunks_for(doc_id)] == [("new a", "pending")]


def test_bad_states_and_unknown_documents_are_refused(journal):
    with pytest.raises(SmfdError, match="unknown state 'eaten'"):
        journal.set_chunk_state([1], "eaten")
    with pytest.raises(SmfdError, match="no document with id 99"):
        journal.mark_failed(99, "x")


def test_updates_are_recorded_and_read_back_newest_first(journal):
    assert journal.last_update() is None
    journal.record_update(1, n_chunks=4, n_rows=64, seconds=2.5, accepted=True, measures={"probe_loss": 1.25})
    journal.record_update(2, n_chunks=3, n_rows=32, seconds=1.0, accepted=False, measures={"probe_loss": 9.0})
    last = journal.last_update()
    assert (last.version, last.accepted, last.measures) == (2, False, {"probe_loss": 9.0})
    assert [u.version for u in journal.updates()] == [2, 1]


def test_another_process_reads_status_while_the_writer_is_open(tmp_path):
    path = tmp_path / "journal.db"
    writer = Journal(path)
    writer.add_document("h1", "watch", "a.txt", None, 1)
    writer.add_document("h1", "watch", "b.txt", None, 1)
    writer.record_update(7, n_chunks=1, n_rows=1, seconds=0.1, accepted=True)
    script = (
        "import sys; from smfd.ingest.journal import Journal\n"
        "j = Journal(sys.argv[1], readonly=True)\n"
        "c = j.counts(); print(c['queued'], c['duplicate'], j.last_update().version)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["1", "1", "7"]
    writer.close()


def test_readonly_journal_refuses_writes_and_missing_file(tmp_path):
    path = tmp_path / "journal.db"
    Journal(path).close()
    reader = Journal(path, readonly=True)
    with pytest.raises(SmfdError, match="read-only"):
        reader.add_document("h", "watch", "a", None, 1)
    reader.close()
    with pytest.raises(SmfdError, match="does not exist"):
        Journal(tmp_path / "absent.db", readonly=True)


def test_journal_from_a_newer_smfd_or_not_sqlite_is_refused(tmp_path):
    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(SmfdError, match="schema version 99"):
        Journal(newer)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(SmfdError, match="garbage.db"):
        Journal(garbage)


def test_concurrent_writers_from_threads_lose_nothing(journal):
    def add_many(prefix: str) -> None:
        for index in range(50):
            journal.add_document(f"{prefix}-{index}", "watch", f"{prefix}{index}.txt", None, 1)

    threads = [threading.Thread(target=add_many, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert journal.counts()["queued"] == 200


# The documents and chunks tables as schema 2 wrote them (before documents could be rolled_back).
SCHEMA_2 = """
CREATE TABLE documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT, content_hash TEXT, source TEXT NOT NULL, name TEXT NOT NULL,
    spool_path TEXT, size_bytes INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL CHECK (state IN ('queued', 'processing', 'done', 'failed', 'quarantined', 'duplicate')),
    attempts INTEGER NOT NULL DEFAULT 0, reason TEXT, duplicate_of INTEGER REFERENCES documents(id),
    checkpoint_version INTEGER, created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX documents_live_hash ON documents(content_hash) WHERE state NOT IN ('duplicate', 'failed');
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL, text TEXT NOT NULL, n_tokens INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'learned', 'known', 'rejected')), updated_at REAL NOT NULL,
    UNIQUE (doc_id, idx)
);
INSERT INTO documents VALUES (7, 'h7', 'watch', 'seven.txt', NULL, 5, 'done', 0, NULL, NULL, 3, 1.0, 1.0);
INSERT INTO documents VALUES (8, 'h7', 'watch', 'again.txt', NULL, 5, 'duplicate', 0, NULL, 7, NULL, 2.0, 2.0);
INSERT INTO chunks VALUES (40, 7, 0, 'Seven is a number.', 5, 'learned', 1.0);
PRAGMA user_version = 2;
"""


def test_a_schema_2_journal_keeps_its_rows_and_can_record_a_rollback(tmp_path):
    path = tmp_path / "journal.db"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_2)
    conn.close()

    with Journal(path) as journal:
        assert journal.get_document(7).checkpoint_version == 3 and journal.get_document(8).duplicate_of == 7
        assert [c.id for c in journal.chunks_for(7)] == [40]
        assert journal.mark_rolled_back(2, "memory rolled back to version 2") == [7]
        assert journal.get_document(7).state == "rolled_back"
        new_id, duplicate = journal.add_document("h7", "watch", "seven-again.txt", None, 5)
        assert not duplicate and new_id > 8, "rolled-back content is learnable again, under a fresh id"
    with Journal(path) as reopened:  # the migration ran once; references still hold
        assert reopened.get_document(7).state == "rolled_back"
        with pytest.raises(sqlite3.IntegrityError):
            with reopened._tx() as conn:
                conn.execute(
                    "INSERT INTO chunks (doc_id, idx, text, n_tokens, state, updated_at) "
                    "VALUES (999, 0, 'x', 1, 'pending', 0)"
                )


def test_a_corrupt_journal_page_is_reported_as_damage_not_a_raw_sqlite_error(tmp_path):
    from smfd.ingest.journal import JournalDamaged

    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        for index in range(400):
            journal.add_document(f"hash-{index}", "watch", f"note-{index}-{'x' * 80}.txt", None, 1)
        journal._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page : 6 * page] = bytes((i * 13 + 7) % 256 for i in range(3 * page))  # pages 4-6, not the header
    path.write_bytes(bytes(data))

    with Journal(path) as damaged:
        with pytest.raises(JournalDamaged, match="journal.db is damaged") as raised:
            damaged.documents("queued", 1000)
        assert damaged.damage is not None and ".recover" in str(raised.value)


def test_chunks_of_a_document_that_is_not_processing_are_not_offered_to_an_update(journal):
    doc_id, _ = journal.add_document("h-failed", "watch", "f.txt", None, 1)
    journal.claim_queued(1)
    journal.add_chunks(doc_id, [("left pending", 3)])
    assert [c.text for c in journal.pending_chunks()] == ["left pending"]

    assert journal.mark_failed(doc_id, "update failed", max_attempts=1) == "failed"

    assert journal.pending_chunks() == [] and journal.pending_chunk_count() == journal.pending_token_count() == 0
