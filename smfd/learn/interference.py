"""Interference penalty: while new text is written into memory rows, keep what ordinary text reads.

Slot selection steers updates to rows that ordinary text reads rarely, but in a memory
retrofitted beside a pretrained MLP (addressing never trained together with the values) every
row is read by some ordinary tokens, so a row trained to carry a new fact also shifts their
hidden states: that is most of the forgetting. The retain set is a sample of general-text tokens
with, per memory layer, their fixed lookup and gate activation (nothing below a memory layer
changes during sparse finetuning, so both stay valid for a single memory layer; with several
layers the lower ones' updates make them an approximation). Each optimizer step adds
``weight * ||change of the memory's output since the update began||^2``, relative to the MLP's
own output there, so the selected rows learn the new text in directions ordinary tokens do not
feel, without pulling back what earlier accepted updates wrote. Gradient still reaches only the
selected rows. The output is linear in the value rows, so its change is computed from the rows
the update changed and their values at its start (`PatchRecorder.before`) alone: no copy of the
output on all the retain tokens is kept (38 MB for the default 16,384 tokens).

Which tokens to watch matters most. Known facts are lost where a document's fact sentences
train rows that the *relation* addresses ("… is affiliated with the religion of"), so the
default retain text is the frozen model's own statements of fact (`fact_recipe`):
continuations of shipped, generic fact-style prompts, i.e. what the model already believes, in
the contexts where it states it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from smfd.errors import SmfdError
from smfd.learn.heal import memory_inputs, token_pool
from smfd.learn.kept_text import SampleRecipe
from smfd.model.memory import ProductKeyMemory
from smfd.paths import builtin_file, read_prompts

FACT_PROMPTS = "fact_prompts.txt"  # shipped beside the default probes
FACT_TOKENS = 48  # sampled tokens per statement: one or two sentences


@dataclass
class RetainLayer:
    """One memory layer's view of the retain tokens (n tokens, r = heads * k reads each)."""

    indices: torch.Tensor  # (n, r) slot ids read
    weights: torch.Tensor  # (n, r) their softmax weights
    gate: torch.Tensor  # (n, d) silu(gate(hidden)), the Memory+ gate
    scale: float  # mean squared norm of the MLP output on these tokens: the penalty's unit


class RetainSet:
    """General-text tokens whose memory output an update should leave where it was."""

    def __init__(self, layers: dict[int, RetainLayer]) -> None:
        self.layers = layers

    @property
    def n_tokens(self) -> int:
        return next(iter(self.layers.values())).indices.shape[0] if self.layers else 0

    @classmethod
    def collect(
        cls, model: PreTrainedModel, memories: list[ProductKeyMemory], sequences: list[list[int]], max_tokens: int
    ) -> RetainSet:
        """Run the sequences once (up to `max_tokens` tokens) and keep each memory layer's view of them."""
        if not sequences or max_tokens < 1:
            raise SmfdError("the retain set needs general text: no sequences given")
        taken: list[list[int]] = []
        for sequence in sequences:
            room = max_tokens - sum(len(s) for s in taken)
            if room <= 0:
                break
            taken.append(sequence[:room])
        return cls.from_inputs(model, memories, memory_inputs(model, memories, taken), max_tokens)

    @classmethod
    @torch.no_grad()
    def from_inputs(
        cls,
        model: PreTrainedModel,
        memories: list[ProductKeyMemory],
        inputs: dict[int, list[torch.Tensor]],
        max_tokens: int,
    ) -> RetainSet:
        """The retain set from the hidden states entering each memory layer, first `max_tokens` tokens in order.

        `inputs` as `memory_inputs` (or sampling, `SampledText.inputs`) gives them; the MLP beside
        the memory reads the same hidden state, so its output (the penalty's unit) is computed here.
        """
        layers = {}
        for memory in memories:
            parts = inputs.get(memory.layer_index)
            if not parts:
                raise SmfdError(f"the retain set needs the inputs of memory layer {memory.layer_index}: none given")
            layers[memory.layer_index] = _retain_layer(model, memory, _first_tokens(parts, max_tokens))
        return cls(layers)

    def read_slots(self, layer_index: int) -> torch.Tensor:
        """Slot ids the retain tokens read above the read cut in one memory layer (ascending, unique)."""
        layer = self.layers.get(layer_index)
        if layer is None:
            return torch.zeros(0, dtype=torch.long)
        return torch.unique(layer.indices[layer.weights > 0])

    def penalty(self, memory: ProductKeyMemory, before: RowValues | None = None) -> torch.Tensor | None:
        """Squared change of this layer's memory output on the retain tokens since the update began, per token,
        in MLP-output units.

        `before`: the rows earlier steps of this update changed, with their values at its start
        (`PatchRecorder.before`); a selected row not among them still holds its starting value in
        the table. Only tokens that read a selected row can change with this step; the rest
        contribute no gradient and are skipped.
        """
        layer = self.layers.get(memory.layer_index)
        selection = memory.selection
        if layer is None or selection is None:
            return None
        touched = ((selection.position[layer.indices] >= 0) & (layer.weights > 0)).any(dim=1)
        if not bool(touched.any()):
            return None
        change = _row_changes(memory, before)
        indices, weights = layer.indices[touched], layer.weights[touched]
        position = change.position[indices]
        moved = F.embedding_bag(
            position.clamp(min=0),
            change.delta,
            per_sample_weights=weights.to(change.delta.dtype) * (position >= 0),
            mode="sum",
        )
        output = memory.out(layer.gate[touched] * moved)
        return output.pow(2).sum() / (layer.indices.shape[0] * layer.scale)


