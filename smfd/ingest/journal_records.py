"""The journal's records beside documents and chunks: memory updates (what `smfd status` shows) and
the inbox files already taken (so a read-only inbox is not re-read on every rescan)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from smfd.errors import SmfdError
from smfd.ingest.journal_schema import JournalConnection, UpdateRow, _update, path_text


class JournalRecords(JournalConnection):
    """Updates and seen files; `smfd.ingest.journal.Journal` adds documents and chunks."""

    # --------------------------------------------------------------- updates
    def record_update(
        self,
        version: int,
        n_chunks: int,
        n_rows: int,
        seconds: float,
        accepted: bool,
        measures: dict[str, Any] | None = None,
        timestamp: float | None = None,
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
                (
                    version,
                    time.time() if timestamp is None else timestamp,
                    n_chunks,
                    n_rows,
                    seconds,
                    int(bool(accepted)),
                    measures_json,
                ),
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

    def recent_verdicts(self, limit: int) -> list[tuple[bool, str | None]]:
        """(accepted, rollback reason) of the last `limit` updates, oldest first: the guard's recent tally."""
        return [(u.accepted, u.measures.get("reason")) for u in reversed(self.updates(limit=limit))]

    # ------------------------------------------------------------ seen files
    def record_seen_file(self, path: str | Path, size_bytes: int, mtime_ns: int, doc_id: int | None) -> None:
        """Remember that this exact file version was taken (for inboxes we may not delete from)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO seen_files (path, size_bytes, mtime_ns, doc_id, seen_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (path_text(path), size_bytes, mtime_ns, doc_id, time.time()),
            )

    def is_seen_file(self, path: str | Path, size_bytes: int, mtime_ns: int) -> bool:
        with self._read() as conn:
            row = conn.execute(
                "SELECT 1 FROM seen_files WHERE path = ? AND size_bytes = ? AND mtime_ns = ?",
                (path_text(path), size_bytes, mtime_ns),
            ).fetchone()
        return row is not None
