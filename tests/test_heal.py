"""Healing: training the memory's addressing on general text so that reads spread over the slots."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from smfd.config import HealSection
from smfd.errors import SmfdError
from smfd.learn.heal import (
    calibrate_from_inputs,
    compute_background,
    heal_addressing,
    memory_inputs,
    prepare_memory,
    read_entropy,
    token_pool,
    usage_imbalance,
)


def imbalance(model, inputs) -> float:
    with torch.no_grad():
        memory = model.memories[0]
        return float(usage_imbalance(memory, memory.lookup(torch.cat(inputs[memory.layer_index])[None], dense=True)))


def entropy(model, inputs) -> float:
    with torch.no_grad():
        memory = model.memories[0]
        return float(read_entropy(memory.lookup(torch.cat(inputs[memory.layer_index])[None], dense=True)))


def test_healing_spreads_general_text_over_more_slots(make_memory_model, background_sequences):
    model = make_memory_model()
    inputs = memory_inputs(model.model, model.memories, background_sequences)
    calibrated = make_memory_model()
    prepare_memory(calibrated.model, calibrated.memories, background_sequences, HealSection(steps=0))
    healed = make_memory_model()

    report, background = prepare_memory(
        healed.model, healed.memories, background_sequences, HealSection(steps=60, lr=1e-2)
    )

    assert report is not None and report.steps == 60
    assert report.last_imbalance < report.first_imbalance
    assert imbalance(healed, inputs) < imbalance(calibrated, inputs)  # measured on all the text, not one step's sample
    assert report.first_read_entropy == pytest.approx(entropy(calibrated, inputs), abs=0.3)  # reported on samples
    # Background counts from the cached inputs equal a fresh forward pass under the healed addressing.
    fresh = compute_background(healed.model, healed.memories, background_sequences)
    layer = healed.memories[0].layer_index
    assert torch.equal(background[layer].counts, fresh[layer].counts)


def test_healing_changes_only_the_addressing_and_the_model_stays_the_base_model(
    make_base_model, make_memory_model, background_sequences, snapshot_memory_state
):
    model = make_memory_model()
    calibrate_from_inputs(model.memories, memory_inputs(model.model, model.memories, background_sequences))
    before = snapshot_memory_state(model)
    ids = torch.tensor([background_sequences[0]])

    heal_addressing(
        model.memories, memory_inputs(model.model, model.memories, background_sequences), HealSection(steps=20, lr=1e-2)
    )

    after = model.memory_state()
    changed = {key.split(".", 1)[1] for key in after if not torch.equal(after[key], before[key])}
    assert changed == {"query.weight", "keys"}
    with torch.no_grad():
        assert torch.equal(model.model(input_ids=ids).logits, make_base_model()(input_ids=ids).logits)
    assert not any(p.requires_grad or p.grad is not None for m in model.memories for p in m.parameters())


def test_zero_steps_is_no_healing(tiny_memory_model, background_sequences, snapshot_memory_state, bit_identical):
    inputs = memory_inputs(tiny_memory_model.model, tiny_memory_model.memories, background_sequences)
    before = snapshot_memory_state(tiny_memory_model)
    assert heal_addressing(tiny_memory_model.memories, inputs, HealSection(steps=0)) is None
    assert bit_identical(tiny_memory_model.memory_state(), before)


def test_healing_after_an_update_is_refused(tiny_memory_model, background_sequences):
    inputs = memory_inputs(tiny_memory_model.model, tiny_memory_model.memories, background_sequences)
    tiny_memory_model.memories[0].values.write(torch.tensor([3]), torch.ones(1, 32))
    with pytest.raises(SmfdError, match="before any update"):
        heal_addressing(tiny_memory_model.memories, inputs, HealSection(steps=1))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": -1}, "steps"),
        ({"steps": 1, "lr": 0}, "lr"),
        ({"steps": 1, "tokens_per_step": 1}, "tokens_per_step"),
    ],
)
def test_bad_heal_settings_are_named_by_the_schema(changes, message):
    with pytest.raises(ValidationError, match=message):
        HealSection(**changes)


def test_healing_without_text_is_an_error(tiny_memory_model):
    with pytest.raises(SmfdError, match="general text"):
        prepare_memory(tiny_memory_model.model, tiny_memory_model.memories, [], HealSection())


def test_memory_inputs_match_one_sequence_at_a_time_and_skip_the_blocks_above(tiny_memory_model, background_sequences):
    """Batching with right padding must give each sequence the hidden states it has alone; nothing above runs."""
    model = tiny_memory_model
    sequences = [seq[:n] for seq, n in zip(background_sequences, (5, 17, 9, 30, 2, 12), strict=False)]
    top_block = model.model.get_decoder().layers[-1]
    assert all(m.layer_index < len(model.model.get_decoder().layers) - 1 for m in model.memories)
    ran_above = []
    handle = top_block.register_forward_hook(lambda *args: ran_above.append(True))
    try:
        batched = memory_inputs(model.model, model.memories, sequences)
    finally:
        handle.remove()
    assert not ran_above
    for seq, got in zip(sequences, batched[model.memories[0].layer_index], strict=True):
        alone = memory_inputs(model.model, model.memories, [seq])[model.memories[0].layer_index][0]
        assert got.shape == (len(seq), alone.shape[1])
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_healing_samples_the_memory_inputs_in_place(tiny_memory_model, background_sequences):
    """Healing draws tokens from every sequence's inputs at once: for `memory_inputs` that is the pool they
    view, not a second copy; any other list of tensors (sampling's views into padded blocks) is concatenated."""
    model = tiny_memory_model
    parts = memory_inputs(model.model, model.memories, background_sequences)[model.memories[0].layer_index]
    pooled = token_pool(parts)
    assert pooled.untyped_storage().data_ptr() == parts[0].untyped_storage().data_ptr()
    assert torch.equal(pooled, torch.cat(parts))
    padded = torch.randn(3, 10, parts[0].shape[1])
    scattered = [padded[0, :4], padded[1, :7], padded[2, :2]]  # rows of a padded block: not consecutive
    copied = token_pool(scattered)
    assert copied.untyped_storage().data_ptr() != padded.untyped_storage().data_ptr()
    assert torch.equal(copied, torch.cat(scattered))
    reordered = [parts[1], parts[0], *parts[2:]]
    assert torch.equal(token_pool(reordered), torch.cat(reordered))
    with pytest.raises(SmfdError, match="no memory inputs"):
        token_pool([])
