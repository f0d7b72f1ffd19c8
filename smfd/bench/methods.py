"""The trainers a method spec (smfd.bench.specs) builds, and the background statistics they share.

SMF learns each document through `smfd.learn.lesson`, the daemon's own path; LoRA and full
finetuning train the same chunks and sentences by next-token prediction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smfd.bench.data import Document, KnownFact
from smfd.bench.forgetting import forgetting_paths
from smfd.bench.reach import probe_reach
from smfd.bench.specs import MethodSpec, smf_configs
from smfd.config import HealSection
from smfd.learn.heal import prepare_memory
from smfd.learn.interference import RetainSet, fact_recipe, retain_text
from smfd.learn.kept_text import model_sequences, store_for
from smfd.learn.lesson import LearnSettings, build_lesson, lesson_batches
from smfd.learn.prepared import PreparedMemory, PreparedStore, prepared_key
from smfd.learn.surprise import sequence_surprise
from smfd.learn.updater import SparseUpdater, StepResult
from smfd.model.batch import TokenBatch, encode, epoch_batches
from smfd.model.loading import ModelSource
from smfd.model.memory_model import MemoryModel
from smfd.model.slot_stats import BackgroundStats, memory_fill
from smfd.store.patches import reused_rows
from smfd.text.restate import training_texts

if TYPE_CHECKING:  # peft is imported only by workers that train LoRA or full finetuning
    from smfd.bench.baselines import FullFinetuneTrainer, LoraTrainer

# ---------------------------------------------------------------- the prepared memory (kept per model and text)


def self_facts(memory_model: MemoryModel, n_sequences: int, background: BackgroundSource) -> list[list[int]]:
    """The base model's own statements of fact (`smfd.learn.interference.fact_recipe`), as the daemon gets them:
    kept per model (here in the benchmark's cache, or shipped for the embedded model), else sampled."""
    if n_sequences == 0:
        return []
    return model_sequences(memory_model, fact_recipe(n_sequences), store_for(memory_model, background.cache_dir))


def prepared_background(
    memory_model: MemoryModel, facts: list[list[int]], background: BackgroundSource, heal: HealSection
) -> tuple[dict[int, BackgroundStats], bool]:
    """Calibrate and heal the memory's addressing and count background reads, or load all of it when it is kept.

    Kept through the daemon's own store (`smfd.learn.prepared`: safetensors, checked on load), under
    a key naming the model, the memory's shape, the healing and the text, so specs that share them
    prepare once. Returns (background statistics, whether they were kept).
    """
    store = PreparedStore(background.cache_dir)
    settings = {
        "memory": memory_model.memory_config.shape(),
        "heal": heal.model_dump(mode="json"),
        "text": background.text,
    }
    key = prepared_key(background.model.digest, settings, {"general": background.sequences, "facts": facts})
    prepared = store.load(key, memory_model.memories)
    if prepared is not None:
        prepared.apply(memory_model.memories)
        return prepared.background, True
    sequences = background.sequences + facts
    healed, stats = prepare_memory(memory_model.model, memory_model.memories, sequences, heal, background.progress)
    store.keep(key, PreparedMemory.of(memory_model.memories, stats, asdict(healed) if healed is not None else None))
    return stats, False


# ---------------------------------------------------------------- learners


class Learning(Protocol):
    """What the benchmark drives: a document's batches, optimizer steps, a hook after each document, the model to evaluate."""

    def document_batches(
        self, document: str, chunks: list[str], passes: int, restate: bool, seed: int
    ) -> list[TokenBatch]: ...

    def step(self, batch: TokenBatch) -> StepResult: ...

    def begin_document(self, batches: list[TokenBatch]) -> None: ...

    def end_document(self) -> int: ...

    def eval_model(self) -> PreTrainedModel: ...

    def surprise(self, sequences: list[list[int]]) -> list[torch.Tensor] | None: ...

    def memory(self) -> dict[str, Any]: ...

    def reach(self, documents: list[Document]) -> dict[str, Any]: ...

    def forgetting(self, lost: list[KnownFact], kept: list[KnownFact]) -> dict[str, Any]: ...

    def describe(self) -> dict[str, Any]: ...


class SmfLearning:
    """Sparse memory finetuning as the daemon runs it: the same lesson (`smfd.learn.lesson`), `SparseUpdater`
    steps, one update per document."""

    def __init__(
        self,
        memory_model: MemoryModel,
        background: dict[int, BackgroundStats],
        settings: LearnSettings,
        retain: RetainSet | None,
        heal: HealSection,
    ) -> None:
        self.memory_model = memory_model
        self.settings = settings
        self.heal = heal
        self.batch_size = settings.train.batch_size
        self.updater = SparseUpdater(memory_model.model, memory_model.memories, background, settings.train, retain)
        self.background = background
        self.rows_updated = 0
        self.sequences_trained = 0
        self.row_retrainings = 0  # rows an update trained that an earlier update had trained
        self.times_trained = {
            m.layer_index: torch.zeros(m.values.n_slots, dtype=torch.int32) for m in memory_model.memories
        }

    def document_batches(
        self, document: str, chunks: list[str], passes: int, restate: bool, seed: int
    ) -> list[TokenBatch]:
        """The daemon's lesson for this document (distilled when the settings say so)."""
        settings = self.settings.with_train(passes=passes, restate=restate)
        lesson = build_lesson(self.memory_model, settings, document, chunks, self.batch_size, seed=seed)
        self.sequences_trained += len(lesson.sequences)
        mm = self.memory_model
        return lesson_batches(lesson, self.batch_size, passes, mm.tokenizer.pad_token_id, seed, mm.device)

    def step(self, batch: TokenBatch) -> StepResult:
        return self.updater.step(batch)

    def begin_document(self, batches: list[TokenBatch]) -> None:
        """Selection scope "update" ranks slots once over the whole document (as the daemon does)."""
        self.updater.plan_update(batches)

    def end_document(self) -> int:
        """Close the document's update (as the daemon does per update); returns the rows it changed."""
        patches = self.updater.finish_update()
        for patch in patches:
            self.times_trained[patch.layer][patch.slot_ids] += 1
        self.row_retrainings += reused_rows(patches)
        rows = sum(p.n_rows for p in patches)
        self.rows_updated += rows
        return rows

    def eval_model(self) -> PreTrainedModel:
        return self.memory_model.model

    def surprise(self, sequences: list[list[int]]) -> list[torch.Tensor] | None:
        """Per-token surprise under the frozen base, only for the rule that weights reads by it (timing batch)."""
        if self.settings.train.selection != "surprise-kl":
            return None
        mm = self.memory_model
        return sequence_surprise(
            mm.model, mm.memories, sequences, mm.tokenizer.pad_token_id, self.batch_size, mm.device
        )

    def memory(self) -> dict[str, Any]:
        """How full the memory is (smfd.model.slot_stats.MemoryFill) and how often rows were trained again."""
        fill = memory_fill(self.memory_model.values(), self.background, self.row_retrainings)
        counts = torch.cat(list(self.times_trained.values()))
        return {**fill.as_dict(), "rows_trained_more_than_once": int((counts > 1).sum())}

    def reach(self, documents: list[Document]) -> dict[str, Any]:
        """How much of each probe's memory read lands on trained rows (smfd.bench.reach)."""
        return probe_reach(self.memory_model, documents)

    def forgetting(self, lost: list[KnownFact], kept: list[KnownFact]) -> dict[str, Any]:
        """Where the memory lost the known facts it lost (smfd.bench.forgetting)."""
        return forgetting_paths(self.memory_model, lost, kept)

    def rows_changed(self) -> int:
        """Value rows that differ from their zero initialisation now: the memory this run actually used."""
        return memory_fill(self.memory_model.values(), self.background).rows_trained

    def describe(self) -> dict[str, Any]:
        info = self.memory_model.describe()
        return {
            "method": "smf",
            "rule": self.settings.train.selection,
            "update": self.settings.train.model_dump(mode="json", exclude={"distill"}),
            "distill": self.settings.train.distill.model_dump(mode="json"),
            "heal": self.heal.model_dump(mode="json"),
            "memory": info["memory"],
            "memory_parameters": info["memory_parameters"],
            "optimizer": "SGD on the selected value rows only (no momentum, no weight decay)",
            "rows_updated": self.rows_updated,
            "rows_changed": self.rows_changed(),
            "sequences_trained": self.sequences_trained,
        }


class AdamWLearning:
    """LoRA or full finetuning: their trainers take the same batches; documents need no closing."""

    def __init__(
        self,
        trainer: LoraTrainer | FullFinetuneTrainer,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        seq_len: int,
        device: torch.device,
    ) -> None:
        self.trainer = trainer
        self.tokenizer, self.batch_size, self.seq_len, self.device = tokenizer, batch_size, seq_len, device

    def document_batches(
        self, document: str, chunks: list[str], passes: int, restate: bool, seed: int
    ) -> list[TokenBatch]:
        """Next-token training on the chunks (and their sentences): the dense baselines' recipe."""
        sequences = encode(self.tokenizer, training_texts(chunks, restate), self.seq_len)
        batches = epoch_batches(sequences, self.batch_size, passes, self.tokenizer.pad_token_id, seed=seed)
        return [b.to(self.device) for b in batches]

    def step(self, batch: TokenBatch) -> StepResult:
        return self.trainer.step(batch)

    def begin_document(self, batches: list[TokenBatch]) -> None:
        return None

    def end_document(self) -> int:
        return 0

    def eval_model(self) -> PreTrainedModel:
        return self.trainer.model  # type: ignore[return-value]

    def surprise(self, sequences: list[list[int]]) -> list[torch.Tensor] | None:
        return None

    def memory(self) -> dict[str, Any]:
        return {}  # dense training has no memory table to fill

    def reach(self, documents: list[Document]) -> dict[str, Any]:
        return {}  # no memory rows to reach

    def forgetting(self, lost: list[KnownFact], kept: list[KnownFact]) -> dict[str, Any]:
        return {}  # no memory to silence

    def describe(self) -> dict[str, Any]:
        return {**self.trainer.describe(), "optimizer": "AdamW"}


@dataclass(frozen=True)
class BackgroundSource:
    """Where SMF methods get their background statistics: general text, where it came from, a folder to keep
    prepared memories in."""

    sequences: list[list[int]]
    text: str  # where the general text came from ("file:NAME"), part of the prepared memory's key
    cache_dir: Path
    model: ModelSource
    progress: bool = True


def build_learning(
    spec: MethodSpec,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    defaults: LearnSettings,
    background: BackgroundSource,
) -> tuple[Learning, dict[str, Any]]:
    """The method's trainer around a freshly loaded base model; also setup facts (background time and source)."""
    o = spec.options
    if spec.family == "smf":
        settings, memory_config, heal = smf_configs(spec, defaults)
        update = settings.train
        memory_model = MemoryModel.attach(model, tokenizer, memory_config, background.model)
        facts = self_facts(memory_model, memory_config.fact_sequences, background)
        stats, cached = prepared_background(memory_model, facts, background, heal)
        retain = None
        if update.retain_weight > 0:  # the daemon's rule: the model's statements of fact, then the general text
            retain = RetainSet.collect(
                memory_model.model,
                memory_model.memories,
                retain_text(facts, background.sequences),
                update.retain_tokens,
            )
        setup = {"background_cached": cached, "fact_sequences": len(facts)}
        return SmfLearning(memory_model, stats, settings, retain, heal), setup
    from smfd.bench.baselines import FullFinetuneTrainer, LoraTrainer

    adamw = {key: o[key] for key in ("lr", "weight_decay") if key in o}
    device = next(model.parameters()).device
    plain = (tokenizer, defaults.train.batch_size, defaults.train.seq_len, device)
    if spec.name == "lora":
        lora = {key: o[key] for key in ("rank", "alpha") if key in o}
        return AdamWLearning(LoraTrainer(model, **lora, **adamw), *plain), {}
    return AdamWLearning(FullFinetuneTrainer(model, **adamw), *plain), {}
