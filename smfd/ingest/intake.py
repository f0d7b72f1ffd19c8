"""Durable intake: turn a found file or feed entry into a spooled, journaled document.

Order of operations for a file (each step is safe to repeat after a crash):

1. check the path stays inside the watch folder (symlinks are never read through
   to the outside), is a regular file and is not larger than ``max_file_bytes``;
2. read and extract the text (smfd.ingest.extract), hash the normalised text;
3. write the text to ``spool_dir/<hash>.txt`` (temp file, fsync, rename, fsync dir);
4. journal it (queued, or duplicate when the content is already known);
5. only then delete the source file (``move=True``).

A crash between 3 and 5 leaves the source in place: it is taken again and recorded
as a duplicate, so nothing is lost and nothing is learned twice. The spool always
holds the extracted text, not the original bytes, so the source is removed rather
than renamed into the spool.

A document ``NAME.ext`` may travel with a sidecar ``NAME.qa.jsonl`` (recall probes, see
smfd.ingest.sidecars): it is validated and spooled as ``<hash>.qa.jsonl`` before the journal row, and
removed with the document. Drop the sidecar first (or together with the document); a bad
sidecar is quarantined on its own and the document is learned with probes cut from its text.

Rejected input is moved to ``quarantine_dir`` (``move=True``) with a ``<name>.reason``
text file beside it, and journaled as quarantined with the reason. With
``move=False`` (read-only inbox) the original stays where it is and only the reason
file is written. Either way the file version is remembered (journal ``seen_files``)
so a rescan does not take it again.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import structlog

from smfd.durable import atomic_write_text
from smfd.errors import SmfdError
from smfd.ingest.extract import RejectedInput, check_text, content_hash, extract_text
from smfd.ingest.journal import Journal
from smfd.ingest.journal_schema import path_text
from smfd.ingest.sidecars import RecallItem, parse_sidecar, sidecar_for, spooled_sidecar, write_items

Outcome = Literal["queued", "duplicate", "quarantined", "vanished", "taken_before"]
OUTCOMES: tuple[Outcome, ...] = ("queued", "duplicate", "quarantined", "vanished", "taken_before")


@dataclass(frozen=True)
class IntakeResult:
    """What happened to one piece of input. ``code`` is a bounded label for metrics."""

    outcome: Outcome
    doc_id: int | None
    name: str
    reason: str | None = None
    code: str | None = None


def _changed_since(path: Path, seen: os.stat_result) -> bool:
    """Whether the file at `path` is no longer the version `seen` (size or modification time moved on)."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_size, now.st_mtime_ns) != (seen.st_size, seen.st_mtime_ns)


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _display_name(path: Path, watch_root: Path | None) -> str:
    """Path relative to the watch folder (kept lexical: a symlink's own name, not its target); bytes that
    are not UTF-8 escaped (`\\xff`), so such a file is journaled and learned under a readable name."""
    if watch_root is not None:
        try:
            return path_text(path.absolute().relative_to(watch_root.absolute()).as_posix())
        except ValueError:
            pass
    return path_text(path.name)


