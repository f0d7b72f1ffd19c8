"""The learner turns journaled documents into checkpointed memory updates. A user relies on:
documents are marked done only once their update is on disk, an interrupted or rejected update
leaves the memory exactly as it was, and nothing is lost across a restart."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from engine_settings import learn_settings, train_section

from smfd.config import ChunkingSection, SurpriseSection
from smfd.guard.verdict import RollbackReason, Verdict
from smfd.ingest.journal import Journal
from smfd.learn.learner import Learner, LearnSettings

DOCUMENTS = {
    "harbour.txt": (
        "Harbour news\n\n"
        "The harbour bridge was painted bright orange by Zelda Quint in 2019. "
        "The paint came from a small factory near the old fishing port."
    ),
    "observatory.txt": (
        "Observatory notes\n\n"
        "Professor Ansel Voss keeps a blue parrot named Figaro in the observatory. "
        "The parrot sleeps beside the telescope every night."
    ),
}

SETTINGS = learn_settings(
    train_section(selection="kl", top_t=16, lr=0.05, passes=2, batch_size=2, seq_len=32, max_documents=16),
    chunk_tokens=32,
    skip_below_nats=0.5,
)


def make_learner(tiny_memory_model, background, store, journal, settings: LearnSettings = SETTINGS) -> Learner:
    return Learner(tiny_memory_model, background, store, journal, settings)


def submit(journal: Journal, spool: Path, name: str, text: str) -> int:
    """Spool a document the way intake does and journal it as queued."""
    spool.mkdir(exist_ok=True)
    path = spool / name
    path.write_text(text, encoding="utf-8")
    doc_id, duplicate = journal.add_document(
        hashlib.sha256(text.encode()).hexdigest(), "watch", name, path, len(text.encode())
    )
    assert not duplicate
    return doc_id


def submit_all(journal: Journal, tmp_path: Path) -> list[int]:
    return [submit(journal, tmp_path / "spool", name, text) for name, text in DOCUMENTS.items()]


def all_chunks(journal: Journal, doc_ids: list[int]) -> list:
    return [chunk for doc_id in doc_ids for chunk in journal.chunks_for(doc_id)]


def test_update_learns_queued_documents_and_marks_them_done_with_the_checkpoint_version(
    tmp_path, tiny_memory_model, background, store, journal, make_memory_model, snapshot_values, bit_identical
):
    doc_ids = submit_all(journal, tmp_path)
    before = snapshot_values(tiny_memory_model)
    seen_by_guard = []

    def guard():
        seen_by_guard.append(not bit_identical(snapshot_values(tiny_memory_model), before))
        return Verdict(True, None, {"drift": 0.01})

    outcome = make_learner(tiny_memory_model, background, store, journal).update(guard=guard)

    chunks = all_chunks(journal, doc_ids)
    assert outcome.accepted and outcome.version == 1 and store.version == 1
    assert outcome.documents == 2 and outcome.chunks_learned == len(chunks) >= 2 and outcome.chunks_known == 0
    assert outcome.steps > 0 and outcome.rows_updated > 0 and outcome.tokens > 0
    assert seen_by_guard == [True], "the guard judges the model with the update applied"
    assert [(d.state, d.checkpoint_version) for d in map(journal.get_document, doc_ids)] == [("done", 1), ("done", 1)]
    assert outcome.documents_settled == [("watch", "done"), ("watch", "done")]
    assert {c.state for c in chunks} == {"learned"}
    update = journal.last_update()
    assert (update.version, update.accepted, update.n_chunks, update.measures) == (
        1,
        True,
        len(chunks),
        {"drift": 0.01},
    )

    assert not bit_identical(snapshot_values(tiny_memory_model), before)
    restarted = make_memory_model()
    store.load_into(restarted)
    assert bit_identical(snapshot_values(restarted), snapshot_values(tiny_memory_model))


def test_update_with_nothing_queued_changes_nothing(
    tiny_memory_model, background, store, journal, snapshot_values, bit_identical
):
    before = snapshot_values(tiny_memory_model)
    outcome = make_learner(tiny_memory_model, background, store, journal).update()
    assert (outcome.documents, outcome.steps, outcome.accepted) == (0, 0, False)
    assert store.version == 0 and journal.updates() == []
    assert bit_identical(snapshot_values(tiny_memory_model), before)


def test_stop_mid_update_leaves_memory_untouched_and_documents_for_the_next_start(
    tmp_path, tiny_memory_model, background, store, journal, snapshot_values, bit_identical
):
    doc_ids = submit_all(journal, tmp_path)
    before = snapshot_values(tiny_memory_model)
    checks = []

    def stop_after_one_step() -> bool:
        checks.append(True)
        return len(checks) > 1

    outcome = make_learner(tiny_memory_model, background, store, journal).update(should_stop=stop_after_one_step)

    assert outcome.stopped and outcome.steps == 1 and not outcome.accepted
    assert bit_identical(snapshot_values(tiny_memory_model), before)
    assert store.version == 0 and journal.updates() == []
    assert [journal.get_document(d).state for d in doc_ids] == ["processing", "processing"]
    assert {c.state for c in all_chunks(journal, doc_ids)} == {"pending"}

    # The next start re-queues the interrupted documents, and they are then learned once.
    with Journal(journal.path) as restarted:
        assert restarted.requeue_processing() == 2
        assert [restarted.get_document(d).state for d in doc_ids] == ["queued", "queued"]
    outcome = make_learner(tiny_memory_model, background, store, journal).update()
    assert outcome.accepted and outcome.version == 1 and outcome.documents == 2
    assert [journal.get_document(d).state for d in doc_ids] == ["done", "done"]
    assert len(all_chunks(journal, doc_ids)) == outcome.chunks_learned, "re-chunking replaces, never duplicates"


def test_rejecting_guard_leaves_memory_untouched_and_records_an_unaccepted_update(
    tmp_path, tiny_memory_model, background, store, journal, make_memory_model, snapshot_values, bit_identical
):
    doc_ids = submit_all(journal, tmp_path)
    before = snapshot_values(tiny_memory_model)

    outcome = make_learner(tiny_memory_model, background, store, journal).update(
        guard=lambda: Verdict(False, RollbackReason.DRIFT, {"drift": 0.9, "probe": "known_facts"})
    )

    assert not outcome.accepted and outcome.reason == "drift" and outcome.version == 0
    assert bit_identical(snapshot_values(tiny_memory_model), before)
    assert store.version == 0
    fresh = make_memory_model()
    store.load_into(fresh)
    assert bit_identical(snapshot_values(fresh), before)
    (update,) = journal.updates()
    measures = {"drift": 0.9, "probe": "known_facts", "reason": "drift"}  # the reason, for the guard's tally
    assert (update.accepted, update.version, update.measures) == (False, 0, measures)
    assert {c.state for c in all_chunks(journal, doc_ids)} == {"rejected"}
    assert {journal.get_document(d).state for d in doc_ids} == {"done"}


def test_chunks_the_model_already_knows_are_marked_known_and_not_trained(
    tmp_path, tiny_memory_model, background, store, journal, snapshot_values, bit_identical
):
    doc_ids = submit_all(journal, tmp_path)
    before = snapshot_values(tiny_memory_model)
    settings = dataclasses.replace(SETTINGS, surprise=SurpriseSection(skip_below_nats=1e9))

    outcome = make_learner(tiny_memory_model, background, store, journal, settings).update()

    chunks = all_chunks(journal, doc_ids)
    assert outcome.chunks_known == len(chunks) >= 2 and outcome.chunks_learned == 0 and outcome.steps == 0
    assert len(outcome.surprise) == len(chunks) and all(s > 0 for s in outcome.surprise)
    assert {c.state for c in chunks} == {"known"}
    assert bit_identical(snapshot_values(tiny_memory_model), before)
    assert store.version == 0 and journal.updates() == []
    assert [(d.state, d.checkpoint_version) for d in map(journal.get_document, doc_ids)] == [("done", 0), ("done", 0)]


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_unreadable_spool_file_fails_that_document_and_learns_the_others(
    damage, tmp_path, tiny_memory_model, background, store, journal
):
    good, lost = submit_all(journal, tmp_path)
    spool = Path(journal.get_document(lost).spool_path)
    if damage == "missing":
        spool.unlink()
    else:  # the text no longer matches the hash it was journaled under: never learned
        spool.write_text(spool.read_text().replace("parrot", "parr\x00t"))

    outcome = make_learner(tiny_memory_model, background, store, journal).update()

    assert outcome.accepted and outcome.version == 1
    assert journal.get_document(good).state == "done"
    failed = journal.get_document(lost)
    assert failed.state == "queued" and failed.attempts == 1 and "observatory.txt" in failed.reason


def test_surprise_weighted_selection_learns_through_the_learner(
    tmp_path, tiny_memory_model, background, store, journal, snapshot_values, bit_identical
):
    doc_ids = submit_all(journal, tmp_path)
    before = snapshot_values(tiny_memory_model)
    settings = SETTINGS.with_train(selection="surprise-kl", restate=False)

    outcome = make_learner(tiny_memory_model, background, store, journal, settings).update()

    assert outcome.accepted and outcome.rows_updated > 0
    assert not bit_identical(snapshot_values(tiny_memory_model), before)
    assert {journal.get_document(d).state for d in doc_ids} == {"done"}


def test_surprise_weighted_update_scores_each_sequence_under_the_frozen_base_once(
    tmp_path, tiny_memory_model, background, store, journal
):
    """Next-token training: the chunk skip and the slot weights share one scoring pass, no chunk is scored twice."""
    submit_all(journal, tmp_path)
    settings = SETTINGS.with_train(selection="surprise-kl", restate=False, distill={"enabled": False})
    learner = make_learner(tiny_memory_model, background, store, journal, settings)
    frozen_rows = []

    def count_frozen_rows(module, args, kwargs):
        if not any(memory.enabled for memory in tiny_memory_model.memories):
            frozen_rows.append(kwargs["input_ids"].shape[0])

    hook = tiny_memory_model.model.get_decoder().register_forward_pre_hook(count_frozen_rows, with_kwargs=True)
    try:
        outcome = learner.update()
    finally:
        hook.remove()

    assert outcome.accepted and outcome.chunks_learned > 0
    assert sum(frozen_rows) == outcome.chunks_learned + outcome.chunks_known


def test_one_token_document_does_not_stall_the_learner(
    tmp_path, tiny_memory_model, background, store, journal, tokenizer
):
    assert len(tokenizer("x", add_special_tokens=False).input_ids) == 1
    tiny = submit(journal, tmp_path / "spool", "tiny.txt", "x")
    normal = submit(journal, tmp_path / "spool", "harbour.txt", DOCUMENTS["harbour.txt"])

    make_learner(tiny_memory_model, background, store, journal).update()

    assert journal.get_document(tiny).state != "processing"
    assert journal.get_document(normal).state == "done"


def test_an_error_mid_update_leaves_memory_and_checkpoint_untouched(
    tmp_path, tiny_memory_model, background, store, journal, snapshot_values, bit_identical
):
    learner = make_learner(tiny_memory_model, background, store, journal)
    doc_ids = submit_all(journal, tmp_path)
    real_step, calls = learner.updater.step, []

    def step_that_fails_the_second_time(batch):
        calls.append(batch)
        if len(calls) == 2:
            raise RuntimeError("simulated failure inside an optimizer step")
        return real_step(batch)

    learner.updater.step = step_that_fails_the_second_time
    before = snapshot_values(tiny_memory_model)

    with pytest.raises(RuntimeError, match="simulated failure"):
        learner.update()

    assert bit_identical(snapshot_values(tiny_memory_model), before)  # the first step was reverted
    assert store.version == 0
    assert {journal.get_document(d).state for d in doc_ids} == {"processing"}  # requeued on restart, nothing lost


def test_chunk_overlap_setting_reaches_the_chunks_the_learner_stores(
    tmp_path, tiny_memory_model, background, store, journal
):
    """chunking.overlap_sentences: each chunk repeats the previous chunk's last sentence."""
    text = "Harbour news\n\n" + " ".join(
        f"The {name} boat sails at dawn every day." for name in ("red", "blue", "green", "white", "black", "grey")
    )
    overlapping = dataclasses.replace(SETTINGS, chunking=ChunkingSection(max_tokens=160, overlap_sentences=1))
    doc = submit(journal, tmp_path / "spool", "harbour.txt", text)
    make_learner(tiny_memory_model, background, store, journal, overlapping).chunk_claimed_documents()

    chunks = [c.text for c in journal.chunks_for(doc)]
    assert len(chunks) >= 2
    for earlier, later in zip(chunks, chunks[1:]):
        last_sentence = earlier.rsplit(". ", 1)[-1].removesuffix(".")
        assert last_sentence in later, f"{later!r} does not repeat {last_sentence!r}"


