"""Attach product-key memory layers beside the MLPs of chosen decoder layers of a pretrained model.

The attach is function-preserving: value rows start at zero, so the retrofitted model produces
exactly the base model's logits until the first update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from transformers import PreTrainedModel

from smfd.config import MemorySection
from smfd.errors import SmfdError
from smfd.model.memory import MemoryAugmentedMLP, ProductKeyMemory


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's stack of decoder blocks (Llama, Qwen2, Mistral and friends keep it at `model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        arch = type(model).__name__
        raise SmfdError(
            f"cannot retrofit {arch}: no decoder layer stack at model.model.layers (decoder-only models only)"
        )
    return layers


def attach_memory(model: PreTrainedModel, config: MemorySection) -> list[ProductKeyMemory]:
    """Wrap each chosen layer's MLP so it adds a memory read; returns the memory modules in layer order."""
    layers = decoder_layers(model)
    hidden_size = int(model.config.hidden_size)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    memories = []
    for index in config.layer_indices(len(layers)):
        block = layers[index]
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            raise SmfdError(
                f"cannot retrofit layer {index} of {type(model).__name__}: the block has no `mlp` submodule"
            )
        if isinstance(mlp, MemoryAugmentedMLP):
            raise SmfdError(f"layer {index} already has a memory attached")
        memory = ProductKeyMemory(hidden_size, config, index).to(device=device, dtype=dtype)
        block.mlp = MemoryAugmentedMLP(mlp, memory)
        memories.append(memory)
    return memories


@contextlib.contextmanager
def memory_switched(memories: list[ProductKeyMemory], enabled: bool) -> Iterator[None]:
    """Every memory on (or off) while inside; each back to its own state after."""
    previous = [m.enabled for m in memories]
    for memory in memories:
        memory.enabled = enabled
    try:
        yield
    finally:
        for memory, state in zip(memories, previous):
            memory.enabled = state


def memory_bypassed(memories: list[ProductKeyMemory]) -> contextlib.AbstractContextManager[None]:
    """Run the frozen base model: every memory read returns zero while inside."""
    return memory_switched(memories, False)
