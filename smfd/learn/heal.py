"""Healing and background statistics for freshly attached memory layers.

Query calibration standardises the memory's queries on general text; healing then trains the
addressing (query projection and keys) so that general text spreads evenly over the slots.
Background statistics record how often general text reads each slot; slot selection then
prefers slots that new facts read and ordinary text does not. None of it changes the model's
output: value rows stay zero until the first update.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from smfd.config import HealSection
from smfd.errors import SmfdError
from smfd.model.memory import Lookup, ProductKeyMemory
from smfd.model.scoring import right_padded
from smfd.model.slot_stats import BackgroundStats

INPUT_BATCH_TOKENS = 1024  # padded tokens per forward while collecting memory inputs: a forward's activations
# are this pass's peak (4096 tokens: 116 MiB above the pool); 1024 runs as fast on a CPU


class _AboveTheMemories(Exception):
    """Raised by the top memory layer's hook: nothing the model computes above it is needed."""


@torch.no_grad()
def memory_inputs(
    model: PreTrainedModel, memories: list[ProductKeyMemory], sequences: list[list[int]]
) -> dict[int, list[torch.Tensor]]:
    """The hidden states entering each memory layer, one (tokens, hidden) tensor per sequence.

    Tuning the addressing does not change them (value rows are zero before any update, and a
    memory's own addressing never affects its input), so one pass serves calibration, every
    healing step and the background read counts. Consecutive sequences run together, right-padded
    (a causal model's real tokens never see the padding after them), and each forward stops at the
    top memory layer: the blocks above it and the output head would be computed for nothing.

    Each layer's rows are written into one pool (no padding kept) and the per-sequence tensors are
    consecutive views of it, so healing samples the pool as it is (`token_pool`) instead of
    concatenating a second copy: on 67,000 tokens that copy (146 MiB) made the benchmark's peak.
    """
    if not sequences:
        raise SmfdError("query calibration, healing and background statistics need general text: the corpus is empty")
    device = next(model.parameters()).device
    top = max(m.layer_index for m in memories)
    total = sum(len(seq) for seq in sequences)
    pools: dict[int, torch.Tensor] = {}
    start = 0
    for group in _padded_groups(sequences, INPUT_BATCH_TOKENS):
        blocks: dict[int, torch.Tensor] = {}
        handles = [m.register_forward_hook(_keep_block(blocks, m.layer_index, m.layer_index == top)) for m in memories]
        ids, _ = right_padded(group, 0)  # no mask needed: causal attention never reaches the padding after a row
        try:
            model.get_decoder()(input_ids=ids.to(device), use_cache=False)
        except _AboveTheMemories:
            pass
        finally:
            for handle in handles:
                handle.remove()
        for layer, block in blocks.items():
            pool = pools.setdefault(layer, block.new_empty(total, block.shape[-1]))
            at = start
            for row, seq in enumerate(group):
                pool[at : at + len(seq)] = block[row, : len(seq)]
                at += len(seq)
        start += sum(len(seq) for seq in group)
    return {layer: list(pool.split([len(seq) for seq in sequences])) for layer, pool in pools.items()}


def token_pool(parts: list[torch.Tensor]) -> torch.Tensor:
    """All rows of `parts` as one (tokens, hidden) tensor: the pool they are consecutive views of
    (`memory_inputs`), without a copy; a concatenated copy for any other list (e.g. sampling's)."""
    if not parts:
        raise SmfdError("token_pool: no memory inputs given (an empty text has no tokens to pool)")
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    expected = first.data_ptr()
    for part in parts:
        if not part.is_contiguous() or part.untyped_storage().data_ptr() != storage or part.data_ptr() != expected:
            return torch.cat(parts)
        expected += part.numel() * part.element_size()
    rows = sum(part.shape[0] for part in parts)
    return first.as_strided((rows, first.shape[1]), first.stride(), first.storage_offset())


def _padded_groups(sequences: list[list[int]], max_tokens: int) -> list[list[list[int]]]:
    """Consecutive sequences in groups whose padded size (rows x longest) stays within `max_tokens` (at least one each)."""
    groups: list[list[list[int]]] = []
    width = 0
    for seq in sequences:
        if groups and (len(groups[-1]) + 1) * max(width, len(seq)) <= max_tokens:
            groups[-1].append(seq)
            width = max(width, len(seq))
        else:
            groups.append([seq])
            width = len(seq)
    return groups


def _keep_block(blocks: dict[int, torch.Tensor], layer: int, stop: bool):
    def hook(memory: ProductKeyMemory, args: tuple, output: torch.Tensor) -> None:
        blocks[layer] = args[0].detach()
        if stop:
            raise _AboveTheMemories

    return hook


@torch.no_grad()
def calibrate_from_inputs(memories: list[ProductKeyMemory], inputs: dict[int, list[torch.Tensor]]) -> None:
    """Set each memory's query standardisation (per-dimension mean and 1/std) from general text.

    Done once, before any update and before the background statistics (which depend on it); with
    zero value rows the model's output is unchanged, so the attach stays function-preserving.
    """
    for memory in memories:
        if not memory.config.query_norm:
            continue
        total = squares = torch.zeros((), dtype=torch.float64)
        count = 0
        for hidden in inputs[memory.layer_index]:  # one sequence at a time: the queries of all would be ~100 MB
            q = memory.query(hidden).double()
            total, squares, count = total + q.sum(0), squares + q.pow(2).sum(0), count + q.shape[0]
        mean = total / count
        std = ((squares - count * mean.pow(2)) / max(count - 1, 1)).clamp_min(0).sqrt()
        memory.query_shift.copy_(mean.to(memory.query_shift.dtype))
        memory.query_scale.copy_((1.0 / std.clamp_min(1e-6)).to(memory.query_scale.dtype))


