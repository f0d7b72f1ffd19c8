"""Durable file writes: a crash leaves either the old file or the new one, never a torn one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

_HASH_BLOCK = 1 << 20  # bytes read at a time while hashing a file


def hash_file(digest: hashlib._Hash, path: Path) -> None:
    """Feed a file's bytes into `digest`, a block at a time (weights and states can be hundreds of MB)."""
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable. Filesystems that cannot open directories are tolerated."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def remove_leftover_temp_files(root: Path) -> list[Path]:
    """Delete the temporary files of `atomic_write` calls a crash interrupted, anywhere under `root`.

    Call only while no writer runs (at start-up, under the state lock). Only names this module
    makes (`.NAME.RANDOM.tmp`) are touched; symbolic links are not followed.
    """
    removed = []
    for tmp in root.rglob(".*.tmp") if root.is_dir() else ():
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def read_rebuildable_json(path: Path) -> Any:
    """A JSON state file that smfd can compute again (e.g. the base model's probe results): its content,
    or None when it is missing or damaged (not JSON, not UTF-8), so the caller rebuilds it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        structlog.get_logger("smfd.durable").warning("state_file_damaged", file=str(path), reason=str(exc))
        return None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1))