def test_a_checkpoint_write_that_fails_undoes_the_update_in_memory(
    tmp_path, tiny_memory_model, background, store, journal, snapshot_values, bit_identical, monkeypatch
):
    import errno

    from smfd.learn.learner import CommitFailed
    from smfd.store import checkpoint

    doc_ids = submit_all(journal, tmp_path)
    before = snapshot_values(tiny_memory_model)

    def disk_full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "atomic_write", disk_full)
    with pytest.raises(CommitFailed, match="No space left"):
        make_learner(tiny_memory_model, background, store, journal).update(guard=lambda: Verdict.unguarded())

    assert bit_identical(snapshot_values(tiny_memory_model), before), "the memory is what the disk holds"
    assert store.version == 0
    assert {journal.get_document(d).state for d in doc_ids} == {"processing"}, "the daemon requeues them"


def test_memory_fill_counts_the_rows_updates_trained_and_the_background_reads_on_them(
    tmp_path, tiny_memory_model, background, store, journal
):
    from smfd.model.slot_stats import memory_fill

    learner = make_learner(tiny_memory_model, background, store, journal)
    empty = learner.fill()
    assert (empty.rows_trained, empty.background_read_share) == (0, 0.0), "a fresh memory holds nothing"

    submit_all(journal, tmp_path)
    outcome = learner.update(guard=lambda: Verdict(True, None, {}))

    trained = {layer: (values.dense() != 0).any(dim=1) for layer, values in tiny_memory_model.values().items()}
    expected_share = sum(float(background[k].counts[t].sum()) for k, t in trained.items()) / sum(
        float(background[k].counts.sum()) for k in trained
    )
    assert outcome.fill == memory_fill(tiny_memory_model.values(), background)
    assert outcome.fill.rows_trained == sum(int(t.sum()) for t in trained.values()) == outcome.rows_updated
    assert outcome.fill.background_read_share == pytest.approx(expected_share)
    assert store.memory_fill() == outcome.fill.as_dict(), "recorded with the checkpoint for smfd status"