@dataclass(frozen=True)
class HealReport:
    """What a healing run did, at its first and last step (mean of the last 10), and its cost.

    imbalance: KL(read mass per slot || uniform), nats; read_entropy: mean entropy of one head's read, nats.
    """

    steps: int
    first_imbalance: float
    last_imbalance: float
    first_read_entropy: float
    last_read_entropy: float
    seconds: float


def usage_imbalance(memory: ProductKeyMemory, lookup: Lookup) -> torch.Tensor:
    """KL(read mass per slot || uniform) over the tokens of `lookup`, in nats (0 = perfectly even)."""
    usage = torch.zeros(memory.config.n_slots, dtype=lookup.weights.dtype, device=lookup.weights.device)
    usage = usage.index_add(0, lookup.indices.reshape(-1), lookup.weights.reshape(-1))
    usage = usage / usage.sum().clamp_min(1e-12)
    read = usage > 0
    return (usage[read] * (usage[read] * memory.config.n_slots).log()).sum()


def read_entropy(lookup: Lookup) -> torch.Tensor:
    """Mean entropy of one head's read over its k slots, in nats (0 = one slot, log k = even)."""
    return -(lookup.weights * lookup.weights.clamp_min(1e-30).log()).sum(-1).mean()


def heal_addressing(
    memories: list[ProductKeyMemory], inputs: dict[int, list[torch.Tensor]], config: HealSection
) -> HealReport | None:
    """Adam on each memory's query projection and keys, minimising the slot-usage imbalance.

    `inputs` are the base model's hidden states at each memory layer (`memory_inputs`): the
    addressing is all that changes, so one forward pass over the corpus serves every step.
    """
    if config.steps == 0:
        return None
    if any(m.values.any_trained() for m in memories):
        raise SmfdError("healing must run before any update: a memory already has trained value rows")
    pools = {layer: token_pool(parts) for layer, parts in inputs.items()}
    params = [p for m in memories for p in (m.query.weight, m.keys)]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    imbalances: list[float] = []
    entropies: list[float] = []
    started = time.perf_counter()
    for param in params:
        param.requires_grad_(True)
    try:
        for _ in range(config.steps):
            optimizer.zero_grad(set_to_none=True)
            step_imbalance, step_entropy = [], []
            for memory in memories:
                hidden = pools[memory.layer_index]
                pick = torch.randint(
                    hidden.shape[0], (min(config.tokens_per_step, hidden.shape[0]),), generator=generator
                )
                found = memory.lookup(hidden[pick.to(hidden.device)][None], dense=True)
                step_imbalance.append(usage_imbalance(memory, found))
                step_entropy.append(float(read_entropy(found).detach()))
            imbalance = torch.stack(step_imbalance).mean()
            imbalance.backward()
            optimizer.step()
            imbalances.append(float(imbalance.detach()))
            entropies.append(sum(step_entropy) / len(step_entropy))
    finally:
        for param in params:
            param.requires_grad_(False)
            param.grad = None
    return HealReport(
        len(imbalances),
        imbalances[0],
        _tail_mean(imbalances),
        entropies[0],
        _tail_mean(entropies),
        time.perf_counter() - started,
    )


def _tail_mean(values: list[float]) -> float:
    tail = values[-10:]
    return sum(tail) / len(tail)


def prepare_memory(
    model: PreTrainedModel,
    memories: list[ProductKeyMemory],
    sequences: list[list[int]],
    heal: HealSection,
    progress: bool = False,
    inputs: dict[int, list[torch.Tensor]] | None = None,
) -> tuple[HealReport | None, dict[int, BackgroundStats]]:
    """Query calibration, healing, then background statistics, all from one pass over the general text.

    `inputs`: the memories' inputs on `sequences` when sampling already produced them
    (`SampledText.inputs`); otherwise the sequences are run once here.
    """
    if inputs is None:
        inputs = memory_inputs(model, memories, sequences)
    calibrate_from_inputs(memories, inputs)
    report = heal_addressing(memories, inputs, heal)
    return report, background_from_inputs(memories, inputs, progress)


def compute_background(
    model: PreTrainedModel,
    memories: list[ProductKeyMemory],
    sequences: list[list[int]],
    progress: bool = False,
) -> dict[int, BackgroundStats]:
    """Read counts per slot over general-text sequences, one sequence per background batch."""
    return background_from_inputs(memories, memory_inputs(model, memories, sequences), progress)


@torch.no_grad()
def background_from_inputs(
    memories: list[ProductKeyMemory], inputs: dict[int, list[torch.Tensor]], progress: bool = False
) -> dict[int, BackgroundStats]:
    """Read counts per slot from the memories' inputs (`memory_inputs`), one sequence per background batch."""
    stats = {m.layer_index: BackgroundStats.empty(m.config.n_slots) for m in memories}
    for memory in memories:
        for hidden in tqdm(inputs[memory.layer_index], desc="background", disable=not progress):
            found = memory.lookup(hidden[None])
            stats[memory.layer_index].add_batch(found.indices[found.weights > 0].cpu())
    return stats
