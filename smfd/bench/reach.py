"""Reach: how much of a probe's memory read lands on rows the updates trained.

A probe is answered from memory only through the rows its last prompt token reads (the read
that predicts the target's first token). Recall of reworded prompts is bounded by how much of
a reworded prompt's read lands on trained rows at all, whatever those rows hold; this measures
that bound beside the accuracy, per probe kind, after learning.
"""

from __future__ import annotations

from typing import Any

import torch

from smfd.bench.data import PROBE_KINDS, Document
from smfd.model.memory import Lookup, recording_lookups
from smfd.model.memory_model import MemoryModel


def last_token_reads(memory_model: MemoryModel, prompt: str) -> dict[int, Lookup]:
    """Each memory layer's read (slots and weights after the read cut) at the prompt's last token."""
    mm = memory_model
    ids = mm.tokenizer(prompt, return_tensors="pt").input_ids.to(mm.device)
    with recording_lookups(mm.memories), torch.no_grad():
        mm.model.get_decoder()(input_ids=ids)
        return {
            m.layer_index: Lookup(m.last_lookup.indices[0, -1].flatten(), m.last_lookup.weights[0, -1].flatten())
            for m in mm.memories
            if m.last_lookup is not None
        }


def _share_on(reads: dict[int, Lookup], rows: dict[int, torch.Tensor]) -> float:
    """Share of the read weight (over all layers) that falls on `rows` of each layer; 0 for a silent read."""
    total = sum(float(r.weights.sum()) for r in reads.values())
    if total == 0:
        return 0.0
    hit = sum(float(r.weights[torch.isin(r.indices, rows[layer])].sum()) for layer, r in reads.items())
    return hit / total


def probe_reach(memory_model: MemoryModel, documents: list[Document]) -> dict[str, Any]:
    """Per probe kind: the mean share of the last token's read on trained rows (`{kind}_read_on_trained`)
    and the share of probes with any (`{kind}_reaches_trained`); for paraphrases also the share of
    their read on the rows the matching memorisation prompt reads (`gen_read_on_mem_rows`)."""
    trained = {layer: table.trained_slots() for layer, table in memory_model.values().items()}
    shares: dict[str, list[float]] = {kind: [] for kind in PROBE_KINDS}
    on_mem_rows: list[float] = []
    for doc in documents:
        reads = {kind: [last_token_reads(memory_model, p.prompt) for p in doc.probes[kind]] for kind in PROBE_KINDS}
        for kind in PROBE_KINDS:
            shares[kind] += [_share_on(r, trained) for r in reads[kind]]
        for mem, gen in zip(reads["mem"], reads["gen"]):
            mem_rows = {layer: r.indices[r.weights > 0] for layer, r in mem.items()}
            on_mem_rows.append(_share_on(gen, mem_rows))
    reach: dict[str, Any] = {}
    for kind, values in shares.items():
        reach[f"{kind}_read_on_trained"] = sum(values) / len(values) if values else None
        reach[f"{kind}_reaches_trained"] = sum(v > 0 for v in values) / len(values) if values else None
    reach["gen_read_on_mem_rows"] = sum(on_mem_rows) / len(on_mem_rows) if on_mem_rows else None
    return reach