def test_rows_an_update_trains_again_are_counted_and_kept_with_the_checkpoint(
    tmp_path, tiny_memory_model, background, store, journal, make_memory_model
):
    learner = make_learner(tiny_memory_model, background, store, journal)
    submit(journal, tmp_path / "spool", "harbour.txt", DOCUMENTS["harbour.txt"])
    first = learner.update(guard=lambda: Verdict(True, None, {}))
    assert first.rows_reused == 0 and first.fill.row_retrainings == 0, "a fresh memory has nothing to overwrite"
    between = {layer: values.dense() for layer, values in tiny_memory_model.values().items()}

    submit(journal, tmp_path / "spool", "observatory.txt", DOCUMENTS["observatory.txt"])
    second = learner.update(guard=lambda: Verdict(True, None, {}))

    expected = 0
    for layer, values in tiny_memory_model.values().items():
        changed = (values.dense() != between[layer]).any(dim=1)
        expected += int((changed & (between[layer] != 0).any(dim=1)).sum())
    assert second.rows_reused == expected > 0, "the tiny memory's 16 selected rows overlap between documents"
    assert second.fill.row_retrainings == expected
    assert store.row_retrainings() == expected, "kept with the checkpoint"
    restarted = Learner(make_memory_model(), background, store, journal, SETTINGS)
    assert restarted.fill().row_retrainings == expected


def test_a_full_memory_keeps_learning_and_reports_that_it_is_full(
    tmp_path, tiny_memory_model, background, store, journal
):
    import torch

    for memory in tiny_memory_model.memories:  # every row holds something, as after a long stream
        memory.values.write(torch.arange(memory.values.n_slots), torch.full(memory.values.shape, 1e-4))
    learner = make_learner(tiny_memory_model, background, store, journal)
    submit_all(journal, tmp_path)

    outcome = learner.update(guard=lambda: Verdict(True, None, {}))

    assert outcome.accepted and outcome.rows_updated > 0 and store.version == 1
    assert outcome.rows_reused == outcome.rows_updated, "every row it trained held earlier learning"
    assert outcome.fill.rows_trained == outcome.fill.rows_total and outcome.fill.background_read_share == 1.0
