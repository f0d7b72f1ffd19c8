"""Background slot statistics: how often ordinary text reads each memory slot.

Counted once when a state is created (smfd.learn.heal), stored with every checkpoint, and used
by slot selection (smfd.learn.selection) to prefer rows that new text reads and general text does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smfd.model.sparse_rows import SparseRows


@dataclass
class BackgroundStats:
    """Read statistics of general text for one memory layer, counted per single-sequence batch."""

    counts: torch.Tensor  # (n_slots,) total reads
    doc_freq: torch.Tensor  # (n_slots,) number of background batches that read the slot
    n_batches: int

    @classmethod
    def empty(cls, n_slots: int) -> BackgroundStats:
        return cls(torch.zeros(n_slots, dtype=torch.float64), torch.zeros(n_slots, dtype=torch.float64), 0)

    def add_batch(self, slot_reads: torch.Tensor) -> None:
        """Add one background batch's reads (a flat tensor of slot ids from real tokens)."""
        self.counts += torch.bincount(slot_reads, minlength=self.counts.numel()).double()
        self.doc_freq[torch.unique(slot_reads)] += 1
        self.n_batches += 1


BACKGROUND_PREFIX = "bg."


def background_to_tensors(background: dict[int, BackgroundStats]) -> dict[str, torch.Tensor]:
    """Flat named tensors (`bg.LAYER.counts`, ...) for storing the statistics beside memory parameters."""
    tensors = {}
    for layer, stats in background.items():
        tensors[f"{BACKGROUND_PREFIX}{layer}.counts"] = stats.counts
        tensors[f"{BACKGROUND_PREFIX}{layer}.doc_freq"] = stats.doc_freq
        tensors[f"{BACKGROUND_PREFIX}{layer}.n_batches"] = torch.tensor([stats.n_batches])
    return tensors


def background_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[int, BackgroundStats]:
    """The statistics stored by `background_to_tensors`; other tensors in `tensors` are ignored."""
    layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith(BACKGROUND_PREFIX)})
    return {
        layer: BackgroundStats(
            tensors[f"{BACKGROUND_PREFIX}{layer}.counts"],
            tensors[f"{BACKGROUND_PREFIX}{layer}.doc_freq"],
            int(tensors[f"{BACKGROUND_PREFIX}{layer}.n_batches"].item()),
        )
        for layer in layers
    }


@dataclass(frozen=True)
class MemoryFill:
    """How full the memory is: value rows ever trained (a trained row is never all zeros again), and the
    share of ordinary text's reads (the background statistics) that land on them. As the share grows,
    ordinary text reads more of what was learned: retention gets harder to keep (the long-stream risk)."""

    rows_trained: int
    rows_total: int
    background_read_share: float
    row_retrainings: int = 0  # rows trained by an update after an earlier one had trained them, summed over updates

    def as_dict(self) -> dict[str, float]:
        return {
            "rows_trained": self.rows_trained,
            "rows_total": self.rows_total,
            "background_read_share": self.background_read_share,
            "row_retrainings": self.row_retrainings,
        }


def memory_fill(
    values: dict[int, SparseRows], background: dict[int, BackgroundStats], row_retrainings: int = 0
) -> MemoryFill:
    """The fill over all memory layers (`values`: layer -> value table; rows start at zero when attached);
    `row_retrainings` is counted by the caller from the updates' patches (it is not visible in the values)."""
    trained_rows, total_rows, trained_reads, all_reads = 0, 0, 0.0, 0.0
    for layer, table in values.items():
        trained = table.trained_slots().cpu()
        trained_rows += int(trained.numel())
        total_rows += table.n_slots
        stats = background.get(layer)
        if stats is not None:
            trained_reads += float(stats.counts[trained].sum())
            all_reads += float(stats.counts.sum())
    return MemoryFill(trained_rows, total_rows, trained_reads / all_reads if all_reads else 0.0, row_retrainings)
