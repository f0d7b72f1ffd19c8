"""Retrofitting memory: attaching it must not change the model, and bad sizes fail with a clear message."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import write_all_rows
from engine_settings import changed
from pydantic import ValidationError
from transformers import GPT2Config, GPT2LMHeadModel

from smfd.config import MemorySection
from smfd.errors import SmfdError
from smfd.learn.heal import calibrate_from_inputs, memory_inputs
from smfd.model.memory import ProductKeyMemory
from smfd.model.memory_model import MemoryModel
from smfd.model.retrofit import attach_memory


@pytest.fixture
def input_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer("The bridge spans the bay, and the river rises in the hills.", add_special_tokens=False).input_ids
    return torch.tensor([ids, list(reversed(ids))])


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_attach_leaves_logits_bit_identical_before_any_update(make_base_model, tokenizer, memory_config, input_ids):
    base = logits(make_base_model(), input_ids)
    model = MemoryModel.attach(make_base_model(), tokenizer, memory_config)

    assert len(model.memories) == 1 and model.memories[0].layer_index == 1
    assert torch.equal(logits(model.model, input_ids), base)


def test_attach_on_several_layers_also_leaves_logits_bit_identical(make_base_model, tokenizer, input_ids):
    base = logits(make_base_model(), input_ids)
    config = MemorySection(layers=(2, 0), n_keys=16, heads=2, k=4, key_dim=16)
    model = MemoryModel.attach(make_base_model(), tokenizer, config)

    assert [m.layer_index for m in model.memories] == [0, 2]
    assert [m.layer_index for m in _memories(model.model)] == [0, 2]
    assert torch.equal(logits(model.model, input_ids), base)


def test_attached_memory_is_frozen_and_only_values_start_at_zero(tiny_memory_model):
    memory = tiny_memory_model.memories[0]
    assert not any(p.requires_grad for p in tiny_memory_model.model.parameters())
    assert torch.count_nonzero(memory.values.dense()) == 0
    assert memory.values.shape == (16 * 16, 32)
    assert memory.values.n_rows == 0, "a fresh memory holds no value rows"
    assert torch.count_nonzero(memory.keys) > 0


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"layers": (3,)}, "[3] out of range"),
        ({"layers": (-4,)}, "[-4] out of range"),
        ({"layers": (1, 1)}, "names a layer twice"),
        ({"layers": (2, -1)}, "names a layer twice"),
    ],
)
def test_layers_the_model_lacks_raise_smfd_error_and_leave_the_model_alone(
    make_base_model, tokenizer, memory_config, changes, named
):
    base = make_base_model()
    before = {name: p.clone() for name, p in base.named_parameters()}
    bad = changed(memory_config, **changes)

    with pytest.raises(SmfdError, match=re.escape(named)):
        MemoryModel.attach(base, tokenizer, bad)
    # Validation happens before any layer is wrapped: the model is left as it was.
    assert _memories(base) == []
    assert all(torch.equal(p, before[name]) for name, p in base.named_parameters())


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"layers": ()}, "layers"),
        ({"key_dim": 15}, "key_dim must be even"),
        ({"k": 17}, "k (17) must not exceed n_keys (16)"),
        ({"k": 0}, "k"),
        ({"heads": 0}, "heads"),
        ({"read_temperature": 0.0}, "read_temperature"),
    ],
)
def test_memory_shapes_that_cannot_be_built_are_refused_by_the_schema(memory_config, changes, named):
    with pytest.raises(ValidationError, match=re.escape(named)):
        changed(memory_config, **changes)


def test_out_of_range_layer_message_names_the_model_depth(make_base_model, tokenizer, memory_config):
    with pytest.raises(SmfdError, match=r"3 decoder layers \(0\.\.2, or -3\.\.-1 counted from the top\)"):
        MemoryModel.attach(make_base_model(), tokenizer, changed(memory_config, layers=(7,)))


def test_negative_layers_count_from_the_top(make_base_model, tokenizer, memory_config):
    """`layers: [-1]` is the last block whatever the model's depth, so one config fits any model."""
    base = make_base_model()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    before = base(ids).logits
    retrofitted = MemoryModel.attach(base, tokenizer, changed(memory_config, layers=(-1, 0)))
    assert [m.layer_index for m in retrofitted.memories] == [0, 2]
    assert torch.equal(retrofitted.model(ids).logits, before)


def test_model_without_decoder_layer_stack_raises_naming_the_architecture(tokenizer, memory_config):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2))

    with pytest.raises(SmfdError, match="GPT2LMHeadModel"):
        MemoryModel.attach(gpt2, tokenizer, memory_config)


