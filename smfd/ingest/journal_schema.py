"""The journal's SQLite schema and its types: document and chunk states, and the rows read back."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from smfd.errors import SmfdError


class DocState(str, Enum):
    """Where a document is: queued -> processing -> done | failed; quarantined and duplicate at intake;
    done -> rolled_back when `smfd rollback` removes the version that learned it."""

    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    DUPLICATE = "duplicate"
    ROLLED_BACK = "rolled_back"


class ChunkState(str, Enum):
    """A chunk is pending until an update learns it, finds it already known, or the guard rejects it."""

    PENDING = "pending"
    LEARNED = "learned"
    KNOWN = "known"
    REJECTED = "rejected"


DOCUMENT_STATES = tuple(state.value for state in DocState)
CHUNK_STATES = tuple(state.value for state in ChunkState)


# 2: chunks lost their never-written surprise column (a version-1 journal opens unchanged; the column is ignored).
# 3: documents may be rolled_back (the table is rebuilt for its CHECK constraint; rows are kept).
SCHEMA_VERSION = 3
# States whose content may be journaled again as a new live document (not a duplicate).
RELEARNABLE_STATES = ("duplicate", "failed", "rolled_back")
DEFAULT_MAX_ATTEMPTS = 3
BUSY_TIMEOUT_MS = 10_000

_DOCUMENTS_TABLE = f"""
CREATE TABLE IF NOT EXISTS {{name}} (
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
"""

_DOCUMENT_COLUMNS = (
    "id, content_hash, source, name, spool_path, size_bytes, state, attempts, reason, duplicate_of, "
    "checkpoint_version, created_at, updated_at"
)

# Older journals: the documents table rebuilt under the current CHECK constraint (SQLite cannot alter one),
# its rows copied unchanged; the indexes are created again by _SCHEMA.
_REBUILD_DOCUMENTS = (
    _DOCUMENTS_TABLE.format(name="documents_rebuilt")
    + f"INSERT INTO documents_rebuilt ({_DOCUMENT_COLUMNS}) SELECT {_DOCUMENT_COLUMNS} FROM documents;\n"
    + "DROP TABLE documents;\nALTER TABLE documents_rebuilt RENAME TO documents;\n"
)

_SCHEMA = (
    _DOCUMENTS_TABLE.format(name="documents")
    + f"""
-- At most one live (not duplicate, failed or rolled back) document per content hash.
CREATE UNIQUE INDEX IF NOT EXISTS documents_live_hash
    ON documents(content_hash) WHERE state NOT IN {RELEARNABLE_STATES!r};
CREATE INDEX IF NOT EXISTS documents_state ON documents(state, id);

CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
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
)


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
        id=row["id"],
        doc_id=row["doc_id"],
        idx=row["idx"],
        text=row["text"],
        n_tokens=row["n_tokens"],
        state=row["state"],
    )


def _update(row: sqlite3.Row) -> UpdateRow:
    return UpdateRow(
        id=row["id"],
        version=row["version"],
        timestamp=row["timestamp"],
        n_chunks=row["n_chunks"],
        n_rows=row["n_rows"],
        seconds=row["seconds"],
        accepted=bool(row["accepted"]),
        measures=json.loads(row["measures"]),
    )


def path_text(path: str | os.PathLike[str]) -> str:
    """A path as journal text. A file name that is not valid UTF-8 (Python carries its bytes as
    lone surrogates, which SQLite refuses) is written with its bad bytes escaped (`\\xff`)."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


class JournalDamaged(SmfdError):
    """SQLite reports the journal file damaged (a corrupt page, not a database): nothing more can be recorded."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(
            f"journal {path} is damaged ({detail}): stop smfd, restore the file from a backup or rebuild it with "
            f"`sqlite3 {path.name} .recover`, then start again; files stay in the inbox until then"
        )


class JournalConnection:
    """The journal's SQLite connection: opening (WAL, full sync), the schema check, one lock, transactions."""

    def __init__(self, path: Path | str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS, readonly: bool = False):
        if max_attempts < 1:
            raise SmfdError(f"journal max_attempts must be >= 1, got {max_attempts}")
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.readonly = readonly
        self.damage: str | None = None  # set when SQLite reports the file damaged; see _noticing_damage
        self._lock = threading.Lock()
        self._conn = self._connect()
        try:
            self._prepare()
        except sqlite3.OperationalError as exc:  # I/O, locking, permissions: the file itself may be fine
            self._conn.close()
            raise SmfdError(
                f"journal {self.path} cannot be opened: {exc} (is the disk full or the folder read-only?); "
                "nothing was changed: free space or fix the permissions and start again"
            ) from exc
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
            # executescript manages its own transaction: rebuild, schema and version land together.
            # Foreign keys are off while the documents table is swapped (the pragma is ignored inside a transaction).
            rebuild = _REBUILD_DOCUMENTS if version > 0 else ""
            with self._lock:
                self._conn.executescript(
                    "PRAGMA foreign_keys = OFF; BEGIN IMMEDIATE;"
                    + rebuild
                    + _SCHEMA
                    + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT; PRAGMA foreign_keys = ON;"
                )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run the body as one write transaction (committed or rolled back)."""
        if self.readonly:
            raise SmfdError(f"journal {self.path} was opened read-only")
        with self._lock, self._noticing_damage():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._noticing_damage():
            yield self._conn

    @contextmanager
    def _noticing_damage(self) -> Iterator[None]:
        """Turn SQLite's corruption errors into JournalDamaged and remember them (`damage`): the daemon then
        stops taking files and reports not ready, instead of failing on every call with a raw error."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if type(exc) is not sqlite3.DatabaseError:  # constraint, locking, I/O: not damage to the file
                raise
            self.damage = str(exc)
            raise JournalDamaged(self.path, str(exc)) from exc

    def close(self) -> None:
        """Close the connection; further calls fail."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JournalConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
