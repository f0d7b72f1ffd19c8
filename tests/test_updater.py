"""The sparse updater's structural guarantee: an update changes only the value rows it selected,
never any other parameter or buffer of the model, and leaves no gradient state behind."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
from engine_settings import changed, train_section
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import smfd.learn.updater as updater_module
from smfd.errors import SmfdError
from smfd.learn.heal import compute_background
from smfd.learn.interference import RetainSet
from smfd.learn.selection import RULES
from smfd.learn.updater import SparseUpdater, causal_lm_loss
from smfd.model.batch import TokenBatch, make_batch
from smfd.model.memory import Lookup, MemorySection, recording_lookups

TWO_LAYER_MEMORY = MemorySection(layers=(0, 2), n_keys=16, heads=2, k=4, key_dim=16)

FACTS = [
    "The harbour bridge was painted bright orange by Zelda Quint in 2019.",
    "Professor Ansel Voss keeps a blue parrot named Figaro in the observatory.",
]


def everything_but_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the model except memory value tables, cloned."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {name: t.detach().clone() for name, t in tensors.items() if ".memory.values." not in name}


def random_batch(generator: torch.Generator, lengths: list[int], with_surprise: bool) -> TokenBatch:
    """Random real token ids (never the pad id 0) in right-padded rows of the given lengths."""
    sequences = [torch.randint(2, 300, (n,), generator=generator).tolist() for n in lengths]
    surprise = [torch.rand(n, generator=generator) * 6 for n in lengths] if with_surprise else None
    return make_batch(sequences, pad_id=0, surprise=surprise)


class SelectionSpy:
    """Calls the real `select_slots` and remembers what it chose, per memory layer."""

    def __init__(self, background: dict) -> None:
        self.layer_of = {id(stats): layer for layer, stats in background.items()}
        self.chosen: list[tuple[int, torch.Tensor]] = []
        self.real = updater_module.select_slots

    def __call__(self, rule, lookup, mask, surprise, stats, top_t, excluded=None):
        ids = self.real(rule, lookup, mask, surprise, stats, top_t, excluded)
        read_by_trained_positions = set(lookup.indices[mask > 0].flatten().tolist())
        assert set(ids.tolist()) <= read_by_trained_positions, "padding or untrained positions chose a slot"
        self.chosen.append((self.layer_of[id(stats)], ids.clone()))
        return ids


batch_shapes = st.lists(st.integers(min_value=2, max_value=12), min_size=1, max_size=3)


@settings(max_examples=30, deadline=None)
@given(
    rule=st.sampled_from(RULES),
    top_t=st.integers(min_value=1, max_value=48),
    lr=st.sampled_from([0.01, 0.05, 0.5]),
    normalize=st.booleans(),
    steps=st.lists(batch_shapes, min_size=1, max_size=3),
    seed=st.integers(min_value=0, max_value=2**16),
    retain_weight=st.sampled_from([0.0, 5.0]),
)
def test_steps_change_only_selected_value_rows(
    make_memory_model, background_sequences, rule, top_t, lr, normalize, steps, seed, retain_weight
):
    mm = make_memory_model(TWO_LAYER_MEMORY)
    background = compute_background(mm.model, mm.memories, background_sequences[:3])
    retain = RetainSet.collect(mm.model, mm.memories, background_sequences[3:], 64) if retain_weight else None
    untouched = everything_but_values(mm.model)
    values_before = {m.layer_index: m.values.dense() for m in mm.memories}
    config = train_section(selection=rule, top_t=top_t, lr=lr, normalize=normalize, retain_weight=retain_weight)
    updater = SparseUpdater(mm.model, mm.memories, background, config, retain)
    spy = SelectionSpy(background)
    generator = torch.Generator().manual_seed(seed)
    selected: dict[int, set[int]] = {m.layer_index: set() for m in mm.memories}

    with patch.object(updater_module, "select_slots", spy):
        for lengths in steps:
            spy.chosen.clear()
            result = updater.step(random_batch(generator, lengths, with_surprise=rule == "surprise-kl"))
            chosen = dict(spy.chosen)
            assert len(chosen) == len(spy.chosen) == 2, "one selection per memory layer per step"
            for layer, ids in chosen.items():
                assert ids.numel() <= top_t
                assert ids.unique().numel() == ids.numel()
                selected[layer].update(ids.tolist())
            for layer, n_rows in result.rows_selected.items():
                assert n_rows == chosen[layer].numel() <= top_t
            assert torch.isfinite(torch.tensor(result.loss))

    after = everything_but_values(mm.model)
    assert after.keys() == untouched.keys()
    assert all(torch.equal(after[name], untouched[name]) for name in untouched)
    for memory in mm.memories:
        changed = (memory.values.dense() != values_before[memory.layer_index]).any(dim=1).nonzero().flatten()
        assert set(changed.tolist()) <= selected[memory.layer_index], (
            f"layer {memory.layer_index} changed unselected rows"
        )
        if selected[memory.layer_index]:
            assert changed.numel() > 0, "selected rows must actually be trained"
        assert memory.selection is None and memory.select_rows is None
    assert all(p.grad is None for p in mm.model.parameters())


def test_loss_decreases_when_repeating_a_batch(tiny_memory_model, background, text_batches):
    batch = text_batches(FACTS, batch_size=2)[0]
    updater = SparseUpdater(
        tiny_memory_model.model,
        tiny_memory_model.memories,
        background,
        train_section(selection="kl", top_t=64, lr=0.05),
    )

    losses = [updater.step(batch).loss for _ in range(12)]
    with torch.no_grad():
        final = float(causal_lm_loss(tiny_memory_model.model, batch))

    assert final < losses[0] - 0.05, losses
    assert losses[-1] < losses[0]


def test_step_reports_loss_before_the_step_and_tokens(tiny_memory_model, background, text_batches):
    batch = text_batches(FACTS, batch_size=2)[0]
    with torch.no_grad():
        expected = float(causal_lm_loss(tiny_memory_model.model, batch))
    updater = SparseUpdater(
        tiny_memory_model.model,
        tiny_memory_model.memories,
        background,
        train_section(selection="kl", top_t=16, lr=0.05),
    )

    result = updater.step(batch)
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.n_tokens == int(batch.attention_mask.sum())
    assert 0 < result.rows_selected[1] <= 16


def test_finish_update_patches_cover_exactly_the_changed_rows(tiny_memory_model, background, text_batches):
    before = tiny_memory_model.memories[0].values.dense()
    updater = SparseUpdater(
        tiny_memory_model.model,
        tiny_memory_model.memories,
        background,
        train_section(selection="tfidf", top_t=8, lr=0.05),
    )
    for batch in text_batches(FACTS, batch_size=1):
        updater.step(batch)

    (patch_,) = updater.finish_update()
    after = tiny_memory_model.memories[0].values.dense()
    changed = (after != before).any(dim=1).nonzero().flatten()
    assert patch_.layer == 1
    assert set(changed.tolist()) <= set(patch_.slot_ids.tolist())
    assert torch.equal(patch_.before, before[patch_.slot_ids])
    assert torch.equal(patch_.after, after[patch_.slot_ids])
    assert updater.finish_update() == [], "a second finish has nothing new to report"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"selection": "bm25"}, "selection"),
        ({"top_t": 0}, "top_t"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"retain_weight": -1.0}, "retain_weight"),
    ],
)
def test_train_settings_are_checked_by_the_schema(changes, named):
    with pytest.raises(ValidationError, match=named):
        changed(train_section(), **changes)


def test_updater_refuses_config_that_does_not_fit_the_memory(tiny_memory_model, background):
    with pytest.raises(SmfdError, match="top_t=257 exceeds the 256 slots of layer 1"):
        SparseUpdater(tiny_memory_model.model, tiny_memory_model.memories, background, train_section(top_t=257))
    with pytest.raises(SmfdError, match=r"no background slot statistics for memory layers \[1\]"):
        SparseUpdater(tiny_memory_model.model, tiny_memory_model.memories, {}, train_section(top_t=8))


def test_update_scope_touches_at_most_top_t_rows_per_layer_over_a_whole_update(
    tiny_memory_model, background, text_batches, snapshot_values
):
    batches = (
        text_batches(
            [
                "The harbour bridge was painted orange.",
                "The library opens at nine every day.",
                "The river flows south to the old port.",
                "Farmers arrive before dawn.",
            ],
            2,
        )
        * 4
    )
    before = snapshot_values(tiny_memory_model)
    config = train_section(selection="kl", top_t=6, lr=0.5, scope="update")
    updater = SparseUpdater(tiny_memory_model.model, tiny_memory_model.memories, background, config)

    updater.plan_update(batches)
    for batch in batches:
        updater.step(batch)
    patches = updater.finish_update()

    after = snapshot_values(tiny_memory_model)
    for layer, values in after.items():
        changed = (values != before[layer]).any(dim=1).sum()
        assert 0 < changed <= config.top_t
    assert all(p.n_rows <= config.top_t for p in patches)
    assert updater.planned is None  # the plan ends with the update


def retain_outputs(mm, retain: RetainSet, layer_index: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """One memory layer's present output on the retain tokens (all, or a mask), selected rows from their copy."""
    memory = next(m for m in mm.memories if m.layer_index == layer_index)
    layer = retain.layers[layer_index]
    indices, weights, gate = layer.indices, layer.weights, layer.gate
    if tokens is not None:
        indices, weights, gate = indices[tokens], weights[tokens], gate[tokens]
    shape = (1, indices.shape[0], memory.config.heads, -1)
    return memory.out(gate * memory.read(Lookup(indices.view(shape), weights.view(shape)))[0])