@dataclass
class RowValues:
    """Value rows of one memory layer: slot ids (ascending) and their values, (n, d)."""

    slot_ids: torch.Tensor
    rows: torch.Tensor


@dataclass
class _RowChanges:
    position: torch.Tensor  # (n_slots,) index into `delta`, -1 for a row that has not moved
    delta: torch.Tensor  # (m, d) present value minus the value at the update's start (selected rows with gradient)


def _row_changes(memory: ProductKeyMemory, before: RowValues | None) -> _RowChanges:
    """How far each row moved since the update began: the selected rows (their trainable copy) and the rows
    earlier steps wrote (table values)."""
    selection = memory.selection
    assert selection is not None
    device = selection.slot_ids.device
    moved_before = None if before is None else before.slot_ids.to(device)  # the recorder keeps its rows on the CPU
    ids = selection.slot_ids if moved_before is None else torch.unique(torch.cat([selection.slot_ids, moved_before]))
    position = torch.full((memory.values.n_slots,), -1, dtype=torch.long, device=device)
    position[ids] = torch.arange(ids.numel(), device=device)
    table = memory.values.gather(ids)
    start = table if before is None else table.index_copy(0, position[moved_before], before.rows.to(table))
    now = table.index_copy(0, position[selection.slot_ids], selection.rows)
    return _RowChanges(position, now - start)


def retain_text(facts: list[list[int]], general: list[list[int]]) -> list[list[int]]:
    """The sequences the penalty watches, in the order `RetainSet.collect` takes them: statements of fact first.

    The statements cover the relation contexts where known facts are lost; the general text after
    them widens the set of rows the penalty sees (an update's rows are read by many kinds of token).
    """
    text = facts + general
    if not text:
        raise SmfdError("the retain set needs text: no statements of fact and no general text")
    return text


def fact_prompts() -> list[str]:
    """The shipped fact-style prompts (generic relation openings written for smfd, no entities from any data set)."""
    return read_prompts(builtin_file(FACT_PROMPTS))


def fact_recipe(n_sequences: int) -> SampleRecipe:
    """The frozen model's own statements of fact: `n_sequences` sampled continuations of `fact_prompts()`.

    Sampled with the memory bypassed, so the statements are the base model's (see
    `smfd.learn.kept_text.model_text`, which also gives the memories' inputs on them).
    """
    return SampleRecipe(tuple(fact_prompts()), n_sequences, FACT_TOKENS)


RETAIN_CHUNK = 1024  # tokens looked up at once: a lookup scores every key half, ~16 KB per token


def _first_tokens(parts: list[torch.Tensor], max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` rows of the parts, in order: a view of the pool `memory_inputs` wrote them into
    when they are its consecutive views (no copy), else copied once (the rest is not touched)."""
    taken, count = [], 0
    for part in parts:
        if count >= max_tokens:
            break
        taken.append(part[: max_tokens - count])
        count += taken[-1].shape[0]
    return token_pool(taken)


def _retain_layer(model: PreTrainedModel, memory: ProductKeyMemory, hidden: torch.Tensor) -> RetainLayer:
    """One memory layer's view of the retain tokens, `RETAIN_CHUNK` tokens at a time (lookups and the MLP
    on all 16k tokens at once would add about 500 MB to the process's peak). The gate (n × hidden, 38 MB
    on 16,384 tokens) is written into its tensor chunk by chunk, never held twice."""
    mlp = _mlp_of(model, memory)
    n, reads = hidden.shape[0], memory.config.heads * memory.config.k
    indices = torch.empty(n, reads, dtype=torch.long, device=hidden.device)
    weights = hidden.new_empty(n, reads)
    gate = hidden.new_empty(n, memory.gate.out_features)
    squares = 0.0
    for start in range(0, n, RETAIN_CHUNK):
        chunk = hidden[start : start + RETAIN_CHUNK]
        rows = slice(start, start + chunk.shape[0])
        found = memory.lookup(chunk[None])
        indices[rows] = found.indices.reshape(chunk.shape[0], -1)
        weights[rows] = found.weights.reshape(chunk.shape[0], -1)
        gate[rows] = F.silu(memory.gate(chunk))
        squares += float(mlp(chunk).double().pow(2).sum())
    return RetainLayer(indices=indices, weights=weights, gate=gate, scale=max(squares / n, 1e-12))


def _mlp_of(model: PreTrainedModel, memory: ProductKeyMemory) -> torch.nn.Module:
    for module in model.modules():
        if getattr(module, "memory", None) is memory and hasattr(module, "mlp"):
            return module.mlp
    raise SmfdError(f"memory layer {memory.layer_index} is not attached beside an MLP")
