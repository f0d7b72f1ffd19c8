"""Text sampled from a model, kept per model so that a new state need not sample it again.

Sampling the general text and the statements of fact is most of a first start (about 530 of
605 s on a 2-core CPU), yet what it yields depends only on the model and the recipe (prompts,
count, length, seed), never on the state. So the sampled token ids are kept in the model cache
under a key naming both, and smfd ships them for the embedded model (`smfd/data/samples/`). A
state created from kept ids runs them once through the blocks below the memories for the inputs
that sampling would have collected on its way (`smfd.learn.heal.memory_inputs`): several times
cheaper than generating them one token at a time.

Kept files are safetensors (never pickle) and are checked on load: the key they were written
under, lengths that add up, ids inside the vocabulary and a SHA-256 of the ids. A file that fails
is named in a warning and ignored; the text is sampled again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from smfd.durable import atomic_write
from smfd.learn.heal import memory_inputs
from smfd.learn.sampling import SAMPLE_BATCH, SAMPLE_SEED, SAMPLE_TEMPERATURE, SAMPLE_TOP_P, SampledText, sample_text
from smfd.model.batch import packed, unpacked
from smfd.model.memory_model import MemoryModel
from smfd.model.retrofit import memory_bypassed
from smfd.paths import builtin_file

log = structlog.get_logger("smfd.learn.kept_text")

FORMAT = "smfd-sampled-text-1"


@dataclass(frozen=True)
class SampleRecipe:
    """What `sample_text` is asked for; with the model's digest it names the text it yields."""

    prompts: tuple[str, ...]
    n_sequences: int
    max_new_tokens: int

    def key(self, model_digest: str) -> str:
        identity = {
            "format": FORMAT,
            "model": model_digest,
            **asdict(self),
            "batch": SAMPLE_BATCH,
            "seed": SAMPLE_SEED,
            "top_p": SAMPLE_TOP_P,
            "temperature": SAMPLE_TEMPERATURE,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def shipped_samples() -> Path:
    """The folder of sampled text shipped for the embedded model (read-only)."""
    return builtin_file("samples")


class SampleStore:
    """Sampled token ids of one model: read from `folder` or the shipped samples, written to `folder`."""

    def __init__(self, model_digest: str, folder: Path | None, shipped: Path | None = None) -> None:
        self.model_digest = model_digest
        self.folder = folder
        self.shipped = shipped_samples() if shipped is None else shipped

    def path(self, recipe: SampleRecipe, folder: Path) -> Path:
        return folder / f"sampled-{recipe.key(self.model_digest)}.safetensors"

    def sequences(self, recipe: SampleRecipe, vocab_size: int) -> list[list[int]] | None:
        """The kept sequences for `recipe`, or None when none are kept (or the kept file fails its checks)."""
        for folder in [f for f in (self.folder, self.shipped) if f is not None]:
            path = self.path(recipe, folder)
            if path.is_file():
                kept = _read(path, recipe.key(self.model_digest), recipe.n_sequences, vocab_size)
                if kept is not None:
                    log.info("sampled_text_kept", file=str(path), sequences=len(kept))
                    return kept
        return None

    def keep(self, recipe: SampleRecipe, sequences: list[list[int]]) -> None:
        """Write `sequences` for `recipe` to the store's folder (nothing when it has none)."""
        if self.folder is None or not sequences:
            return
        tensors = packed(sequences, torch.int32)
        metadata = {
            "format": FORMAT,
            "key": recipe.key(self.model_digest),
            "model": self.model_digest,
            "recipe": json.dumps(asdict(recipe)),
            "ids_sha256": _ids_digest(tensors["ids"]),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(recipe, self.folder)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def store_for(model: MemoryModel, folder: Path | None) -> SampleStore | None:
    """The sample store of `model` (None for a model built in memory, which has no file to name it by)."""
    return SampleStore(model.source.digest, folder) if model.source is not None else None


def kept_sequences(model: MemoryModel, recipe: SampleRecipe, store: SampleStore | None) -> list[list[int]] | None:
    """The token ids kept for `recipe`, or None when they must be sampled."""
    return store.sequences(recipe, len(model.tokenizer)) if store is not None else None


def model_sequences(model: MemoryModel, recipe: SampleRecipe, store: SampleStore | None) -> list[list[int]]:
    """The token ids `recipe` samples from the frozen model: kept ones if the store has them, else sampled and kept."""
    kept = kept_sequences(model, recipe, store)
    if kept is not None:
        return kept
    return _sample(model, recipe, store).sequences


def model_text(
    model: MemoryModel, recipe: SampleRecipe, store: SampleStore | None, kept: list[list[int]] | None = None
) -> SampledText:
    """`model_sequences` with the memories' inputs on every token: from sampling, or one pass over kept ids.

    `kept`: the ids `kept_sequences` already gave for `recipe` (read from the store when None).
    """
    kept = kept if kept is not None else kept_sequences(model, recipe, store)
    if kept is None:
        return _sample(model, recipe, store)
    with memory_bypassed(model.memories):
        inputs = memory_inputs(model.model, model.memories, kept)
    fed = _fed_lengths(kept, [len(p) for p in _prompt_ids(model, recipe)])
    return SampledText(kept, {layer: [h[:n] for h, n in zip(rows, fed)] for layer, rows in inputs.items()})


def _prompt_ids(model: MemoryModel, recipe: SampleRecipe) -> list[list[int]]:
    """Each sequence's prompt as the sampler encoded it (prompts cycled in order)."""
    encoded = [model.tokenizer(p, add_special_tokens=False).input_ids for p in recipe.prompts]
    return [encoded[i % len(encoded)] for i in range(recipe.n_sequences)]


def _fed_lengths(sequences: list[list[int]], prompt_lengths: list[int]) -> list[int]:
    """How many of each sequence's tokens the sampler fed the model, so that a state made from kept text holds
    the same rows as one made while sampling (and heals on the same draws).

    In each batch of `SAMPLE_BATCH` rows, `generate` runs as many steps as its longest continuation
    and never feeds the token sampled at the last step: the rows that ran to that step miss their
    last token; rows that ended earlier were fed whole.
    """
    fed = []
    for start in range(0, len(sequences), SAMPLE_BATCH):
        batch = range(start, min(start + SAMPLE_BATCH, len(sequences)))
        steps = max(len(sequences[i]) - prompt_lengths[i] for i in batch)
        fed += [len(sequences[i]) - (len(sequences[i]) - prompt_lengths[i] == steps) for i in batch]
    return fed


def _sample(model: MemoryModel, recipe: SampleRecipe, store: SampleStore | None) -> SampledText:
    sampled = sample_text(
        model.model, model.tokenizer, model.memories, list(recipe.prompts), recipe.n_sequences, recipe.max_new_tokens
    )
    if store is not None:
        store.keep(recipe, sampled.sequences)
    return sampled


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()


def _read(path: Path, key: str, n_sequences: int, vocab_size: int) -> list[list[int]] | None:
    """The sequences in a kept file, or None (with a warning naming it) when the file fails a check."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, ValueError, SafetensorError) as exc:
        log.warning("sampled_text_rejected", file=str(path), reason=f"unreadable: {exc}")
        return None
    ids, lengths = tensors.get("ids"), tensors.get("lengths")
    problem = _problem(metadata, key, ids, lengths, n_sequences, vocab_size)
    if problem is not None:
        log.warning("sampled_text_rejected", file=str(path), reason=problem)
        return None
    return unpacked(ids, lengths)


def _problem(
    metadata: dict,
    key: str,
    ids: torch.Tensor | None,
    lengths: torch.Tensor | None,
    n_sequences: int,
    vocab_size: int,
) -> str | None:
    if metadata.get("format") != FORMAT or metadata.get("key") != key:
        return f"written for another model or recipe (format {metadata.get('format')!r}, key {metadata.get('key')!r})"
    if ids is None or lengths is None or ids.dim() != 1 or lengths.dim() != 1:
        return "needs one-dimensional 'ids' and 'lengths' tensors"
    if lengths.numel() != n_sequences:
        return f"holds {lengths.numel()} sequences, the recipe {n_sequences}"
    if int(lengths.min()) <= 0 or int(lengths.sum()) != ids.numel():
        return f"lengths (sum {int(lengths.sum())}) do not split the {ids.numel()} ids into non-empty sequences"
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        return f"token ids outside the vocabulary of {vocab_size}"
    if _ids_digest(ids) != metadata.get("ids_sha256"):
        return "the ids do not match their SHA-256"
    return None