def memory_output_change(mm, retain: RetainSet) -> float:
    """Squared change of each memory layer's output on the retain tokens since the set was collected (value rows
    were all zero then, so the output was zero)."""
    with torch.no_grad():
        return sum(float(retain_outputs(mm, retain, m.layer_index).pow(2).sum()) for m in mm.memories)


@pytest.mark.parametrize("scope", ["step", "update"])
def test_retain_penalty_is_the_output_change_since_the_update_began(
    make_memory_model, background_sequences, text_batches, scope
):
    """The penalty is computed from the rows the update moved; it must equal the change of the full output."""
    mm = make_memory_model(TWO_LAYER_MEMORY)
    background = compute_background(mm.model, mm.memories, background_sequences[:3])
    retain = RetainSet.collect(mm.model, mm.memories, background_sequences[3:], 256)
    config = train_section(selection="kl", top_t=12, lr=0.5, retain_weight=1.0, scope=scope)
    updater = SparseUpdater(mm.model, mm.memories, background, config, retain)
    first, second = text_batches(FACTS[:1], 1), text_batches(FACTS[1:], 1)
    updater.plan_update(first)  # an earlier update: the second starts from rows that hold something
    for batch in first:
        updater.step(batch)
    updater.finish_update()
    with torch.no_grad():
        start = {m.layer_index: retain_outputs(mm, retain, m.layer_index) for m in mm.memories}

    compared = []
    penalty = retain.penalty

    def checked(memory, before=None):
        got = penalty(memory, before)
        layer = retain.layers[memory.layer_index]
        touched = ((memory.selection.position[layer.indices] >= 0) & (layer.weights > 0)).any(dim=1)
        change = retain_outputs(mm, retain, memory.layer_index, touched) - start[memory.layer_index][touched]
        want = change.pow(2).sum() / (layer.indices.shape[0] * layer.scale)
        compared.append((0.0 if got is None else float(got.detach()), float(want.detach())))
        return got

    retain.penalty = checked
    updater.plan_update(second)
    for batch in second * 2:
        updater.step(batch)
    updater.finish_update()
    assert len(compared) >= 4 and any(want > 0 for _, want in compared[2:])
    for got, want in compared:
        assert got == pytest.approx(want, rel=1e-4, abs=1e-9)


