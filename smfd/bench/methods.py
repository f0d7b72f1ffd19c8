"""Method specs (`NAME[:key=value;key=value]`) and the trainers they build.

A spec names a method and overrides some of its settings, so one run can hold a learning-rate
sweep: `smf-kl,smf-kl:lr=0.2;top_t=500,lora:lr=1e-3`. Anything a spec does not set comes from
the engine's own defaults (`LearnSettings`, `UpdateConfig`, `MemoryConfig`, the trainer
signatures) or from the run-wide budget (passes, restatement), so the numbers live in one place.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smfd.durable import atomic_write
from smfd.errors import SmfdError
from smfd.learn.heal import HealConfig, prepare_memory
from smfd.model.batch import encode, epoch_batches
from smfd.learn.lesson import LearnSettings, build_lesson, lesson_batches
from smfd.text.restate import training_texts
from smfd.model.memory import MemoryConfig
from smfd.model.memory_model import MemoryModel
from smfd.learn.interference import FACT_SEQUENCES, FACT_TOKENS, RetainSet, fact_prompts, retain_text, sample_self_facts
from smfd.model.slot_stats import BackgroundStats
from smfd.learn.surprise import sequence_surprise
from smfd.learn.updater import SparseUpdater, StepResult
from smfd.model.batch import TokenBatch

if TYPE_CHECKING:  # peft is imported only by workers that train LoRA or full finetuning
    from smfd.bench.baselines import FullFinetuneTrainer, LoraTrainer

SPEC_SEPARATOR = ","  # between specs
OPTION_SEPARATOR = ";"  # between key=value options inside one spec
# `smf` is the daemon's recipe as configured by default; the others pin a slot-ranking rule.
SMF_RULES = {"smf": None, "smf-kl": "kl", "smf-tfidf": "tfidf", "smf-surprise-kl": "surprise-kl"}
IN_CONTEXT = "in-context"  # no training: each probe is asked with its document in the prompt (the ceiling)
METHOD_NAMES = (*SMF_RULES, "lora", "full", IN_CONTEXT)


def _int_at_least(low: int, key: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SmfdError(f"option {key}={raw!r} must be a whole number") from None
    if value < low:
        raise SmfdError(f"option {key}={raw!r} must be >= {low}")
    return value


def _positive_int(key: str, raw: str) -> int:
    return _int_at_least(1, key, raw)


def _non_negative_int(key: str, raw: str) -> int:
    return _int_at_least(0, key, raw)


def _number(key: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise SmfdError(f"option {key}={raw!r} must be a number") from None


def _positive_float(key: str, raw: str) -> float:
    value = _number(key, raw)
    if not value > 0 or value != value or value == float("inf"):
        raise SmfdError(f"option {key}={raw!r} must be a finite number > 0")
    return value


def _non_negative_float(key: str, raw: str) -> float:
    value = _number(key, raw)
    if not 0 <= value < float("inf"):
        raise SmfdError(f"option {key}={raw!r} must be a finite number >= 0")
    return value


def _flag(key: str, raw: str) -> bool:
    if raw not in ("0", "1"):
        raise SmfdError(f"option {key}={raw!r} must be 0 or 1")
    return raw == "1"


def _scope(key: str, raw: str) -> str:
    if raw not in ("step", "update"):
        raise SmfdError(f"option {key}={raw!r} must be step or update")
    return raw


def _layers(key: str, raw: str) -> tuple[int, ...]:
    parts = raw.split("+")
    if not all(p.strip().removeprefix("-").isdigit() for p in parts):
        raise SmfdError(f"option {key}={raw!r} must be decoder layer numbers joined by '+', e.g. 12+20 or -2")
    return tuple(int(p) for p in parts)


Parser = Callable[[str, str], Any]
SMF_OPTIONS: dict[str, Parser] = {
    "lr": _positive_float, "top_t": _positive_int, "passes": _positive_int, "layers": _layers, "restate": _flag,
    "n_keys": _positive_int, "k": _positive_int, "heads": _positive_int, "key_dim": _positive_int, "normalize": _flag,
    "scope": _scope, "normalize_once": _flag, "retain_weight": _non_negative_float, "retain_tokens": _positive_int,
    "prefix_cache_mb": _non_negative_int,
    "read_temperature": _positive_float, "min_read_weight": _non_negative_float, "heal_steps": _non_negative_int, "heal_lr": _positive_float,
    "fact_sequences": _non_negative_int,
    "distill": _flag, "distill_top_k": _positive_int, "dropped_variants": _non_negative_int,
    "drop_rate": _non_negative_float, "shuffled_variants": _non_negative_int, "ce_weight": _non_negative_float,
    "min_shift": _non_negative_float,
}
LORA_OPTIONS: dict[str, Parser] = {
    "lr": _positive_float, "rank": _positive_int, "alpha": _positive_float, "passes": _positive_int, "restate": _flag,
    "weight_decay": _non_negative_float,
}
FULL_OPTIONS: dict[str, Parser] = {
    "lr": _positive_float, "passes": _positive_int, "restate": _flag, "weight_decay": _non_negative_float,
}


def options_for(name: str) -> dict[str, Parser]:
    if name == IN_CONTEXT:
        return {}
    if name in SMF_RULES:
        return SMF_OPTIONS
    return LORA_OPTIONS if name == "lora" else FULL_OPTIONS


@dataclass(frozen=True)
class MethodSpec:
    """One method to benchmark. `label` is the spec as typed (whitespace removed): the results key."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return "smf" if self.name in SMF_RULES else self.name

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "name": self.name, "options": self.options}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "MethodSpec":
        options = dict(data["options"])
        if "layers" in options:
            options["layers"] = tuple(options["layers"])
        return cls(data["label"], data["name"], options)


