"""Contrast sentences: a document's sentences with its names swapped, held still while the document is learned."""

from __future__ import annotations

import random

import torch
from engine_settings import train_section
from test_updater import FACTS, TWO_LAYER_MEMORY, memory_output_change

from smfd.learn.heal import compute_background
from smfd.learn.interference import RetainSet
from smfd.learn.lesson import LearnSettings, build_lesson, contrast_sequences
from smfd.learn.selection import batch_reads, phrasing_slots
from smfd.learn.updater import SparseUpdater, read_weights
from smfd.model.memory import recording_lookups
from smfd.text.contrast import contrast_texts, inner_names, known_names

DOCUMENT = [
    "Zorvath is a city on the planet Ekko. Its mayor, Brin Talos, was elected in Zorvath in 6678.",
    "The river that crosses Zorvath is named after Brin Talos.",
    "Nothing else happened that year.",
]
WEIGHTS = (0.0, 50.0)
PASSES = 32
POOL = ["Paris", "France", "Marie Curie", "Ekko"]


def test_names_are_the_capitalised_words_used_inside_a_sentence():
    assert inner_names(DOCUMENT[0]) == {"Zorvath", "Ekko", "Brin Talos"}
    assert inner_names("The cat sat. It slept.") == set()  # sentence-initial words are not names
    assert known_names(["We went to Paris and Rome.", "Then Paris again."]) == ["Paris", "Rome"]


def test_every_document_name_is_swapped_for_a_known_name_from_the_first_swap_on():
    sentences = ["Zorvath lies on Ekko.", "The mayor of Zorvath is Brin Talos.", "Nothing else happened that year."]
    contrasts = contrast_texts(sentences, POOL, random.Random(0))

    assert len(contrasts) == 2  # the sentence without a document name has nothing to contrast
    replacements = {"Paris", "France", "Marie Curie"}  # "Ekko" is the document's own name: never drawn
    for original, contrast in zip(sentences, contrasts):
        assert contrast.text[: contrast.start] == original[: contrast.start]
        assert not inner_names(contrast.text) & {"Zorvath", "Ekko", "Brin Talos"}
        swapped = {name for name in replacements if name in contrast.text}
        assert swapped and len(swapped) == (2 if "Brin" in original or "Ekko" in original else 1)
    assert contrasts[1].start == len("The mayor of ")


def test_a_lesson_carries_contrast_sentences_only_with_the_penalty_on(tiny_memory_model):
    mm = tiny_memory_model
    off = build_lesson(mm, LearnSettings(), "\n".join(DOCUMENT), DOCUMENT, 4, known_names=POOL)
    on_settings = LearnSettings().with_train(contrast_weight=1.0)
    on = build_lesson(mm, on_settings, "\n".join(DOCUMENT), DOCUMENT, 4, known_names=POOL)
    no_names = build_lesson(mm, on_settings, "\n".join(DOCUMENT), DOCUMENT, 4, known_names=[])

    assert off.contrast == [] and no_names.contrast == []
    assert on.contrast and on.sequences == off.sequences  # the training text itself does not change
    for watched in on.contrast:
        assert 0 <= watched.start < len(watched.ids)
        text = mm.tokenizer.decode(watched.ids[: watched.start])
        assert not any(name in text for name in POOL if name != "Ekko")  # nothing swapped before the start


def test_the_contrast_penalty_keeps_the_swapped_sentences_outputs_closer_to_where_they_were(
    make_memory_model, background_sequences, text_batches
):
    changes = {}
    for weight in WEIGHTS:
        mm = make_memory_model(TWO_LAYER_MEMORY)
        background = compute_background(mm.model, mm.memories, background_sequences[:3])
        watched = contrast_sequences(mm, FACTS, ["Alice Smith", "Harbour Master"], 64, seed=0)
        contrast = RetainSet.watching(mm.model, mm.memories, watched)  # the same tokens, measured from the start
        assert contrast is not None
        assert contrast.n_tokens == sum(len(w.ids) - w.start for w in watched)  # the document's prefix is not held
        config = train_section(selection="kl", top_t=48, lr=0.5, retain_weight=0.0, contrast_weight=weight)
        updater = SparseUpdater(mm.model, mm.memories, background, config)
        # The contrast tokens read nearly the rows the facts train, and normalised steps stay lr-sized, so even a
        # dominant penalty leaves an lr-sized oscillation there; 32 passes let the unpenalised change grow past it.
        batches = [batch for _ in range(PASSES) for batch in text_batches(FACTS)]
        updater.plan_update(batches, watched)
        assert (updater.contrast is not None) == (weight > 0)
        for batch in batches:
            updater.step(batch)
        updater.finish_update()
        changes[weight] = memory_output_change(mm, contrast)
    assert changes[0.0] > 0
    assert changes[50.0] < 0.6 * changes[0.0], changes


def test_phrasing_slots_are_those_the_contrast_reads_at_least_as_much_as_the_document():
    reads = torch.tensor([1, 1, 1, 2, 4])
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])  # document shares: slot 1 0.6, slot 2 0.2, slot 4 0.2
    contrast = torch.tensor([2, 2, 3, 4, 1, 1])  # contrast shares: slot 1 1/3, slot 2 1/3, slot 3 1/6, slot 4 1/6

    assert phrasing_slots(reads, weights, contrast, 8).tolist() == [2]  # slot 3: the document never reads it
    assert phrasing_slots(reads, weights, torch.zeros(0, dtype=torch.long), 8).numel() == 0


def test_an_update_with_contrast_rows_trains_no_row_the_swapped_sentences_read_as_much(
    make_memory_model, background_sequences, text_batches
):
    mm = make_memory_model(TWO_LAYER_MEMORY)
    background = compute_background(mm.model, mm.memories, background_sequences[:3])
    watched = contrast_sequences(mm, FACTS, ["Alice Smith", "Harbour Master"], 64, seed=0)
    contrast = RetainSet.watching(mm.model, mm.memories, watched)
    batches = text_batches(FACTS)
    plans = {}
    for rows in (False, True):
        updater = SparseUpdater(
            mm.model, mm.memories, background, train_section(selection="kl", top_t=64, contrast_rows=rows)
        )
        updater.plan_update(batches, watched)
        plans[rows] = updater.planned
        updater.finish_update()

    document = _document_read_shares(mm, batches)
    for memory in mm.memories:
        layer, n_slots = memory.layer_index, memory.config.n_slots
        swapped = torch.bincount(contrast.read_slots_all(layer), minlength=n_slots).double()
        swapped /= swapped.sum()
        chosen = plans[True][layer]
        assert 0 < chosen.numel() <= 64
        assert bool((document[layer][chosen] > swapped[chosen]).all())
        assert set(plans[False][layer].tolist()) - set(chosen.tolist()), "some rows of the plain plan are left out"


def _document_read_shares(mm, batches) -> dict[int, torch.Tensor]:
    """Each memory layer's share of the document's reads per slot, as selection counts them."""
    counts = {m.layer_index: torch.zeros(m.config.n_slots, dtype=torch.float64) for m in mm.memories}
    with torch.no_grad(), recording_lookups(mm.memories):
        for batch in batches:
            mm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            mask, _ = read_weights(batch)
            for memory in mm.memories:
                slots, weights = batch_reads(memory.last_lookup, mask)
                counts[memory.layer_index] += torch.bincount(slots, weights=weights, minlength=memory.config.n_slots)
    return {layer: c / c.sum() for layer, c in counts.items()}