def test_retain_penalty_keeps_general_text_outputs_closer_to_where_they_were(
    make_memory_model, background_sequences, text_batches
):
    changes = {}
    for weight in (0.0, 50.0):
        mm = make_memory_model(TWO_LAYER_MEMORY)
        background = compute_background(mm.model, mm.memories, background_sequences[:3])
        retain = RetainSet.collect(mm.model, mm.memories, background_sequences[3:], 256)
        updater = SparseUpdater(
            mm.model,
            mm.memories,
            background,
            train_section(selection="kl", top_t=48, lr=0.5, retain_weight=weight),
            retain,
        )
        # Normalised steps stay lr-sized, so a dominant penalty still leaves an lr-sized oscillation;
        # 8 passes let the unpenalised change grow well past it.
        for _ in range(8):
            for batch in text_batches(FACTS):
                updater.step(batch)
        changes[weight] = memory_output_change(mm, retain)
    assert changes[0.0] > 0
    assert changes[50.0] < 0.5 * changes[0.0], changes


def test_retain_weight_without_a_retain_set_is_an_error(tiny_memory_model, background):
    with pytest.raises(SmfdError, match="retain_weight > 0 needs a retain set"):
        SparseUpdater(
            tiny_memory_model.model, tiny_memory_model.memories, background, train_section(top_t=8, retain_weight=1.0)
        )


