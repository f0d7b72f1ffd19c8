"""Checksums of the state files, recorded in the manifest and verified before a file is used.

A checkpoint file can be damaged on disk after it was written (a bad sector, a truncating copy, a
stray write). safetensors notices some damage (a torn header) but not garbage inside the tensor
data, which would load as NaN or as wrong rows without a word. The manifest, written last in every
commit, records each file's SHA-256; a file whose digest differs is not used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from smfd.durable import hash_file
from smfd.errors import SmfdError


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    hash_file(digest, path)
    return digest.hexdigest()


def is_intact(folder: Path, name: str, digests: dict[str, str]) -> bool:
    """Whether `folder/name` exists and matches its recorded digest (a file with no digest recorded counts as intact)."""
    path = folder / name
    if not path.is_file():
        return False
    expected = digests.get(name)
    if expected is None:
        return True
    try:
        return file_digest(path) == expected
    except OSError:
        return False


class DamagedState(SmfdError):
    """A state file smfd cannot use and cannot rebuild: the message names it and says how to go on."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(
            f"state file {path} is damaged ({what}) and cannot be rebuilt from the other files: restore the state "
            f"folder from a backup, or move {path.parent} away to start again from the base model"
        )
        self.path = path
