"""Build the pieces a process needs from a config: the memory model and its checkpoint store."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import torch

from smfd.config import SmfdConfig
from smfd.errors import SmfdError
from smfd.heap import trim
from smfd.ingest.journal import Journal
from smfd.learn.budget import MemoryBudget
from smfd.learn.gate import ModelGate
from smfd.learn.heal import memory_inputs, prepare_memory
from smfd.learn.interference import RetainSet, fact_recipe, retain_text
from smfd.learn.kept_text import SampleRecipe, SampleStore, kept_sequences, model_text, store_for
from smfd.learn.learner import Learner
from smfd.learn.lesson import LearnSettings
from smfd.learn.prepared import PreparedMemory, PreparedStore, prepared_key
from smfd.learn.sampling import GENERAL_TOKENS, SampledText
from smfd.model.batch import encode
from smfd.model.memory_model import MemoryModel
from smfd.model.retrofit import decoder_layers, memory_bypassed
from smfd.model.slot_stats import BackgroundStats
from smfd.observe.startup import StartupProgress
from smfd.paths import StatePaths, builtin_file, read_prompts
from smfd.store.checkpoint import CheckpointStore

log = structlog.get_logger("smfd.daemon.runtime")


def shipped_prompts() -> list[str]:
    return read_prompts(builtin_file("drift_prompts.txt"))


def general_sequences(
    cfg: SmfdConfig, model: MemoryModel, samples: SampleStore | None
) -> tuple[list[list[int]] | None, str]:
    """The general text's token ids (None when they must be sampled from the model first) and where they come from:
    the configured corpus, or text sampled from the frozen model (kept per model in `samples`)."""
    path = cfg.memory.background_text
    if path is None:
        return kept_sequences(model, general_recipe(cfg), samples), "sampled-from-base"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SmfdError(f"memory.background_text: cannot read {path}: {exc}") from exc
    sequences = encode(model.tokenizer, [text], 128)[: cfg.memory.background_sequences]
    if len(sequences) < 8:
        raise SmfdError(
            f"memory.background_text {path} is too short: {len(sequences)} sequences of 128 tokens, need >= 8"
        )
    return sequences, f"file:{Path(path).name}"


def general_recipe(cfg: SmfdConfig) -> SampleRecipe:
    return SampleRecipe(tuple(shipped_prompts()), cfg.memory.background_sequences, GENERAL_TOKENS)


def general_text(
    cfg: SmfdConfig, model: MemoryModel, samples: SampleStore | None, sequences: list[list[int]] | None
) -> SampledText:
    """The general text with the memories' inputs on every token (sampled on the way, or one pass).

    `sequences`: what `general_sequences` gave (None when the text must be sampled first).
    """
    if cfg.memory.background_text is None:
        return model_text(model, general_recipe(cfg), samples, sequences)
    assert sequences is not None, "a configured background text is always read, never sampled"
    with model.base():
        inputs = memory_inputs(model.model, model.memories, sequences)
    return SampledText(sequences, inputs)


def state_settings(cfg: SmfdConfig, model: MemoryModel) -> dict[str, dict]:
    """The settings fixed when a state is created (checked again on every later start)."""
    background_text = cfg.memory.background_text
    return {
        "memory": model.memory_config.shape(),
        "heal": cfg.heal.model_dump(mode="json"),
        "background": {
            "text": str(background_text) if background_text is not None else None,
            "sequences": cfg.memory.background_sequences,
            "fact_sequences": cfg.memory.fact_sequences,
        },
        "model": {"name": model.source.display_name if model.source else None},
    }


@dataclass
class Runtime:
    model: MemoryModel
    store: CheckpointStore
    background: dict[int, BackgroundStats]
    version: int
    general_text: list[list[int]] | None = None  # general-text sequences behind the background statistics
    fact_text: list[list[int]] | None = None  # the model's own statements of fact (also in the statistics)
    # A new state's retain text as its sampling already ran it (memory inputs, statements of fact first):
    # the first retain set is built from these instead of running the text again, then they are dropped.
    retain_inputs: dict[int, list[torch.Tensor]] | None = None

    def retain_set(self, settings: LearnSettings, cfg: SmfdConfig) -> RetainSet | None:
        """The interference penalty's tokens: the model's statements of fact first, then the general text."""
        update = settings.train
        if update.retain_weight <= 0:
            return None
        text = retain_text(self.fact_text or [], self.general_text or [])
        log.info(
            "retain_set",
            fact_sequences=len(self.fact_text or []),
            general_sequences=len(self.general_text),
            weight=update.retain_weight,
            tokens=update.retain_tokens,
        )
        inputs, self.retain_inputs = self.retain_inputs, None
        with memory_bypassed(self.model.memories):
            if inputs is not None:
                retain = RetainSet.from_inputs(self.model.model, self.model.memories, inputs, update.retain_tokens)
            else:
                retain = RetainSet.collect(self.model.model, self.model.memories, text, update.retain_tokens)
        del inputs
        trim()  # the sampled text's hidden states are gone: give their pages back
        return retain

    def learner(self, cfg: SmfdConfig, journal: Journal, gate: ModelGate | None = None) -> Learner:
        """The learner that owns this runtime's model, with the config's settings and memory budget."""
        settings = LearnSettings.from_config(cfg)
        budget = MemoryBudget(self.model.device, cfg.budget.ram_mb, cfg.budget.vram_mb)
        retain = self.retain_set(settings, cfg)
        return Learner(self.model, self.background, self.store, journal, settings, budget, retain, gate)


def open_runtime(cfg: SmfdConfig, create: bool = True, progress: StartupProgress | None = None) -> Runtime:
    """Load the base model, attach memory and restore the latest checkpoint (creating version 0 if allowed)."""
    progress = progress or StartupProgress()
    progress.stage("loading the model")
    torch.set_num_threads(cfg.model.threads)
    model = MemoryModel.load(cfg.model.path, cfg.memory, cfg.model.cache_dir, cfg.model.device)
    store = CheckpointStore(StatePaths(cfg.state_dir).memory, keep=cfg.checkpoint.keep)
    if store.exists():
        store.check_settings(state_settings(cfg, model), n_layers=len(decoder_layers(model.model)))
        version, background = store.load_into(model, repair=create)  # only the state's owner repairs it
        log.info("checkpoint_loaded", version=version)
        return Runtime(model, store, background, version, store.load_text("general_text"), store.load_text("fact_text"))
    if not create:
        raise SmfdError(f"no checkpoint in {store.folder}: start the daemon once (or run `smfd --once`) to create it")
    return new_runtime(cfg, model, store, progress)


def new_runtime(cfg: SmfdConfig, model: MemoryModel, store: CheckpointStore, progress: StartupProgress) -> Runtime:
    """Create version 0 of a new state: the memory prepared on general text and the model's statements of fact.

    The preparation is kept per model (`smfd.learn.prepared`): when the model cache or the
    shipped files hold it for this model, settings and text, it is loaded instead of computed.
    """
    samples = store_for(model, cfg.model.cache_dir)
    kept = PreparedStore(cfg.model.cache_dir) if model.source is not None else None
    general_ids, source = general_sequences(cfg, model, samples)
    fact_ids = kept_sequences(model, fact_recipe(cfg.memory.fact_sequences), samples)
    prepared, retain_inputs = None, None
    if kept is not None and general_ids is not None and fact_ids is not None:
        prepared = kept.load(preparation_key(cfg, model, source, general_ids, fact_ids), model.memories)
    loaded = prepared is not None
    if prepared is not None:
        prepared.apply(model.memories)
    else:
        prepared, general_ids, fact_ids, retain_inputs = _prepare(cfg, model, samples, progress, general_ids, fact_ids)
        if prepared.heal is not None:
            log.info("memory_healed", **prepared.heal)
        if kept is not None:
            kept.keep(preparation_key(cfg, model, source, general_ids, fact_ids), prepared)
    log.info("background_statistics", sequences=len(general_ids), source=source, fact_sequences=len(fact_ids))
    meta = {
        "background": source,
        "background_sequences": len(general_ids),
        "fact_sequences": len(fact_ids),
        "prepared": "kept" if loaded else "computed",
    }
    if prepared.heal is not None:
        meta["heal"] = prepared.heal  # the report of the healing that made it, kept or now
    store.save_text("general_text", general_ids)  # before the manifest: a state that exists has its texts
    store.save_text("fact_text", fact_ids)
    store.initialise(model, prepared.background, meta, state_settings(cfg, model))
    return Runtime(model, store, prepared.background, 0, general_ids, fact_ids, retain_inputs)


def preparation_key(
    cfg: SmfdConfig, model: MemoryModel, source: str, general_ids: list[list[int]], fact_ids: list[list[int]]
) -> str:
    """The key a new state's prepared memory is kept under: the model, what shapes the preparation and its text."""
    assert model.source is not None, "a model built in memory has no digest to key its preparation by"
    settings = {"memory": model.memory_config.shape(), "heal": cfg.heal.model_dump(mode="json"), "text": source}
    return prepared_key(model.source.digest, settings, {"general": general_ids, "facts": fact_ids})