def test_normalize_once_makes_the_first_step_lr_sized_and_later_steps_shrink(
    tiny_memory_model, background, text_batches
):
    config = train_section(selection="kl", top_t=48, lr=0.5, scope="update", normalize_once=True)
    updater = SparseUpdater(tiny_memory_model.model, tiny_memory_model.memories, background, config)
    batch = text_batches(FACTS, batch_size=2)[0]
    memory = tiny_memory_model.memories[0]
    updater.plan_update([batch])
    step_rms = []
    for _ in range(12):
        before = memory.values.dense()
        updater.step(batch)
        changed = (memory.values.dense() != before).any(dim=1)
        step_rms.append(float((memory.values.dense() - before)[changed].pow(2).mean().sqrt()))
    updater.finish_update()
    assert step_rms[0] == pytest.approx(0.5, rel=1e-4)
    assert step_rms[-1] < 0.5 * step_rms[0], step_rms


def rows_read(mm, batch: TokenBatch) -> dict[int, tuple[set[int], set[int]]]:
    """Per memory layer: rows read by each sequence's first token, and rows read at any later real position."""
    for memory in mm.memories:
        memory.record_lookup = True
    try:
        with torch.no_grad():
            mm.model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        found = {}
        for memory in mm.memories:
            indices = memory.last_lookup.indices
            real = batch.attention_mask.bool()
            first = set(indices[:, 0].flatten().tolist())
            later = set(indices[:, 1:][real[:, 1:]].flatten().tolist())
            found[memory.layer_index] = (first, later)
        return found
    finally:
        for memory in mm.memories:
            memory.record_lookup = False
            memory.last_lookup = None


@pytest.mark.parametrize("scope", ["step", "update"])
def test_rows_only_the_first_token_reads_are_never_trained(
    tiny_memory_model, background, text_batches, snapshot_values, scope
):
    """The first position is the attention sink, the same hidden state in every text: its rows stay as they were."""
    batches = text_batches(FACTS, 2)
    read: dict[int, tuple[set[int], set[int]]] = {}
    for batch in batches:
        for layer, (first, later) in rows_read(tiny_memory_model, batch).items():
            seen_first, seen_later = read.get(layer, (set(), set()))
            read[layer] = (seen_first | first, seen_later | later)
    before = snapshot_values(tiny_memory_model)
    n_slots = tiny_memory_model.memories[0].config.n_slots
    updater = SparseUpdater(
        tiny_memory_model.model,
        tiny_memory_model.memories,
        background,
        train_section(selection="tfidf", top_t=n_slots, lr=0.5, scope=scope),
    )

    updater.plan_update(batches)
    for batch in batches:
        updater.step(batch)
    updater.finish_update()

    after = snapshot_values(tiny_memory_model)
    for layer, (first, later) in read.items():
        changed = set((after[layer] != before[layer]).any(dim=1).nonzero().flatten().tolist())
        sink_only = first - later
        assert sink_only, "the test needs rows that only the first token reads"
        assert changed, "the update trained nothing"
        assert not changed & sink_only, f"layer {layer}: rows read only by the first token were trained"


def _update_rows(mm, background, batches, **changes) -> set[int]:
    """Rows an update over `batches` changes (all layers, as layer * 10**6 + slot)."""
    before = {m.layer_index: m.values.dense() for m in mm.memories}
    updater = SparseUpdater(mm.model, mm.memories, background, train_section(lr=0.5, **changes))
    updater.plan_update(batches)
    for batch in batches:
        updater.step(batch)
    updater.finish_update()
    changed = set()
    for m in mm.memories:
        rows = (m.values.dense() != before[m.layer_index]).any(dim=1).nonzero().flatten()
        changed |= {m.layer_index * 10**6 + int(r) for r in rows}
    return changed


