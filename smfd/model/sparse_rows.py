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

Each written row also has a read floor (`memory.read_floor_margin`, smfd.model.memory): the
lowest key score at which the update that wrote it read it. It is -inf, no floor, for rows written
without one and for every unwritten slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smfd.errors import SmfdError

MIN_CAPACITY = 1024
NO_FLOOR = float("-inf")  # a row without a read floor answers every read


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
        self.register_buffer("row_floor", torch.full((1 + MIN_CAPACITY,), NO_FLOOR), persistent=False)

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
        return sum(t.numel() * t.element_size() for t in (self.slot_row, self.rows, self.row_slot, self.row_floor))

    def gather(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """A copy of these slots' rows (zeros for slots never written)."""
        return self.rows[self.slot_row[slot_ids.to(self.device)]].clone()

    def floors(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """These slots' read floors, any shape (-inf where a slot has none)."""
        return self.row_floor[self.slot_row[slot_ids]]

    def read(self, slot_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the rows named in each row of `slot_ids` (batch, n): the memory's read."""
        return F.embedding_bag(self.slot_row[slot_ids], self.rows, per_sample_weights=weights, mode="sum")

    @torch.no_grad()
    def write(self, slot_ids: torch.Tensor, values: torch.Tensor, floors: torch.Tensor | None = None) -> None:
        """Set these slots' rows (slot ids unique) and, when given, their read floors (a row keeps its
        floor otherwise); a slot written for the first time gets a compact row, with no floor."""
        slot_ids = slot_ids.to(self.device, torch.long)
        if slot_ids.numel() != torch.unique(slot_ids).numel():
            raise SmfdError("SparseRows.write: slot ids must be unique")
        if values.shape != (slot_ids.numel(), self.width):
            raise SmfdError(f"SparseRows.write: rows of shape {tuple(values.shape)} for {slot_ids.numel()} slots")
        if floors is not None and floors.shape != (slot_ids.numel(),):
            raise SmfdError(f"SparseRows.write: floors of shape {tuple(floors.shape)} for {slot_ids.numel()} slots")
        fresh = slot_ids[self.slot_row[slot_ids] == 0]
        if fresh.numel():
            self._reserve(self.n_rows + fresh.numel())
            positions = torch.arange(self.n_rows + 1, self.n_rows + 1 + fresh.numel(), device=self.device)
            self.slot_row[fresh] = positions
            self.row_slot[positions] = fresh
            self.row_floor[positions] = NO_FLOOR
            self.n_rows += fresh.numel()
        self.rows[self.slot_row[slot_ids]] = values.to(self.rows)
        if floors is not None:
            self.row_floor[self.slot_row[slot_ids]] = floors.to(self.row_floor)

    @torch.no_grad()
    def set_floors(self, slot_ids: torch.Tensor, floors: torch.Tensor) -> None:
        """Set the read floors of rows already written (an unwritten slot has no row to hold one)."""
        at = self.slot_row[slot_ids.to(self.device, torch.long)]
        if bool((at == 0).any()):
            raise SmfdError("SparseRows.set_floors: a slot that was never written has no row to hold a floor")
        self.row_floor[at] = floors.to(self.row_floor)

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
        row_floor = self.row_floor.new_full((1 + new_capacity,), NO_FLOOR)
        row_floor[: self.row_floor.shape[0]] = self.row_floor
        self.rows, self.row_slot, self.row_floor = rows, row_slot, row_floor

    def trained_slots(self) -> torch.Tensor:
        """Slot ids whose row holds any non-zero value, ascending (a row written back to zero is untrained)."""
        used = self.rows[1 : self.n_rows + 1]
        slots = self.row_slot[1 : self.n_rows + 1][(used != 0).any(dim=1)]
        return torch.sort(slots).values

    def any_trained(self) -> bool:
        return bool(self.rows[1 : self.n_rows + 1].any())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The canonical form, on CPU: `slot_ids` (ascending), their non-zero `rows` and their `floors`."""
        slots = self.trained_slots()
        at = self.slot_row[slots]
        return {
            "slot_ids": slots.cpu().contiguous(),
            "rows": self.rows[at].cpu().contiguous(),
            "floors": self.row_floor[at].cpu().contiguous(),
        }

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Replace the table with `to_tensors` output (`floors` may be missing: states written before
        read floors existed); `source` names the file in the error if they disagree."""
        problem = table_problem(tensors, self.n_slots, self.width)
        if problem:
            raise SmfdError(f"{source}: memory rows and their slot index disagree ({problem})")
        self.clear()
        self.write(tensors["slot_ids"], tensors["rows"], tensors.get("floors"))

    def clear(self) -> None:
        """Every row back to zero, the compact tensor back to its smallest size."""
        self.slot_row.zero_()
        self.rows = self.rows.new_zeros(1 + MIN_CAPACITY, self.width)
        self.row_slot = self.row_slot.new_full((1 + MIN_CAPACITY,), -1)
        self.row_floor = self.row_floor.new_full((1 + MIN_CAPACITY,), NO_FLOOR)
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
    floors = tensors.get("floors")
    if floors is not None and (floors.shape != slot_ids.shape or not floors.is_floating_point()):
        return f"{slot_ids.numel()} slot ids but floors of shape {tuple(floors.shape)} {floors.dtype}"
    return ""


def merged_rows(
    stored: dict[str, torch.Tensor],
    new_slot_ids: torch.Tensor,
    new_rows: torch.Tensor,
    new_floors: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Stored rows (`to_tensors` form) with new rows written over them, in the canonical form (ascending,
    zero rows dropped): folding a patch into a stored table without building the table. Missing
    floors (files from before read floors) are -inf."""
    slot_ids, rows = stored["slot_ids"], stored["rows"]
    ids = torch.cat([slot_ids, new_slot_ids.to(slot_ids)])
    stacked = torch.cat([rows, new_rows.to(rows)])
    floors = torch.cat([_floors_or_none(stored.get("floors"), slot_ids), _floors_or_none(new_floors, new_slot_ids)])
    unique, inverse = torch.unique(ids, return_inverse=True)
    order = torch.arange(ids.numel())
    last = torch.full((unique.numel(),), -1, dtype=torch.long).scatter_reduce(0, inverse, order, reduce="amax")
    kept = stacked[last]
    nonzero = (kept != 0).any(dim=1)
    return {
        "slot_ids": unique[nonzero].contiguous(),
        "rows": kept[nonzero].contiguous(),
        "floors": floors[last][nonzero].contiguous(),
    }


def _floors_or_none(floors: torch.Tensor | None, slot_ids: torch.Tensor) -> torch.Tensor:
    return torch.full((slot_ids.numel(),), NO_FLOOR) if floors is None else floors.float()
