"""Durable journal of every document smfd has seen, backed by one SQLite file.

Why SQLite: the daemon must survive a crash at any moment without losing or
double-learning a document, and `smfd status` must be able to read progress from
another process while the daemon runs. SQLite in WAL mode gives both: each state
change is one committed transaction, and readers never block the writer.

Document life cycle::

    queued -> processing -> done            (checkpoint containing the update is on disk)
                        \\-> done            (crash after the checkpoint: settle_committed() at startup)
                        \\-> queued          (crash before it: requeue_processing() at startup)
                        \\-> queued / failed (mark_failed: retried until max_attempts)
                        \\-> quarantined     (content rejected)
    done -> rolled_back                     (smfd rollback removed the version that learned it)
    duplicate                               (same content hash already known)

Chunks of a document are stored in `chunks` with states pending, learned, known
(low surprise, nothing to learn) or rejected.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smfd.errors import SmfdError
from smfd.ingest.journal_records import JournalRecords
from smfd.ingest.journal_schema import (
    CHUNK_STATES,
    DOCUMENT_STATES,
    RELEARNABLE_STATES,
    ChunkRow,
    ChunkState,
    DocState,
    DocumentRow,
    JournalDamaged,
    UpdateRow,
    _chunk,
    _document,
    path_text,
)

__all__ = [
    "CHUNK_STATES",
    "DOCUMENT_STATES",
    "ChunkRow",
    "ChunkState",
    "DocState",
    "DocumentRow",
    "Journal",
    "JournalDamaged",
    "UpdateRow",
]


# Pending chunks that an update may learn: those of documents in processing.
_LIVE_PENDING = "JOIN documents d ON d.id = c.doc_id WHERE c.state = 'pending' AND d.state = 'processing'"


def _placeholders(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


class Journal(JournalRecords):
    """The document/chunk/update journal. One connection, guarded by a lock, shared by threads.

    Every public method is one transaction: either all of it is on disk or none of it.
    Open with ``readonly=True`` from another process (``smfd status``) while the daemon runs.
    """

    # ------------------------------------------------------------- documents
    def add_document(
        self, content_hash: str, source: str, name: str, spool_path: str | Path | None, size_bytes: int
    ) -> tuple[int, bool]:
        """Journal a new document; returns (row id, is_duplicate).

        Content already known in any state but failed is recorded as a duplicate row
        (``duplicate_of`` names the original) and is not queued.
        """
        now = time.time()
        with self._tx() as conn:
            original = conn.execute(
                f"SELECT id FROM documents WHERE content_hash = ? AND state NOT IN {RELEARNABLE_STATES!r}",
                (content_hash,),
            ).fetchone()
            state = "duplicate" if original else "queued"
            cursor = conn.execute(
                "INSERT INTO documents (content_hash, source, name, spool_path, size_bytes, state, "
                "duplicate_of, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    content_hash,
                    source,
                    name,
                    None if spool_path is None else path_text(spool_path),
                    size_bytes,
                    state,
                    original["id"] if original else None,
                    now,
                    now,
                ),
            )
            return int(cursor.lastrowid), original is not None

    def add_quarantined(
        self,
        source: str,
        name: str,
        path: str | Path | None,
        size_bytes: int,
        reason: str,
        content_hash: str | None = None,
    ) -> int:
        """Journal input rejected at intake (no usable text), so status shows it and why."""
        now = time.time()
        with self._tx() as conn:
            cursor = conn.execute(
                "INSERT INTO documents (content_hash, source, name, spool_path, size_bytes, state, reason, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'quarantined', ?, ?, ?)",
                (content_hash, source, name, None if path is None else path_text(path), size_bytes, reason, now, now),
            )
            return int(cursor.lastrowid)

    def live_document(self, content_hash: str) -> DocumentRow | None:
        """The document holding this content (any state but duplicate, failed or rolled back), if any."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT * FROM documents WHERE content_hash = ? AND state NOT IN {RELEARNABLE_STATES!r}",
                (content_hash,),
            ).fetchone()
        return None if row is None else _document(row)

    def get_document(self, doc_id: int) -> DocumentRow | None:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return _document(row) if row else None

    def documents(self, state: str | None = None, limit: int | None = None) -> list[DocumentRow]:
        """Documents (optionally of one state), oldest first."""
        if state is not None:
            self._check_state(state, DOCUMENT_STATES)
        sql = "SELECT * FROM documents" + (" WHERE state = ?" if state else "") + " ORDER BY id"
        params: list[Any] = [state] if state else []
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._read() as conn:
            return [_document(row) for row in conn.execute(sql, params)]

    def claim_queued(self, limit: int) -> list[DocumentRow]:
        """The oldest queued documents, moved to processing in one transaction (safe with several workers)."""
        now = time.time()
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT id FROM documents WHERE state = 'queued' ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
            ids = [row["id"] for row in rows]
            if not ids:
                return []
            conn.execute(
                f"UPDATE documents SET state = 'processing', updated_at = ? WHERE id IN ({_placeholders(ids)})",
                [now, *ids],
            )
            result = conn.execute(
                f"SELECT * FROM documents WHERE id IN ({_placeholders(ids)}) ORDER BY id", ids
            ).fetchall()
        return [_document(row) for row in result]

    def requeue_processing(self) -> int:
        """processing -> queued; call at startup so work interrupted by a crash is redone."""
        now = time.time()
        with self._tx() as conn:
            return conn.execute(
                "UPDATE documents SET state = 'queued', updated_at = ? WHERE state = 'processing'", (now,)
            ).rowcount

    def settle_committed(self, committed: Mapping[int, tuple[int, Sequence[int]]]) -> list[int]:
        """Documents left `processing` whose update the checkpoint already holds -> done; returns their ids.

        `committed` maps a document id to (checkpoint version, chunk ids learned), as the checkpoint
        records them with each update. A crash between the checkpoint's commit and the journal's
        record would otherwise requeue such a document and learn it twice. Their chunks become
        learned; a document with a chunk still pending that the update did not hold stays
        `processing` (and is requeued). Call at startup, before `requeue_processing`.
        """
        now = time.time()
        settled = []
        with self._tx() as conn:
            rows = conn.execute("SELECT id FROM documents WHERE state = 'processing' ORDER BY id").fetchall()
            for doc_id in (row["id"] for row in rows):
                if doc_id not in committed:
                    continue
                version, chunk_ids = committed[doc_id]
                ids = list(chunk_ids)
                if ids:
                    conn.execute(
                        f"UPDATE chunks SET state = 'learned', updated_at = ? WHERE doc_id = ? AND state = 'pending' "
                        f"AND id IN ({_placeholders(ids)})",
                        [now, doc_id, *ids],
                    )
                if conn.execute("SELECT 1 FROM chunks WHERE doc_id = ? AND state = 'pending'", (doc_id,)).fetchone():
                    continue
                conn.execute(
                    "UPDATE documents SET state = 'done', checkpoint_version = ?, updated_at = ? WHERE id = ?",
                    (version, now, doc_id),
                )
                settled.append(doc_id)
        return settled

    def mark_done(self, doc_ids: Sequence[int], checkpoint_version: int) -> int:
        """processing -> done, recording the checkpoint that holds their update. Call only
        after that checkpoint is on disk. Returns how many moved."""
        now = time.time()
        ids = list(doc_ids)
        with self._tx() as conn:
            return conn.execute(
                f"UPDATE documents SET state = 'done', checkpoint_version = ?, updated_at = ? "
                f"WHERE state = 'processing' AND id IN ({_placeholders(ids)})",
                [checkpoint_version, now, *ids],
            ).rowcount

    def mark_rolled_back(self, after_version: int, reason: str) -> list[int]:
        """done -> rolled_back for every document learned by a version above `after_version`; returns their ids.

        Called when the memory is rolled back to `after_version`: those documents are no longer in
        it. They are not requeued (that would learn them again); their content may be dropped again.
        """
        now = time.time()
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT id FROM documents WHERE state = 'done' AND checkpoint_version > ? ORDER BY id", (after_version,)
            ).fetchall()
            ids = [row["id"] for row in rows]
            if ids:
                conn.execute(
                    f"UPDATE documents SET state = 'rolled_back', reason = ?, updated_at = ? "
                    f"WHERE id IN ({_placeholders(ids)})",
                    [reason, now, *ids],
                )
        return ids

    def mark_failed(self, doc_id: int, reason: str, max_attempts: int | None = None) -> str:
        """Count a failed attempt; back to queued while attempts < max_attempts, else failed.

        Returns the new state. A failed document's content may be submitted again later.
        """
        limit = self.max_attempts if max_attempts is None else max_attempts
        now = time.time()
        with self._tx() as conn:
            row = conn.execute("SELECT attempts, state FROM documents WHERE id = ?", (doc_id,)).fetchone()
            if row is None:
                raise SmfdError(f"journal has no document with id {doc_id}")
            attempts = row["attempts"] + 1
            state = "queued" if attempts < limit else "failed"
            conn.execute(
                "UPDATE documents SET attempts = ?, state = ?, reason = ?, updated_at = ? WHERE id = ?",
                (attempts, state, reason, now, doc_id),
            )
            return state

    def mark_quarantined(self, doc_id: int, reason: str, spool_path: str | Path | None = None) -> None:
        """Any state -> quarantined with a reason (optionally where the content now lies)."""
        now = time.time()
        with self._tx() as conn:
            sql = "UPDATE documents SET state = 'quarantined', reason = ?, updated_at = ?"
            params: list[Any] = [reason, now]
            if spool_path is not None:
                sql += ", spool_path = ?"
                params.append(path_text(spool_path))
            if conn.execute(sql + " WHERE id = ?", [*params, doc_id]).rowcount != 1:
                raise SmfdError(f"journal has no document with id {doc_id}")

    def set_spool_path(self, doc_id: int, spool_path: str | Path) -> None:
        """Record where a document's text now lies (e.g. moved to quarantine after failing)."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE documents SET spool_path = ?, updated_at = ? WHERE id = ?",
                (path_text(spool_path), time.time(), doc_id),
            )

    def counts(self) -> dict[str, int]:
        """Number of documents per state; every state is present (0 when none)."""
        result = dict.fromkeys(DOCUMENT_STATES, 0)
        with self._read() as conn:
            for row in conn.execute("SELECT state, COUNT(*) AS n FROM documents GROUP BY state"):
                result[row["state"]] = row["n"]
        return result

    # ---------------------------------------------------------------- chunks
    def add_chunks(self, doc_id: int, chunks: Sequence[tuple[str, int]]) -> list[int]:
        """Store (text, n_tokens) chunks of a document as pending; returns their ids.

        Replaces any chunks the document already had: after a crash the document is
        re-chunked and re-learned, because the lost update never reached a checkpoint.
        """
        now = time.time()
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone() is None:
                raise SmfdError(f"journal has no document with id {doc_id}")
            conn.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
            ids = []
            for idx, (text, n_tokens) in enumerate(chunks):
                cursor = conn.execute(
                    "INSERT INTO chunks (doc_id, idx, text, n_tokens, state, updated_at) "
                    "VALUES (?, ?, ?, ?, 'pending', ?)",
                    (doc_id, idx, text, int(n_tokens), now),
                )
                ids.append(int(cursor.lastrowid))
            return ids

    def pending_chunks(self, limit: int | None = None) -> list[ChunkRow]:
        """Pending chunks of documents being processed, oldest first.

        A document that went back to queued or on to failed keeps its chunks until it is chunked
        again; they must not be learned meanwhile (a failed document would otherwise be retrained
        on every update and committed later while the journal says failed).
        """
        sql = f"SELECT c.* FROM chunks c {_LIVE_PENDING} ORDER BY c.id"
        params: tuple[Any, ...] = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (limit,)
        with self._read() as conn:
            return [_chunk(row) for row in conn.execute(sql, params)]

    def chunks_for(self, doc_id: int) -> list[ChunkRow]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM chunks WHERE doc_id = ? ORDER BY idx", (doc_id,)).fetchall()
        return [_chunk(row) for row in rows]

    def pending_chunk_count(self) -> int:
        with self._read() as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM chunks c {_LIVE_PENDING}").fetchone()[0])

    def pending_token_count(self) -> int:
        with self._read() as conn:
            return int(conn.execute(f"SELECT COALESCE(SUM(c.n_tokens), 0) FROM chunks c {_LIVE_PENDING}").fetchone()[0])

    def set_chunk_state(self, chunk_ids: Sequence[int], state: ChunkState | str) -> int:
        """Set the state of chunks; returns how many changed."""
        self._check_state(state, CHUNK_STATES)
        now = time.time()
        with self._tx() as conn:
            return sum(
                conn.execute(
                    "UPDATE chunks SET state = ?, updated_at = ? WHERE id = ?",
                    (str(ChunkState(state).value), now, chunk_id),
                ).rowcount
                for chunk_id in chunk_ids
            )

    def finished_processing_ids(self) -> list[int]:
        """Documents in processing that have chunks and none of them pending: ready for mark_done
        once the checkpoint holding their update is saved."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT d.id FROM documents d WHERE d.state = 'processing' "
                "AND EXISTS (SELECT 1 FROM chunks c WHERE c.doc_id = d.id) "
                "AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.doc_id = d.id AND c.state = 'pending') "
                "ORDER BY d.id"
            ).fetchall()
        return [row["id"] for row in rows]

    @staticmethod
    def _check_state(state: str, allowed: Sequence[str]) -> None:
        if state not in allowed:
            raise SmfdError(f"unknown state {state!r}; expected one of {', '.join(allowed)}")