def test_query_noise_trains_rows_around_the_reads_and_ends_with_the_update(
    make_memory_model, background_sequences, text_batches
):
    batches = text_batches(FACTS, 2) * 3
    clean_mm, noisy_mm = make_memory_model(), make_memory_model()
    background = compute_background(clean_mm.model, clean_mm.memories, background_sequences)

    clean = _update_rows(clean_mm, background, batches, top_t=256, retain_weight=0.0)
    noisy = _update_rows(noisy_mm, background, batches, top_t=256, retain_weight=0.0, query_noise=1.0)

    assert len(noisy) > len(clean), "noisy reads reach rows the clean reads do not"
    assert all(m.query_noise is None for m in noisy_mm.memories)
    ids = batches[0].input_ids
    with torch.no_grad():
        first, second = noisy_mm.model(input_ids=ids).logits, noisy_mm.model(input_ids=ids).logits
    assert torch.equal(first, second), "reads after the update carry no noise"


def test_query_noise_is_seeded_per_update_so_a_replayed_update_trains_the_same_values(
    make_memory_model, background_sequences, text_batches
):
    batches = text_batches(FACTS, 2) * 2
    first_mm, replay_mm = make_memory_model(), make_memory_model()
    background = compute_background(first_mm.model, first_mm.memories, background_sequences)

    for mm in (first_mm, replay_mm):
        _update_rows(mm, background, batches, top_t=256, retain_weight=0.0, query_noise=1.0)

    for first, replay in zip(first_mm.memories, replay_mm.memories):
        assert torch.equal(first.values.dense(), replay.values.dense()), f"layer {first.layer_index} differs"


@pytest.mark.parametrize("scope", ["step", "update"])
def test_avoid_retain_rows_never_trains_a_row_the_retain_tokens_read(
    scope, make_memory_model, background_sequences, text_batches
):
    mm = make_memory_model()
    background = compute_background(mm.model, mm.memories, background_sequences[:3])
    retain = RetainSet.collect(mm.model, mm.memories, background_sequences[3:], 256)
    config = train_section(selection="kl", lr=0.5, top_t=256, retain_weight=1.0, avoid_retain_rows=True, scope=scope)
    updater = SparseUpdater(mm.model, mm.memories, background, config, retain)
    batches = text_batches(FACTS, 2) * 2
    updater.plan_update(batches)
    for batch in batches:
        updater.step(batch)
    patches = updater.finish_update()

    assert any(p.n_rows for p in patches), "the update trains some rows"
    for memory in mm.memories:
        read = set(retain.read_slots(memory.layer_index).tolist())
        trained = set(memory.values.trained_slots().tolist())
        assert read and trained, f"layer {memory.layer_index}"
        assert not read & trained, f"layer {memory.layer_index}: rows the retain tokens read were trained"


def test_avoid_retain_rows_without_the_retain_penalty_is_refused_by_the_schema():
    with pytest.raises(ValidationError, match="avoid_retain_rows needs the retain penalty"):
        train_section(retain_weight=0.0, avoid_retain_rows=True)


