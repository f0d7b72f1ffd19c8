"""Shared fixtures for the engine tests: a tiny random Llama, a real in-memory BPE tokenizer,
a memory-augmented model and background statistics. Nothing is downloaded, and each fixture
builds in milliseconds, so tests that change a model always get a fresh one."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from smfd.config import MemorySection
from smfd.learn.heal import compute_background
from smfd.model.batch import TokenBatch, encode, make_batch
from smfd.model.memory_model import MemoryModel
from smfd.model.slot_stats import BackgroundStats


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread: the test models are tiny, and waking a thread pool for each small
    matmul costs far more than the matmul (tens of milliseconds per call on small machines)."""
    torch.set_num_threads(1)


VOCAB_SIZE = 300
SEQ_LEN = 32

CORPUS = [
    "The harbour bridge was designed by the engineer Alice Smith in 1932. It spans three kilometres "
    "across the bay and carries two railway lines, eight lanes of traffic and a footpath.",
    "Traffic grew quickly after the opening of the bridge. Tolls paid for its upkeep until 1950, "
    "when the city council took over the maintenance and painted the arch grey.",
    "The river rises in the northern hills and flows south through farmland, small towns and a "
    "large forest before it reaches the sea near the old fishing port.",
    "In the autumn the market sells apples, pears, pumpkins and honey. Farmers arrive before dawn "
    "and the stalls stay open until the evening bell rings at the town hall.",
    "The library holds about forty thousand books, a collection of maps and the letters of the "
    "first mayor. Visitors may read in the main hall every day except Sunday.",
    "A small observatory stands on the hill above the town. Its telescope was built in 1889 and is "
    "still used by students who study the moon, the planets and distant stars.",
]


def _train_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    """A real fast byte-level BPE tokenizer, trained in memory (never mutated by tests)."""
    trained = _train_tokenizer()
    assert len(trained) <= VOCAB_SIZE
    return trained


def build_base_model(seed: int = 0) -> LlamaForCausalLM:
    """A tiny seeded Llama, frozen and in eval mode like `load_base_model` returns it."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    model.requires_grad_(False)
    return model


TINY_MEMORY = MemorySection(layers=(1,), n_keys=16, heads=2, k=4, key_dim=16)


@pytest.fixture(scope="session")
def memory_config() -> MemorySection:
    return TINY_MEMORY


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """The tiny model and tokenizer saved as a Hugging Face model folder, for the daemon run as a process."""
    folder = tmp_path_factory.mktemp("tiny-model")
    build_base_model().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def make_base_model() -> Callable[..., LlamaForCausalLM]:
    """Factory for a fresh tiny base model (same weights for the same seed)."""
    return build_base_model


@pytest.fixture
def base_model() -> LlamaForCausalLM:
    return build_base_model()


@pytest.fixture(scope="session")
def make_memory_model(tokenizer) -> Callable[..., MemoryModel]:
    """Factory for a fresh memory-augmented tiny model; every call returns identical weights."""

    def make(config: MemorySection = TINY_MEMORY, seed: int = 0) -> MemoryModel:
        return MemoryModel.attach(build_base_model(seed), tokenizer, config)

    return make


@pytest.fixture
def tiny_memory_model(make_memory_model) -> MemoryModel:
    return make_memory_model()


@pytest.fixture(scope="session")
def background_sequences(tokenizer) -> list[list[int]]:
    """General text, tokenized: one background batch per sequence."""
    return encode(tokenizer, CORPUS, SEQ_LEN)


@pytest.fixture
def background(tiny_memory_model, background_sequences) -> dict[int, BackgroundStats]:
    return compute_background(tiny_memory_model.model, tiny_memory_model.memories, background_sequences)


@pytest.fixture(scope="session")
def text_batches(tokenizer) -> Callable[[list[str], int], list[TokenBatch]]:
    """Turn texts into right-padded training batches of `batch_size` sequences each."""

    def make(texts: list[str], batch_size: int = 2) -> list[TokenBatch]:
        sequences = encode(tokenizer, texts, SEQ_LEN)
        return [
            make_batch(sequences[start : start + batch_size], tokenizer.pad_token_id)
            for start in range(0, len(sequences), batch_size)
        ]

    return make


def clone_values(model: MemoryModel) -> dict[int, torch.Tensor]:
    """A dense copy of every memory's value table, keyed by layer (tiny tables: tests only)."""
    return {layer: values.dense() for layer, values in model.values().items()}


def write_all_rows(memory, table: torch.Tensor) -> None:
    """Set every row of a memory's value table from a dense (n_slots, width) tensor."""
    memory.values.write(torch.arange(memory.values.n_slots), table)


def clone_memory_state(model: MemoryModel) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.memory_state().items()}


@pytest.fixture(scope="session")
def snapshot_values() -> Callable[[MemoryModel], dict[int, torch.Tensor]]:
    return clone_values


@pytest.fixture(scope="session")
def snapshot_memory_state() -> Callable[[MemoryModel], dict[str, torch.Tensor]]:
    return clone_memory_state


def states_equal(left: dict, right: dict) -> bool:
    """Same keys and bit-identical tensors."""
    return left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


@pytest.fixture(scope="session")
def bit_identical() -> Callable[[dict, dict], bool]:
    return states_equal


@pytest.fixture
def journal(tmp_path):
    """A real SQLite journal in the test's folder."""
    from smfd.ingest.journal import Journal

    with Journal(tmp_path / "journal.db") as opened:
        yield opened


@pytest.fixture
def store(tmp_path, tiny_memory_model, background):
    """A checkpoint store initialised at version 0 with the tiny memory model."""
    from smfd.store.checkpoint import CheckpointStore

    created = CheckpointStore(tmp_path / "checkpoint", keep=3)
    created.initialise(tiny_memory_model, background)
    return created
