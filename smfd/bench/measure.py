"""What the benchmark measures on a model: probe accuracy (learning), retention (HellaSwag, known
facts, held-out NLL, drift) and cost (step speed on a fixed batch, peak memory)."""

from __future__ import annotations

import resource
import time
from typing import Any, TypeVar

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smfd.bench.data import (
    PROBE_KINDS,
    ChoiceItem,
    Document,
    HeldoutSplit,
    KnownFact,
)
from smfd.bench.methods import Learning
from smfd.learn.distill import CONTEXT_SEPARATOR
from smfd.learn.updater import causal_lm_loss
from smfd.model.batch import TokenBatch, make_batch
from smfd.model.scoring import heldout_nll, next_token_logprobs, score_choice, score_cloze

T = TypeVar("T")
EVAL_BATCH = 32  # rows per progress step
CHOICE_PAIRS_PER_FORWARD = 16  # (context, ending) pairs per forward: bounds the full-vocabulary log-prob tensors


# ---------------------------------------------------------------- evaluation


def _batches(items: list[T], size: int, desc: str) -> list[list[T]]:
    groups = [items[i : i + size] for i in range(0, len(items), size)]
    return tqdm(groups, desc=desc, unit="batch", leave=False)  # type: ignore[return-value]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def learning_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: list[Document],
    label: str,
    in_context: bool = False,
) -> list[dict[str, list[tuple[bool, float]]]]:
    """Per document and probe kind: (target inside the greedy continuation, mean target NLL) of each probe.

    `in_context`: each prompt is preceded by its own document's text and a blank line (the ceiling
    a learned memory is measured against).
    """
    scores = []
    for doc in tqdm(documents, desc=f"{label}: probes", unit="doc", leave=False):
        items = [(kind, p) for kind in PROBE_KINDS for p in doc.probes[kind]]
        prefix = doc.text + CONTEXT_SEPARATOR if in_context else ""
        scored = score_cloze(model, tokenizer, [(prefix + p.prompt, p.target) for _, p in items])
        per_kind: dict[str, list[tuple[bool, float]]] = {kind: [] for kind in PROBE_KINDS}
        for (kind, _), result in zip(items, scored):
            per_kind[kind].append((result.correct, result.nll))
        scores.append(per_kind)
    return scores


def summarise_learning(scores: list[dict[str, list[tuple[bool, float]]]], prefix: str = "") -> dict[str, Any]:
    """`{prefix}{kind}_acc`, `_nll` and `_items` over the documents' probe scores."""
    learn: dict[str, Any] = {}
    for kind in PROBE_KINDS:
        results = [result for doc in scores for result in doc[kind]]
        learn[f"{prefix}{kind}_acc"] = _mean([float(ok) for ok, _ in results])
        learn[f"{prefix}{kind}_nll"] = _mean([nll for _, nll in results])
        learn[f"{prefix}{kind}_items"] = len(results)
    return learn


def evaluate_learning(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: list[Document],
    label: str,
    in_context: bool = False,
) -> dict[str, Any]:
    """Cloze accuracy (target inside the greedy continuation) and mean target NLL per probe kind."""
    return summarise_learning(learning_scores(model, tokenizer, documents, label, in_context))


def hellaswag_correct(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[ChoiceItem], label: str
) -> list[bool]:
    """Whether the model picks each item's right ending."""
    correct: list[bool] = []
    for group in _batches(items, EVAL_BATCH, f"{label}: hellaswag"):
        results = score_choice(
            model,
            tokenizer,
            [(i.context, list(i.endings), i.label) for i in group],
            batch_size=CHOICE_PAIRS_PER_FORWARD,
        )
        correct.extend(r.correct for r in results)
    return correct


def evaluate_hellaswag(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[ChoiceItem], label: str
) -> float:
    return sum(hellaswag_correct(model, tokenizer, items, label)) / len(items)


def known_facts_correct(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: list[KnownFact], label: str
) -> list[bool]:
    out: list[bool] = []
    for group in _batches(facts, EVAL_BATCH, f"{label}: known facts"):
        out.extend(r.correct for r in score_cloze(model, tokenizer, [(f.prompt, f.answer) for f in group]))
    return out


def evaluate_heldout(model: PreTrainedModel, windows: list[list[int]], label: str) -> float:
    """Mean NLL per predicted token over all windows (token-weighted across batches)."""
    total, count = 0.0, 0
    for group in _batches(windows, 4, f"{label}: held-out NLL"):
        n = sum(len(w) - 1 for w in group)
        total += heldout_nll(model, group) * n
        count += n
    return total / count


def logprobs(model: PreTrainedModel, windows: list[list[int]]) -> list[torch.Tensor]:
    return next_token_logprobs(model, windows)


# ---------------------------------------------------------------- timing and memory


def peak_memory(device: torch.device, prefix: str = "peak_memory") -> dict[str, Any]:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on CPU.

    Read right after training, so evaluation (whose full-vocabulary log-probs can outgrow a
    small model's training) does not decide the method's cost; then again after evaluation.
    On CUDA the peak counter is reset after each reading; ru_maxrss cannot be reset.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
        return {f"{prefix}_bytes": peak, f"{prefix}_kind": "cuda_max_allocated", f"{prefix}_rss_bytes": rss}
    return {f"{prefix}_bytes": rss, f"{prefix}_kind": "ru_maxrss"}


def timing_batch(split: HeldoutSplit, tokenizer: PreTrainedTokenizerBase) -> TokenBatch:
    return make_batch(split.timing_rows, tokenizer.pad_token_id)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def same_batch_speed(
    learning: Learning, batch: TokenBatch, steps: int, device: torch.device, passes: int
) -> dict[str, Any]:
    """Like-for-like step speed on one fixed batch, each method as its update runs it.

    The update is opened as in training (`begin_document`: SMF plans its slots there, and that
    forward fills its frozen-prefix cache), then one warm-up and `steps` timed steps. The
    planning time is reported, and `update_tokens_per_second_same_batch` charges it to an
    update of `passes` passes over the batch, so the prefix cache's saving is not counted free.
    """
    surprise = learning.surprise(batch.input_ids.tolist())
    if surprise is not None:
        batch = TokenBatch(batch.input_ids, batch.attention_mask, batch.loss_mask, torch.stack(surprise))
    batch = batch.to(device)
    _sync(device)
    started = time.perf_counter()
    learning.begin_document([batch])
    _sync(device)
    plan_seconds = time.perf_counter() - started
    learning.step(batch)
    seconds = 0.0
    for _ in range(steps):
        _sync(device)
        started = time.perf_counter()
        learning.step(batch)
        _sync(device)
        seconds += time.perf_counter() - started
    learning.end_document()
    step_seconds = seconds / steps
    return {
        "step_tokens_per_second_same_batch": batch.n_tokens / step_seconds,
        "step_seconds_same_batch": step_seconds,
        "plan_seconds_same_batch": plan_seconds,
        "update_tokens_per_second_same_batch": passes * batch.n_tokens / (plan_seconds + passes * step_seconds),
        "same_batch_shape": list(batch.input_ids.shape),
    }


@torch.no_grad()
def forward_speed(model: PreTrainedModel, batch: TokenBatch, steps: int, device: torch.device) -> float:
    """Tokens per second of the loss forward alone on the timing batch: the floor under every method's step."""
    batch = batch.to(device)
    causal_lm_loss(model, batch)
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        causal_lm_loss(model, batch)
    _sync(device)
    return steps * batch.n_tokens / (time.perf_counter() - started)
