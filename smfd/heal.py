"""Healing and background statistics for freshly attached memory layers.

Background statistics record how often general text reads each slot; slot selection then
prefers slots that new facts read and ordinary text does not. Healing (optional) trains the
memory's own parameters on general text so that addressing becomes meaningful.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from tqdm import tqdm

from smfd.errors import SmfdError
from smfd.model.memory import ProductKeyMemory
from smfd.selection import BackgroundStats


@torch.no_grad()
def compute_background(
    model: PreTrainedModel,
    memories: list[ProductKeyMemory],
    sequences: list[list[int]],
    progress: bool = False,
) -> dict[int, BackgroundStats]:
    """Read counts per slot over general-text sequences, one sequence per background batch."""
    if not sequences:
        raise SmfdError("background statistics need general text: the corpus is empty")
    device = next(model.parameters()).device
    stats = {m.layer_index: BackgroundStats.empty(m.config.n_slots) for m in memories}
    for memory in memories:
        memory.record_lookup = True
    try:
        for seq in tqdm(sequences, desc="background", disable=not progress):
            ids = torch.tensor([seq], device=device)
            model(input_ids=ids)
            for memory in memories:
                stats[memory.layer_index].add_batch(memory.last_lookup.indices.reshape(-1).cpu())
    finally:
        for memory in memories:
            memory.record_lookup = False
            memory.last_lookup = None
    return stats
