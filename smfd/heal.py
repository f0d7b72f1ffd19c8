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
from smfd.evaluation import left_padded
from smfd.model.memory import ProductKeyMemory
from smfd.selection import BackgroundStats


@torch.no_grad()
def calibrate_queries(model: PreTrainedModel, memories: list[ProductKeyMemory], sequences: list[list[int]]) -> None:
    """Set each memory's query standardisation (per-dimension mean and 1/std) from general text.

    Done once, before any update and before the background statistics (which depend on it); with
    zero value rows the model's output is unchanged, so the attach stays function-preserving.
    """
    wanted = [m for m in memories if m.config.query_norm]
    if not wanted:
        return
    if not sequences:
        raise SmfdError("query calibration needs general text: the corpus is empty")
    device = next(model.parameters()).device
    queries: dict[int, list[torch.Tensor]] = {m.layer_index: [] for m in wanted}
    handles = [m.register_forward_hook(_collect_queries(queries[m.layer_index])) for m in wanted]
    try:
        for seq in sequences:
            model.get_decoder()(input_ids=torch.tensor([seq], device=device))
    finally:
        for handle in handles:
            handle.remove()
    for memory in wanted:
        q = torch.cat(queries[memory.layer_index]).double()
        memory.query_shift.copy_(q.mean(0).to(memory.query_shift.dtype))
        memory.query_scale.copy_((1.0 / q.std(0).clamp_min(1e-6)).to(memory.query_scale.dtype))


def _collect_queries(store: list[torch.Tensor]):
    def hook(memory: ProductKeyMemory, args: tuple, output: torch.Tensor) -> None:
        hidden = args[0]
        store.append(memory.query(hidden.reshape(-1, hidden.shape[-1])))
    return hook


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
            model.get_decoder()(input_ids=ids)  # reads happen inside the decoder; the LM head is not needed
            for memory in memories:
                stats[memory.layer_index].add_batch(memory.last_lookup.indices.reshape(-1).cpu())
    finally:
        for memory in memories:
            memory.record_lookup = False
            memory.last_lookup = None
    return stats


@torch.no_grad()
def sample_general_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    n_sequences: int,
    max_new_tokens: int = 96,
    batch_size: int = 32,
    seed: int = 0,
) -> list[list[int]]:
    """General text sampled from the frozen model itself, for background statistics without a corpus.

    Each sequence starts from one of `prompts` (cycled) and continues by sampling (temperature 1,
    top-p 0.95), so the statistics describe what the model reads on ordinary text of its own kind.
    """
    if not prompts:
        raise SmfdError("sampling background text needs at least one prompt")
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    sequences: list[list[int]] = []
    try:
        for start in range(0, n_sequences, batch_size):
            chosen = [prompts[(start + i) % len(prompts)] for i in range(min(batch_size, n_sequences - start))]
            encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in chosen]
            ids, mask = left_padded(encoded, tokenizer.pad_token_id)
            width = ids.shape[1]
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, top_p=0.95,
                temperature=1.0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            )
            for row, seq in enumerate(encoded):
                tail = [t for t in out[row, width:].tolist() if t != tokenizer.pad_token_id]
                sequences.append(seq + tail)
    finally:
        torch.random.set_rng_state(generator_state)
    return sequences
