"""What one update trains on for one document: the single path shared by the daemon and the benchmark.

A lesson is the document's training sequences with what the update needs beside them: each
token's surprise (for slot ranking) and, with context distillation on, the teacher's targets.
`smfd.learn.learner.Learner` and the benchmark's SMF methods both call `build_lesson` and
`lesson_batches`, so the benchmark measures exactly what the daemon learns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
import torch

from smfd.config import ChunkingSection, SmfdConfig, SurpriseSection, TrainSection
from smfd.learn.distill import CONTEXT_SEPARATOR, build_queries, teacher_targets
from smfd.learn.surprise import sequence_surprise
from smfd.model.batch import TeacherTarget, TokenBatch, encode, epoch_batches
from smfd.model.memory_model import MemoryModel
from smfd.text.restate import training_texts

log = structlog.get_logger("smfd.learn.lesson")

# Per-token surprise (NLL under the frozen base) of each token sequence, keyed by its token ids.
TokenSurprise = dict[tuple[int, ...], torch.Tensor]


@dataclass(frozen=True)
class LearnSettings:
    """A typed view of the config sections an update reads; every default lives in the schema."""

    train: TrainSection = field(default_factory=TrainSection)
    chunking: ChunkingSection = field(default_factory=ChunkingSection)
    surprise: SurpriseSection = field(default_factory=SurpriseSection)

    @classmethod
    def from_config(cls, cfg: SmfdConfig) -> LearnSettings:
        return cls(cfg.train, cfg.chunking, cfg.surprise)

    def with_train(self, **changes: Any) -> LearnSettings:
        """These settings with some train keys changed, validated by the schema (distill: a dict of its keys)."""
        data = self.train.model_dump()
        if "distill" in changes:
            changes["distill"] = {**data["distill"], **changes["distill"]}
        return replace(self, train=TrainSection.model_validate({**data, **changes}))


@dataclass
class Lesson:
    """A document's training sequences; `surprise` and `teacher` are per sequence, or None when unused."""

    sequences: list[list[int]]
    surprise: list[torch.Tensor] | None
    teacher: list[TeacherTarget] | None

    @property
    def distilled(self) -> bool:
        return self.teacher is not None


def teacher_contexts(
    memory_model: MemoryModel, document: str, chunks: list[str], max_tokens: int
) -> list[tuple[str, list[str]]]:
    """(teacher context, chunks taught under it): the whole document when it fits the teacher's
    context budget, else each chunk on its own (a chunk carries its document's title when it fits)."""
    if len(memory_model.tokenizer(document + CONTEXT_SEPARATOR, add_special_tokens=False).input_ids) <= max_tokens:
        return [(document, chunks)]
    log.info("distill_by_chunk", reason=f"document longer than max_context_tokens={max_tokens}", chunks=len(chunks))
    return [(chunk, [chunk]) for chunk in chunks]


def build_lesson(
    memory_model: MemoryModel,
    settings: LearnSettings,
    document: str,
    chunks: list[str],
    batch_size: int,
    seed: int = 0,
    scored: TokenSurprise | None = None,
) -> Lesson:
    """The training sequences of `chunks` (parts of `document`), with surprise and teacher targets.

    With distillation on, every training text (chunks, their sentences, and the queries built
    from them) gets the teacher's targets under the document, and slots are ranked by how much
    the document moves each prediction. A document that yields no query is learned by
    next-token training (logged). `scored` holds surprise already computed for some sequences.
    """
    wants_surprise = settings.train.selection == "surprise-kl"
    if settings.train.distill.enabled:
        rng = random.Random(seed)
        groups = [
            (context, part, build_queries(part, settings.train.distill, rng))
            for context, part in teacher_contexts(
                memory_model, document, chunks, settings.train.distill.max_context_tokens
            )
        ]
        if any(queries for _, _, queries in groups):
            return _distilled_lesson(memory_model, settings, groups, batch_size, wants_surprise)
        log.info("distill_skipped", reason="no sentence long enough to build a query from; next-token training")
    sequences = encode(memory_model.tokenizer, training_texts(chunks, settings.train.restate), settings.train.seq_len)
    surprise = _surprise(memory_model, sequences, batch_size, scored) if wants_surprise else None
    return Lesson(sequences, surprise, None)


def _distilled_lesson(
    memory_model: MemoryModel,
    settings: LearnSettings,
    groups: list[tuple[str, list[str], list[str]]],
    batch_size: int,
    wants_surprise: bool,
) -> Lesson:
    sequences: list[list[int]] = []
    teacher: list[TeacherTarget] = []
    mm = memory_model
    for context, part, queries in groups:
        seqs = encode(mm.tokenizer, training_texts(part, settings.train.restate) + queries, settings.train.seq_len)
        targets = teacher_targets(
            mm.model, mm.tokenizer, mm.memories, context, seqs, settings.train.distill, batch_size, mm.device
        )
        kept = [
            (seq, target) for seq, target in zip(seqs, targets) if bool(target.trained.any())
        ]  # else nothing to learn
        sequences += [seq for seq, _ in kept]
        teacher += [target for _, target in kept]
    if not sequences:
        log.info("distill_nothing_to_learn", reason="the document moves no prediction of its own text")
        return Lesson([], None, None)
    return Lesson(sequences, [t.shift for t in teacher] if wants_surprise else None, teacher)


def _surprise(
    memory_model: MemoryModel, sequences: list[list[int]], batch_size: int, scored: TokenSurprise | None
) -> list[torch.Tensor]:
    """Per-token surprise of each sequence, reusing `scored` where it has the sequence already."""
    known = scored or {}
    todo = list(dict.fromkeys(tuple(s) for s in sequences if tuple(s) not in known))
    mm = memory_model
    fresh = dict(
        zip(
            todo,
            sequence_surprise(
                mm.model, mm.memories, [list(s) for s in todo], mm.tokenizer.pad_token_id, batch_size, mm.device
            ),
        )
    )
    return [known[tuple(s)] if tuple(s) in known else fresh[tuple(s)] for s in sequences]


def lesson_batches(
    lesson: Lesson, batch_size: int, passes: int, pad_id: int, seed: int, device: torch.device
) -> list[TokenBatch]:
    """The lesson's `passes` shuffled passes, as batches on `device`."""
    batches = epoch_batches(
        lesson.sequences, batch_size, passes, pad_id, seed=seed, surprise=lesson.surprise, teacher=lesson.teacher
    )
    return [batch.to(device) for batch in batches]
