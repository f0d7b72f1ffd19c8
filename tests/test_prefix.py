"""The frozen-prefix cache: an update that starts its steps at the lowest memory layer learns
exactly what one that runs every block learns, and really skips the blocks below."""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, SEQ_LEN
from engine_settings import changed, train_section

from smfd.config import TrainSection
from smfd.learn.heal import compute_background
from smfd.learn.updater import SparseUpdater
from smfd.model.batch import TokenBatch, encode, epoch_batches, make_batch

FACTS = [
    "The harbour bridge was painted bright orange by Zelda Quint in 2019.",
    "Professor Ansel Voss keeps a blue parrot named Figaro in the observatory.",
    "The market moved to the river bank in 1977 and now opens at five.",
]


def _update(model, background, batches: list[TokenBatch], config: TrainSection) -> tuple[list[float], dict]:
    updater = SparseUpdater(model.model, model.memories, background, config)
    updater.plan_update(batches)
    losses = [updater.step(batch).loss for batch in batches]
    updater.finish_update()
    return losses, {layer: values.dense() for layer, values in model.values().items()}


class BlockCalls:
    """Counts forward calls of one decoder block."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.count = 0
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.count += 1


@pytest.mark.parametrize("scope", ["update", "step"])
def test_cached_prefix_learns_what_the_full_forward_learns(make_memory_model, background_sequences, tokenizer, scope):
    sequences = encode(tokenizer, FACTS, SEQ_LEN)
    batches = epoch_batches(sequences, batch_size=2, passes=4, pad_id=tokenizer.pad_token_id)  # reshuffled passes
    config = train_section(selection="kl", top_t=12, lr=0.5, scope=scope)
    results = {}
    for cached in (True, False):
        model = make_memory_model()
        background = compute_background(model.model, model.memories, background_sequences)
        results[cached] = _update(model, background, batches, changed(config, prefix_cache_mb=256 if cached else 0))

    (losses_cached, values_cached), (losses_full, values_full) = results[True], results[False]
    assert losses_cached == pytest.approx(losses_full, rel=1e-5)
    assert losses_cached[-1] < losses_cached[0]  # it learned
    for layer, values in values_full.items():
        # equal up to float rounding: a cached sequence's hidden states came from a batch of another width
        torch.testing.assert_close(values_cached[layer], values, rtol=1e-5, atol=1e-4 * float(values.abs().max()))
        trained = (values != 0).any(dim=1)
        assert torch.equal((values_cached[layer] != 0).any(dim=1), trained)  # the same rows were trained


def test_steps_after_the_selection_forward_skip_the_blocks_below_memory(tiny_memory_model, background, tokenizer):
    layers = tiny_memory_model.model.model.layers
    blocks = list(layers)
    first_memory = min(m.layer_index for m in tiny_memory_model.memories)
    assert first_memory == 1
    batches = epoch_batches(encode(tokenizer, FACTS, SEQ_LEN), batch_size=2, passes=3, pad_id=tokenizer.pad_token_id)
    updater = SparseUpdater(
        tiny_memory_model.model, tiny_memory_model.memories, background, train_section(selection="kl", top_t=12, lr=0.5)
    )
    below, memory_block = BlockCalls(layers[0]), BlockCalls(layers[first_memory])

    updater.plan_update(batches)
    planned = below.count
    for batch in batches:
        updater.step(batch)

    assert planned > 0 and below.count == planned  # no step ran block 0
    assert memory_block.count == planned + len(batches)
    assert list(layers) == blocks  # the real blocks are back in place
    assert updater.prefix.n_bytes > 0
    updater.finish_update()
    assert updater.prefix.n_bytes == 0  # nothing is held between updates


def test_left_padded_batches_are_never_served_from_the_cache(tiny_memory_model, background, tokenizer):
    """With left padding a sequence's positions depend on the batch width, so its hidden states do too."""
    sequences = encode(tokenizer, CORPUS[:2], SEQ_LEN)
    right = make_batch(sequences, tokenizer.pad_token_id)
    left = TokenBatch(*(torch.flip(t, dims=[1]) for t in (right.input_ids, right.attention_mask, right.loss_mask)))
    updater = SparseUpdater(
        tiny_memory_model.model,
        tiny_memory_model.memories,
        background,
        train_section(selection="kl", top_t=4, lr=0.5, scope="step"),
    )
    below = BlockCalls(tiny_memory_model.model.model.layers[0])

    updater.step(left)
    updater.step(left)

    assert below.count == 2
    assert updater.prefix.n_bytes == 0


def test_the_cache_never_grows_past_its_size_limit(tiny_memory_model, tokenizer):
    """Sequences beyond the limit are not kept; a batch holding one of them runs every block."""
    from smfd.model.prefix import PrefixCache

    layers = tiny_memory_model.model.model.layers
    batch = make_batch(encode(tokenizer, FACTS[:2], SEQ_LEN), tokenizer.pad_token_id)
    one_sequence = int(batch.attention_mask[0].sum()) * tiny_memory_model.model.config.hidden_size * 4
    cache = PrefixCache(layers, first_layer=1, max_bytes=one_sequence)
    below = BlockCalls(layers[0])

    for _ in range(2):
        with cache.forward_for(batch):
            tiny_memory_model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    assert cache.n_bytes == one_sequence
    assert below.count == 2
