"""Background slot statistics: how often ordinary text reads each memory slot.

Counted once when a state is created (smfd.learn.heal), stored with every checkpoint, and used
by slot selection (smfd.learn.selection) to prefer rows that new text reads and general text does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
