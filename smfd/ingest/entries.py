"""What an inbox entry is, and why one can never be taken: only regular files (or links to them) hold text."""

from __future__ import annotations

import errno
import os
import stat

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def skip_reason(path: str, info: os.stat_result) -> str | None:
    """Why an entry can never be taken (None: a regular file, or a link to one, worth reading)."""
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.stat(path)
        except FileNotFoundError:
            return "a dangling symlink"
        except OSError as exc:
            return "a symlink loop" if exc.errno == errno.ELOOP else f"an unreadable symlink: {exc.strerror}"
        info = target
    if stat.S_ISREG(info.st_mode):
        return None
    return f"not a regular file: {_KINDS.get(stat.S_IFMT(info.st_mode), 'a special file')}"