class Intake:
    """Makes input durable. One instance is shared by all sources; methods are thread-safe."""

    def __init__(
        self,
        journal: Journal,
        spool_dir: Path,
        quarantine_dir: Path,
        max_file_bytes: int,
        jsonl_field: str = "text",
    ):
        if max_file_bytes < 1:
            raise SmfdError(f"max_file_bytes must be >= 1, got {max_file_bytes}")
        self.journal = journal
        self.spool_dir = Path(spool_dir)
        self.quarantine_dir = Path(quarantine_dir)
        self.max_file_bytes = max_file_bytes
        self.jsonl_field = jsonl_field
        self._lock = threading.Lock()
        self._log = structlog.get_logger().bind(component="intake")
        for directory in (self.spool_dir, self.quarantine_dir):
            try:
                directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise SmfdError(f"cannot create directory {directory}: {exc}") from exc

    # ----------------------------------------------------------------- files
    def claim_file(
        self, path: Path, source: str, watch_root: Path, move: bool, jsonl_field: str | None = None
    ) -> IntakeResult:
        """Take one file found in ``watch_root``; never raises for bad input, only reports it.

        ``jsonl_field`` overrides the intake's default for this file (it is a per-folder setting).
        """
        path = Path(path)
        name = _display_name(path, watch_root)
        try:
            link_stat = os.lstat(path)
        except FileNotFoundError:
            return self._vanished(path, name)
        field = self.jsonl_field if jsonl_field is None else jsonl_field
        result = self._claim_existing(path, name, source, watch_root, move, link_stat, field)
        if result.outcome != "vanished" and os.path.lexists(path):
            # Still there (read-only inbox, move=False, or removal failed): remember this version.
            self.journal.record_seen_file(path, link_stat.st_size, link_stat.st_mtime_ns, result.doc_id)
        return result

    def _claim_existing(
        self,
        path: Path,
        name: str,
        source: str,
        watch_root: Path,
        move: bool,
        link_stat: os.stat_result,
        jsonl_field: str,
    ) -> IntakeResult:
        real = os.path.realpath(path)
        if not _is_within(real, os.path.realpath(watch_root)):
            what = "symlink" if stat.S_ISLNK(link_stat.st_mode) else "path"
            rejection = RejectedInput(f"{what} resolves outside the watch folder", "outside_root")
            return self._quarantine(path, name, source, move, rejection, size=0)
        try:
            data = self._read_limited(real)
        except FileNotFoundError:
            return self._vanished(path, name)
        except RejectedInput as rejection:
            return self._quarantine(path, name, source, move, rejection, size=link_stat.st_size)
        try:
            text = extract_text(data, path.name, jsonl_field)
        except RejectedInput as rejection:
            return self._quarantine(path, name, source, move, rejection, size=len(data))
        sidecar = sidecar_for(path)
        probes = self._take_sidecar(sidecar, source, watch_root, move)
        result = self._journal_text(text, source, name, size=len(data), probes=probes)
        if move:
            if _changed_since(path, link_stat):  # a writer still at work: keep it for the next version
                self._log.warning("file_changed_while_taken", name=name, doc_id=result.doc_id)
                return result
            self._remove_source(path)
            if probes is not None:
                self._remove_source(sidecar)
        return result

    def _take_sidecar(self, sidecar: Path, source: str, watch_root: Path, move: bool) -> list[RecallItem] | None:
        """The document's recall probes from ``NAME.qa.jsonl``, if present; a bad sidecar is quarantined."""
        if not os.path.lexists(sidecar):
            return None
        name = _display_name(sidecar, watch_root)
        try:
            if not _is_within(os.path.realpath(sidecar), os.path.realpath(watch_root)):
                raise RejectedInput("sidecar resolves outside the watch folder", "outside_root")
            data = self._read_limited(os.path.realpath(sidecar))
            return parse_sidecar(data, sidecar.name)
        except FileNotFoundError:
            return None
        except RejectedInput as rejection:
            self._quarantine(sidecar, name, source, move, rejection, size=0)
            return None

    def _read_limited(self, real: str) -> bytes:
        """Read a regular file, refusing anything else and anything over the size limit.

        O_NOFOLLOW: if the checked path was swapped for a symlink, we do not read through it.
        O_NONBLOCK: a FIFO dropped in the folder cannot hang the daemon.
        """
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(real, flags | getattr(os, "O_CLOEXEC", 0))
        except PermissionError as exc:
            raise RejectedInput("unreadable: permission denied", "unreadable") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RejectedInput("symlink changed while reading", "outside_root") from exc
            if exc.errno == errno.ENOENT:
                raise FileNotFoundError(real) from exc
            raise RejectedInput(f"unreadable: {exc.strerror}", "unreadable") from exc
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise RejectedInput("not a regular file", "not_regular")
            if info.st_size > self.max_file_bytes:
                raise RejectedInput(self._too_large(info.st_size), "too_large")
            try:
                data = handle.read(self.max_file_bytes + 1)
            except OSError as exc:
                raise RejectedInput(f"unreadable: {exc.strerror}", "unreadable") from exc
        if len(data) > self.max_file_bytes:
            raise RejectedInput(self._too_large(len(data)), "too_large")
        return data

    def _too_large(self, size: int) -> str:
        return f"file too large ({size} bytes > limit {self.max_file_bytes})"

    def _remove_source(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._log.warning("source_not_removed", path=str(path), reason=str(exc))

    # ------------------------------------------------------------------ feeds
    def submit_text(self, text: str, name: str, source: str = "feed") -> IntakeResult:
        """Take text that has no source file (a feed entry) through the same spool and journal."""
        size = len(text.encode("utf-8", errors="replace"))
        try:
            normalized = check_text(text)
            if size > self.max_file_bytes:
                raise RejectedInput(f"text too large ({size} bytes > limit {self.max_file_bytes})", "too_large")
        except RejectedInput as rejection:
            doc_id = self.journal.add_quarantined(source, name, None, size, rejection.reason)
            self._log.warning(
                "document_quarantined",
                name=name,
                source=source,
                reason=rejection.reason,
                code=rejection.code,
                doc_id=doc_id,
            )
            return IntakeResult("quarantined", doc_id, name, rejection.reason, rejection.code)
        return self._journal_text(normalized, source, name, size)

    # ---------------------------------------------------------------- shared
    def spool_path_for(self, digest: str) -> Path:
        return self.spool_dir / f"{digest}.txt"

    def _journal_text(
        self, normalized: str, source: str, name: str, size: int, probes: list[RecallItem] | None = None
    ) -> IntakeResult:
        digest = content_hash(normalized)
        spool_path = self.spool_path_for(digest)
        with self._lock:  # check-then-spool must not interleave between sources
            if probes is not None:  # spooled before the journal row, so a queued document never lacks them
                self._spool_probes(spooled_sidecar(spool_path), probes)
            live = self.journal.live_document(digest)
            if live is not None and (live.source, live.name) == (source, name) and spool_path.exists():
                # The same file, journaled before a crash cut its intake short (the source was not removed yet).
                self._log.info("document_taken_before", name=name, source=source, doc_id=live.id)
                return IntakeResult("taken_before", live.id, name, "journaled before an interrupted intake")
            if live is None:
                self._write_spool(spool_path, normalized)
            doc_id, duplicate = self.journal.add_document(digest, source, name, spool_path, size)
        if duplicate:
            self._log.info("document_duplicate", name=name, source=source, doc_id=doc_id, content_hash=digest)
            return IntakeResult("duplicate", doc_id, name, "content already journaled", "duplicate")
        self._log.info("document_queued", name=name, source=source, doc_id=doc_id, content_hash=digest, size_bytes=size)
        return IntakeResult("queued", doc_id, name)

    def _write_spool(self, spool_path: Path, text: str) -> None:
        """Write atomically and durably: temp file, fsync, rename, fsync directory."""
        try:
            atomic_write_text(spool_path, text)
        except OSError as exc:
            raise SmfdError(f"cannot write spool file {spool_path}: {exc}") from exc

    def _spool_probes(self, path: Path, probes: list[RecallItem]) -> None:
        try:
            write_items(path, probes)
        except OSError as exc:
            raise SmfdError(f"cannot write spool file {path}: {exc}") from exc

    def _vanished(self, path: Path, name: str) -> IntakeResult:
        self._log.info("file_vanished", path=str(path), name=name)
        return IntakeResult("vanished", None, name, "file vanished before it was taken", "vanished")

    def _quarantine(
        self, path: Path, name: str, source: str, move: bool, rejection: RejectedInput, size: int
    ) -> IntakeResult:
        """Move the original aside (never reading through a symlink) and write why beside it."""
        destination = self._unique_destination(path.name)
        moved = False
        if move:
            try:
                # shutil.move renames a symlink itself (or recreates it across filesystems).
                shutil.move(os.fspath(path), destination)
                moved = True
            except FileNotFoundError:
                return self._vanished(path, name)
            except OSError as exc:
                self._log.warning("quarantine_move_failed", path=str(path), reason=str(exc))
        self._write_reason(destination, path, source, rejection)
        doc_id = self.journal.add_quarantined(source, name, destination if moved else path, size, rejection.reason)
        self._log.warning(
            "document_quarantined",
            name=name,
            source=source,
            reason=rejection.reason,
            code=rejection.code,
            doc_id=doc_id,
            moved=moved,
        )
        return IntakeResult("quarantined", doc_id, name, rejection.reason, rejection.code)

    def _unique_destination(self, filename: str) -> Path:
        """A quarantine path whose file and .reason file are both free."""
        candidate = self.quarantine_dir / filename
        stem, suffix = os.path.splitext(filename)
        counter = 1
        while os.path.lexists(candidate) or os.path.lexists(f"{candidate}.reason"):
            candidate = self.quarantine_dir / f"{stem}.{counter}{suffix}"
            counter += 1
        return candidate

    def _write_reason(self, destination: Path, original: Path, source: str, rejection: RejectedInput) -> None:
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        body = (
            f"reason: {rejection.reason}\ncode: {rejection.code}\nsource: {source}\n"
            f"original: {original}\ntime: {when}\n"
        )
        try:
            Path(f"{destination}.reason").write_text(body, encoding="utf-8")
        except OSError as exc:
            self._log.error("quarantine_reason_not_written", path=str(destination), reason=str(exc))

    # ------------------------------------------------------------ failures
    def fail_document(self, doc_id: int, reason: str, max_attempts: int | None = None) -> str:
        """Record a failed processing attempt. After the last attempt the spooled text moves to
        quarantine with a reason file. Returns the new state (queued or failed)."""
        state = self.journal.mark_failed(doc_id, reason, max_attempts)
        if state != "failed":
            return state
        row = self.journal.get_document(doc_id)
        if row is None or not row.spool_path or not os.path.exists(row.spool_path):
            return state
        spool_path = Path(row.spool_path)
        destination = self._unique_destination(spool_path.name)
        try:
            shutil.move(os.fspath(spool_path), destination)
        except OSError as exc:
            self._log.warning("quarantine_move_failed", path=str(spool_path), reason=str(exc))
            return state
        self._write_reason(destination, spool_path, row.source, RejectedInput(reason, "failed"))
        self.journal.set_spool_path(doc_id, destination)
        self._log.warning("document_failed", doc_id=doc_id, name=row.name, reason=reason, attempts=row.attempts)
        return state
