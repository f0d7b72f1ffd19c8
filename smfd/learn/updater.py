"""The sparse updater: one optimizer step changes only the selected value rows of each memory.

Per step and per memory layer, the slots this batch reads (real tokens only) are ranked
against background reads and the top t are copied into a small trainable tensor. Plain SGD
(no momentum, no weight decay) updates that tensor, and `index_copy_` writes it back. Nothing
else has `requires_grad`, and no optimizer state exists outside the step, so every other row
and every other parameter of the model is left bit-identical.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from smfd.config import TrainSection
from smfd.errors import SmfdError
from smfd.learn.interference import RetainSet, RowValues
from smfd.learn.selection import batch_reads, lowest_read_scores, select_slots, top_slots
from smfd.model.batch import TokenBatch
from smfd.model.head_loss import head_nll
from smfd.model.memory import Lookup, ProductKeyMemory, recording_lookups
from smfd.model.prefix import PrefixCache
from smfd.model.retrofit import decoder_layers
from smfd.model.slot_stats import BackgroundStats
from smfd.store.patches import LayerPatch, PatchRecorder

# Every update draws its query noise from a generator seeded alike, so a replayed update trains the same values.
NOISE_SEED = 0


@dataclass
class StepResult:
    loss: float
    rows_selected: dict[int, int]
    n_tokens: int
    seconds: float


def distill_loss(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student), the teacher renormalised over its top-k tokens.

    `logits` (n, vocab) are the student's at the trained positions; `teacher_*` (n, k) the same positions.
    """
    student = logits.float().log_softmax(-1).gather(-1, teacher_ids)
    teacher = teacher_logprobs.float().log_softmax(-1)  # renormalise over the kept tokens
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _trained_hidden(model: PreTrainedModel, batch: TokenBatch) -> torch.Tensor:
    """Final hidden states at the positions whose next token is trained: the LM head (the big vocab
    matmul) runs only there."""
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return hidden[:, :-1][batch.loss_mask[:, 1:].bool()]


def _trained_targets(batch: TokenBatch) -> torch.Tensor:
    return batch.input_ids[:, 1:][batch.loss_mask[:, 1:].bool()]


def causal_lm_loss(model: PreTrainedModel, batch: TokenBatch) -> torch.Tensor:
    """Mean next-token NLL over trained tokens (the logits a chunk at a time: smfd.model.head_loss)."""
    return head_nll(model.get_output_embeddings(), _trained_hidden(model, batch), _trained_targets(batch))


def lesson_loss(model: PreTrainedModel, batch: TokenBatch, ce_weight: float) -> torch.Tensor:
    """An update's loss: KL(teacher ‖ student) plus `ce_weight` times the next-token NLL for a batch
    with teacher targets (smfd.learn.distill); the next-token NLL alone for any other batch."""
    if batch.teacher_ids is None or batch.teacher_logprobs is None:
        return causal_lm_loss(model, batch)
    logits = model.get_output_embeddings()(_trained_hidden(model, batch))
    nll = F.cross_entropy(logits.float(), _trained_targets(batch))
    trained = batch.loss_mask.bool()
    kl = distill_loss(logits, batch.teacher_ids[trained], batch.teacher_logprobs[trained])
    return kl + ce_weight * nll if ce_weight else kl


