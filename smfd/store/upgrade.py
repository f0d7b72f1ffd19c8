"""Convert a state written with dense value tables (format 2) to sparse rows (format 3), exactly.

Format 2 kept every value row of every memory in `base.safetensors` and `current.safetensors`,
zero or not (about 600 MB each at the default shape). The conversion keeps the non-zero rows of
the base with their slot ids, so every row reads as before; the patches are stored by slot id in
both formats and stay as they are; the dense value cache is deleted (format 3 keeps none: a version
is its base plus its patches). It runs once, by the state's owner (under the state lock), before anything reads the state.

Crash safety: the sparse base is written beside the old one, its digest recorded in
`upgrade-pending.json`, then renamed over it; the manifest (format 3, the new digest) is written
last. A crash before the rename leaves the dense state to convert again; after it, the pending
record shows that the base on disk is the converted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog
import torch
from safetensors.torch import load_file, save_file

from smfd.durable import atomic_write, atomic_write_json, fsync_directory
from smfd.store.checkpoint import BASE, DENSE_FORMAT, FORMAT
from smfd.store.integrity import DamagedState, file_digest, is_intact

log = structlog.get_logger("smfd.store.upgrade")
PENDING = "upgrade-pending.json"
SPARSE_BASE = "base.sparse.safetensors"
DENSE_CACHE = "current.safetensors"  # format 2's value cache; format 3 replays base + patches instead


def upgrade_dense_state(folder: Path) -> bool:
    """Convert the checkpoint in `folder` from format 2 in place; True if it was converted, False if not format 2."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False  # the store refuses a corrupt manifest itself, with its own message
    if manifest.get("format") != DENSE_FORMAT:
        return False
    files = manifest.setdefault("files", {})
    pending_path = folder / PENDING
    pending = json.loads(pending_path.read_text()) if pending_path.is_file() else {}
    if not (pending.get(BASE) and is_intact(folder, BASE, pending)):
        pending = {BASE: _write_sparse_base(folder, files)}
        atomic_write_json(pending_path, pending)
        os.replace(folder / SPARSE_BASE, folder / BASE)
        fsync_directory(folder)
    files[BASE] = pending[BASE]
    files.pop(DENSE_CACHE, None)
    (folder / DENSE_CACHE).unlink(missing_ok=True)
    manifest["format"] = FORMAT
    atomic_write_json(manifest_path, manifest)
    pending_path.unlink(missing_ok=True)
    log.info("state_converted", folder=str(folder), to_format=FORMAT, base_bytes=(folder / BASE).stat().st_size)
    return True


def _write_sparse_base(folder: Path, digests: dict[str, str]) -> str:
    """Write the base's sparse form beside it; returns its digest. A damaged dense base is refused."""
    path = folder / BASE
    if not is_intact(folder, BASE, digests):
        raise DamagedState(path, "missing or checksum mismatch")
    tensors = load_file(str(path))
    converted = {}
    for key, tensor in tensors.items():
        if key.endswith(".values") and tensor.dim() == 2:
            slot_ids = _nonzero_rows(tensor)
            converted[f"{key}.slot_ids"] = slot_ids
            converted[f"{key}.rows"] = tensor[slot_ids].contiguous()
        else:
            converted[key] = tensor
    atomic_write(folder / SPARSE_BASE, lambda tmp: save_file(converted, str(tmp)))
    return file_digest(folder / SPARSE_BASE)


def _nonzero_rows(table: torch.Tensor, rows_per_block: int = 16384) -> torch.Tensor:
    """Ids of the rows holding any non-zero value, a block at a time (no boolean copy of the whole table)."""
    found = [
        (table[start : start + rows_per_block] != 0).any(dim=1).nonzero().flatten() + start
        for start in range(0, table.shape[0], rows_per_block)
    ]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)
