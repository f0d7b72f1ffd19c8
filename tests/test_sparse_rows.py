"""The sparse value table reads exactly like the dense table it replaces, and holds only written rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smfd.errors import SmfdError
from smfd.model.sparse_rows import SparseRows, merged_rows, table_problem


@pytest.mark.parametrize("seed", range(5))
def test_reads_match_a_dense_table_through_writes_overwrites_and_zeroing(seed):
    generator = torch.Generator().manual_seed(seed)
    n_slots, width = 3000, 8
    table, dense = SparseRows(n_slots, width), torch.zeros(n_slots, width)
    for _ in range(6):  # rounds of writes, partly over rows written before, some rows back to zero
        slots = torch.randperm(n_slots, generator=generator)[: int(torch.randint(1, 900, (1,), generator=generator))]
        rows = torch.randn(slots.numel(), width, generator=generator)
        rows[: slots.numel() // 10] = 0.0
        table.write(slots, rows)
        dense[slots] = rows
        reads = torch.randint(0, n_slots, (64, 12), generator=generator)
        weights = torch.rand(64, 12, generator=generator)
        expected = F.embedding_bag(reads, dense, per_sample_weights=weights, mode="sum")
        assert torch.equal(table.read(reads, weights), expected)
        assert torch.equal(table.gather(slots), dense[slots])
    assert torch.equal(table.dense(), dense)
    assert torch.equal(table.trained_slots(), (dense != 0).any(dim=1).nonzero().flatten())


def test_the_table_holds_only_written_rows_whatever_its_slot_count():
    table = SparseRows(1024 * 1024, 576)  # a million slots: 2.4 GB if every row were held
    assert table.nbytes() < 16 * 2**20, "a fresh table holds the slot index and no rows"
    table.write(torch.arange(0, 50_000, 10), torch.ones(5000, 576))
    assert table.n_rows == 5000
    assert table.nbytes() < 8 * 2**20 + 2 * 5000 * 576 * 4 + 2**20, "rows held grow by doubling at most"


def test_stored_form_round_trips_and_a_disagreeing_one_is_refused_naming_its_source():
    table = SparseRows(100, 4)
    table.write(torch.tensor([7, 3, 50]), torch.tensor([[1.0] * 4, [0.0] * 4, [2.0] * 4]))
    stored = table.to_tensors()
    assert stored["slot_ids"].tolist() == [7, 50], "canonical: ascending, rows that read as zero left out"

    copy = SparseRows(100, 4)
    copy.load_tensors(stored, "current.safetensors")
    assert torch.equal(copy.dense(), table.dense())

    bad = {"slot_ids": torch.tensor([7, 50]), "rows": torch.ones(3, 4)}
    with pytest.raises(SmfdError, match=r"current\.safetensors: memory rows and their slot index disagree"):
        copy.load_tensors(bad, "current.safetensors")
    assert "outside" in table_problem({"slot_ids": torch.tensor([100]), "rows": torch.ones(1, 4)}, 100, 4)
    assert "twice" in table_problem({"slot_ids": torch.tensor([1, 1]), "rows": torch.ones(2, 4)}, 100, 4)
    with pytest.raises(SmfdError, match="unique"):
        table.write(torch.tensor([1, 1]), torch.ones(2, 4))


def test_merging_stored_rows_equals_writing_them_into_the_table():
    generator = torch.Generator().manual_seed(0)
    table = SparseRows(500, 6)
    table.write(torch.arange(0, 500, 3), torch.randn(167, 6, generator=generator))
    table.write(torch.arange(0, 500, 6), table.gather(torch.arange(0, 500, 6)), torch.rand(84, generator=generator))
    stored = table.to_tensors()
    new_ids = torch.arange(0, 500, 7)
    new_rows = torch.randn(new_ids.numel(), 6, generator=generator)
    new_rows[::5] = 0.0
    new_floors = torch.rand(new_ids.numel(), generator=generator)
    table.write(new_ids, new_rows, new_floors)

    merged = merged_rows(stored, new_ids, new_rows, new_floors)
    expected = table.to_tensors()
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[name], expected[name]) for name in expected)
    assert torch.isfinite(expected["floors"]).any() and torch.isinf(expected["floors"]).any()
