"""What every benchmark worker process shares: the loaded data and base model, the held-out split,
the chunks, and the retention measures taken on whatever model a method produced."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smfd.bench.data import HeldoutSplit, document_chunks, document_training_texts, split_heldout
from smfd.bench.measure import evaluate_heldout, evaluate_hellaswag, known_facts_correct
from smfd.bench.options import BASE_LOGPROBS_FILE, BenchConfig, Inputs, load_inputs
from smfd.learn.lesson import LearnSettings
from smfd.model.loading import ModelSource, load_base_model
from smfd.model.memory_model import pick_device
from smfd.model.scoring import drift_kl_by_group


@dataclass
class WorkerContext:
    cfg: BenchConfig
    inputs: Inputs
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    device: torch.device
    split: HeldoutSplit
    chunks: list[list[str]]

    @property
    def model_name(self) -> str:
        return self.source.display_name

    def texts(self, restate: bool) -> list[list[str]]:
        return [document_training_texts(c, restate) for c in self.chunks]


def open_context(cfg: BenchConfig) -> WorkerContext:
    """Everything a benchmark process shares between methods: data, base model, device, held-out split, chunks."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    inputs = load_inputs(cfg)
    model, tokenizer, source = load_base_model(cfg.model, Path(cfg.cache_dir))
    device = pick_device(cfg.device)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    split = split_heldout(
        tokenizer, inputs.heldout_text, cfg.heldout_text, cfg.split_sizes(), inputs.background_text, cfg.background_text
    )
    overlap = LearnSettings().chunking.overlap_sentences
    chunks = [
        document_chunks(d, tokenizer, cfg.chunk_tokens, cfg.title_context, cfg.with_paraphrases, overlap)
        for d in tqdm(inputs.documents, desc="chunking", unit="doc", leave=False)
    ]
    return WorkerContext(cfg, inputs, model, tokenizer, source, device, split, chunks)


def logprobs_path(cfg: BenchConfig) -> Path:
    return Path(cfg.out) / BASE_LOGPROBS_FILE


def evaluate_retention(
    ctx: WorkerContext,
    model: PreTrainedModel,
    known_correct: list[int],
    label: str,
    hellaswag: bool = True,
) -> dict[str, Any]:
    """Known facts kept (and which base-correct ones were lost: indices into the known facts), held-out NLL,
    drift and (unless `hellaswag` is False) HellaSwag on the whole set."""
    facts = [ctx.inputs.known_facts[i] for i in known_correct]
    still = known_facts_correct(model, ctx.tokenizer, facts, label) if facts else []
    retain: dict[str, Any] = {}
    if hellaswag:
        retain["hellaswag_acc"] = evaluate_hellaswag(model, ctx.tokenizer, ctx.inputs.hellaswag, label)
        retain["hellaswag_rows"] = len(ctx.inputs.hellaswag)
    return {
        **retain,
        "known_facts_acc": sum(still) / len(still) if still else None,
        "known_facts_items": len(facts),
        "known_facts_lost": [i for i, ok in zip(known_correct, still) if not ok],
        "heldout_nll": evaluate_heldout(model, ctx.split.heldout_windows, label),
        "drift_kl": drift_against_base(ctx, model),
    }


def drift_against_base(ctx: WorkerContext, model: PreTrainedModel) -> float:
    """Mean KL(base || model) on the drift windows, the base's log-probabilities read from the base run's file
    a group of windows at a time (all of them at once: 201 MB for 16 windows of 64 positions x the vocabulary)."""
    with safe_open(str(logprobs_path(ctx.cfg)), framework="pt") as base:

        def base_logprobs(group: range) -> list[torch.Tensor]:
            return [base.get_tensor(f"window_{i:04d}") for i in group]

        return drift_kl_by_group(model, ctx.split.drift_windows, base_logprobs)
