"""Retention probes and the update guard: does the model still know what it knew?

Suites come from the config (cloze, choice, held-out text) plus a drift prompt set. The first
run records the frozen base model's results; for cloze and choice suites only the items the
base gets right are tracked, so "accuracy" means "share of what the base knew that is kept".

After each update a fast subset runs (the known answer's NLL on the first `fast_subset` tracked
items of each suite, the first held-out windows, drift KL on the first drift prompts); the guard compares it with
the last accepted state. On a schedule the full set runs, including greedy cloze accuracy.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch

from smfd.config import ProbesSection, ProbeSuite
from smfd.durable import atomic_write_json, atomic_write_text, read_rebuildable_json
from smfd.errors import SmfdError
from smfd.guard.probes import ProbeItem, load_items
from smfd.ingest.sidecars import SIDECAR_KIND, RecallItem
from smfd.model.memory_model import MemoryModel
from smfd.model.scoring import (
    continuation_scores,
    drift_kl_by_group,
    heldout_nll,
    next_token_logprobs,
    score_choice,
    score_cloze,
    text_windows,
)
from smfd.paths import StatePaths, builtin_file, read_prompts

log = structlog.get_logger("smfd.guard.retention")

HELDOUT_WINDOW = 128
RECALL_KEPT = 500  # recall probes kept on disk (newest)
RECALL_MEASURED = 64  # newest recall probes scored in a full run
FAST_HELDOUT_WINDOWS = 4  # a single window is a noisy judge of held-out NLL for the guard
FAST_DRIFT_PROMPTS = 16
DRIFT_BATCH = 4  # drift prompts scored at once (base and now): two batches of logits over the vocabulary at a time
# (8 held about 40 MB above the daemon's base, as much as a training step)
FULL_HELDOUT_WINDOWS = 8


def builtin_suites() -> list[ProbeSuite]:
    """The probe set shipped with smfd (written by the project)."""
    return [
        ProbeSuite(name="known_facts", kind="cloze", path=builtin_file("known_facts.jsonl")),
        ProbeSuite(name="commonsense", kind="choice", path=builtin_file("choice.jsonl")),
        ProbeSuite(name="heldout", kind="heldout", path=builtin_file("heldout.txt")),
    ]


@dataclass
class Suite:
    name: str
    kind: str
    items: list[ProbeItem] = field(default_factory=list)
    windows: list[list[int]] = field(default_factory=list)
    tracked: list[ProbeItem] = field(default_factory=list)


Measures = dict[str, dict[str, float]]


class RetentionProbes:
    def __init__(
        self, model: MemoryModel, config: ProbesSection, state_dir: Path, include_builtin: bool = True
    ) -> None:
        self.model = model
        self.config = config
        paths = StatePaths(state_dir)
        self.state_file = paths.probe_base
        self.last_file = paths.probe_last
        self.recall_file = paths.recall
        specs = (builtin_suites() if include_builtin else []) + list(config.suites)
        self.suites = [self._load_suite(spec) for spec in specs]
        drift_path = config.drift_prompts or (builtin_file("drift_prompts.txt") if include_builtin else None)
        prompts = [] if drift_path is None else read_prompts(drift_path)
        self.drift_windows = [model.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        self.base: Measures = {}

    def _load_suite(self, spec: ProbeSuite) -> Suite:
        if spec.kind == "heldout":
            try:
                text = Path(spec.path).read_text(encoding="utf-8")
            except OSError as exc:
                raise SmfdError(f"probe suite {spec.name}: cannot read {spec.path}: {exc}") from exc
            windows = text_windows(self.model.tokenizer, text, HELDOUT_WINDOW, None)
            if not windows:
                raise SmfdError(f"probe suite {spec.name}: {spec.path} has no text")
            return Suite(spec.name, "heldout", windows=windows[: spec.limit or FULL_HELDOUT_WINDOWS])
        items = load_items(Path(spec.path), spec.limit)
        wrong = [i.id for i in items if i.kind != spec.kind]
        if wrong:
            raise SmfdError(f"probe suite {spec.name} is kind {spec.kind} but items {wrong[:3]} are not")
        return Suite(spec.name, spec.kind, items=items)

    # ---- baseline ----------------------------------------------------------------------
    def establish_baseline(self) -> Measures:
        """Score the frozen base once (cached on disk) and pick the tracked items."""
        cached = read_rebuildable_json(self.state_file)  # damaged: the base is scored again
        cached = cached if isinstance(cached, dict) else {}
        with self.model.base():
            for suite in self.suites:
                if suite.kind == "heldout":
                    continue
                known = cached.get("tracked", {}).get(suite.name)
                if known is None:
                    correct = self._correct(suite.kind, suite.items)
                    known = [i.id for i, ok in zip(suite.items, correct) if ok]
                ids = set(known)
                suite.tracked = [i for i in suite.items if i.id in ids]
            self.base = cached.get("measures") or self.measure(fast=False, compare_drift=False)
        atomic_write_json(
            self.state_file,
            {
                "tracked": {s.name: [i.id for i in s.tracked] for s in self.suites if s.kind != "heldout"},
                "measures": self.base,
            },
        )
        return self.base

    def _correct(self, kind: str, items: list[ProbeItem]) -> list[bool]:
        m, tok = self.model.model, self.model.tokenizer
        if kind == "cloze":
            return [r.correct for r in score_cloze(m, tok, [(i.prompt, i.target) for i in items])]
        return [r.correct for r in score_choice(m, tok, [(i.prompt, list(i.endings), i.label) for i in items])]

    # ---- measuring ---------------------------------------------------------------------
    def measure(self, fast: bool, compare_drift: bool = True) -> Measures:
        """Accuracy (tracked items still right) and NLL per suite, plus drift; fast = the post-update subset."""
        m, tok = self.model.model, self.model.tokenizer
        out: Measures = {}
        for suite in self.suites:
            if suite.kind == "heldout":
                windows = suite.windows[:FAST_HELDOUT_WINDOWS] if fast else suite.windows
                out[suite.name] = {"nll": heldout_nll(m, windows)}
                continue
            items = suite.tracked[: self.config.fast_subset] if fast else suite.tracked
            if not items:
                continue
            if fast:
                out[suite.name] = self._known_answer_scores(suite.kind, items)
            elif suite.kind == "choice":
                res = score_choice(m, tok, [(i.prompt, list(i.endings), i.label) for i in items])
                out[suite.name] = {
                    "accuracy": sum(r.correct for r in res) / len(res),
                    "nll": sum(r.nll for r in res) / len(res),
                }
            else:
                res = score_cloze(m, tok, [(i.prompt, i.target) for i in items])
                out[suite.name] = {
                    "accuracy": sum(r.correct for r in res) / len(res),
                    "nll": sum(r.nll for r in res) / len(res),
                }
        if compare_drift and self.drift_windows:
            count = FAST_DRIFT_PROMPTS if fast else len(self.drift_windows)
            out["drift"] = {"kl": self._drift(self.drift_windows[:count])}
        return out

    def _drift(self, windows: list[list[int]]) -> float:
        """Mean per-position KL(base || now) on the drift prompts, the base's distributions computed beside the
        current ones a group at a time rather than kept: a few forwards over short prompts, where keeping them
        held 265 positions x the whole vocabulary (52 MB for the embedded model) for the daemon's life."""

        def base(group: range) -> list[torch.Tensor]:
            with self.model.base():
                return next_token_logprobs(self.model.model, windows[group.start : group.stop], DRIFT_BATCH)

        return drift_kl_by_group(self.model.model, windows, base, DRIFT_BATCH)

    def _known_answer_scores(self, kind: str, items: list[ProbeItem]) -> dict[str, float]:
        """Mean per-token NLL of the known answer (a cloze target, or a choice item's right ending).

        One forward pass per item, where greedy decoding or scoring every ending would take
        several: this is what keeps the post-update check cheap next to the update itself. Cloze
        suites also get a fast accuracy: the share of answers still produced token by token as the
        argmax (teacher-forced greedy), so the guard's accuracy threshold still applies.
        """
        if kind == "choice":
            pairs = [(i.prompt, " " + i.endings[i.label].strip()) for i in items]
        else:
            pairs = [(i.prompt, " " + i.target.strip()) for i in items]
        scored = continuation_scores(self.model.model, self.model.tokenizer, pairs)
        out = {"nll": sum(total / max(n, 1) for total, n, _ in scored) / len(scored)}
        if kind == "cloze":
            out["accuracy"] = sum(match for _, _, match in scored) / len(scored)
        return out

    # ---- new-knowledge recall -------------------------------------------------------------
    def add_recall(self, items: list[RecallItem]) -> int:
        """Keep a learned document's recall probes (sidecar pairs or cut clozes), newest last."""
        if not items:
            return 0
        kept = self._recall_records()[-(RECALL_KEPT - len(items)) :] if len(items) < RECALL_KEPT else []
        lines = [json.dumps(r) for r in kept + items[-RECALL_KEPT:]]
        self.recall_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.recall_file, "\n".join(lines) + "\n")
        return len(items)

    def _recall_records(self) -> list[dict]:
        if not self.recall_file.exists():
            return []
        records = []
        for line in self.recall_file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                record = None
                log.warning("recall_probe_damaged", file=str(self.recall_file), line=line[:80])
            if isinstance(record, dict) and {"prompt", "target"} <= record.keys():
                records.append(record)
        return records

    def measure_recall(self) -> dict[str, float] | None:
        """Accuracy and target NLL of the newest learned facts (greedy continuation contains the target),
        overall and per probe kind (`accuracy.KIND`), e.g. verbatim against reworded prompts."""
        records = self._recall_records()[-RECALL_MEASURED:]
        if not records:
            return None
        res = score_cloze(self.model.model, self.model.tokenizer, [(r["prompt"], r["target"]) for r in records])
        measured = {
            "accuracy": sum(r.correct for r in res) / len(res),
            "nll": sum(r.nll for r in res) / len(res),
            "items": float(len(res)),
        }
        by_kind: dict[str, list[bool]] = {}
        for record, result in zip(records, res):
            by_kind.setdefault(record.get("kind", SIDECAR_KIND), []).append(result.correct)
        measured.update({f"accuracy.{kind}": sum(hits) / len(hits) for kind, hits in sorted(by_kind.items())})
        return measured

    def record_last(self, measures: Measures, version: int) -> None:
        atomic_write_json(self.last_file, {"version": version, "timestamp": time.time(), "summary": measures})
