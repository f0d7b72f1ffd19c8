"""Interference penalty: while new text is written into memory rows, keep what ordinary text reads.

Slot selection steers updates to rows that ordinary text reads rarely, but in a memory
retrofitted beside a pretrained MLP (addressing never trained together with the values) every
row is read by some ordinary tokens, so a row trained to carry a new fact also shifts their
hidden states: that is most of the forgetting. The retain set is a sample of general-text tokens
with, per memory layer, their fixed lookup and gate activation (nothing below a memory layer
changes during sparse finetuning, so both stay valid for a single memory layer; with several
layers the lower ones' updates make them an approximation). At the start of each update the
reference is set to the memory's current output on those tokens; each optimizer step then adds
``weight * ||memory output - reference||^2``, relative to the MLP's own output there, so the
selected rows learn the new text in directions ordinary tokens do not feel, without pulling
back what earlier accepted updates wrote. Gradient still reaches only the selected rows.

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
from smfd.learn.heal import memory_inputs
from smfd.learn.kept_text import SampleRecipe
from smfd.model.memory import Lookup, ProductKeyMemory
from smfd.paths import builtin_file, read_prompts

FACT_PROMPTS = "fact_prompts.txt"  # shipped beside the default probes
FACT_TOKENS = 48  # sampled tokens per statement: one or two sentences


@dataclass
class RetainLayer:
    """One memory layer's view of the retain tokens (n tokens, r = heads * k reads each)."""

    indices: torch.Tensor  # (n, r) slot ids read
    weights: torch.Tensor  # (n, r) their softmax weights
    gate: torch.Tensor  # (n, d) silu(gate(hidden)), the Memory+ gate
    reference: torch.Tensor  # (n, d) memory output at the start of the current update
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
        retain = cls(layers)
        retain.rebase(memories)
        return retain

    @torch.no_grad()
    def rebase(self, memories: list[ProductKeyMemory]) -> None:
        """Make the memory's present output on the retain tokens the reference (start of an update)."""
        for memory in memories:
            layer = self.layers.get(memory.layer_index)
            if layer is not None:  # in place and in chunks: no second copy of all the tokens' outputs at once
                tokens = torch.arange(layer.indices.shape[0], device=layer.indices.device)
                for chunk in tokens.split(RETAIN_CHUNK):
                    layer.reference[chunk] = self._output(memory, layer, chunk)

    def read_slots(self, layer_index: int) -> torch.Tensor:
        """Slot ids the retain tokens read above the read cut in one memory layer (ascending, unique)."""
        layer = self.layers.get(layer_index)
        if layer is None:
            return torch.zeros(0, dtype=torch.long)
        return torch.unique(layer.indices[layer.weights > 0])

    def penalty(self, memory: ProductKeyMemory) -> torch.Tensor | None:
        """Squared change of this layer's memory output on the retain tokens, per token, in MLP-output units.

        Only tokens that read a selected row can change; the rest contribute zero and are skipped.
        """
        layer = self.layers.get(memory.layer_index)
        selection = memory.selection
        if layer is None or selection is None:
            return None
        touched = ((selection.position[layer.indices] >= 0) & (layer.weights > 0)).any(dim=1)
        if not bool(touched.any()):
            return None
        output = self._output(memory, layer, touched)
        return (output - layer.reference[touched]).pow(2).sum() / (layer.indices.shape[0] * layer.scale)

    @staticmethod
    def _output(memory: ProductKeyMemory, layer: RetainLayer, rows: torch.Tensor) -> torch.Tensor:
        """The memory's output for the chosen retain tokens (a mask or indices; selected rows read from their
        trainable copy)."""
        indices, weights = layer.indices[rows], layer.weights[rows]
        shape = (1, indices.shape[0], memory.config.heads, -1)
        read = memory.read(Lookup(indices=indices.view(shape), weights=weights.view(shape)))[0]
        return memory.out(layer.gate[rows] * read)


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
    """The first `max_tokens` rows of the parts, in order, copied once (the rest is not touched)."""
    taken, count = [], 0
    for part in parts:
        if count >= max_tokens:
            break
        taken.append(part[: max_tokens - count])
        count += taken[-1].shape[0]
    return torch.cat(taken)


def _retain_layer(model: PreTrainedModel, memory: ProductKeyMemory, hidden: torch.Tensor) -> RetainLayer:
    """One memory layer's view of the retain tokens, `RETAIN_CHUNK` tokens at a time (lookups and the MLP
    on all 16k tokens at once would add about 500 MB to the process's peak)."""
    mlp = _mlp_of(model, memory)
    indices, weights, gates, squares = [], [], [], 0.0
    for chunk in hidden.split(RETAIN_CHUNK):
        found = memory.lookup(chunk[None])
        indices.append(found.indices.reshape(chunk.shape[0], -1))
        weights.append(found.weights.reshape(chunk.shape[0], -1))
        gates.append(F.silu(memory.gate(chunk)))
        squares += float(mlp(chunk).double().pow(2).sum())
    return RetainLayer(
        indices=torch.cat(indices),
        weights=torch.cat(weights),
        gate=torch.cat(gates),
        reference=torch.zeros_like(hidden),
        scale=max(squares / hidden.shape[0], 1e-12),
    )


def _mlp_of(model: PreTrainedModel, memory: ProductKeyMemory) -> torch.nn.Module:
    for module in model.modules():
        if getattr(module, "memory", None) is memory and hasattr(module, "mlp"):
            return module.mlp
    raise SmfdError(f"memory layer {memory.layer_index} is not attached beside an MLP")