def _prepare(
    cfg: SmfdConfig,
    model: MemoryModel,
    samples: SampleStore | None,
    progress: StartupProgress,
    general_ids: list[list[int]] | None,
    fact_ids: list[list[int]] | None,
) -> tuple[PreparedMemory, list[list[int]], list[list[int]], dict[int, list[torch.Tensor]]]:
    """Calibrate, heal and count background reads from one pass over the text (sampling it first if need be).

    `general_ids`, `fact_ids`: the text's ids as already read (None for text still to be sampled).
    Returns the prepared memory, the general and fact ids, and the retain text's memory inputs
    (statements first, the order of `retain_text`), so the first retain set needs no second pass.
    """
    progress.stage("collecting general text (memory.background_text, or text of the model's own: kept or sampled)")
    general = general_text(cfg, model, samples, general_ids)
    progress.stage("collecting the model's statements of fact (kept or sampled)")
    facts = model_text(model, fact_recipe(cfg.memory.fact_sequences), samples, fact_ids)
    progress.stage("healing the memory and counting background reads")
    both = general + facts
    healed, background = prepare_memory(model.model, model.memories, both.sequences, cfg.heal, inputs=both.inputs)
    prepared = PreparedMemory.of(model.memories, background, asdict(healed) if healed is not None else None)
    retain_inputs = (facts + general).inputs
    general_ids, fact_ids = general.sequences, facts.sequences
    del general, facts, both  # the runtime keeps the retain inputs only
    trim()
    return prepared, general_ids, fact_ids, retain_inputs
