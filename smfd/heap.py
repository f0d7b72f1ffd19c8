"""Keep the C heap from holding on to memory the process has freed (glibc only; elsewhere a no-op).

PyTorch's CPU tensors come from malloc. glibc serves a large request from its own mapping and
unmaps it on free, but after the first such free it raises that size limit (up to 32 MB) and
serves later requests of up to that size from the heap, whose freed pages stay resident. A
daemon that samples text, heals, scores probes and trains in turn frees tensors of every size
between its stages, so the peaks of the stages add up in resident memory instead of each being
given back. A fixed limit keeps every tensor above it in its own mapping, returned on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import structlog

log = structlog.get_logger("smfd.heap")

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 * 1024  # tensors of this size or more get their own mapping
TRIM_THRESHOLD_BYTES = 1024 * 1024  # free memory beyond this at the heap's top is returned at once


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc, looked up once (`find_library` runs `ldconfig`)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_memory_promptly() -> bool:
    """Fix glibc's mapping and trim thresholds for this process; True when applied (glibc found)."""
    libc = _glibc()
    if libc is None:
        return False
    applied = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    applied = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and applied
    if not applied:
        log.warning("heap_settings_refused", mmap_threshold=MMAP_THRESHOLD_BYTES, trim_threshold=TRIM_THRESHOLD_BYTES)
    return applied


def trim() -> None:
    """Hand the heap's free pages back to the system (between stages that free large amounts)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
