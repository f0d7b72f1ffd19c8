"""Reach: the share of a probe's last-token memory read that lands on trained rows."""

from __future__ import annotations

import torch

from smfd.bench.data import Document, Probe
from smfd.bench.reach import last_token_reads, probe_reach
from smfd.model.memory import MemorySection

OPEN_READS = MemorySection(layers=(1,), n_keys=16, heads=2, k=4, key_dim=16, min_read_weight=0.0)
ORIGINAL = "The harbour bridge was painted bright orange by"
REWORDED = "Zelda Quint, who painted it, chose for the old harbour bridge a colour like"


def document(mem: str, gen: str) -> Document:
    probes = {"mem": (Probe(mem, "Zelda"),), "gen": (Probe(gen, "Zelda"),), "hard": (Probe(gen, "orange"),)}
    return Document("d-0", ORIGINAL + " Zelda Quint.", probes)


def train_rows(memory_model, slots: dict[int, torch.Tensor]) -> None:
    for memory in memory_model.memories:
        ids = slots[memory.layer_index].unique()
        memory.values.write(ids, torch.ones(ids.numel(), memory.values.shape[1]))


def test_nothing_is_reached_before_any_row_is_trained(make_memory_model):
    mm = make_memory_model(OPEN_READS)
    reach = probe_reach(mm, [document(ORIGINAL, REWORDED)])
    assert reach["mem_read_on_trained"] == reach["gen_read_on_trained"] == reach["gen_reaches_trained"] == 0.0


def test_training_exactly_the_original_reads_reaches_all_of_it_and_the_rewording_only_where_reads_overlap(
    make_memory_model,
):
    mm = make_memory_model(OPEN_READS)
    original = last_token_reads(mm, ORIGINAL)
    reworded = last_token_reads(mm, REWORDED)
    train_rows(mm, {layer: read.indices for layer, read in original.items()})

    reach = probe_reach(mm, [document(ORIGINAL, REWORDED)])

    assert reach["mem_read_on_trained"] == 1.0 and reach["mem_reaches_trained"] == 1.0
    layer = next(iter(original))
    shared = torch.isin(reworded[layer].indices, original[layer].indices)
    expected = float(reworded[layer].weights[shared].sum() / reworded[layer].weights.sum())
    assert abs(reach["gen_read_on_trained"] - expected) < 1e-6
    assert abs(reach["gen_read_on_mem_rows"] - expected) < 1e-6
    assert all(m.last_lookup is None and not m.record_lookup for m in mm.memories)