def read_weights(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which positions' memory reads count for selection: those whose next token is trained.

    Returned as (mask, surprise) aligned to read positions: the read at position t serves the
    prediction of token t+1, so it is weighted by that token's surprise.

    The first token of each sequence never counts. It is the attention sink: at the memory's
    depth its hidden state is the same whatever the token, so it reads the same few rows in every
    text, and the token after it is always surprising. Counting it selects those rows for every
    update, and a row the sink reads shifts every later position of every prompt.
    """
    mask = F.pad(batch.loss_mask[:, 1:], (0, 1)).float()
    first = batch.attention_mask.long().argmax(dim=1)
    mask[torch.arange(mask.shape[0], device=mask.device), first] = 0.0
    surprise = None if batch.surprise is None else F.pad(batch.surprise[:, 1:], (0, 1))
    return mask, surprise


class SparseUpdater:
    """Trains only the selected value rows of the model's memory layers."""

    def __init__(
        self,
        model: PreTrainedModel,
        memories: list[ProductKeyMemory],
        background: dict[int, BackgroundStats],
        config: TrainSection,
        retain: RetainSet | None = None,
    ) -> None:
        if config.retain_weight > 0 and retain is None:
            raise SmfdError("retain_weight > 0 needs a retain set of general-text tokens")
        missing = [m.layer_index for m in memories if m.layer_index not in background]
        if missing:
            raise SmfdError(
                f"no background slot statistics for memory layers {missing} (smfd.learn.heal.compute_background makes them)"
            )
        for memory in memories:
            if config.top_t > memory.config.n_slots:
                raise SmfdError(
                    f"top_t={config.top_t} exceeds the {memory.config.n_slots} slots of layer {memory.layer_index}"
                )
        self.model = model
        self.memories = memories
        self.background = background
        self.config = config
        self.retain = retain if config.retain_weight > 0 else None
        # The retain tokens' reads are fixed when the set is collected, so the rows they forbid are too.
        self.avoided: dict[int, torch.Tensor] = (
            {m.layer_index: self.retain.read_slots(m.layer_index) for m in memories}
            if config.avoid_retain_rows and self.retain is not None
            else {}
        )
        self.recorder = PatchRecorder()
        self.planned: dict[int, torch.Tensor] | None = None
        # Per memory with `read_floor_margin`: the lowest score at which this update's text reads each slot.
        self.read_scores: dict[int, torch.Tensor] = {}
        self.grad_scale: dict[int, torch.Tensor] = {}  # normalize_once: 1 / RMS of the update's first gradient
        first_memory = min(m.layer_index for m in memories)
        self.prefix = PrefixCache(decoder_layers(model), first_memory, config.prefix_cache_mb * 1024 * 1024)
        self.noise_generator: torch.Generator | None = None  # seeded per update when query_noise > 0

    @contextlib.contextmanager
    def _noisy_reads(self) -> Iterator[None]:
        """Inside, every memory read carries the update's query noise (none when `query_noise` is 0)."""
        if self.noise_generator is None:
            yield
            return
        for memory in self.memories:
            memory.query_noise = (self.config.query_noise, self.noise_generator)
        try:
            yield
        finally:
            for memory in self.memories:
                memory.query_noise = None

    @torch.no_grad()
    def plan_update(self, batches: list[TokenBatch]) -> None:
        """Start an update: with scope "update", rank slots once over all its batches.

        The selection forward also fills the prefix cache, so every step of the update starts at
        the lowest memory layer. With query noise, each sequence's reads are ranked once clean and
        `query_noise_draws` times noisy (those forwards start at the memory layer, from the cache).
        The clean reads also give the rows' read floors (`finish_update`) where a memory uses them.
        """
        self.grad_scale = {}
        self.prefix.clear()
        self.noise_generator = None
        if self.config.query_noise > 0:
            device = self.memories[0].keys.device
            self.noise_generator = torch.Generator(device=device).manual_seed(NOISE_SEED)
        self.read_scores = {
            m.layer_index: torch.full((m.config.n_slots,), float("inf"), device=m.keys.device)
            for m in self.memories
            if m.config.read_floor_margin is not None
        }
        if not batches or (self.config.scope != "update" and not self.read_scores):
            return
        reads: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {m.layer_index: [] for m in self.memories}
        seen: set[tuple[int, ...]] = set()
        draws = 1 + (self.config.query_noise_draws if self.noise_generator is not None else 0)
        with recording_lookups(self.memories):
            for batch in batches:
                rows = set(batch.sequences())
                if rows <= seen:
                    continue  # later passes repeat the same sequences: one forward per sequence is enough
                seen |= rows
                self._record_reads(batch, draws, reads)
        if self.config.scope != "update":
            return
        self.planned = {
            layer: top_slots(
                self.config.selection,
                torch.cat([r for r, _ in pairs]),
                torch.cat([w for _, w in pairs]),
                self.background[layer],
                self.config.top_t,
                excluded=self.avoided.get(layer),
            )
            for layer, pairs in reads.items()
        }

    def _forward_parts(self, batch: TokenBatch) -> list[TokenBatch]:
        """`batch` in parts of at most `micro_batch_size` rows, one forward and backward each (a step's micro-batches)."""
        size = self.config.micro_batch_size
        rows = batch.input_ids.shape[0]
        if size is None or size >= rows:
            return [batch]
        return [batch.rows(slice(first, first + size)) for first in range(0, rows, size)]

    def _record_reads(
        self, batch: TokenBatch, draws: int, reads: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
    ) -> None:
        """Run the selection forward(s) over `batch`: its reads, weighted for ranking, go to `reads`; the
        clean draw's lowest score per row to the read floors."""
        mask, surprise = read_weights(batch)
        weights = (
            mask.double()
            if surprise is None or self.config.selection != "surprise-kl"
            else mask.double() * surprise.double().clamp_min(0)
        )
        for draw in range(draws):
            with self.prefix.forward_for(batch), self._noisy_reads() if draw else contextlib.nullcontext():
                self.model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            for memory in self.memories:
                reads[memory.layer_index].append(batch_reads(memory.last_lookup, weights / draws))
                if draw == 0 and memory.layer_index in self.read_scores:
                    lowest_read_scores(memory.last_lookup, batch.attention_mask, self.read_scores[memory.layer_index])

    def _selector(
        self, mask: torch.Tensor, surprise: torch.Tensor | None
    ) -> Callable[[ProductKeyMemory, Lookup], torch.Tensor]:
        def choose(memory: ProductKeyMemory, lookup: Lookup) -> torch.Tensor:
            if self.planned is not None:
                return self.planned[memory.layer_index]
            stats = self.background[memory.layer_index]
            return select_slots(
                self.config.selection,
                lookup,
                mask,
                surprise,
                stats,
                self.config.top_t,
                self.avoided.get(memory.layer_index),
            )

        return choose

    def _interference(self, loss: torch.Tensor) -> torch.Tensor:
        """The retain penalty over all memory layers (zero when off or when no retain token reads a selected row)."""
        total = loss.new_zeros(())
        if self.retain is None:
            return total
        for memory in self.memories:
            changed = self.recorder.before(memory.layer_index)
            penalty = self.retain.penalty(memory, None if changed is None else RowValues(*changed))
            if penalty is not None:
                total = total + penalty
        return self.config.retain_weight * total

    def _step_direction(self, layer: int, grad: torch.Tensor) -> torch.Tensor:
        """The SGD direction, optionally divided by a gradient RMS over this layer's selected rows.

        Normalising makes `lr` the RMS change per element whatever the gradient scale: the raw
        gradient of a value row is tiny (each read carries a softmax weight of about 1/k), which
        otherwise forces learning rates in the thousands that depend on the model. With
        `normalize_once` the divisor is fixed at the update's first step, so later steps are
        plain SGD and shrink as the text is learned.
        """
        if not self.config.normalize:
            return grad
        if not self.config.normalize_once:
            return grad / grad.pow(2).mean().sqrt().clamp_min(1e-12)
        if layer not in self.grad_scale:
            self.grad_scale[layer] = 1.0 / grad.pow(2).mean().sqrt().clamp_min(1e-12)
        return grad * self.grad_scale[layer]

    def step(self, batch: TokenBatch) -> StepResult:
        """One forward/backward/SGD step on `batch`; returns the loss before the step.

        The gradient is summed over micro-batches (`micro_batches`) on one selection of rows: each
        part's mean loss is weighted by its share of the batch's trained tokens, so the step is the
        whole batch's (to float rounding) while only one part's activations are alive at a time.
        """
        started = time.perf_counter()
        mask, surprise = read_weights(batch)
        selector = self._selector(mask, surprise)
        loss = torch.zeros(())
        try:
            for index, (part, share) in enumerate(self.micro_batches(batch)):
                for memory in self.memories:  # later parts train the rows the first part selected
                    memory.select_rows = selector if index == 0 else None
                with self.prefix.forward_for(part), self._noisy_reads():
                    part_loss = share * lesson_loss(self.model, part, self.config.distill.ce_weight)
                total = part_loss + self._interference(part_loss) if index == 0 else part_loss
                if total.requires_grad:  # else no slot qualified (e.g. every sequence is one trained token long)
                    total.backward()
                loss = loss + part_loss.detach().cpu()
        except BaseException:
            for memory in self.memories:
                memory.selection = None
            raise
        finally:
            for memory in self.memories:
                memory.select_rows = None
        rows_selected = {}
        with torch.no_grad():
            for memory in self.memories:
                selection = memory.selection
                if selection is None or selection.rows.grad is None:
                    memory.selection = None
                    continue
                selection.rows.sub_(self._step_direction(memory.layer_index, selection.rows.grad), alpha=self.config.lr)
                self.recorder.record(memory, selection.slot_ids)
                rows_selected[memory.layer_index] = memory.commit_selection()
        return StepResult(float(loss), rows_selected, batch.n_tokens, time.perf_counter() - started)

    def micro_batches(self, batch: TokenBatch) -> list[tuple[TokenBatch, float]]:
        """The parts of `batch` run one at a time, each with its share of the batch's trained tokens.

        The whole batch when `micro_batch_size` is unset or not smaller, and under scope "step",
        whose rows are ranked from the whole batch's reads in its one forward pass.
        """
        if self.planned is None:
            return [(batch, 1.0)]
        pieces = self._forward_parts(batch)
        if len(pieces) == 1:
            return [(batch, 1.0)]
        total = float(batch.loss_mask[:, 1:].sum())
        parts = []
        for part in pieces:
            share = float(part.loss_mask[:, 1:].sum()) / total if total else 0.0
            if share > 0:  # a part with nothing to train adds nothing (and its mean loss is undefined)
                parts.append((part, share))
        return parts or [(batch, 1.0)]

    def finish_update(self) -> list[LayerPatch]:
        """Close the current update: the patches that revert or replay everything since the last call."""
        self._set_read_floors()
        self.planned = None
        self.grad_scale = {}
        self.noise_generator = None
        self.prefix.clear()
        return self.recorder.finish(self.memories)

    def _set_read_floors(self) -> None:
        """Give each row this update trained the lowest score at which the update's text read it (the
        lower of that and its earlier floor, for a row trained before); a row the clean reads never
        reached keeps its floor."""
        for memory in self.memories:
            lowest = self.read_scores.get(memory.layer_index)
            changed = self.recorder.changed_slots(memory.layer_index)
            if lowest is None or changed is None:
                continue
            ids = changed.to(lowest.device)
            new, old = lowest[ids], memory.values.floors(ids)
            earlier = torch.where(torch.isfinite(old), old, new)  # a row without a floor takes the new one
            floors = torch.where(torch.isfinite(new), torch.minimum(earlier, new), old)
            memory.values.set_floors(ids, floors)
        self.read_scores = {}


def split_batch(batch: TokenBatch) -> tuple[TokenBatch, TokenBatch] | None:
    """Two halves of a batch (for out-of-memory backoff); None for a single sequence."""
    rows = batch.input_ids.shape[0]
    if rows < 2:
        return None
    half = rows // 2
    return batch.rows(slice(0, half)), batch.rows(slice(half, rows))
