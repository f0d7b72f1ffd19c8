"""Prepared memory: the addressing and background statistics a new state starts from, kept per model.

A new state's memory is prepared on the model's own text: the queries are calibrated, the
addressing (query projection and keys) is healed and general text's reads are counted
(`smfd.learn.heal`). All of it needs the memories' inputs on every token of that text, a pass
through nearly the whole model that was most of a first start, yet the result depends only on
the model, the memory's shape, the healing settings and the text, never on the state. So it is
kept in the model cache under a key naming all of those, and smfd ships the embedded model's for
the default settings (`smfd/data/prepared/`). Value rows are not part of it: every state starts
them at zero, so the model is still exactly the base model. The memory's other parameters (the
gate and output projections) come from its seeded initialisation and are not kept.

Files are safetensors (never pickle), checked on load: the format and key they were written
under, a SHA-256 of the tensors, and each tensor's shape against the configured memory. A file
that fails is named in a warning and ignored; the memory is then prepared from the text again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from smfd.durable import atomic_write
from smfd.model.batch import packed
from smfd.model.memory import ProductKeyMemory
from smfd.model.slot_stats import BackgroundStats, background_from_tensors, background_to_tensors
from smfd.paths import builtin_file

log = structlog.get_logger("smfd.learn.prepared")

FORMAT = "smfd-prepared-memory-1"
# What calibration and healing change; everything else in a fresh memory comes from its seed.
ADDRESSING = ("query.weight", "keys", "query_shift", "query_scale")


@dataclass(frozen=True)
class PreparedMemory:
    """A prepared memory's addressing per layer, its background statistics and the healing report."""

    addressing: dict[int, dict[str, torch.Tensor]]
    background: dict[int, BackgroundStats]
    heal: dict | None  # smfd.learn.heal.HealReport as a dict; None when healing is off

    @classmethod
    def of(
        cls, memories: list[ProductKeyMemory], background: dict[int, BackgroundStats], heal: dict | None
    ) -> PreparedMemory:
        """The prepared state of `memories` as they are now (calibrated and healed, no value row trained)."""
        addressing = {}
        for memory in memories:
            state = memory.state_dict()
            addressing[memory.layer_index] = {name: state[name].detach().cpu().clone() for name in ADDRESSING}
        return cls(addressing, background, heal)

    def apply(self, memories: list[ProductKeyMemory]) -> None:
        """Load the addressing into freshly attached `memories` (shapes were checked when the file was read)."""
        for memory in memories:
            state = memory.state_dict()
            with torch.no_grad():
                for name, tensor in self.addressing[memory.layer_index].items():
                    state[name].copy_(tensor)


def prepared_key(model_digest: str, settings: dict, texts: dict[str, list[list[int]]]) -> str:
    """The key of a prepared memory: the model's SHA-256, the settings that shape it and its text's token ids.

    `settings`: the memory's shape, the healing settings and where the text came from (the fed
    length of a sampled sequence differs from a file's). The ids themselves are hashed, so text
    sampled again on another machine never meets a memory prepared on other text.
    """
    text_digests = {}
    for name, sequences in sorted(texts.items()):
        flat = packed(sequences, torch.int64)
        digest = hashlib.sha256(flat["lengths"].numpy().tobytes())
        digest.update(flat["ids"].numpy().tobytes())
        text_digests[name] = digest.hexdigest()
    identity = {"format": FORMAT, "model": model_digest, "settings": settings, "texts": text_digests}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def shipped_prepared() -> Path:
    """The folder of prepared memories shipped for the embedded model (read-only)."""
    return builtin_file("prepared")


class PreparedStore:
    """Prepared memories: read from `folder` or the shipped ones, written to `folder`."""

    def __init__(self, folder: Path | None, shipped: Path | None = None) -> None:
        self.folder = folder
        self.shipped = shipped_prepared() if shipped is None else shipped

    @staticmethod
    def path(key: str, folder: Path) -> Path:
        return folder / f"prepared-{key}.safetensors"

    def load(self, key: str, memories: list[ProductKeyMemory]) -> PreparedMemory | None:
        """The prepared memory kept under `key`, or None when none is kept (or the kept file fails its checks)."""
        for folder in [f for f in (self.folder, self.shipped) if f is not None]:
            path = self.path(key, folder)
            if path.is_file():
                prepared = _read(path, key, memories)
                if prepared is not None:
                    log.info("prepared_memory_kept", file=str(path))
                    return prepared
        return None

    def keep(self, key: str, prepared: PreparedMemory) -> None:
        """Write `prepared` under `key` to the store's folder (nothing when it has none)."""
        if self.folder is None:
            return
        tensors = _to_tensors(prepared)
        metadata = {
            "format": FORMAT,
            "key": key,
            "heal": json.dumps(prepared.heal),
            "tensors_sha256": tensors_digest(tensors),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(key, self.folder), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _to_tensors(prepared: PreparedMemory) -> dict[str, torch.Tensor]:
    tensors = {
        f"{layer}.{name}": t.contiguous() for layer, own in prepared.addressing.items() for name, t in own.items()
    }
    tensors.update(background_to_tensors(prepared.background))
    return tensors


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _read(path: Path, key: str, memories: list[ProductKeyMemory]) -> PreparedMemory | None:
    """The prepared memory in a kept file, or None (with a warning naming it) when the file fails a check."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
        heal = json.loads(metadata.get("heal", "null"))
    except (OSError, ValueError, SafetensorError) as exc:
        log.warning("prepared_memory_rejected", file=str(path), reason=f"unreadable: {exc}")
        return None
    problem = _problem(metadata, key, tensors, memories)
    if problem is not None:
        log.warning("prepared_memory_rejected", file=str(path), reason=problem)
        return None
    addressing = {m.layer_index: {name: tensors[f"{m.layer_index}.{name}"] for name in ADDRESSING} for m in memories}
    return PreparedMemory(addressing, background_from_tensors(tensors), heal)


def _problem(
    metadata: dict, key: str, tensors: dict[str, torch.Tensor], memories: list[ProductKeyMemory]
) -> str | None:
    if metadata.get("format") != FORMAT or metadata.get("key") != key:
        return f"written for another model, memory or text (format {metadata.get('format')!r}, key {metadata.get('key')!r})"
    if tensors_digest(tensors) != metadata.get("tensors_sha256"):
        return "the tensors do not match their SHA-256"
    for memory in memories:
        state = memory.state_dict()
        n_slots = memory.config.n_slots
        expected = {f"{memory.layer_index}.{name}": tuple(state[name].shape) for name in ADDRESSING}
        expected |= {f"bg.{memory.layer_index}.{name}": (n_slots,) for name in ("counts", "doc_freq")}
        expected[f"bg.{memory.layer_index}.n_batches"] = (1,)
        for name, shape in expected.items():
            if name not in tensors:
                return f"has no tensor {name}"
            if tuple(tensors[name].shape) != shape:
                return f"tensor {name} has shape {tuple(tensors[name].shape)}, the memory needs {shape}"
    return None
