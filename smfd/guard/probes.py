"""Probe items: what a user asks the model to check what it learned and what it kept.

Two item forms, one per JSONL line:
- cloze  `{"prompt": ..., "target": ...}`: target NLL, and whether a greedy continuation contains it;
- choice `{"ctx": ..., "endings": [...], "label": n}`: multiple choice by length-normalised likelihood.
Each is scored with the learned memory ("now") and with the frozen base ("base").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from smfd.errors import SmfdError
from smfd.model.memory_model import MemoryModel
from smfd.model.scoring import score_choice, score_cloze


@dataclass(frozen=True)
class ProbeItem:
    id: str
    kind: str  # "cloze" | "choice"
    prompt: str
    target: str = ""
    endings: tuple[str, ...] = ()
    label: int = 0


@dataclass(frozen=True)
class Score:
    nll: float
    correct: bool


@dataclass(frozen=True)
class ProbeResult:
    item: ProbeItem
    base: Score
    now: Score


def parse_item(record: object, where: str) -> ProbeItem:
    if not isinstance(record, dict):
        raise SmfdError(f"{where}: a probe item must be a JSON object")
    item_id = str(record.get("id", where.rsplit(":", 1)[-1]))
    if "prompt" in record and "target" in record:
        prompt, target = record["prompt"], record["target"]
        if not isinstance(prompt, str) or not isinstance(target, str) or not prompt.strip() or not target.strip():
            raise SmfdError(f"{where}: 'prompt' and 'target' must be non-empty strings")
        return ProbeItem(item_id, "cloze", prompt, target=target)
    if "ctx" in record and "endings" in record and "label" in record:
        endings, label = record["endings"], record["label"]
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
            raise SmfdError(f"{where}: 'endings' must be a list of at least two strings")
        if not isinstance(label, int) or not 0 <= label < len(endings):
            raise SmfdError(f"{where}: 'label' must be an index into 'endings' (0..{len(endings) - 1}), got {label!r}")
        return ProbeItem(item_id, "choice", str(record["ctx"]), endings=tuple(endings), label=label)
    raise SmfdError(f"{where}: expected {{prompt, target}} or {{ctx, endings, label}}, got keys {sorted(record)}")


def load_items(path: Path, limit: int | None = None) -> list[ProbeItem]:
    """Read probe items from a JSONL file; every bad line is an error naming the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SmfdError(f"cannot read probe file {path}: {exc}") from exc
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SmfdError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        items.append(parse_item(record, f"{path}:{number}"))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise SmfdError(f"probe file {path} has no items")
    return items


def _score(model: MemoryModel, items: list[ProbeItem]) -> list[Score]:
    cloze = [i for i in items if i.kind == "cloze"]
    choice = [i for i in items if i.kind == "choice"]
    cloze_scores = score_cloze(model.model, model.tokenizer, [(i.prompt, i.target) for i in cloze])
    choice_scores = score_choice(model.model, model.tokenizer, [(i.prompt, list(i.endings), i.label) for i in choice])
    by_id = {id(i): Score(r.nll, r.correct) for i, r in zip(cloze, cloze_scores)}
    by_id.update({id(i): Score(r.nll, r.correct) for i, r in zip(choice, choice_scores)})
    return [by_id[id(i)] for i in items]


def score_now(model: MemoryModel, items: list[ProbeItem]) -> list[Score]:
    """Scores with the learned memory."""
    return _score(model, items)


def score_base(model: MemoryModel, items: list[ProbeItem]) -> list[Score]:
    """Scores of the frozen base model (memory bypassed)."""
    with model.base():
        return _score(model, items)


def run_probes(model: MemoryModel, items: list[ProbeItem]) -> list[ProbeResult]:
    return [ProbeResult(i, b, n) for i, b, n in zip(items, score_base(model, items), score_now(model, items))]


def summarize(results: list[ProbeResult]) -> dict[str, object]:
    def side(pick: str) -> dict[str, float]:
        scores = [getattr(r, pick) for r in results]
        return {
            "accuracy": sum(s.correct for s in scores) / len(scores),
            "mean_nll": sum(s.nll for s in scores) / len(scores),
        }

    return {
        "items": len(results),
        "cloze": sum(r.item.kind == "cloze" for r in results),
        "choice": sum(r.item.kind == "choice" for r in results),
        "base": side("base"),
        "now": side("now"),
    }