@settings(max_examples=12, deadline=None)
@given(
    micro=st.integers(min_value=1, max_value=3),
    steps=st.lists(st.lists(st.integers(min_value=6, max_value=12), min_size=2, max_size=5), min_size=1, max_size=3),
    seed=st.integers(min_value=0, max_value=2**16),
    retain_weight=st.sampled_from([0.0, 5.0]),
)
def test_micro_batches_make_the_whole_batchs_steps(
    make_memory_model, background_sequences, micro, steps, seed, retain_weight
):
    """A step summed over micro-batches trains the same rows to the same values (to float rounding) and
    reports the same loss as the whole batch at once, on the same ranked rows; nothing else changes and no
    gradient is left."""
    runs = {}
    for size in (None, micro):
        mm = make_memory_model(TWO_LAYER_MEMORY)
        background = compute_background(mm.model, mm.memories, background_sequences[:3])
        retain = RetainSet.collect(mm.model, mm.memories, background_sequences[3:], 64) if retain_weight else None
        untouched = everything_but_values(mm.model)
        config = train_section(selection="kl", top_t=24, lr=0.5, retain_weight=retain_weight, micro_batch_size=size)
        updater = SparseUpdater(mm.model, mm.memories, background, config, retain)
        generator = torch.Generator().manual_seed(seed)
        batches = [random_batch(generator, lengths, with_surprise=False) for lengths in steps]
        updater.plan_update(batches)
        planned = {layer: slots.clone() for layer, slots in updater.planned.items()}
        parts = [len(updater.micro_batches(batch)) for batch in batches]
        losses = [updater.step(batch).loss for batch in batches]
        updater.finish_update()
        after = everything_but_values(mm.model)
        assert all(torch.equal(after[name], untouched[name]) for name in untouched)
        assert all(p.grad is None for p in mm.model.parameters())
        runs[size] = (losses, {m.layer_index: m.values.dense() for m in mm.memories}, parts, planned)
    whole, parted = runs[None], runs[micro]
    assert all(torch.equal(parted[3][layer], slots) for layer, slots in whole[3].items()), "the same rows ranked"
    assert whole[2] == [1] * len(steps)
    assert parted[2] == [-(-len(lengths) // micro) for lengths in steps], "every part has trained tokens"
    assert parted[0] == pytest.approx(whole[0], rel=1e-5)
    assert any(values.abs().sum() > 0 for values in whole[1].values()), "the steps trained something"
    for layer, values in whole[1].items():
        torch.testing.assert_close(parted[1][layer], values, rtol=1e-4, atol=1e-5)  # rows move by ~lr=0.5


def test_scope_step_runs_the_batch_whole(tiny_memory_model, background, text_batches):
    """Rows ranked per step come from the whole batch's reads, which one forward pass gives."""
    batch = text_batches(FACTS, batch_size=2)[0]
    config = train_section(selection="kl", top_t=16, lr=0.05, scope="step", micro_batch_size=1)
    updater = SparseUpdater(tiny_memory_model.model, tiny_memory_model.memories, background, config)
    updater.plan_update([batch])
    assert updater.micro_batches(batch) == [(batch, 1.0)]


@pytest.mark.parametrize("scope", ["update", "step"])
def test_read_floors_are_the_lowest_scores_the_updates_own_text_read_its_rows_at(
    make_memory_model, memory_config, background_sequences, text_batches, scope
):
    """With `read_floor_margin`, each row an update trained gets the lowest key score at which the
    update's own sequences read it: the gate never cuts the reads the row was trained through, and
    a row trained again keeps the lower of its two floors."""
    mm = make_memory_model(changed(memory_config, read_floor_margin=0.0))
    memory = mm.memories[0]
    background = compute_background(mm.model, mm.memories, background_sequences[:3])
    config = train_section(selection="kl", top_t=24, lr=0.5, scope=scope)
    updater = SparseUpdater(mm.model, mm.memories, background, config)

    floors_by_update = []
    for texts in (FACTS, FACTS[::-1] + ["The observatory's parrot is blue."]):
        batches = text_batches(texts, batch_size=2)
        with recording_lookups(mm.memories):
            reads = []
            for batch in batches:
                with torch.no_grad():
                    mm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                found = memory.last_lookup
                keep = (batch.attention_mask[..., None, None] > 0) & (found.weights > 0)
                reads.append((found.indices[keep], found.scores[keep]))
        ids = torch.cat([i for i, _ in reads])
        scores = torch.cat([s for _, s in reads])
        lowest = torch.full((memory.config.n_slots,), float("inf")).scatter_reduce(0, ids, scores, reduce="amin")
        old = memory.values.floors(torch.arange(memory.config.n_slots)).clone()

        updater.plan_update(batches)
        for batch in batches:
            updater.step(batch)
        patch = updater.finish_update()[0]

        trained = patch.slot_ids
        assert torch.isfinite(lowest[trained]).all(), "every trained row was read by the update's text"
        earlier = old[trained]
        expected = torch.where(torch.isfinite(earlier), torch.minimum(earlier, lowest[trained]), lowest[trained])
        assert torch.equal(memory.values.floors(trained), expected)
        assert torch.equal(patch.floor_after, expected) and torch.equal(patch.floor_before, old[trained])
        untouched = torch.ones(memory.config.n_slots, dtype=torch.bool)
        untouched[trained] = False
        assert torch.equal(memory.values.floors(torch.arange(memory.config.n_slots))[untouched], old[untouched])
        floors_by_update.append((trained, expected))
    first, second = floors_by_update
    again = first[0][torch.isin(first[0], second[0])]
    assert again.numel() > 0, "the second update trains some of the first one's rows again"
    assert (memory.values.floors(again) <= first[1][torch.isin(first[0], second[0])]).all()
