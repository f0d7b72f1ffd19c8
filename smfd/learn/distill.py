"""Context distillation: learn what the model would answer with the document in front of it.

Next-token training on a document teaches its wording: the memory rows read by the exact
sentences learn their next tokens, and a question in other words reads other rows. The frozen
model itself answers reworded questions well when the document is in its prompt. So an update
can train the memory (the student, no document in context) to match the frozen model's
next-token distributions *with* the document in context (the teacher) on queries built from
the document: its sentences, the sentences with words dropped, and the sentences behind
another sentence of the document. No model-written text is needed, and the teacher's soft
targets say what matters at each position (where the document changes nothing, teacher and
base agree and there is nothing to learn).

Per position the teacher keeps its `top_k` most likely next tokens. The student is trained on
KL(teacher ‖ student) over those tokens (teacher renormalised over them). The teacher's KL to
the frozen base at each position is how much the document changes that prediction: it takes
the place of surprise when the update ranks memory slots.

The teacher's context (the document, one forward) is kept as a KV cache and repeated for each
batch of queries, so a query costs its own tokens, not the document's.
"""

from __future__ import annotations

import copy
import inspect
import random

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smfd.config import DistillSection
from smfd.errors import SmfdError
from smfd.model.batch import TeacherTarget, make_batch
from smfd.model.memory import ProductKeyMemory
from smfd.model.retrofit import memory_bypassed
from smfd.text.restate import sentence_restatements

CONTEXT_SEPARATOR = "\n\n"  # between the teacher's document and a query, as the in-context ceiling asks
MIN_QUERY_WORDS = 4  # a sentence shorter than this has too little to drop words from


def drop_words(sentence: str, rate: float, rng: random.Random) -> str:
    """The sentence with about `rate` of its words left out (never all of them, never the first)."""
    words = sentence.split()
    if len(words) < MIN_QUERY_WORDS:
        return sentence
    kept = [words[0]] + [w for w in words[1:] if rng.random() >= rate]
    return " ".join(kept)


def sentence_tail(sentence: str, rng: random.Random) -> str:
    """The sentence from a word between a quarter and three fifths in: the fact reached from its nearby
    words only, as a reworded question that shares the sentence's end reaches it."""
    words = sentence.split()
    if len(words) < 2 * MIN_QUERY_WORDS:
        return sentence
    start = rng.randint(len(words) // 4, max(len(words) * 3 // 5, len(words) // 4))
    return " ".join(words[min(start, len(words) - MIN_QUERY_WORDS) :])


def build_queries(chunks: list[str], config: DistillSection, rng: random.Random) -> list[str]:
    """Queries about the chunks' facts that need no generator: every sentence with words dropped,
    every sentence's tail, and every sentence behind another (random) sentence of the same chunks.

    The sentences themselves and the chunks are added by the caller (they are the next-token
    training texts as well), so nothing here repeats them.
    """
    sentences = [s for chunk in chunks for s in (sentence_restatements(chunk) or [chunk.strip()])]
    queries: list[str] = []
    for index, sentence in enumerate(sentences):
        for _ in range(config.dropped_variants):
            variant = drop_words(sentence, config.drop_rate, rng)
            if variant != sentence:
                queries.append(variant)
        for _ in range(config.tail_variants):
            tail = sentence_tail(sentence, rng)
            if tail != sentence:
                queries.append(tail)
        others = [s for j, s in enumerate(sentences) if j != index]
        for _ in range(config.shuffled_variants if others else 0):
            queries.append(f"{rng.choice(others)} {sentence}")
    return queries


def _cache_argument(model: PreTrainedModel) -> str:
    """The forward's name for a KV cache: `cache` in newer transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _repeat_cache(cache: object, rows: int) -> object:
    """A copy of a one-row KV cache repeated for `rows` queries (the original stays untouched)."""
    repeated = copy.deepcopy(cache)
    repeated.batch_repeat_interleave(rows)  # type: ignore[attr-defined]
    return repeated


@torch.no_grad()
def teacher_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    memories: list[ProductKeyMemory],
    context: str,
    queries: list[list[int]],
    config: DistillSection,
    batch_size: int,
    device: torch.device,
) -> list[TeacherTarget]:
    """The frozen base's top-k next-token distributions on each query with `context` before it,
    and the shift of each from the base's prediction without the context."""
    context_ids = tokenizer(context + CONTEXT_SEPARATOR, add_special_tokens=False).input_ids
    if len(context_ids) > config.max_context_tokens:
        raise SmfdError(
            f"teacher context of {len(context_ids)} tokens exceeds max_context_tokens={config.max_context_tokens}"
        )
    pad_id = tokenizer.pad_token_id
    out: list[TeacherTarget] = []
    with memory_bypassed(memories):
        cache_argument = _cache_argument(model)
        opened = model(input_ids=torch.tensor([context_ids], device=device), use_cache=True)
        prefix = opened[cache_argument] if cache_argument in opened else opened.past_key_values
        for start in range(0, len(queries), batch_size):
            group = queries[start : start + batch_size]
            batch = make_batch(group, pad_id).to(device)
            rows = len(group)
            mask = torch.cat(
                [
                    torch.ones(rows, len(context_ids), dtype=batch.attention_mask.dtype, device=device),
                    batch.attention_mask,
                ],
                dim=1,
            )
            taught = (
                model(
                    input_ids=batch.input_ids,
                    attention_mask=mask,
                    use_cache=False,
                    **{cache_argument: _repeat_cache(prefix, rows)},
                )
                .logits.float()
                .log_softmax(-1)
            )
            base = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float().log_softmax(-1)
            out.extend(_targets(taught, base, group, config.top_k, config.min_shift))
    return out


def _targets(
    taught: torch.Tensor, base: torch.Tensor, group: list[list[int]], top_k: int, min_shift: float
) -> list[TeacherTarget]:
    """Per query: top-k of the teacher's prediction of each token (from the position before it) and its KL to base."""
    logprobs, ids = taught[:, :-1].topk(top_k, dim=-1)
    probs = logprobs.exp()
    probs = probs / probs.sum(-1, keepdim=True)
    base_at = base[:, :-1].gather(-1, ids)
    shift = (probs * (probs.clamp_min(1e-12).log() - base_at)).sum(-1).clamp_min(0)
    targets = []
    for row, seq in enumerate(group):
        n = len(seq)
        pad_ids = F.pad(ids[row, : n - 1], (0, 0, 1, 0)).cpu()
        pad_lp = F.pad(logprobs[row, : n - 1], (0, 0, 1, 0)).cpu()
        row_shift = F.pad(shift[row, : n - 1], (1, 0)).cpu()
        trained = row_shift >= min_shift
        trained[0] = False
        targets.append(TeacherTarget(pad_ids, pad_lp, row_shift, trained))
    return targets
