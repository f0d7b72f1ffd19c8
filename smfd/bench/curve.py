"""The stream curve (`smfd bench --curve-every N`): what a method has learned and kept after every N documents.

Documents are fed one at a time, as everywhere in the benchmark; after every N of them the
training stops for an evaluation of the model as it is at that moment:

- learning: the probes of every document learned so far (`mem_acc`, `gen_acc`, `hard_acc`) and of
  the first N documents alone (`first_mem_acc`, ...): are early documents overwritten by later ones?
- retention: known facts kept (all of the base-correct set), held-out NLL and drift (all windows),
  and HellaSwag on its first `CURVE_HELLASWAG_ROWS` rows only, against the base model on the same
  rows: the one measure an intermediate point shortens, so an 80-document run fits in about an hour.
- memory: how full an SMF memory is (rows trained, rows trained more than once, the share of
  ordinary text's reads landing on trained rows); empty for the dense baselines.

The last point is the run's own final evaluation (the full HellaSwag set), so the curve ends
where the results table stands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smfd.bench.context import WorkerContext, evaluate_retention
from smfd.bench.data import ChoiceItem, Document
from smfd.bench.measure import hellaswag_correct, learning_scores, summarise_learning
from smfd.bench.methods import Learning
from smfd.errors import SmfdError


def check_curve_every(every: int | None, documents: int) -> None:
    """A curve needs a point inside the stream: 1 <= N <= the documents learned."""
    if every is None:
        return
    if every < 1:
        raise SmfdError(f"--curve-every must be >= 1, got {every}")
    if every > documents:
        raise SmfdError(f"--curve-every {every} is larger than the {documents} documents learned")


def intermediate_points(documents: int, every: int | None) -> list[int]:
    """Document counts after which the stream pauses for an evaluation (the final count excluded)."""
    if every is None:
        return []
    return list(range(every, documents, every))


@dataclass(frozen=True)
class CurveReference:
    """What the base model scored on the sets an intermediate point measures, and those sets."""

    hellaswag_items: list[ChoiceItem]  # the first CURVE_HELLASWAG_ROWS rows
    base_hellaswag_acc: float  # the base model's accuracy on those rows
    base_heldout_nll: float


def learning_point(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: list[Document],
    every: int,
    label: str,
) -> dict[str, Any]:
    """Probe accuracy over all `documents` and, prefixed `first_`, over the first `every` of them."""
    scores = learning_scores(model, tokenizer, documents, label)
    return {**summarise_learning(scores), **summarise_learning(scores[:every], "first_")}


def relative_point(reference: CurveReference, retain: dict[str, Any], hellaswag_acc: float) -> dict[str, Any]:
    """Forgetting at a point, against the base model on the same (shortened) sets."""
    nll = retain["heldout_nll"]
    return {
        "hellaswag_drop": (reference.base_hellaswag_acc - hellaswag_acc) * 100,
        "known_facts_retention": retain["known_facts_acc"],
        "heldout_nll_increase_ratio": (nll - reference.base_heldout_nll) / reference.base_heldout_nll,
    }


def hellaswag_subset_acc(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, reference: CurveReference, label: str
) -> float:
    correct = hellaswag_correct(model, tokenizer, reference.hellaswag_items, label)
    return sum(correct) / len(correct)


def known_facts_forgetting(
    ctx: WorkerContext, learning: Learning, known_correct: list[int], lost: list[int]
) -> dict[str, Any]:
    """Where the method lost the base-correct known facts it lost (smfd.bench.forgetting; empty for dense methods)."""
    facts = ctx.inputs.known_facts
    gone = set(lost)
    return learning.forgetting([facts[i] for i in lost], [facts[i] for i in known_correct if i not in gone])


def final_point(
    documents: int, learn: dict[str, Any], retain: dict[str, Any], memory: dict[str, Any], forgetting: dict[str, Any]
) -> dict[str, Any]:
    """The run's full evaluation as the curve's last point (its `relative` is the method's, added by the runner)."""
    return {
        "documents": documents,
        "learn": learn,
        "retain": retain,
        "memory": memory,
        "forgetting": forgetting,
        "final": True,
    }


def curve_point(
    ctx: WorkerContext, learning: Learning, reference: CurveReference, known_correct: list[int], n: int, label: str
) -> dict[str, Any]:
    """The model after `n` documents of the stream (smfd.bench.curve); training resumes in the mode it was in."""
    model = learning.eval_model()
    training = model.training
    model.eval()
    started = time.perf_counter()
    where = f"{label} @{n}"
    learn = learning_point(model, ctx.tokenizer, ctx.inputs.documents[:n], ctx.cfg.curve_every or n, where)
    hellaswag = hellaswag_subset_acc(model, ctx.tokenizer, reference, where)
    retain = {
        "hellaswag_acc": hellaswag,
        "hellaswag_rows": len(reference.hellaswag_items),
        **evaluate_retention(ctx, model, known_correct, where, hellaswag=False),
    }
    forgetting = known_facts_forgetting(ctx, learning, known_correct, retain["known_facts_lost"])
    model.train(training)
    point = {
        "documents": n,
        "learn": learn,
        "retain": retain,
        "relative": relative_point(reference, retain, hellaswag),
        "memory": learning.memory(),
        "forgetting": forgetting,
        "eval_seconds": time.perf_counter() - started,
    }
    tqdm.write(
        f"{label} after {n} documents: mem {learn['mem_acc']:.2f}, gen {learn['gen_acc']:.2f}, "
        f"first mem {learn['first_mem_acc']:.2f}, known facts kept {retain['known_facts_acc']}"
    )
    return point