def test_attaching_twice_to_the_same_layer_is_refused(tiny_memory_model, memory_config):
    with pytest.raises(SmfdError, match="layer 1 already has a memory attached"):
        attach_memory(tiny_memory_model.model, memory_config)


def test_memory_bypassed_returns_base_logits_after_values_changed(make_base_model, tokenizer, memory_config, input_ids):
    base = logits(make_base_model(), input_ids)
    model = MemoryModel.attach(make_base_model(), tokenizer, memory_config)
    write_all_rows(model.memories[0], torch.randn(256, 32, generator=torch.Generator().manual_seed(1)))

    changed = logits(model.model, input_ids)
    with model.base():
        bypassed = logits(model.model, input_ids)
    after = logits(model.model, input_ids)

    assert not torch.allclose(changed, base), "changed values must change the output"
    assert torch.equal(bypassed, base)
    assert torch.equal(after, changed), "leaving the context must re-enable the memory"


def test_memory_bypassed_restores_memory_even_when_the_body_raises(tiny_memory_model):
    with pytest.raises(RuntimeError):
        with tiny_memory_model.base():
            raise RuntimeError("boom")
    assert all(m.enabled for m in tiny_memory_model.memories)


def test_memory_state_round_trips_and_refuses_a_state_from_other_layers(
    make_memory_model, memory_config, bit_identical
):
    source = make_memory_model()
    write_all_rows(source.memories[0], torch.rand(256, 32) * 2 - 1)
    state = source.memory_state()
    assert set(state) == {
        "1.query.weight",
        "1.keys",
        "1.values.slot_ids",
        "1.values.rows",
        "1.values.floors",
        "1.gate.weight",
        "1.out.weight",
        "1.query_shift",
        "1.query_scale",
    }

    target = make_memory_model()
    target.load_memory_state(state)
    assert bit_identical(target.memory_state(), state)

    older = {name: tensor for name, tensor in state.items() if name != "1.values.floors"}  # before read floors
    target.load_memory_state(older)
    assert torch.equal(target.memory_state()["1.values.rows"], state["1.values.rows"])
    assert torch.isneginf(target.memory_state()["1.values.floors"]).all()

    other = make_memory_model(changed(memory_config, layers=(2,)))
    with pytest.raises(SmfdError, match="other memory.layers"):
        other.load_memory_state(state)


def test_memory_state_without_calibration_buffers_names_the_cause(make_memory_model):
    state = make_memory_model().memory_state()
    del state["1.query_shift"], state["1.query_scale"]
    with pytest.raises(SmfdError, match="saved without query calibration"):
        make_memory_model().load_memory_state(state)


def test_memory_state_with_wrong_shape_is_refused(make_memory_model, memory_config):
    small = make_memory_model(changed(memory_config, n_keys=8, k=4))
    with pytest.raises(SmfdError, match=r"1\.keys has shape \(2, 2, 8, 8\), expected \(2, 2, 16, 8\)"):
        make_memory_model().load_memory_state(small.memory_state())


def test_lower_read_temperature_reads_the_same_slots_with_weight_on_the_best():
    config = MemorySection(layers=(0,), n_keys=16, heads=2, k=4, key_dim=16, seed=3, min_read_weight=0.0)
    soft = ProductKeyMemory(32, config, 0)
    sharp = ProductKeyMemory(32, changed(config, read_temperature=0.25), 0)
    hidden = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))

    a, b = soft.lookup(hidden), sharp.lookup(hidden)

    assert torch.equal(a.indices, b.indices)
    assert torch.allclose(b.weights.sum(-1), torch.ones(2, 5, 2))
    # Sorted best-first, so the first weight is the best slot's: sharper means more of the read lands there.
    assert bool((b.weights[..., 0] > a.weights[..., 0]).all())


