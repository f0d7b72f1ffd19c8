"""SparseRows: a memory's value table that holds only the rows ever written.

A product-key memory has `n_keys²` value rows (262,144 at the default shape, 600 MB in float32
for a 576-wide model) and every one starts at zero; an update writes at most `top_t` of them.
So the table keeps a slot → compact-row index (`slot_row`, 0 for a row never written) and a
compact tensor of written rows whose row 0 is always zero: every unwritten slot reads that zero
row, and a read stays one vectorised `embedding_bag` over the compact tensor. The size in RAM
and on disk then follows what was learned, not `n_keys`.

The compact tensor grows by doubling, so writing new rows costs amortised O(rows written) (its
unused tail is never written, so it is not resident memory either), and
the row order in it is internal: `to_tensors` gives the canonical form (non-zero rows by slot id)
that checkpoints store.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smfd.errors import SmfdError

MIN_CAPACITY = 1024


class SparseRows(nn.Module):
    """`n_slots` rows of `width` values, all zero until written; only written rows take memory.

    The tensors are non-persistent buffers: `.to(device, dtype)` moves them with the memory, while
    the state dict leaves them out (their size changes; checkpoints use `to_tensors`).
    """

    def __init__(self, n_slots: int, width: int) -> None:
        super().__init__()
        self.n_slots = n_slots
        self.width = width
        self.n_rows = 0  # compact rows in use, the zero row excluded
        self.register_buffer("slot_row", torch.zeros(n_slots, dtype=torch.long), persistent=False)
        self.register_buffer("rows", torch.zeros(1 + MIN_CAPACITY, width), persistent=False)
        self.register_buffer("row_slot", torch.full((1 + MIN_CAPACITY,), -1, dtype=torch.long), persistent=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_slots, self.width)

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def nbytes(self) -> int:
        """Bytes held by the table now (index, compact rows and their slot ids)."""
        return sum(t.numel() * t.element_size() for t in (self.slot_row, self.rows, self.row_slot))

    def gather(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """A copy of these slots' rows (zeros for slots never written)."""
        return self.rows[self.slot_row[slot_ids.to(self.device)]].clone()

    def read(self, slot_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the rows named in each row of `slot_ids` (batch, n): the memory's read."""
        return F.embedding_bag(self.slot_row[slot_ids], self.rows, per_sample_weights=weights, mode="sum")

    @torch.no_grad()
    def write(self, slot_ids: torch.Tensor, values: torch.Tensor) -> None:
        """Set these slots' rows (slot ids unique); a slot written for the first time gets a compact row."""
        slot_ids = slot_ids.to(self.device, torch.long)
        if slot_ids.numel() != torch.unique(slot_ids).numel():
            raise SmfdError("SparseRows.write: slot ids must be unique")
        if values.shape != (slot_ids.numel(), self.width):
            raise SmfdError(f"SparseRows.write: rows of shape {tuple(values.shape)} for {slot_ids.numel()} slots")
        fresh = slot_ids[self.slot_row[slot_ids] == 0]
        if fresh.numel():
            self._reserve(self.n_rows + fresh.numel())
            positions = torch.arange(self.n_rows + 1, self.n_rows + 1 + fresh.numel(), device=self.device)
            self.slot_row[fresh] = positions
            self.row_slot[positions] = fresh
            self.n_rows += fresh.numel()
        self.rows[self.slot_row[slot_ids]] = values.to(self.rows)

    def _reserve(self, n_rows: int) -> None:
        """Grow the compact tensor (doubling) so it holds `n_rows` rows beside the zero row."""
        capacity = self.rows.shape[0] - 1
        if n_rows <= capacity:
            return
        new_capacity = max(n_rows, 2 * capacity)
        # Uninitialised beyond the rows in use: nothing reads a row before it is written, and pages never
        # written take no resident memory (zeros would touch every page of the doubled tensor at once).
        rows = self.rows.new_empty(1 + new_capacity, self.width)
        rows[: self.rows.shape[0]] = self.rows
        row_slot = self.row_slot.new_full((1 + new_capacity,), -1)
        row_slot[: self.row_slot.shape[0]] = self.row_slot
        self.rows, self.row_slot = rows, row_slot

    def trained_slots(self) -> torch.Tensor:
        """Slot ids whose row holds any non-zero value, ascending (a row written back to zero is untrained)."""
        used = self.rows[1 : self.n_rows + 1]
        slots = self.row_slot[1 : self.n_rows + 1][(used != 0).any(dim=1)]
        return torch.sort(slots).values

    def any_trained(self) -> bool:
        return bool(self.rows[1 : self.n_rows + 1].any())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The canonical form, on CPU: `slot_ids` (ascending) and their non-zero `rows`."""
        slots = self.trained_slots()
        rows = self.rows[self.slot_row[slots]]
        return {"slot_ids": slots.cpu().contiguous(), "rows": rows.cpu().contiguous()}

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Replace the table with `to_tensors` output; `source` names the file in the error if they disagree."""
        problem = table_problem(tensors, self.n_slots, self.width)
        if problem:
            raise SmfdError(f"{source}: memory rows and their slot index disagree ({problem})")
        self.clear()
        self.write(tensors["slot_ids"], tensors["rows"])

    def clear(self) -> None:
        """Every row back to zero, the compact tensor back to its smallest size."""
        self.slot_row.zero_()
        self.rows = self.rows.new_zeros(1 + MIN_CAPACITY, self.width)
        self.row_slot = self.row_slot.new_full((1 + MIN_CAPACITY,), -1)
        self.n_rows = 0

    def dense(self) -> torch.Tensor:
        """The whole (n_slots, width) table: for converting old states and for tests, never on a hot path."""
        return self.rows[self.slot_row]

    def extra_repr(self) -> str:
        return f"n_slots={self.n_slots}, width={self.width}, rows_held={self.n_rows}"


def table_problem(tensors: dict[str, torch.Tensor], n_slots: int, width: int) -> str:
    """Why stored `slot_ids` / `rows` cannot be loaded into a table of this shape, or "" when they can."""
    slot_ids, rows = tensors.get("slot_ids"), tensors.get("rows")
    if slot_ids is None or rows is None:
        return "slot_ids or rows missing"
    if slot_ids.dim() != 1 or slot_ids.dtype != torch.long:
        return f"slot_ids must be a 1-D int64 tensor, got {tuple(slot_ids.shape)} {slot_ids.dtype}"
    if rows.dim() != 2 or rows.shape != (slot_ids.numel(), width):
        return (
            f"{slot_ids.numel()} slot ids but rows of shape {tuple(rows.shape)}; expected ({slot_ids.numel()}, {width})"
        )
    if slot_ids.numel() and (int(slot_ids.min()) < 0 or int(slot_ids.max()) >= n_slots):
        return f"slot ids outside 0..{n_slots - 1}"
    if torch.unique(slot_ids).numel() != slot_ids.numel():
        return "a slot id appears twice"
    return ""


def merged_rows(
    slot_ids: torch.Tensor, rows: torch.Tensor, new_slot_ids: torch.Tensor, new_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored rows with new rows written over them, in the canonical form (ascending, zero rows dropped):
    folding a patch into a stored table without building the table."""
    ids = torch.cat([slot_ids, new_slot_ids.to(slot_ids)])
    stacked = torch.cat([rows, new_rows.to(rows)])
    unique, inverse = torch.unique(ids, return_inverse=True)
    order = torch.arange(ids.numel())
    last = torch.full((unique.numel(),), -1, dtype=torch.long).scatter_reduce(0, inverse, order, reduce="amax")
    kept = stacked[last]
    nonzero = (kept != 0).any(dim=1)
    return unique[nonzero].contiguous(), kept[nonzero].contiguous()
