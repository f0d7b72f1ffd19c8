"""MemoryModel: a frozen base model with product-key memory attached, and its memory state.

This is the one object that owns the model. The learner thread holds it in the daemon; the
benchmark and the CLI hold one each.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smfd.config import MemorySection
from smfd.errors import SmfdError
from smfd.model.loading import ModelSource, load_base_model
from smfd.model.memory import ProductKeyMemory
from smfd.model.retrofit import attach_memory, memory_bypassed
from smfd.model.sparse_rows import SparseRows

VALUE_KEYS = ("values.slot_ids", "values.rows")
FLOORS_KEY = "values.floors"


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SmfdError("model.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class MemoryModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    memories: list[ProductKeyMemory]
    memory_config: MemorySection
    source: ModelSource | None = None

    @classmethod
    def load(
        cls,
        model_path: str | Path,
        memory_config: MemorySection,
        cache_dir: Path | None = None,
        device: str = "auto",
    ) -> MemoryModel:
        model, tokenizer, source = load_base_model(model_path, cache_dir)
        model.to(pick_device(device))
        return cls.attach(model, tokenizer, memory_config, source)

    @classmethod
    def attach(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        memory_config: MemorySection,
        source: ModelSource | None = None,
    ) -> MemoryModel:
        memories = attach_memory(model, memory_config)
        return cls(model, tokenizer, memories, memory_config, source)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def base(self) -> contextlib.AbstractContextManager[None]:
        """Inside this context the model is exactly the frozen base model."""
        return memory_bypassed(self.memories)

    def memory_state(self) -> dict[str, torch.Tensor]:
        """Every memory tensor, keyed `<layer>.<name>` (safetensors-ready, on CPU): the addressing
        parameters and buffers, and the value table's written rows as `values.slot_ids` / `values.rows` / `values.floors`."""
        state = {}
        for m in self.memories:
            state.update(
                {f"{m.layer_index}.{name}": t.detach().cpu().contiguous() for name, t in m.state_dict().items()}
            )
            state.update({f"{m.layer_index}.values.{name}": t for name, t in m.values.to_tensors().items()})
        return state

    def load_memory_state(self, state: dict[str, torch.Tensor], source: str = "memory state") -> None:
        """Strict load: every key present, no extra key, same shapes; `source` names the file in errors."""
        expected = {f"{m.layer_index}.{name}" for m in self.memories for name in (*m.state_dict(), *VALUE_KEYS)}
        optional = {f"{m.layer_index}.{FLOORS_KEY}" for m in self.memories}  # absent in states before read floors
        missing, extra = expected - set(state), set(state) - expected - optional
        if missing or extra:
            raise SmfdError(
                f"{source} does not match the configured memory (missing {sorted(missing)[:4]}, "
                f"unexpected {sorted(extra)[:4]}): {_mismatch_hint(missing, extra)}"
            )
        for memory in self.memories:
            prefix = f"{memory.layer_index}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            values = {name: own.pop(f"values.{name}") for name in ("slot_ids", "rows")}
            if FLOORS_KEY in own:
                values["floors"] = own.pop(FLOORS_KEY)
            for name, tensor in memory.state_dict().items():
                if own[name].shape != tensor.shape:
                    raise SmfdError(
                        f"memory tensor {prefix}{name} has shape {tuple(own[name].shape)}, "
                        f"expected {tuple(tensor.shape)} (in {source})"
                    )
            memory.load_state_dict(own, strict=True)
            memory.values.load_tensors(values, source)

    def values(self) -> dict[int, SparseRows]:
        """Each memory layer's value table."""
        return {m.layer_index: m.values for m in self.memories}

    def describe(self) -> dict[str, object]:
        n_memory = sum(p.numel() for m in self.memories for p in m.parameters())
        n_base = sum(p.numel() for p in self.model.parameters()) - n_memory
        n_value_params = sum(m.values.n_slots * m.values.width for m in self.memories)  # all rows, held or not
        return {
            "model": self.source.display_name if self.source else type(self.model).__name__,
            "base_parameters": n_base,
            "memory_parameters": n_memory + n_value_params,
            "memory": self.memory_config.shape(),
        }


def _mismatch_hint(missing: set[str], extra: set[str]) -> str:
    """The likely cause of a memory-state mismatch, so the user knows what to change."""
    names = {key.split(".", 1)[1] for key in missing | extra}
    if names and names <= {"query_shift", "query_scale"}:
        return (
            "the state was saved without query calibration (written by an older smfd); "
            "start this state directory afresh"
        )
    return "was it saved with other memory.layers?"
