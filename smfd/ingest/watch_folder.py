"""Watch a folder for new text files and hand stable ones to the intake.

Design (the one mature watch-folder consumers converged on): filesystem events are
only hints. They are recorded by a handler that never raises (an exception in a
watchdog handler silently kills its dispatcher thread) and never does work. A startup
scan and a periodic rescan catch anything the events missed (inotify queue overflow,
files moved in as a whole directory, network filesystems). A file is taken only when
its size and mtime have stayed unchanged for ``settle_seconds``, so a file still being
written or copied is not read half-way; where the native observer reports opens and closes
(inotify), a file some process opened and has not closed yet waits for its close too (up to
``HELD_OPEN_LIMIT_S`` without a change, in case a close event was lost).

Filtering, applied to the path relative to the root (POSIX separators):

* hidden files and folders (any component starting with ``.``) and temporary names
  (``*.part``, ``*.tmp``, ``~*``) are ignored;
* ``include`` / ``exclude`` are fnmatch globs, case-sensitive. As in fnmatch, ``*``
  also crosses ``/`` (``*.txt`` matches ``a/b.txt``); a pattern without ``/`` is also
  tried against the bare file name, and a leading ``**/`` also matches at the top level.
  An empty ``include`` takes everything; exclude wins over include;
* the intake's spool and quarantine folders are skipped if they lie inside the root.

Symlinked folders are never descended; symlinked files are passed to the intake, which
reads them only when their target resolves inside the root.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchdog.events import EVENT_TYPE_CREATED, EVENT_TYPE_MOVED, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from smfd.errors import SmfdError
from smfd.ingest.entries import skip_reason
from smfd.ingest.intake import Intake, IntakeResult
from smfd.ingest.journal_schema import path_text
from smfd.ingest.sidecars import is_sidecar

TEMP_NAME_PATTERNS = ("*.part", "*.tmp", "~*")
# Events that may mean "a file has new content here". Deletions and opens are not.
_HINT_EVENT_TYPES = frozenset({"created", "modified", "moved", "closed", "attrib"})
HELD_OPEN_LIMIT_S = 600.0  # a file unchanged this long is taken even if no close event came for its open
OBSERVER_STOP_TIMEOUT_S = 5.0


@dataclass
class _Observation:
    """Last seen size/mtime of a candidate file and when (monotonic) it last changed."""

    size: int
    mtime_ns: int
    since: float


def glob_match(relative: str, pattern: str) -> bool:
    """Match a relative POSIX path against one include/exclude glob (see module docstring)."""
    if fnmatch.fnmatchcase(relative, pattern):
        return True
    if "/" not in pattern and fnmatch.fnmatchcase(relative.rsplit("/", 1)[-1], pattern):
        return True
    return pattern.startswith("**/") and glob_match(relative, pattern[3:])


def is_hidden_or_temporary(relative: str) -> bool:
    """Dot-files/-folders and the names editors and downloaders use while writing."""
    parts = relative.split("/")
    if any(part.startswith(".") for part in parts):
        return True
    return any(fnmatch.fnmatchcase(parts[-1], pattern) for pattern in TEMP_NAME_PATTERNS)


class _HintHandler(FileSystemEventHandler):
    """Records event paths for the poller. Must never raise: that would kill watchdog's thread."""

    def __init__(self, owner: WatchFolderSource):
        super().__init__()
        self._owner = owner

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._owner._record_event(event)
        except Exception:  # noqa: BLE001 - see class docstring
            self._owner.handler_errors_total += 1
            try:
                structlog.get_logger().exception("watch_handler_error", event_type=event.event_type)
            except Exception:  # noqa: BLE001 - logging must not kill the thread either
                pass


