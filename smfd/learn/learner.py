"""The learner: the one owner of the model. Turns journaled documents into memory updates.

Every call into this class must come from the learner thread (the daemon's single-thread
executor), so updates, probes and completions never race on the model.

One update: claim queued documents -> chunk -> score surprise (skip what the model already
knows) -> restate -> sparse update (stop flag checked between steps) -> guard -> checkpoint
(durable, naming the documents and chunks it holds) -> journal marks the documents done. A stop
or crash before the checkpoint lands leaves the documents in `processing`, which the next start
re-queues; a crash after it is settled from the checkpoint's record at the next start
(`Journal.settle_committed`): nothing is lost and nothing is applied twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from smfd.errors import SmfdError
from smfd.guard.verdict import GuardCheck, Verdict
from smfd.ingest.extract import content_hash
from smfd.ingest.journal import ChunkRow, ChunkState, DocState, Journal
from smfd.ingest.sidecars import RecallItem, recall_items
from smfd.learn.budget import MIB, MemoryBudget
from smfd.learn.gate import ModelGate, accepted_view
from smfd.learn.interference import RetainSet
from smfd.learn.lesson import LearnSettings, TokenSurprise, build_lesson, lesson_batches
from smfd.learn.surprise import sequence_surprise
from smfd.learn.updater import SparseUpdater, split_batch
from smfd.model.batch import TokenBatch, encode, make_batch
from smfd.model.memory_model import MemoryModel
from smfd.model.slot_stats import BackgroundStats, MemoryFill, memory_fill
from smfd.store.checkpoint import CheckpointStore
from smfd.store.patches import LayerPatch, apply_patches, reused_rows
from smfd.text.chunker import chunk_text

log = structlog.get_logger("smfd.learn.learner")


def _step_footprint(settings: LearnSettings) -> tuple:
    """The settings that decide how much memory one update step holds."""
    t = settings.train
    return t.batch_size, t.seq_len, t.prefix_cache_mb, t.selection


@dataclass
class UpdateOutcome:
    version: int | None = None
    documents: int = 0
    chunks_learned: int = 0
    chunks_known: int = 0
    rows_updated: int = 0
    rows_reused: int = 0  # of those, rows an earlier update had trained (smfd.store.patches.reused_rows)
    slots_selected: int = 0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    # (source, "done" | "rejected") of each document this update settled; rejected: its chunks were rolled back
    documents_settled: list[tuple[str, str]] = field(default_factory=list)
    recall_items: list[RecallItem] = field(default_factory=list)  # probes for what this update learned
    accepted: bool = False
    stopped: bool = False
    reason: str = ""
    surprise: list[float] = field(default_factory=list)
    fill: MemoryFill | None = None  # how full the memory is after an accepted update


__all__ = ["CommitFailed", "Learner", "LearnSettings", "UpdateOutcome"]


class CommitFailed(SmfdError):
    """Writing an accepted update's checkpoint failed (disk full, I/O error): the update was reverted in
    memory and its documents are still `processing`; the caller requeues them and retries later."""


class Learner:
    def __init__(
        self,
        model: MemoryModel,
        background: dict[int, BackgroundStats],
        store: CheckpointStore,
        journal: Journal,
        settings: LearnSettings,
        budget: MemoryBudget | None = None,
        retain: RetainSet | None = None,
        gate: ModelGate | None = None,
    ) -> None:
        self.model = model
        self.gate = gate or ModelGate()
        self._undecided: list[LayerPatch] = []  # an update's patches between its last step and the verdict
        self.retain = retain
        self.budget = budget or MemoryBudget(model.device, None, None)
        self.batch_size = settings.train.batch_size
        self.background = background
        self.store = store
        self.journal = journal
        self.settings = settings
        self.updater = SparseUpdater(model.model, model.memories, background, settings.train, retain)

    def reconfigure(self, settings: LearnSettings) -> None:
        """Apply new learning settings (SIGHUP reload) between updates; a bad one leaves the old in force.

        A change to what a step holds in memory (batch size, sequence length, the prefix cache, the
        rule) plans the batch again, so a reload cannot take the learner past its memory budget.
        Turning the retain penalty on needs a restart (its general-text tokens are collected at start).
        """
        updater = SparseUpdater(self.model.model, self.model.memories, self.background, settings.train, self.retain)
        batch_size = min(self.batch_size, settings.train.batch_size)
        if _step_footprint(settings) != _step_footprint(self.settings):
            with self.gate.learner():
                batch_size = self._planned_batch_size(settings, updater)
        self.settings = settings
        self.updater = updater
        self.batch_size = batch_size

    def plan_batch_size(self) -> int:
        """Measure one step and fit the micro-batch into the memory budget (the step is undone)."""
        with self.gate.learner():
            self.batch_size = self._planned_batch_size(self.settings, self.updater)
        return self.batch_size

    def _planned_batch_size(self, settings: LearnSettings, updater: SparseUpdater) -> int:
        ids = self.model.tokenizer(
            "The quick brown fox jumps over the lazy dog. " * 64, add_special_tokens=False
        ).input_ids
        sequence = ids[: settings.train.seq_len]
        # The surprise-weighted rule ranks slots by each token's surprise: the measured step needs it too.
        surprise = (
            [self._sequence_surprise([sequence])[tuple(sequence)]]
            if settings.train.selection == "surprise-kl"
            else None
        )

        def measure(n: int) -> None:
            batch = make_batch(
                [sequence] * n, self.model.tokenizer.pad_token_id, None if surprise is None else surprise * n
            )
            updater.step(batch.to(self.model.device))
            apply_patches(self.model.memories, updater.finish_update(), revert=True)

        cache_bytes = settings.train.prefix_cache_mb * MIB
        batch_size = self.budget.plan_batch_size(settings.train.batch_size, measure, reserved_bytes=cache_bytes)
        log.info(
            "batch_planned",
            batch_size=batch_size,
            budget_bytes=self.budget.limit_bytes,
            device=self.budget.device_label,
        )
        return batch_size

    def serve(self, job: Callable[[MemoryModel, int], None]) -> None:
        """Queue `job(model, version)` for a served request, run on the model's thread as soon as the
        learner allows (between two optimizer steps with `serve.during_update: pause_learner`), on the
        model as last accepted: what an update in progress has trained so far is never visible."""
        self.gate.submit(lambda: job(self.model, self.store.version))

    def _accepted_view(self) -> AbstractContextManager[None]:
        unaccepted = self._undecided or self.updater.recorder.pending(self.model.memories)
        return accepted_view(self.model.memories, unaccepted)

    def fill(self, uncommitted_reuse: int = 0) -> MemoryFill:
        """How full the memory is now; its row retrainings are the committed ones plus `uncommitted_reuse`."""
        return memory_fill(self.model.values(), self.background, self.store.row_retrainings() + uncommitted_reuse)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=False).input_ids)

    # ---- stage 1: documents -> chunks ------------------------------------------------
    def chunk_claimed_documents(self) -> int:
        """Claim queued documents and store their chunks in the journal; returns documents claimed."""
        claimed = self.journal.claim_queued(self.settings.train.max_documents)
        for doc in claimed:
            try:
                text = Path(doc.spool_path).read_text(encoding="utf-8")
                if doc.content_hash is not None and content_hash(text) != doc.content_hash:
                    raise SmfdError(f"spool file {doc.spool_path} is damaged (its text no longer matches its hash)")
                chunking = self.settings.chunking
                chunks = chunk_text(
                    text,
                    self.count_tokens,
                    chunking.max_tokens,
                    title_context=chunking.title_context,
                    overlap_sentences=chunking.overlap_sentences,
                )
            except (OSError, SmfdError) as exc:
                log.warning("document_failed", doc_id=doc.id, reason=str(exc))
                self.journal.mark_failed(doc.id, str(exc))
                continue
            self.journal.add_chunks(doc.id, [(c.text, c.n_tokens) for c in chunks])
        return len(claimed)

    # ---- stage 2: surprise ------------------------------------------------------------
    def split_known(self, chunks: list[ChunkRow]) -> tuple[list[ChunkRow], list[ChunkRow], list[float], TokenSurprise]:
        """Partition chunks into (to learn, already known) by mean token surprise under the frozen base.

        Also returns each scored chunk's per-token surprise, so the update's slot selection does
        not score the same sequences a second time.
        """
        tokenizer = self.model.tokenizer
        learn, known, means = [], [], []
        scorable = []
        for chunk in chunks:
            if len(tokenizer(chunk.text, add_special_tokens=False).input_ids) < 2:
                known.append(chunk)  # a single token carries no prediction to learn
            else:
                scorable.append(chunk)
        sequences = [encode(tokenizer, [c.text], self.settings.train.seq_len)[0] for c in scorable]
        scored = self._sequence_surprise(sequences)
        for chunk, sequence in zip(scorable, sequences):
            mean = float(scored[tuple(sequence)].sum()) / max(len(sequence) - 1, 1)
            means.append(mean)
            (known if mean < self.settings.surprise.skip_below_nats else learn).append(chunk)
        return learn, known, means, scored

    # ---- stage 3: the update ----------------------------------------------------------
    def update(self, should_stop: Callable[[], bool] = lambda: False, guard: GuardCheck | None = None) -> UpdateOutcome:
        """One update, holding the model gate (served requests run only at its pause points)."""
        with self.gate.learner():
            return self._update(should_stop, guard)

    def _update(self, should_stop: Callable[[], bool], guard: GuardCheck | None) -> UpdateOutcome:
        started = time.perf_counter()
        outcome = UpdateOutcome(documents=self.chunk_claimed_documents())
        chunks = self.journal.pending_chunks()
        if not chunks:
            outcome.documents_settled = self._finish_documents(self.store.version)
            return outcome
        learn, known, outcome.surprise, scored = self.split_known(chunks)
        self.gate.pause_point(self._accepted_view)
        if known:
            self.journal.set_chunk_state([c.id for c in known], ChunkState.KNOWN)
        outcome.chunks_known = len(known)
        if learn:
            patches = self._train(learn, scored, outcome, should_stop)
            if outcome.stopped:
                return outcome
            outcome.seconds = time.perf_counter() - started
            self._undecided = patches
            try:
                self.gate.pause_point(self._accepted_view)
                self._accept_or_reject(learn, patches, outcome, guard)
            finally:
                self._undecided = []
        else:
            outcome.version = self.store.version
        outcome.documents_settled = self._finish_documents(outcome.version)
        if not outcome.seconds:
            outcome.seconds = time.perf_counter() - started
        return outcome

    def _train(
        self, chunks: list[ChunkRow], scored: TokenSurprise, outcome: UpdateOutcome, should_stop: Callable[[], bool]
    ) -> list[LayerPatch]:
        """Run the optimizer steps; returns the update's patches (already reverted if stopped)."""
        batches = self._lesson_batches(chunks, scored)
        self.gate.pause_point(self._accepted_view)
        try:
            self.updater.plan_update(batches)
            for batch in batches:
                self.gate.pause_point(self._accepted_view)
                if should_stop():
                    outcome.stopped = True
                    break
                for result in self.budget.run_with_backoff(self.updater.step, batch, split_batch):
                    outcome.steps += 1
                    outcome.tokens += result.n_tokens
                    outcome.slots_selected += sum(result.rows_selected.values())
        except BaseException:
            apply_patches(self.model.memories, self.updater.finish_update(), revert=True)  # no half-applied update
            raise
        patches = self.updater.finish_update()
        if outcome.stopped:
            apply_patches(self.model.memories, patches, revert=True)
            outcome.reason = "stopped before the update finished; its documents will be learned after restart"
            log.info("update_interrupted", steps=outcome.steps)
            return []
        outcome.rows_updated, outcome.rows_reused = sum(p.n_rows for p in patches), reused_rows(patches)
        outcome.chunks_learned = len(chunks)
        return patches

    def _lesson_batches(self, chunks: list[ChunkRow], scored: TokenSurprise) -> list[TokenBatch]:
        """Each document's lesson (smfd.learn.lesson, the benchmark's path too), its passes one after the other."""
        s = self.settings
        by_document: dict[int, list[ChunkRow]] = {}
        for chunk in chunks:
            by_document.setdefault(chunk.doc_id, []).append(chunk)
        batches: list[TokenBatch] = []
        for doc_id, rows in by_document.items():
            texts = [c.text for c in rows]
            lesson = build_lesson(
                self.model, s, self._document_text(doc_id, texts), texts, self.batch_size, scored=scored
            )
            batches += lesson_batches(
                lesson, self.batch_size, s.train.passes, self.model.tokenizer.pad_token_id, 0, self.model.device
            )
        return batches

    def _document_text(self, doc_id: int, chunk_texts: list[str]) -> str:
        """The document as spooled (the distillation teacher's context); its chunks joined if unreadable."""
        doc = self.journal.get_document(doc_id)
        if doc is not None and doc.spool_path is not None:
            try:
                return Path(doc.spool_path).read_text(encoding="utf-8")
            except OSError as exc:
                log.warning("document_unreadable", doc_id=doc_id, reason=str(exc))
        return "\n".join(chunk_texts)

    def _sequence_surprise(self, sequences: list[list[int]], scored: TokenSurprise | None = None) -> TokenSurprise:
        """Per-token surprise of each sequence not already in `scored` (a new dict; `scored` is not changed)."""
        scored = dict(scored or {})
        todo = list(dict.fromkeys(tuple(seq) for seq in sequences if tuple(seq) not in scored))
        nll = sequence_surprise(
            self.model.model,
            self.model.memories,
            [list(seq) for seq in todo],
            self.model.tokenizer.pad_token_id,
            self.batch_size,
            self.model.device,
        )
        scored.update(zip(todo, nll))
        return scored

    def _accept_or_reject(
        self, chunks: list[ChunkRow], patches: list[LayerPatch], outcome: UpdateOutcome, guard: GuardCheck | None
    ) -> None:
        verdict = guard() if guard is not None else Verdict.unguarded()
        measures = verdict.measures
        chunk_ids = [c.id for c in chunks]
        if not verdict.accepted:
            apply_patches(self.model.memories, patches, revert=True)
            self.journal.set_chunk_state(chunk_ids, ChunkState.REJECTED)
            reason = verdict.rollback_reason
            outcome.version, outcome.accepted, outcome.reason = self.store.version, False, reason
            measures = {**measures, "reason": reason}  # the guard's verdicts along the stream (`smfd status`)
            self.journal.record_update(
                outcome.version, len(chunks), outcome.rows_updated, outcome.seconds, False, measures
            )
            log.warning(
                "update_rolled_back",
                reason=reason,
                **{k: v for k, v in measures.items() if isinstance(v, (int, float))},
            )
            return
        self.gate.pause_point(self._accepted_view)  # requests still see the previous version until it is on disk
        outcome.fill = self.fill(outcome.rows_reused)
        meta = {
            "chunks": len(chunks),
            "rows": outcome.rows_updated,
            "rows_reused": outcome.rows_reused,
            "steps": outcome.steps,
            "measures": measures,
            "fill": outcome.fill.as_dict(),
        }
        documents: dict[int, list[int]] = {}
        for chunk in chunks:
            documents.setdefault(chunk.doc_id, []).append(chunk.id)
        try:
            outcome.version = self.store.commit(patches, meta, documents)
        except (OSError, SmfdError) as exc:
            apply_patches(self.model.memories, patches, revert=True)  # the memory stays what the disk holds
            raise CommitFailed(f"the checkpoint could not be written ({exc}); the update was undone") from exc
        outcome.accepted = True
        outcome.recall_items = recall_items(self.journal, chunks)
        self.journal.set_chunk_state(chunk_ids, ChunkState.LEARNED)
        self.journal.record_update(outcome.version, len(chunks), outcome.rows_updated, outcome.seconds, True, measures)
        log.info(
            "update_committed",
            version=outcome.version,
            chunks=len(chunks),
            rows=outcome.rows_updated,
            rows_reused=outcome.rows_reused,
            steps=outcome.steps,
            tokens=outcome.tokens,
        )

    def _finish_documents(self, version: int | None) -> list[tuple[str, str]]:
        """Mark done every processing document whose chunks are all settled; the checkpoint is already on disk.

        Returns (source, outcome) per document: "rejected" when the guard rolled back the chunks it
        had to learn (none of them learned), else "done". Rejected documents are not retried: the
        same text would make the same update.
        """
        done = self.journal.finished_processing_ids()
        if not done:
            return []
        self.journal.mark_done(done, self.store.version if version is None else version)
        settled = []
        for doc_id in done:
            row = self.journal.get_document(doc_id)
            if row is not None:
                states = {chunk.state for chunk in self.journal.chunks_for(doc_id)}
                rejected = ChunkState.REJECTED in states and ChunkState.LEARNED not in states
                settled.append((row.source, "rejected" if rejected else DocState.DONE.value))
        return settled
