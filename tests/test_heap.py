"""The process hands freed tensor memory back to the system instead of keeping it resident."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from smfd.heap import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="the heap settings apply to glibc only")

# A 4 MB tensor freed first raises glibc's default mapping threshold above what follows; then 400
# tensors of 512 KB, each with a small one kept after it, are freed: a heap that served them cannot
# give the pages back while the small ones sit between them (about 200 MB stay resident by default).
SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from smfd.heap import release_freed_memory_promptly

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    if sys.argv[1] == "on":
        assert release_freed_memory_promptly()
    warm = torch.ones(1024 * 1024)  # 4 MB, freed: by default every smaller tensor now comes from the heap
    del warm
    before = rss_mb()
    big, small = [], []
    for _ in range(400):
        big.append(torch.ones(128 * 1024))  # 512 KB
        small.append(torch.ones(16))
    del big
    print(rss_mb() - before)
    """
)


def _retained_mb(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip())


def test_freed_tensors_leave_resident_memory():
    """200 MB allocated and freed: with the settings on, under 20 MB of it stays resident."""
    assert _retained_mb("on") < 20.0