class WatchFolderSource:
    """One watched folder. Call start(), then poll() periodically; stop() at shutdown.

    ``polling`` uses watchdog's PollingObserver (network filesystems); the native observer
    also falls back to it when the OS refuses more watches. ``move=False`` leaves files in
    the folder (read-only inbox); the journal remembers each taken file version so it is not
    taken again. ``jsonl_field`` overrides the intake's default for this folder.

    Counters (plain attributes, read by the metrics code): ``rescans_total`` (every full
    scan, including the startup scan and scan_once), ``events_total``, ``handler_errors_total``,
    ``intake_errors_total``; ``last_scan_unsettled`` is how many files scan_once(settle=False)
    skipped because they were modified within the last settle window.
    """

    def __init__(
        self,
        root: Path,
        intake: Intake,
        recursive: bool = True,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        polling: bool = False,
        settle_seconds: float = 2.0,
        rescan_seconds: float = 60.0,
        move: bool = True,
        source: str = "watch",
        jsonl_field: str | None = None,
    ):
        if settle_seconds < 0 or rescan_seconds <= 0:
            raise SmfdError(
                f"watch {root}: settle_seconds must be >= 0 and rescan_seconds > 0 "
                f"(got {settle_seconds}, {rescan_seconds})"
            )
        self.root = Path(os.path.realpath(root))
        self.intake = intake
        self.recursive = recursive
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.polling = polling
        self.settle_seconds = settle_seconds
        self.rescan_seconds = rescan_seconds
        self.move = move
        self.source = source
        self.jsonl_field = jsonl_field
        self.rescans_total = 0
        self.events_total = 0
        self.handler_errors_total = 0
        self.intake_errors_total = 0
        self.last_scan_unsettled = 0
        self.using_polling = polling
        self._hints: set[str] = set()
        self._open_handles: dict[str, int] = {}  # path -> opens not yet closed, from inotify's events
        self._hint_lock = threading.Lock()
        self._work_lock = threading.RLock()
        self._pending: dict[str, _Observation | None] = {}
        self._noted: dict[str, str] = {}  # path -> the reason last logged for not taking it
        self._last_rescan: float | None = None
        self._observer: BaseObserver | None = None
        self._skip_dirs = tuple(os.path.realpath(d) for d in (intake.spool_dir, intake.quarantine_dir))
        self._log = structlog.get_logger().bind(component="watch_folder", root=str(self.root))

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start watching, then scan what is already there (in that order, so nothing slips between)."""
        self._check_root()
        self._observer = self._start_observer()
        with self._work_lock:
            self.rescan()
        self._log.info("watch_started", polling=self.using_polling, recursive=self.recursive)

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(OBSERVER_STOP_TIMEOUT_S)
            self._log.info("watch_stopped")

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise SmfdError(f"watch folder {self.root} does not exist or is not a directory")

    def _start_observer(self) -> BaseObserver:
        """Native observer, falling back to polling when inotify is out of watches (ENOSPC)."""
        if not self.polling:
            try:
                return self._schedule(Observer())
            except OSError as exc:
                self._log.warning("watch_observer_fallback", reason=str(exc), errno=exc.errno)
                self.using_polling = True
        try:
            return self._schedule(PollingObserver())
        except OSError as exc:
            raise SmfdError(f"cannot watch folder {self.root}: {exc}") from exc

    def _schedule(self, observer: BaseObserver) -> BaseObserver:
        observer.schedule(_HintHandler(self), str(self.root), recursive=self.recursive)
        observer.start()
        return observer

    # ----------------------------------------------------------------- hints
    def _record_event(self, event: FileSystemEvent) -> None:
        """Called on watchdog's thread: only note the path (moves: the destination) and count open handles."""
        if not event.is_directory and event.event_type in ("opened", "closed", "closed_no_write", "deleted", "moved"):
            opened = os.fsdecode(event.src_path)
            with self._hint_lock:
                held = self._open_handles.get(opened, 0) + (1 if event.event_type == "opened" else -1)
                if held > 0 and event.event_type not in ("deleted", "moved"):
                    self._open_handles[opened] = held
                else:  # closed, or gone from this name: nothing holds it any more
                    self._open_handles.pop(opened, None)
        if event.event_type not in _HINT_EVENT_TYPES:
            return
        path = os.fsdecode(event.dest_path if event.event_type == EVENT_TYPE_MOVED else event.src_path)
        if event.is_directory and event.event_type not in (EVENT_TYPE_CREATED, EVENT_TYPE_MOVED):
            return  # a directory's own modified/attrib events say nothing about new files
        with self._hint_lock:
            self._hints.add(path)
            self.events_total += 1

    def _drain_hints(self) -> None:
        with self._hint_lock:
            hints, self._hints = self._hints, set()
        for path in hints:
            if os.path.isdir(path) and not os.path.islink(path):
                self._add_tree(Path(path))  # a folder moved in: its files have no events of their own
            elif self._wanted(path):
                self._pending.setdefault(path, None)

    # --------------------------------------------------------------- scanning
    def rescan(self) -> int:
        """Walk the folder and make every wanted file a candidate; returns how many were found."""
        with self._work_lock:
            self._last_rescan = time.monotonic()
            self.rescans_total += 1
            if not self.root.is_dir():
                self._log.warning("watch_root_missing")
                return 0
            return self._add_tree(self.root)

    def _add_tree(self, top: Path) -> int:
        found = 0
        for directory, dirnames, filenames in os.walk(top, followlinks=False, onerror=self._walk_error):
            if not self.recursive and os.path.realpath(directory) != str(self.root):
                dirnames[:] = []
                continue
            dirnames[:] = [d for d in dirnames if self._descend(os.path.join(directory, d))]
            if not self.recursive:
                for name in dirnames:
                    self._note_once(os.path.join(directory, name), "a folder: this watch is not recursive")
                dirnames[:] = []
            for filename in filenames:
                path = os.path.join(directory, filename)
                if self._wanted(path):
                    self._pending.setdefault(path, None)
                    found += 1
        return found

    def _walk_error(self, exc: OSError) -> None:
        self._log.warning("watch_scan_error", path=exc.filename, reason=exc.strerror)

    def _descend(self, directory: str) -> bool:
        if os.path.basename(directory).startswith("."):
            return False
        real = os.path.realpath(directory)
        return not any(real == skip or real.startswith(skip + os.sep) for skip in self._skip_dirs)

    def _relative(self, path: str) -> str | None:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return None

    def _wanted(self, path: str) -> bool:
        relative = self._relative(path)
        if relative is None or relative == "." or is_hidden_or_temporary(relative):
            return False
        if is_sidecar(relative):
            return False  # taken together with its document (smfd.ingest.intake)
        if not self.recursive and "/" in relative:
            return False
        parent = os.path.realpath(os.path.dirname(path))
        if any(parent == skip or parent.startswith(skip + os.sep) for skip in self._skip_dirs):
            return False
        if self.include and not any(glob_match(relative, pattern) for pattern in self.include):
            return False
        return not any(glob_match(relative, pattern) for pattern in self.exclude)

    # ---------------------------------------------------------------- taking
    def poll(self) -> list[IntakeResult]:
        """Take every candidate whose size and mtime held still for settle_seconds."""
        with self._work_lock:
            if self._last_rescan is None or time.monotonic() - self._last_rescan >= self.rescan_seconds:
                self.rescan()
            self._drain_hints()
            return self._take(self._settled)

    def scan_once(self, settle: bool = True) -> list[IntakeResult]:
        """Scan now and take what is ready.

        settle=True: like a periodic rescan followed by poll(); new files are only
        observed, and taken by a later call once stable.
        settle=False (for a one-shot run): take at once every file whose mtime is at
        least settle_seconds old; files modified more recently are probably still being
        written and are skipped (counted in ``last_scan_unsettled``) for the next run.
        A missing folder raises SmfdError here (poll() only logs it: a mount may come back).
        """
        self._check_root()
        with self._work_lock:
            self.rescan()
            self._drain_hints()
            if settle:
                return self._take(self._settled)
            self.last_scan_unsettled = 0
            return self._take(self._old_enough)

    def _settled(self, path: str, info: os.stat_result) -> bool:
        now = time.monotonic()
        seen = self._pending.get(path)
        if seen is None or (seen.size, seen.mtime_ns) != (info.st_size, info.st_mtime_ns):
            self._pending[path] = _Observation(info.st_size, info.st_mtime_ns, now)
            return False
        if self._held_open(path):
            return now - seen.since >= HELD_OPEN_LIMIT_S
        return now - seen.since >= self.settle_seconds

    def _held_open(self, path: str) -> bool:
        """Whether some process opened the file and has not closed it (known only from inotify events)."""
        with self._hint_lock:
            return self._open_handles.get(path, 0) > 0

    def _old_enough(self, path: str, info: os.stat_result) -> bool:
        if time.time() - info.st_mtime >= self.settle_seconds:
            return True
        self.last_scan_unsettled += 1
        return False

    def _take(self, ready) -> list[IntakeResult]:  # ready: (path, stat) -> bool
        """Offer each candidate to the intake; one entry's failure never holds up the entries after it."""
        results = []
        for path in sorted(self._pending):
            try:
                result = self._take_one(path, ready)
            except Exception as exc:  # noqa: BLE001 - isolate the entry; it is retried at the next scan
                self.intake_errors_total += 1
                self._note_once(path, f"intake failed: {type(exc).__name__}: {exc}", level="error")
                continue
            if result is not None:
                results.append(result)
        return results

    def _take_one(self, path: str, ready) -> IntakeResult | None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            del self._pending[path]  # gone before it settled: nothing to take
            return None
        skip = skip_reason(path, info)
        if skip is not None or self.intake.journal.is_seen_file(path, info.st_size, info.st_mtime_ns):
            if skip is not None:
                self._note_once(path, skip)
            del self._pending[path]
            return None
        if not ready(path, info):
            return None
        result = self._claim(path)
        if result is not None:
            del self._pending[path]
        return result

    def _note_once(self, path: str, reason: str, level: str = "warning") -> None:
        """Log why an entry is not taken the first time it is seen, not on every rescan."""
        if self._noted.get(path) == reason:
            return
        self._noted[path] = reason
        getattr(self._log, level)("entry_not_taken", path=path_text(path), reason=reason)

    def _claim(self, path: str) -> IntakeResult | None:
        """Hand one file to the intake; an intake failure (disk full...) is logged and retried later."""
        try:
            return self.intake.claim_file(Path(path), self.source, self.root, self.move, self.jsonl_field)
        except (OSError, SmfdError) as exc:
            self.intake_errors_total += 1
            self._pending[path] = None
            self._log.error("intake_error", path=path, reason=str(exc))
            return None
