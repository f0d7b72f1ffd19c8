"""Memory budget: plan the micro-batch from measured peak memory and stay under the configured ceiling.

On CUDA the peak is `torch.cuda.max_memory_allocated`; an out-of-memory error halves the batch
and the step is retried (outside the `except` block, so the failed step's tensors are freed).
On CPU an out-of-memory kills the process instead of raising, so the plan comes from a
measured estimate: resident memory before and after one step at batch 1, extrapolated per
sequence. The unit's `MemoryMax=` stays the hard wall.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from smfd.errors import SmfdError

MIB = 1024 * 1024
T = TypeVar("T")
R = TypeVar("R")


def resident_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize()


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class MemoryBudget:
    device: torch.device
    ram_mb: int | None
    vram_mb: int | None

    @property
    def device_label(self) -> str:
        return "cuda" if self.device.type == "cuda" else "cpu"

    @property
    def limit_bytes(self) -> int | None:
        mb = self.vram_mb if self.device.type == "cuda" else self.ram_mb
        return None if mb is None else mb * MIB

    def current_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return resident_bytes()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return peak_resident_bytes()

    def plan_batch_size(self, wanted: int, measure_step: Callable[[int], None], reserved_bytes: int = 0) -> int:
        """Largest batch size <= `wanted` whose estimated peak fits the budget.

        `measure_step(batch_size)` runs one representative step (its effect is undone by the caller).
        `reserved_bytes` is memory an update may hold beside its steps (the frozen-prefix cache's limit).
        """
        limit = self.limit_bytes
        if limit is None:
            return wanted
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        before = self.current_bytes()
        if before + reserved_bytes >= limit:
            reserved = (
                f" plus {reserved_bytes // MIB} MiB reserved for the prefix cache (train.prefix_cache_mb)"
                if reserved_bytes
                else ""
            )
            raise SmfdError(
                f"memory budget of {limit // MIB} MiB ({self.device_label}) is already used by the model itself "
                f"({before // MIB} MiB){reserved}: raise budget.{'vram_mb' if self.device.type == 'cuda' else 'ram_mb'}"
            )
        measure_step(1)
        after = max(self.peak_bytes() if self.device.type == "cuda" else self.current_bytes(), before + 1)
        per_sequence = after - before
        fits = (limit - before - reserved_bytes) // per_sequence
        if fits < 1:
            raise SmfdError(
                f"memory budget of {limit // MIB} MiB ({self.device_label}) cannot fit one training sequence: "
                f"the model uses {before // MIB} MiB and one sequence needs about {per_sequence // MIB + 1} MiB more"
            )
        return int(min(wanted, fits))

    def run_with_backoff(self, run: Callable[[T], R], batch: T, split: Callable[[T], tuple[T, T] | None]) -> list[R]:
        """Run one step; on CUDA out-of-memory split the batch in two and run each half (recursively)."""
        try:
            return [run(batch)]
        except torch.OutOfMemoryError:
            halves = split(batch)
            if halves is None:
                raise SmfdError(f"out of {self.device_label} memory even for a single sequence") from None
        torch.cuda.empty_cache()
        return [r for half in halves for r in self.run_with_backoff(run, half, split)]
