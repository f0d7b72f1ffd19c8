"""Durable journal of every document smfd has seen, backed by one SQLite file.

Why SQLite: the daemon must survive a crash at any moment without losing or
double-learning a document, and `smfd status` must be able to read progress from
another process while the daemon runs. SQLite in WAL mode gives both: each state
change is one committed transaction, and readers never block the writer.

Document life cycle::

    queued -> processing -> done            (checkpoint containing the update is on disk)
                        \\-> queued          (crash: requeue_processing() at startup)
                        \\-> queued / failed (mark_failed: retried until max_attempts)
                        \\-> quarantined     (content rejected)
    duplicate                               (same content hash already known)

Chunks of a document are stored in `chunks` with states pending, learned, known
(low surprise, nothing to learn) or rejected.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smfd.errors import SmfdError

SCHEMA_VERSION = 1

DOCUMENT_STATES = ("queued", "processing", "done", "failed", "quarantined", "duplicate")
CHUNK_STATES = ("pending", "learned", "known", "rejected")
DEFAULT_MAX_ATTEMPTS = 3
BUSY_TIMEOUT_MS = 10_000

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    content_hash TEXT,
    source TEXT NOT NULL,
    name TEXT NOT NULL,
    spool_path TEXT,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL CHECK (state IN {DOCUMENT_STATES!r}),
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    duplicate_of INTEGER REFERENCES documents(id),
    checkpoint_version INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
-- At most one live (non-duplicate, non-failed) document per content hash.
CREATE UNIQUE INDEX IF NOT EXISTS documents_live_hash
    ON documents(content_hash) WHERE state NOT IN ('duplicate', 'failed');
CREATE INDEX IF NOT EXISTS documents_state ON documents(state, id);

CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    surprise REAL,
    state TEXT NOT NULL CHECK (state IN {CHUNK_STATES!r}),
    updated_at REAL NOT NULL,
    UNIQUE (doc_id, idx)
);
CREATE INDEX IF NOT EXISTS chunks_state ON chunks(state, id);

CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    version INTEGER NOT NULL,
    timestamp REAL NOT NULL,
    n_chunks INTEGER NOT NULL,
    n_rows INTEGER NOT NULL,
    seconds REAL NOT NULL,
    accepted INTEGER NOT NULL CHECK (accepted IN (0, 1)),
    measures TEXT NOT NULL
);

-- Files a watch folder has already taken, so a read-only inbox is not re-read
-- on every rescan or restart.
CREATE TABLE IF NOT EXISTS seen_files (
    path TEXT PRIMARY KEY,
    size_bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    doc_id INTEGER,
    seen_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class DocumentRow:
    """One journaled document."""

    id: int
    content_hash: str | None
    source: str
    name: str
    spool_path: str | None
    size_bytes: int
    state: str
    attempts: int
    reason: str | None
    duplicate_of: int | None
    checkpoint_version: int | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class ChunkRow:
    """One chunk of a document, the unit the learner scores and learns."""

    id: int
    doc_id: int
    idx: int
    text: str
    n_tokens: int
    surprise: float | None
    state: str


@dataclass(frozen=True)
class UpdateRow:
    """One memory update written by the learner."""

    id: int
    version: int
    timestamp: float
    n_chunks: int
    n_rows: int
    seconds: float
    accepted: bool
    measures: dict[str, Any]


def _document(row: sqlite3.Row) -> DocumentRow:
    return DocumentRow(**{key: row[key] for key in row.keys()})


def _chunk(row: sqlite3.Row) -> ChunkRow:
    return ChunkRow(
        id=row["id"], doc_id=row["doc_id"], idx=row["idx"], text=row["text"],
        n_tokens=row["n_tokens"], surprise=row["surprise"], state=row["state"],
    )


def _update(row: sqlite3.Row) -> UpdateRow:
    return UpdateRow(
        id=row["id"], version=row["version"], timestamp=row["timestamp"], n_chunks=row["n_chunks"],
        n_rows=row["n_rows"], seconds=row["seconds"], accepted=bool(row["accepted"]),
        measures=json.loads(row["measures"]),
    )


def _placeholders(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


class Journal:
    """The document/chunk/update journal. One connection, guarded by a lock, shared by threads.

    Every public method is one transaction: either all of it is on disk or none of it.
    Open with ``readonly=True`` from another process (``smfd status``) while the daemon runs.
    """

    def __init__(self, path: Path | str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS, readonly: bool = False):
        if max_attempts < 1:
            raise SmfdError(f"journal max_attempts must be >= 1, got {max_attempts}")
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.readonly = readonly
        self._lock = threading.Lock()
        self._conn = self._connect()
        try:
            self._prepare()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise SmfdError(f"journal {self.path} is not a usable SQLite database: {exc}") from exc

    # ----------------------------------------------------------------- setup
    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            if not self.path.exists():
                raise SmfdError(f"journal {self.path} does not exist (has the daemon run yet?)")
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            except (OSError, sqlite3.OperationalError) as exc:
                raise SmfdError(f"cannot open journal {self.path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return conn

    def _prepare(self) -> None:
        """Create or check the schema. A newer schema than ours is refused, never rewritten."""
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SmfdError(
                f"journal {self.path} has schema version {version}, newer than this smfd supports "
                f"({SCHEMA_VERSION}); upgrade smfd"
            )
        if self.readonly:
            if version == 0:
                raise SmfdError(f"journal {self.path} has no smfd schema")
            return
        self._conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed state change survives power loss, not only a process crash.
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        if version < SCHEMA_VERSION:
            # executescript manages its own transaction: schema and version land together.
            with self._lock:
                self._conn.executescript(
                    "BEGIN IMMEDIATE;" + _SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run the body as one write transaction (committed or rolled back)."""
        if self.readonly:
            raise SmfdError(f"journal {self.path} was opened read-only")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    def close(self) -> None:
        """Close the connection; further calls fail."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
                "SELECT id FROM documents WHERE content_hash = ? AND state NOT IN ('duplicate', 'failed')",
                (content_hash,),
            ).fetchone()
            state = "duplicate" if original else "queued"
            cursor = conn.execute(
                "INSERT INTO documents (content_hash, source, name, spool_path, size_bytes, state, "
                "duplicate_of, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (content_hash, source, name, None if spool_path is None else str(spool_path), size_bytes,
                 state, original["id"] if original else None, now, now),
            )
            return int(cursor.lastrowid), original is not None

    def add_quarantined(
        self, source: str, name: str, path: str | Path | None, size_bytes: int, reason: str,
        content_hash: str | None = None,
    ) -> int:
        """Journal input rejected at intake (no usable text), so status shows it and why."""
        now = time.time()
        with self._tx() as conn:
            cursor = conn.execute(
                "INSERT INTO documents (content_hash, source, name, spool_path, size_bytes, state, reason, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'quarantined', ?, ?, ?)",
                (content_hash, source, name, None if path is None else str(path), size_bytes, reason, now, now),
            )
            return int(cursor.lastrowid)

    def is_known(self, content_hash: str) -> bool:
        """True when this content would be recorded as a duplicate."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT 1 FROM documents WHERE content_hash = ? AND state NOT IN ('duplicate', 'failed')",
                (content_hash,),
            ).fetchone()
        return row is not None

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

    def next_queued(self, limit: int) -> list[DocumentRow]:
        """The oldest queued documents (not claimed; see claim_queued)."""
        return self.documents("queued", limit)

    def mark_processing(self, doc_ids: Sequence[int]) -> int:
        """queued -> processing for these ids; returns how many moved."""
        return self._transition(doc_ids, "processing", from_states=("queued",))

    def claim_queued(self, limit: int) -> list[DocumentRow]:
        """next_queued + mark_processing in one transaction (safe with several workers)."""
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
                params.append(str(spool_path))
            if conn.execute(sql + " WHERE id = ?", [*params, doc_id]).rowcount != 1:
                raise SmfdError(f"journal has no document with id {doc_id}")

    def set_spool_path(self, doc_id: int, spool_path: str | Path) -> None:
        """Record where a document's text now lies (e.g. moved to quarantine after failing)."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE documents SET spool_path = ?, updated_at = ? WHERE id = ?",
                (str(spool_path), time.time(), doc_id),
            )

    def _transition(self, doc_ids: Sequence[int], state: str, from_states: Sequence[str]) -> int:
        ids = list(doc_ids)
        now = time.time()
        with self._tx() as conn:
            return conn.execute(
                f"UPDATE documents SET state = ?, updated_at = ? WHERE id IN ({_placeholders(ids)}) "
                f"AND state IN ({_placeholders(from_states)})",
                [state, now, *ids, *from_states],
            ).rowcount

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
        """Pending chunks, oldest first."""
        sql = "SELECT * FROM chunks WHERE state = 'pending' ORDER BY id"
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
            return int(conn.execute("SELECT COUNT(*) FROM chunks WHERE state = 'pending'").fetchone()[0])

    def pending_token_count(self) -> int:
        with self._read() as conn:
            return int(
                conn.execute("SELECT COALESCE(SUM(n_tokens), 0) FROM chunks WHERE state = 'pending'").fetchone()[0]
            )

    def set_chunk_state(
        self, chunk_ids: Sequence[int], state: str, surprise: float | Sequence[float] | None = None
    ) -> int:
        """Set the state of chunks; surprise is None (unchanged), one value, or one per id."""
        self._check_state(state, CHUNK_STATES)
        ids = list(chunk_ids)
        if surprise is None or isinstance(surprise, (int, float)):
            surprises: list[float | None] = [None if surprise is None else float(surprise)] * len(ids)
        else:
            surprises = [float(value) for value in surprise]
            if len(surprises) != len(ids):
                raise SmfdError(f"set_chunk_state got {len(ids)} chunk ids but {len(surprises)} surprise values")
        now = time.time()
        with self._tx() as conn:
            changed = 0
            for chunk_id, value in zip(ids, surprises):
                changed += conn.execute(
                    "UPDATE chunks SET state = ?, surprise = COALESCE(?, surprise), updated_at = ? WHERE id = ?",
                    (state, value, now, chunk_id),
                ).rowcount
            return changed

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

    # --------------------------------------------------------------- updates
    def record_update(
        self, version: int, n_chunks: int, n_rows: int, seconds: float, accepted: bool,
        measures: dict[str, Any] | None = None, timestamp: float | None = None,
    ) -> int:
        """One row per memory update (accepted or rolled back); `smfd status` reads these."""
        try:
            measures_json = json.dumps(measures or {}, sort_keys=True, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise SmfdError(f"update measures must be JSON-serialisable: {exc}") from exc
        with self._tx() as conn:
            cursor = conn.execute(
                "INSERT INTO updates (version, timestamp, n_chunks, n_rows, seconds, accepted, measures) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (version, time.time() if timestamp is None else timestamp, n_chunks, n_rows, seconds,
                 int(bool(accepted)), measures_json),
            )
            return int(cursor.lastrowid)

    def last_update(self) -> UpdateRow | None:
        rows = self.updates(limit=1)
        return rows[0] if rows else None

    def updates(self, limit: int | None = None) -> list[UpdateRow]:
        """Updates, newest first."""
        sql = "SELECT * FROM updates ORDER BY id DESC"
        params: tuple[Any, ...] = ()
        if limit is not None:
            sql += " LIMIT ?"
            params = (limit,)
        with self._read() as conn:
            return [_update(row) for row in conn.execute(sql, params)]

    # ------------------------------------------------------------ seen files
    def record_seen_file(self, path: str | Path, size_bytes: int, mtime_ns: int, doc_id: int | None) -> None:
        """Remember that this exact file version was taken (for inboxes we may not delete from)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO seen_files (path, size_bytes, mtime_ns, doc_id, seen_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (str(path), size_bytes, mtime_ns, doc_id, time.time()),
            )

    def is_seen_file(self, path: str | Path, size_bytes: int, mtime_ns: int) -> bool:
        with self._read() as conn:
            row = conn.execute(
                "SELECT 1 FROM seen_files WHERE path = ? AND size_bytes = ? AND mtime_ns = ?",
                (str(path), size_bytes, mtime_ns),
            ).fetchone()
        return row is not None

    @staticmethod
    def _check_state(state: str, allowed: Sequence[str]) -> None:
        if state not in allowed:
            raise SmfdError(f"unknown state {state!r}; expected one of {', '.join(allowed)}")
