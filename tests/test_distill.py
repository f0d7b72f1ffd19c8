"""Context distillation: what a user relies on is that the memory learns what the model answers
with the document in front of it, from queries that never invent facts, through the one path
the daemon and the benchmark share."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch
from engine_settings import learn_settings, train_section

from smfd.bench.methods import SmfLearning
from smfd.config import DistillSection, HealSection
from smfd.ingest.journal import Journal
from smfd.learn.distill import CONTEXT_SEPARATOR, build_queries, teacher_targets
from smfd.learn.learner import Learner
from smfd.learn.lesson import build_lesson, lesson_batches, teacher_contexts
from smfd.learn.updater import lesson_loss
from smfd.model.batch import encode
from smfd.model.memory_model import MemoryModel
from smfd.store.checkpoint import CheckpointStore

DOCUMENT = (
    "Harbour news\n\n"
    "The harbour bridge was painted bright orange by Zelda Quint in 2019. "
    "The paint came from a small factory near the old fishing port. "
    "Zelda Quint later opened a gallery of bridge paintings beside the lighthouse."
)
SETTINGS = learn_settings(
    train_section(
        selection="surprise-kl",
        top_t=16,
        lr=0.05,
        passes=2,
        batch_size=2,
        seq_len=48,
        distill=DistillSection(enabled=True, min_shift=0.0),
    ),
    chunk_tokens=48,
)


def test_queries_only_drop_or_reorder_the_documents_own_words():
    config = DistillSection(dropped_variants=2, shuffled_variants=1, drop_rate=0.3)
    queries = build_queries([DOCUMENT], config, random.Random(0))
    words = set(DOCUMENT.split())
    assert queries, "a document of three sentences yields queries"
    for query in queries:
        assert set(query.split()) <= words, f"query invents words: {query!r}"
    # Each sentence appears behind another one exactly `shuffled_variants` times.
    assert sum(q.count("Zelda Quint later opened") for q in queries) >= config.shuffled_variants
    assert build_queries([DOCUMENT], config, random.Random(0)) == queries  # deterministic for a seed


def test_cached_teacher_context_gives_the_full_prompts_distribution(tiny_memory_model: MemoryModel):
    mm = tiny_memory_model
    queries = encode(mm.tokenizer, ["The harbour bridge was painted", "Zelda Quint opened a gallery"], 32)
    config = DistillSection(top_k=5)
    targets = teacher_targets(mm.model, mm.tokenizer, mm.memories, DOCUMENT, queries, config, 2, mm.device)
    context = mm.tokenizer(DOCUMENT + CONTEXT_SEPARATOR, add_special_tokens=False).input_ids
    for query, target in zip(queries, targets):
        with torch.no_grad():
            full = mm.model(input_ids=torch.tensor([context + query])).logits.float().log_softmax(-1)[0]
        expected = full[len(context) : len(context) + len(query) - 1].topk(5, dim=-1)
        assert torch.equal(target.ids[1:], expected.indices)
        assert torch.allclose(target.logprobs[1:], expected.values, atol=1e-4)
        assert target.shift[0] == 0 and not target.trained[0]


def test_a_distilled_update_moves_the_student_toward_the_teacher(tiny_memory_model, background):
    settings = SETTINGS.with_train(lr=0.002, passes=4)
    learning = SmfLearning(tiny_memory_model, background, settings, None, HealSection())
    batches = learning.document_batches(DOCUMENT, [DOCUMENT], settings.train.passes, True, seed=0)
    assert all(batch.teacher_ids is not None for batch in batches)

    def loss() -> float:
        with torch.no_grad():
            return sum(float(lesson_loss(tiny_memory_model.model, batch, 0.0)) for batch in batches)

    before = loss()
    learning.begin_document(batches)
    for batch in batches:
        learning.step(batch)
    assert learning.end_document() > 0
    assert loss() < before


def test_document_without_sentences_to_query_is_learned_by_next_token_training(tiny_memory_model):
    lesson = build_lesson(tiny_memory_model, SETTINGS, "Hi there", ["Hi there"], batch_size=2)
    assert not lesson.distilled and lesson.sequences


def test_document_too_long_for_the_teacher_is_distilled_chunk_by_chunk(tiny_memory_model):
    chunks = [
        "Harbour news\nThe harbour bridge was painted bright orange.",
        "Harbour news\nThe paint came from a factory.",
    ]
    assert teacher_contexts(tiny_memory_model, DOCUMENT, chunks, max_tokens=10_000) == [(DOCUMENT, chunks)]
    assert teacher_contexts(tiny_memory_model, DOCUMENT, chunks, max_tokens=16) == [(c, [c]) for c in chunks]


def test_daemon_and_benchmark_train_the_same_rows_to_the_same_values(
    tmp_path: Path, make_memory_model, background_sequences, snapshot_values, bit_identical
):
    """The daemon's learner and the benchmark's SMF method learn a document through one path."""
    from smfd.learn.heal import compute_background

    daemon_model, bench_model = make_memory_model(), make_memory_model()
    background = compute_background(daemon_model.model, daemon_model.memories, background_sequences)
    journal = Journal(tmp_path / "journal.db")
    store = CheckpointStore(tmp_path / "checkpoint", keep=3)
    store.initialise(daemon_model, background)
    spool = tmp_path / "harbour.txt"
    spool.write_text(DOCUMENT, encoding="utf-8")
    journal.add_document(hashlib.sha256(DOCUMENT.encode()).hexdigest(), "watch", "harbour.txt", spool, len(DOCUMENT))
    outcome = Learner(daemon_model, background, store, journal, SETTINGS).update()
    assert outcome.accepted and outcome.rows_updated > 0

    chunks = [c.text for c in journal.chunks_for(1)]
    learning = SmfLearning(bench_model, background, SETTINGS, None, HealSection())
    batches = learning.document_batches(DOCUMENT, chunks, SETTINGS.train.passes, SETTINGS.train.restate, seed=0)
    learning.begin_document(batches)
    for batch in batches:
        learning.step(batch)
    assert learning.end_document() == outcome.rows_updated
    assert bit_identical(snapshot_values(daemon_model), snapshot_values(bench_model))


def test_lesson_batches_carry_teacher_targets_only_where_the_document_moves_the_prediction(tiny_memory_model):
    settings = SETTINGS.with_train(distill={"min_shift": 1e9})
    lesson = build_lesson(tiny_memory_model, settings, DOCUMENT, [DOCUMENT], batch_size=2)
    assert lesson.sequences == [] and lesson_batches(lesson, 2, 2, 0, 0, tiny_memory_model.device) == []
