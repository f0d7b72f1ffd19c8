"""Patches: every update recorded as (layer, slot ids, rows before, rows after), with the rows' read
floors before and after (smfd.model.sparse_rows).

A patch reverts an update exactly (write `before` back) or replays it (write `after`), so any
memory version is reproducible from a base snapshot plus patches. Stored with safetensors; rows
before are stored only where they held something (a row trained for the first time was zero).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smfd.errors import SmfdError
from smfd.model.memory import ProductKeyMemory
from smfd.model.sparse_rows import table_problem


@dataclass
class LayerPatch:
    layer: int
    slot_ids: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor
    # Read floors of the rows before and after; None in patch files from before read floors (no floors then).
    floor_before: torch.Tensor | None = None
    floor_after: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        return int(self.slot_ids.numel())

    def has_floors(self) -> bool:
        """Whether any row has a read floor before or after (with floors off, none has: files stay as they were)."""
        return any(f is not None and bool(torch.isfinite(f).any()) for f in (self.floor_before, self.floor_after))

    def held_before(self) -> torch.Tensor:
        """Positions of the rows that held something before the update (value rows start at zero)."""
        return (self.before != 0).any(dim=1).nonzero().flatten()


class PatchRecorder:
    """Remembers each touched row's value from before its first change during one update."""

    def __init__(self) -> None:
        self._before: dict[int, dict[int, tuple[torch.Tensor, float]]] = {}

    def record(self, memory: ProductKeyMemory, slot_ids: torch.Tensor) -> None:
        """Call before `slot_ids` of `memory` are overwritten."""
        seen = self._before.setdefault(memory.layer_index, {})
        fresh = [int(s) for s in slot_ids.tolist() if int(s) not in seen]
        if fresh:
            ids = torch.tensor(fresh)
            rows = memory.values.gather(ids).cpu()
            floors = memory.values.floors(ids).cpu().tolist()
            seen.update(zip(fresh, zip(rows, floors)))

    def changed_slots(self, layer_index: int) -> torch.Tensor | None:
        """Slot ids (ascending) of one layer's rows changed so far, without their values; None if none."""
        seen = self._before.get(layer_index)
        return torch.tensor(sorted(seen), dtype=torch.long) if seen else None

    def before(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(slot ids ascending, their values before this update) of one layer's rows changed so far; None if none."""
        changed = self._before_with_floors(layer_index)
        return None if changed is None else changed[:2]

    def _before_with_floors(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        ids = self.changed_slots(layer_index)
        if ids is None:
            return None
        seen = self._before[layer_index]
        rows = torch.stack([seen[int(i)][0] for i in ids])
        return ids, rows, torch.tensor([seen[int(i)][1] for i in ids])

    def finish(self, memories: list[ProductKeyMemory]) -> list[LayerPatch]:
        """One patch per touched layer: union of rows, first-seen `before`, current `after`; the recorder empties."""
        patches = self.pending(memories)
        self._before = {}
        return patches

    def pending(self, memories: list[ProductKeyMemory]) -> list[LayerPatch]:
        """The patches of the update so far, without closing it (the recorder keeps its rows)."""
        patches = []
        for memory in memories:
            changed = self._before_with_floors(memory.layer_index)
            if changed is None:
                continue
            ids, before, floor_before = changed
            after = memory.values.gather(ids).cpu()
            floor_after = memory.values.floors(ids).cpu()
            patches.append(LayerPatch(memory.layer_index, ids, before, after, floor_before, floor_after))
        return patches


def reused_rows(patches: list[LayerPatch]) -> int:
    """Rows of these patches that held something before the update (value rows start at zero): rows an
    earlier update had trained and this one trained again, overwriting part of what they held."""
    return sum(patch.held_before().numel() for patch in patches)


def apply_patches(memories: list[ProductKeyMemory], patches: list[LayerPatch], *, revert: bool = False) -> None:
    """Write each patch's `after` rows (or `before` rows when reverting) into the memory tables."""
    by_layer = {m.layer_index: m for m in memories}
    for patch in patches:
        memory = by_layer.get(patch.layer)
        if memory is None:
            raise SmfdError(f"patch for layer {patch.layer} but the model has memory at layers {sorted(by_layer)}")
        floors = patch.floor_before if revert else patch.floor_after
        memory.values.write(patch.slot_ids, patch.before if revert else patch.after, floors)


def patch_problem(memories: list[ProductKeyMemory], patches: list[LayerPatch]) -> str:
    """Why these patches cannot be applied to these memories (rows that disagree with their slot ids
    or the memory's shape, a layer the model has no memory at), or "" when they can."""
    by_layer = {m.layer_index: m for m in memories}
    for patch in patches:
        memory = by_layer.get(patch.layer)
        if memory is None:
            return f"patch for layer {patch.layer} but the model has memory at layers {sorted(by_layer)}"
        for name, rows, floors in (
            ("before", patch.before, patch.floor_before),
            ("after", patch.after, patch.floor_after),
        ):
            stored = {"slot_ids": patch.slot_ids, "rows": rows}
            if floors is not None:
                stored["floors"] = floors
            problem = table_problem(stored, memory.values.n_slots, memory.values.width)
            if problem:
                return f"layer {patch.layer} rows {name}: {problem}"
    return ""


def save_patches(path: Path, patches: list[LayerPatch], metadata: dict[str, object]) -> None:
    """Each layer's slot ids and rows after; rows before only where they held something (`before_at`:
    their positions), since a row trained for the first time was zero before; read floors before and
    after where any row has one."""
    tensors = {}
    for p in patches:
        held = p.held_before()
        tensors[f"{p.layer}.slot_ids"] = p.slot_ids.contiguous()
        tensors[f"{p.layer}.after"] = p.after.contiguous()
        tensors[f"{p.layer}.before_at"] = held.contiguous()
        tensors[f"{p.layer}.before"] = p.before[held].contiguous()
        if p.has_floors():
            tensors[f"{p.layer}.floor_before"] = p.floor_before.contiguous()
            tensors[f"{p.layer}.floor_after"] = p.floor_after.contiguous()
    save_file(tensors, str(path), metadata={"smfd": json.dumps(metadata)})


def load_patches(path: Path) -> tuple[list[LayerPatch], dict[str, object]]:
    """The patches in `path` (rows before filled back with zeros where none was stored) and their metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads((handle.metadata() or {}).get("smfd", "{}"))
    tensors = load_file(str(path))
    layers = sorted({int(name.split(".")[0]) for name in tensors})
    patches = []
    for layer in layers:
        after, before, held = tensors[f"{layer}.after"], tensors[f"{layer}.before"], tensors.get(f"{layer}.before_at")
        if held is not None:  # rows before stored only where they held something (format 2 stored them all)
            before = torch.zeros_like(after).index_copy_(0, held, before)
        floors = (tensors.get(f"{layer}.floor_before"), tensors.get(f"{layer}.floor_after"))
        patches.append(LayerPatch(layer, tensors[f"{layer}.slot_ids"], before, after, *floors))
    return patches, metadata
