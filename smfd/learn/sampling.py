"""Text sampled from the frozen model, with what each memory layer read while it was written.

A new state needs ordinary text of the model's own kind (background statistics, healing, the
retain set). Sampling it is most of a first start's work, and every token sampled has already
passed through the memory layers on its way: the hidden state entering a memory layer is the
same whether the token was fed during generation or again in a later forward pass over the
finished sequence (up to float rounding of the cached attention). So the sampler keeps those
inputs, and nothing has to run the sequences a second time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smfd.errors import SmfdError
from smfd.model.memory import ProductKeyMemory
from smfd.model.retrofit import memory_bypassed
from smfd.model.scoring import left_padded

SAMPLE_BATCH = 32  # sequences sampled together (the RNG stream, so the text, depends on it)
SAMPLE_SEED = 0
SAMPLE_TOP_P = 0.95
SAMPLE_TEMPERATURE = 1.0
GENERAL_TOKENS = 96  # sampled tokens per sequence of general text


@dataclass
class SampledText:
    """Sampled sequences and, per memory layer, the hidden state that entered it at each fed token.

    A sequence is its prompt and the sampled tokens up to and including the first end-of-sequence
    token (if one was sampled).

    `inputs[layer][i]` has one row per token of `sequences[i]` that the model was fed: all of
    them but possibly the last (generation stops after sampling it). Both lists are in order.
    """

    sequences: list[list[int]]
    inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def __add__(self, other: SampledText) -> SampledText:
        layers = self.inputs.keys() | other.inputs.keys()
        inputs = {layer: self.inputs.get(layer, []) + other.inputs.get(layer, []) for layer in layers}
        return SampledText(self.sequences + other.sequences, inputs)


@torch.no_grad()
def sample_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    memories: list[ProductKeyMemory],
    prompts: list[str],
    n_sequences: int,
    max_new_tokens: int = GENERAL_TOKENS,
    batch_size: int = SAMPLE_BATCH,
    seed: int = SAMPLE_SEED,
) -> SampledText:
    """`n_sequences` continuations of `prompts` (cycled) sampled from the frozen model, with the memories' inputs.

    Sampling: temperature 1, top-p 0.95, fixed seed (the global RNG is restored after), every one
    of `memories` bypassed (pass all of the model's), so the text is the base model's whatever they hold.
    """
    if not prompts:
        raise SmfdError("sampling text from the model needs at least one prompt")
    device = next(model.parameters()).device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    sampled = SampledText([], {m.layer_index: [] for m in memories})
    try:
        with memory_bypassed(memories):
            for start in range(0, n_sequences, batch_size):
                chosen = [prompts[(start + i) % len(prompts)] for i in range(min(batch_size, n_sequences - start))]
                sampled = sampled + _sample_batch(model, tokenizer, memories, chosen, max_new_tokens, device)
    finally:
        torch.random.set_rng_state(generator_state)
    return sampled


def _sample_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    memories: list[ProductKeyMemory],
    prompts: list[str],
    max_new_tokens: int,
    device: torch.device,
) -> SampledText:
    """One left-padded batch through `generate`; forward hooks collect each memory's input per call.

    `generate` feeds the prompts at once, then each sampled token as the next step's input, so the
    calls line up with a row's positions in the padded batch; the last sampled token is never fed.
    """
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    ids, mask = left_padded(encoded, tokenizer.pad_token_id)
    calls: dict[int, list[torch.Tensor]] = {m.layer_index: [] for m in memories}
    handles = [m.register_forward_hook(_keep_input(calls[m.layer_index])) for m in memories]
    try:
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            top_p=SAMPLE_TOP_P,
            temperature=SAMPLE_TEMPERATURE,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    finally:
        for handle in handles:
            handle.remove()
    width = ids.shape[1]
    ends = _end_ids(model)
    kept = [_kept_span(out[row], width - len(seq), width, ends) for row, seq in enumerate(encoded)]
    sequences = [out[row, first:stop].tolist() for row, (first, stop) in enumerate(kept)]
    inputs = {}
    for layer, parts in calls.items():
        # (batch, positions fed, hidden): the prompt, then one position per step. Each sequence's rows are
        # a view into it, so the batch is one block of memory, released as a whole (see smfd.heap).
        hidden = torch.cat(parts, dim=1)
        inputs[layer] = [hidden[row, first : min(stop, hidden.shape[1])] for row, (first, stop) in enumerate(kept)]
    return SampledText(sequences, inputs)


def _end_ids(model: PreTrainedModel) -> torch.Tensor:
    """Token ids that end a sampled sequence (after one, `generate` only pads the row)."""
    eos = model.generation_config.eos_token_id
    return torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long)


def _kept_span(row: torch.Tensor, first: int, width: int, ends: torch.Tensor) -> tuple[int, int]:
    """(first, stop) positions of a row's prompt and sampled tokens, up to and including the first end-of-sequence.

    A padding id sampled as an ordinary token stays: dropping it would leave the text's later
    tokens with hidden states computed in a context the text no longer shows.
    """
    sampled = row[width:].cpu()
    finished = torch.isin(sampled, ends).nonzero()
    return first, width + (int(finished[0]) + 1 if finished.numel() else sampled.shape[0])


def _keep_input(store: list[torch.Tensor]):
    def hook(memory: ProductKeyMemory, args: tuple, output: torch.Tensor) -> None:
        store.append(args[0].detach())

    return hook