def test_memory_layer_is_deterministic_for_a_seed():
    config = MemorySection(layers=(0,), n_keys=16, heads=2, k=4, key_dim=16, seed=3)
    first, second = ProductKeyMemory(32, config, 0), ProductKeyMemory(32, config, 0)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_query_calibration_standardises_queries_and_keeps_logits_bit_identical(
    make_base_model, tokenizer, memory_config, input_ids, background_sequences
):
    base = logits(make_base_model(), input_ids)
    model = MemoryModel.attach(make_base_model(), tokenizer, memory_config)
    memory = model.memories[0]
    calibrate_from_inputs(model.memories, memory_inputs(model.model, model.memories, background_sequences))

    hidden = []
    handle = memory.register_forward_hook(
        lambda module, args, output: hidden.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        for seq in background_sequences:
            model.model.get_decoder()(input_ids=torch.tensor([seq]))
    handle.remove()

    with torch.no_grad():
        queries = (memory.query(torch.cat(hidden)) - memory.query_shift) * memory.query_scale
    assert queries.mean(0).abs().max() < 1e-3
    assert torch.allclose(queries.std(0), torch.ones(queries.shape[1]), atol=1e-3)
    assert torch.equal(logits(model.model, input_ids), base)  # values are still zero: the model is unchanged


def test_query_calibration_can_be_turned_off(make_base_model, tokenizer, memory_config, background_sequences):
    model = MemoryModel.attach(make_base_model(), tokenizer, changed(memory_config, query_norm=False))
    calibrate_from_inputs(model.memories, memory_inputs(model.model, model.memories, background_sequences))
    assert torch.equal(model.memories[0].query_shift, torch.zeros_like(model.memories[0].query_shift))
    assert torch.equal(model.memories[0].query_scale, torch.ones_like(model.memories[0].query_scale))


def test_reads_at_or_below_min_read_weight_count_for_nothing():
    """A row a token reads only weakly can change without changing that token's output."""
    config = MemorySection(layers=(0,), n_keys=16, heads=2, k=4, key_dim=16, seed=3, min_read_weight=0.3)
    memory = ProductKeyMemory(32, config, 0)
    hidden = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(1))
    dense, cut = memory.lookup(hidden, dense=True), memory.lookup(hidden)
    assert torch.equal(dense.indices, cut.indices)
    assert torch.equal(cut.weights, torch.where(dense.weights > 0.3, dense.weights, torch.zeros_like(dense.weights)))

    weak = (dense.weights > 0) & (dense.weights <= 0.3)
    strong = cut.weights > 0
    slot = int(next(s for s in dense.indices[weak].tolist() if s not in set(dense.indices[strong].tolist())))
    readers = (dense.indices == slot).any(-1).any(-1)[0]  # tokens that have the slot among their candidates
    before = memory(hidden).detach()
    memory.values.write(torch.tensor([slot]), torch.randn(1, 32, generator=torch.Generator().manual_seed(2)) * 10)

    after = memory(hidden).detach()
    assert bool(readers.any())
    assert torch.equal(after, before)  # every reader of the slot read it weakly: nothing moved

    memory.values.write(dense.indices[strong][:1], torch.full((1, 32), 10.0))
    assert not torch.equal(memory(hidden).detach(), before)


def test_min_read_weight_must_be_a_fraction():
    with pytest.raises(ValidationError, match="min_read_weight"):
        MemorySection(layers=(0,), min_read_weight=1.0)


def _memories(model: torch.nn.Module) -> list[ProductKeyMemory]:
    """The memory layers a model holds, in layer order."""
    return sorted((m for m in model.modules() if isinstance(m, ProductKeyMemory)), key=lambda m: m.layer_index)


@pytest.mark.parametrize("margin", [0.0, 0.3])
def test_a_read_scoring_below_its_rows_floor_counts_for_nothing(memory_config, margin):
    """A trained row answers only reads that score at least its floor minus the margin; rows without a
    floor, and every row when the margin is unset, answer as before."""
    torch.manual_seed(0)
    hidden = torch.randn(1, 12, 32)
    gated = ProductKeyMemory(32, changed(memory_config, read_floor_margin=margin), layer_index=1)
    plain = ProductKeyMemory(32, changed(memory_config, read_floor_margin=None), layer_index=1)
    plain.load_state_dict(gated.state_dict())
    before = gated.lookup(hidden)
    assert torch.equal(before.weights, plain.lookup(hidden).weights), "no floors yet: nothing is cut"

    read = torch.unique(before.indices[before.weights > 0])
    floored, unfloored = read[::2], read[1::2]
    floor = before.scores[before.weights > 0].median()
    for memory in (gated, plain):
        memory.values.write(read, torch.ones(read.numel(), 32))
        memory.values.set_floors(floored, torch.full((floored.numel(),), float(floor)))

    after = gated.lookup(hidden)
    has_floor = torch.isin(before.indices, floored)
    cut = has_floor & (before.scores < floor - margin)
    assert cut.any() and (has_floor & ~cut & (before.weights > 0)).any()
    assert torch.equal(after.weights, before.weights * ~cut)
    assert torch.equal(plain.lookup(hidden).weights, before.weights), "margin unset: floors are ignored"
    assert torch.isin(unfloored, before.indices[after.weights > 0]).all()