def parse_method_spec(text: str) -> MethodSpec:
    """`NAME` or `NAME:key=value;key=value` -> MethodSpec, checking the name, every key and every value."""
    label = "".join(text.split())
    name, _, option_text = label.partition(":")
    if name not in METHOD_NAMES:
        raise SmfdError(f"unknown method {name!r} in spec {text!r}; choose from {', '.join(METHOD_NAMES)}")
    allowed = options_for(name)
    options: dict[str, Any] = {}
    for item in filter(None, option_text.split(OPTION_SEPARATOR)):
        key, eq, raw = item.partition("=")
        if not eq or not raw:
            raise SmfdError(f"method spec {text!r}: option {item!r} is not key=value")
        if key not in allowed:
            raise SmfdError(f"method spec {text!r}: unknown option {key!r} for {name}; allowed: {', '.join(allowed)}")
        if key in options:
            raise SmfdError(f"method spec {text!r}: option {key!r} given twice")
        options[key] = allowed[key](key, raw)
    return MethodSpec(label, name, options)


def parse_method_specs(values: list[str]) -> list[MethodSpec]:
    """Every spec from one or more comma-separated lists, in order; duplicates are an error."""
    specs: list[MethodSpec] = []
    for value in values:
        for part in value.split(SPEC_SEPARATOR):
            if not part.strip():
                raise SmfdError(f"--methods {value!r} has an empty entry (two commas in a row or a trailing comma)")
            specs.append(parse_method_spec(part))
    labels = [s.label for s in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise SmfdError(f"--methods names {', '.join(duplicates)} more than once")
    if not specs:
        raise SmfdError("--methods is empty: name at least one method")
    return specs


# ---------------------------------------------------------------- SMF settings


def smf_configs(spec: MethodSpec, defaults: LearnSettings) -> tuple[LearnSettings, MemoryConfig]:
    """The learn settings and memory configuration of an SMF spec: engine defaults, then the spec's overrides."""
    o = spec.options
    update = replace(
        defaults.update,
        rule=SMF_RULES[spec.name] or defaults.update.rule,
        **{key: o[key] for key in ("lr", "top_t", "normalize", "normalize_once", "scope", "retain_weight", "retain_tokens",
                                 "prefix_cache_mb", "ce_weight") if key in o},
    )
    distill = replace(
        defaults.distill,
        **{field: o[key] for key, field in (("distill", "enabled"), ("distill_top_k", "top_k"),
                                             ("dropped_variants", "dropped_variants"), ("drop_rate", "drop_rate"),
                                             ("shuffled_variants", "shuffled_variants"), ("min_shift", "min_shift")) if key in o},
    )
    distill.validate()
    memory = replace(MemoryConfig(), **{key: o[key] for key in ("layers", "n_keys", "k", "heads", "key_dim", "read_temperature",
                                                            "min_read_weight") if key in o})
    update.validate()
    settings = replace(defaults, update=update, distill=distill,
                       **{key: o[key] for key in ("passes", "restate") if key in o})
    return settings, memory


def heal_config_of(spec: MethodSpec) -> HealConfig:
    """Healing settings of an SMF spec: the engine's defaults, then the spec's `heal_steps` / `heal_lr`."""
    o = spec.options
    config = replace(HealConfig(), **{field: o[key] for key, field in (("heal_steps", "steps"), ("heal_lr", "lr")) if key in o})
    config.validate()
    return config


# ---------------------------------------------------------------- background statistics (cached)


def self_facts(memory_model: MemoryModel, n_sequences: int, background: "BackgroundSource") -> list[list[int]]:
    """The base model's own statements of fact (`smfd.learn.interference.sample_self_facts`), cached as JSON token ids."""
    if n_sequences == 0:
        return []
    identity = {"model": background.model_id, "n": n_sequences, "tokens": FACT_TOKENS, "prompts": fact_prompts()}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    cache = background.cache_dir / f"facts-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    facts = sample_self_facts(memory_model.model, memory_model.tokenizer, memory_model.memories, n_sequences)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda tmp: tmp.write_text(json.dumps(facts)))
    return facts


ADDRESSING = ("query_shift", "query_scale", "query.weight", "keys")  # set from the same general text


def _background_key(memory_config: MemoryConfig, heal: HealConfig, model_id: str, sequences: list[list[int]]) -> str:
    identity = {"memory": asdict(memory_config), "model": model_id, "heal": asdict(heal)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for seq in sequences:
        digest.update(json.dumps(seq).encode())
    return digest.hexdigest()[:20]


def _save_background(path: Path, stats: dict[int, BackgroundStats], memory_model: MemoryModel) -> None:
    """Background statistics with the addressing they were counted under (calibration and healed query and keys)."""
    tensors = {key: t for key, t in memory_model.memory_state().items() if key.endswith(ADDRESSING)}
    for layer, s in stats.items():
        tensors[f"bg.{layer}.counts"] = s.counts.contiguous()
        tensors[f"bg.{layer}.doc_freq"] = s.doc_freq.contiguous()
        tensors[f"bg.{layer}.n_batches"] = torch.tensor([s.n_batches])
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def _load_background(path: Path, memory_model: MemoryModel) -> dict[int, BackgroundStats]:
    tensors = load_file(str(path))
    layers = [m.layer_index for m in memory_model.memories]
    with torch.no_grad():
        for memory in memory_model.memories:
            own = memory.state_dict(keep_vars=True)
            for name in ADDRESSING:
                own[name].copy_(tensors[f"{memory.layer_index}.{name}"])
    return {
        layer: BackgroundStats(
            tensors[f"bg.{layer}.counts"], tensors[f"bg.{layer}.doc_freq"], int(tensors[f"bg.{layer}.n_batches"].item())
        )
        for layer in layers
    }


def background_stats(
    memory_model: MemoryModel, sequences: list[list[int]], cache_dir: Path, model_id: str, progress: bool,
    heal: HealConfig = HealConfig(),
) -> tuple[dict[int, BackgroundStats], bool]:
    """Background read counts for this memory after calibration and healing, reused across specs that share
    the memory shape and healing; (stats, from_cache)."""
    key = _background_key(memory_model.memory_config, heal, model_id, sequences)
    cache = cache_dir / f"background-{key}.safetensors"
    if cache.is_file():
        return _load_background(cache, memory_model), True
    _, stats = prepare_memory(memory_model.model, memory_model.memories, sequences, heal, progress)
    _save_background(cache, stats, memory_model)
    return stats, False


# ---------------------------------------------------------------- learners


class Learning(Protocol):
    """What the benchmark drives: a document's batches, optimizer steps, a hook after each document, the model to evaluate."""

    def document_batches(self, document: str, chunks: list[str], passes: int, restate: bool, seed: int) -> list[TokenBatch]: ...

    def step(self, batch: TokenBatch) -> StepResult: ...

    def begin_document(self, batches: list[TokenBatch]) -> None: ...

    def end_document(self) -> int: ...

    def eval_model(self) -> PreTrainedModel: ...

    def surprise(self, sequences: list[list[int]]) -> list[torch.Tensor] | None: ...

    def describe(self) -> dict[str, Any]: ...


class SmfLearning:
    """Sparse memory finetuning as the daemon runs it: the same lesson (`smfd.learn.lesson`), `SparseUpdater`
    steps, one update per document."""

    def __init__(self, memory_model: MemoryModel, background: dict[int, BackgroundStats], settings: LearnSettings,
                 retain: RetainSet | None = None, heal: HealConfig = HealConfig()) -> None:
        self.memory_model = memory_model
        self.settings = settings
        self.update = settings.update
        self.heal = heal
        self.batch_size = settings.batch_size
        self.updater = SparseUpdater(memory_model.model, memory_model.memories, background, settings.update, retain)
        self.rows_updated = 0
        self.sequences_trained = 0

    def document_batches(self, document: str, chunks: list[str], passes: int, restate: bool, seed: int) -> list[TokenBatch]:
        """The daemon's lesson for this document (distilled when the settings say so)."""
        settings = replace(self.settings, passes=passes, restate=restate)
        lesson = build_lesson(self.memory_model, settings, document, chunks, self.batch_size, seed=seed)
        self.sequences_trained += len(lesson.sequences)
        mm = self.memory_model
        return lesson_batches(lesson, self.batch_size, passes, mm.tokenizer.pad_token_id, seed, mm.device)

    def step(self, batch: TokenBatch) -> StepResult:
        return self.updater.step(batch)

    def begin_document(self, batches: list[TokenBatch]) -> None:
        """Selection scope "update" ranks slots once over the whole document (as the daemon does)."""
        self.updater.plan_update(batches)

    def end_document(self) -> int:
        """Close the document's update (as the daemon does per update); returns the rows it changed."""
        rows = sum(p.n_rows for p in self.updater.finish_update())
        self.rows_updated += rows
        return rows

    def eval_model(self) -> PreTrainedModel:
        return self.memory_model.model

    def surprise(self, sequences: list[list[int]]) -> list[torch.Tensor] | None:
        """Per-token surprise under the frozen base, only for the rule that weights reads by it (timing batch)."""
        if self.update.rule != "surprise-kl":
            return None
        mm = self.memory_model
        return sequence_surprise(mm.model, mm.memories, sequences, mm.tokenizer.pad_token_id, self.batch_size, mm.device)

    def rows_changed(self) -> int:
        """Value rows that differ from their zero initialisation now: the memory this run actually used."""
        return sum(int((m.values.detach() != 0).any(dim=1).sum()) for m in self.memory_model.memories)

    def describe(self) -> dict[str, Any]:
        info = self.memory_model.describe()
        return {
            "method": "smf",
            "rule": self.update.rule,
            "update": asdict(self.update),
            "distill": asdict(self.settings.distill),
            "heal": asdict(self.heal),
            "memory": info["memory"],
            "memory_parameters": info["memory_parameters"],
            "optimizer": "SGD on the selected value rows only (no momentum, no weight decay)",
            "rows_updated": self.rows_updated,
            "rows_changed": self.rows_changed(),
            "sequences_trained": self.sequences_trained,
        }


class AdamWLearning:
    """LoRA or full finetuning: their trainers take the same batches; documents need no closing."""

    def __init__(self, trainer: "LoraTrainer | FullFinetuneTrainer", tokenizer: PreTrainedTokenizerBase, batch_size: int,
                 seq_len: int, device: torch.device) -> None:
        self.trainer = trainer
        self.tokenizer, self.batch_size, self.seq_len, self.device = tokenizer, batch_size, seq_len, device

    def document_batches(self, document: str, chunks: list[str], passes: int, restate: bool, seed: int) -> list[TokenBatch]:
        """Next-token training on the chunks (and their sentences): the dense baselines' recipe."""
        sequences = encode(self.tokenizer, training_texts(chunks, restate), self.seq_len)
        batches = epoch_batches(sequences, self.batch_size, passes, self.tokenizer.pad_token_id, seed=seed)
        return [b.to(self.device) for b in batches]

    def step(self, batch: TokenBatch) -> StepResult:
        return self.trainer.step(batch)

    def begin_document(self, batches: list[TokenBatch]) -> None:
        return None

    def end_document(self) -> int:
        return 0

    def eval_model(self) -> PreTrainedModel:
        return self.trainer.model  # type: ignore[return-value]

    def surprise(self, sequences: list[list[int]]) -> list[torch.Tensor] | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {**self.trainer.describe(), "optimizer": "AdamW"}


@dataclass(frozen=True)
class BackgroundSource:
    """Where SMF methods get their background statistics: general-text sequences and a cache folder."""

    sequences: list[list[int]]
    cache_dir: Path
    model_id: str
    progress: bool = True


def build_learning(
    spec: MethodSpec,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    defaults: LearnSettings,
    background: BackgroundSource,
) -> tuple[Learning, dict[str, Any]]:
    """The method's trainer around a freshly loaded base model; also setup facts (background time and source)."""
    o = spec.options
    if spec.family == "smf":
        settings, memory_config = smf_configs(spec, defaults)
        update = settings.update
        memory_model = MemoryModel.attach(model, tokenizer, memory_config)
        heal = heal_config_of(spec)
        facts = self_facts(memory_model, o.get("fact_sequences", FACT_SEQUENCES), background)
        stats, cached = background_stats(memory_model, background.sequences + facts, background.cache_dir,
                                         background.model_id, background.progress, heal)
        retain = None
        if update.retain_weight > 0:  # the daemon's rule: the model's statements of fact, then the general text
            retain = RetainSet.collect(memory_model.model, memory_model.memories,
                                       retain_text(facts, background.sequences), update.retain_tokens)
        setup = {"background_cached": cached, "fact_sequences": len(facts)}
        return SmfLearning(memory_model, stats, settings, retain, heal), setup
    from smfd.bench.baselines import FullFinetuneTrainer, LoraTrainer

    adamw = {key: o[key] for key in ("lr", "weight_decay") if key in o}
    device = next(model.parameters()).device
    plain = (tokenizer, defaults.batch_size, defaults.seq_len, device)
    if spec.name == "lora":
        lora = {key: o[key] for key in ("rank", "alpha") if key in o}
        return AdamWLearning(LoraTrainer(model, **lora, **adamw), *plain), {}
    return AdamWLearning(FullFinetuneTrainer(model, **adamw), *plain), {}
