"""The configuration schema: every setting of smfd, defined once, with its default and its meaning.

Components take their section (or `smfd.learn.lesson.LearnSettings`, a typed view of the learning
sections) instead of keeping their own copy, so a setting cannot be accepted here and ignored there.
Unknown keys are errors, so a typo fails at start with its key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from smfd.errors import SmfdError

EMBEDDED_MODEL = "embedded"


class ModelSection(BaseModel):
    """Which base model to load and where it may run."""

    model_config = ConfigDict(extra="forbid")

    path: str = EMBEDDED_MODEL
    threads: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: Path | None = None  # None means <state_dir>/model-cache (filled in by load_config)


class MemorySection(BaseModel):
    """The sparse memory layers retrofitted into the model (smfd.model.memory).

    Every field here but `read_floor_margin` is recorded in a state when it is created; a config that
    changes one is refused by name, since the stored rows only mean something under the shape that
    wrote them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Decoder layers that get a memory; negative numbers count from the top (-1 is the last block),
    # so one config fits models of any depth. Near the top a reworded prompt reads more of the rows
    # its original wording trained (docs/design.md).
    layers: tuple[int, ...] = Field((-2,), min_length=1)
    n_keys: int = Field(512, ge=2)  # sub-keys per half: n_keys² slots per layer
    heads: int = Field(4, ge=1)
    k: int = Field(8, ge=1)  # slots read per head and token
    key_dim: int = Field(128, ge=2)  # query/key width, split in two halves
    seed: int = Field(0, ge=0)  # initialisation of keys and query projection
    # Standardise each query dimension with statistics of general text (smfd.learn.heal): a
    # pretrained model's hidden states share a large common direction, so raw queries all land on
    # the same popular slots, and a row trained for new text is then read by most ordinary tokens.
    query_norm: bool = True
    # Softmax temperature over the k slot scores of each head; below 1 a token's read concentrates
    # on its best-matching slots.
    read_temperature: float = Field(0.3, gt=0)
    # Reads whose softmax weight (within the head) is at most this count for nothing, in the output
    # and in slot statistics: a trained row changes only the tokens that address it squarely.
    min_read_weight: float = Field(0.2, ge=0, lt=1)
    # Each trained row keeps a read floor: the lowest key score its update's own text read it at. A
    # read scoring more than this margin below its row's floor counts for nothing (ordinary text that
    # merely has the row among its k). None = off; docs/experiments/2026-12-07-read-floors.md.
    read_floor_margin: float | None = Field(0.3, ge=0)
    # General text for background slot statistics; None samples text from the frozen model itself.
    background_text: Path | None = None
    background_sequences: int = Field(256, ge=8)
    # The model's own statements of fact, sampled once: counted as ordinary text in the slot
    # statistics and watched by the retain penalty (smfd.learn.interference); 0 = none.
    fact_sequences: int = Field(256, ge=0)

    @model_validator(mode="after")
    def _shape_is_buildable(self) -> MemorySection:
        """Catch shapes that cannot be built before any tensor is allocated."""
        if self.k > self.n_keys:
            raise ValueError(f"k ({self.k}) must not exceed n_keys ({self.n_keys})")
        if self.key_dim % 2:
            raise ValueError(f"key_dim must be even (it is split in two halves), got {self.key_dim}")
        return self

    @property
    def n_slots(self) -> int:
        return self.n_keys * self.n_keys

    def shape(self) -> dict[str, Any]:
        """What defines the memory's rows: recorded in a state and compared on every start.

        `read_floor_margin` is left out: it changes no stored row, only which reads of floored rows
        count, so it may change on an existing state (rows trained while it was unset have no floor).
        """
        excluded = {"background_text", "background_sequences", "fact_sequences", "read_floor_margin"}
        return self.model_dump(mode="json", exclude=excluded)

    def layer_indices(self, n_layers: int) -> list[int]:
        """The chosen decoder layers as indices into a stack of `n_layers`, negative ones counted from the top."""
        bad = [layer for layer in self.layers if not -n_layers <= layer < n_layers]
        if bad:
            raise SmfdError(
                f"memory.layers {bad} out of range: the model has {n_layers} decoder layers "
                f"(0..{n_layers - 1}, or -{n_layers}..-1 counted from the top)"
            )
        indices = [layer % n_layers for layer in self.layers]
        if len(set(indices)) != len(indices):
            raise SmfdError(f"memory.layers {list(self.layers)} names a layer twice (model of {n_layers} layers)")
        return sorted(indices)


class HealSection(BaseModel):
    """Training of the memory's addressing on general text, once, when the state is created (smfd.learn.heal).

    The loss is KL(read mass per slot || uniform): ordinary text stops crowding onto popular
    slots, so a row an update trains for new text is read by few ordinary tokens. Value rows
    stay zero, so the model stays exactly the base model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(300, ge=0)  # 0 = off
    lr: float = Field(1e-3, gt=0)
    tokens_per_step: int = Field(1024, ge=2)
    seed: int = Field(0, ge=0)


class DistillSection(BaseModel):
    """Context distillation (smfd.learn.distill): the memory learns what the frozen model predicts
    with the document in its context, on queries built from the document.

    Off by default: on the 6-document benchmark it recalled no more reworded prompts than next-token
    training (10.0% either way) at about twice the cost (docs/experiments/2026-12-02-context-distillation.md).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    top_k: int = Field(32, ge=1)  # teacher tokens kept per position
    dropped_variants: int = Field(2, ge=0)  # copies of each sentence with words dropped
    drop_rate: float = Field(0.15, ge=0, lt=1)  # share of words dropped in such a copy
    shuffled_variants: int = Field(1, ge=0)  # copies of each sentence behind another sentence of the document
    tail_variants: int = Field(0, ge=0)  # copies of each sentence's tail (from a word a quarter to three fifths in)
    # Tokens whose prediction the document moves by less than this (KL, nats) are not trained: nothing
    # to learn there, and the language-model head (most of a step's cost) runs only where a loss is taken.
    min_shift: float = Field(0.05, ge=0)
    ce_weight: float = Field(0.0, ge=0)  # next-token NLL beside the KL; 0 = pure distillation
    max_context_tokens: int = Field(2048, ge=16)  # a longer document is distilled chunk by chunk


class TrainSection(BaseModel):
    """How an update chooses memory slots and trains them (smfd.learn)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Slot ranking against background reads (smfd.learn.selection): "tfidf" (Lin et al.), "kl"
    # (Goyal et al.), "surprise-kl" ("kl" with each read weighted by how surprising its token is).
    selection: Literal["kl", "tfidf", "surprise-kl"] = "surprise-kl"
    top_t: int = Field(1000, ge=1)  # rows an update may change, per memory layer
    lr: float = Field(12.0, gt=0)
    normalize: bool = True  # lr is the RMS change per element of the selected rows per step
    # With normalize: divide by the RMS of the update's first gradient (per layer) instead of each
    # step's own, so steps shrink as the loss falls.
    normalize_once: bool = False
    # "update": top_t chosen once from all of an update's text; "step": afresh per optimizer step (Lin et al.).
    scope: Literal["step", "update"] = "update"
    # Interference penalty (smfd.learn.interference): squared change of the memory's output on the
    # retain tokens, relative to the MLP's output; 0 = off.
    retain_weight: float = Field(5.0, ge=0)
    retain_tokens: int = Field(16384, ge=1)  # tokens of the retain text the penalty watches (statements first)
    # Never train a row that a retain token reads above the read cut (the penalty then guards only the
    # weaker reads of the rows an update does train). Off: on 20 dev documents it halved ordinary
    # text's reads on trained rows but kept the same known facts and memorised less
    # (docs/experiments/2026-12-07-stream-variants.md).
    avoid_retain_rows: bool = False
    # MiB for each sequence's hidden state entering the lowest memory layer, kept for the rest of the
    # update (smfd.model.prefix): same results, later passes skip the blocks below; 0 = off.
    prefix_cache_mb: int = Field(256, ge=0)
    passes: int = Field(8, ge=1)  # times each training text is seen in its update
    batch_size: int = Field(8, ge=1)  # upper bound; the memory budget may plan a smaller one
    # Sequences per forward and backward pass: a step sums its batch's gradient over micro-batches of at
    # most this many, the same step to float rounding with a smaller peak (on the embedded model, 4 of 8
    # sequences: about 56 MiB less). Scope "step" ranks rows from the whole batch's reads, so it runs
    # the batch at once. null: the whole batch.
    micro_batch_size: int | None = Field(4, ge=1)
    seq_len: int = Field(128, ge=8)
    restate: bool = True  # also learn each sentence on its own (smfd.text.restate)
    # Gaussian noise (standard deviation, in the memory's normalised query space) added to every
    # read while an update ranks and trains rows, never when the model answers or is measured: the
    # rows around a text's own reads are trained too, where a reworded prompt's read may land.
    # Off: on 20 dev documents σ 0.3 cost most of the memorisation and recalled no more paraphrases
    # (docs/experiments/2026-12-06-reach-and-query-noise.md).
    query_noise: float = Field(0.0, ge=0)
    query_noise_draws: int = Field(4, ge=1)  # noisy reads of each sequence when an update ranks its rows
    max_documents: int = Field(1, ge=1)  # documents claimed per update
    distill: DistillSection = Field(default_factory=DistillSection)

    @model_validator(mode="after")
    def _avoided_rows_are_known(self) -> TrainSection:
        """The rows `avoid_retain_rows` leaves alone are those of the retain set, which exists only with the penalty."""
        if self.avoid_retain_rows and self.retain_weight <= 0:
            raise ValueError("avoid_retain_rows needs the retain penalty: set retain_weight > 0")
        return self


class ChunkingSection(BaseModel):
    """How documents are cut into training chunks."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(96, ge=8)
    overlap_sentences: int = Field(0, ge=0)
    title_context: bool = True


class SurpriseSection(BaseModel):
    """Chunks with mean token NLL below ``skip_below_nats`` are treated as already known."""

    model_config = ConfigDict(extra="forbid")

    skip_below_nats: float = Field(0.5, ge=0)


class WatchFolder(BaseModel):
    """One folder to take documents from."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    recursive: bool = False
    include: list[str] = Field(default_factory=lambda: ["*"])  # unsupported types are quarantined with a reason
    exclude: list[str] = Field(default_factory=list)
    polling: bool = False  # needed on network filesystems, where inotify sees nothing
    jsonl_field: str = "text"
    move: bool = True  # move files into the spool; False copies them and leaves the inbox alone


class Feed(BaseModel):
    """One RSS/Atom feed to poll."""

    model_config = ConfigDict(extra="forbid")

    url: str
    interval_seconds: float = Field(900, gt=0)
    timeout_seconds: float = Field(20, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        """Only http(s) is fetched; other schemes (file:, ftp:) would bypass the HTTP client's limits."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
        return url


class SourcesSection(BaseModel):
    """Where text comes from and how eagerly it is taken."""

    model_config = ConfigDict(extra="forbid")

    watch: list[WatchFolder] = Field(default_factory=lambda: [WatchFolder(path=Path("./inbox"))])
    feeds: list[Feed] = Field(default_factory=list)
    settle_seconds: float = Field(2.0, ge=0)
    rescan_seconds: float = Field(30.0, gt=0)
    max_file_bytes: int = Field(1_000_000, ge=1)
    max_attempts: int = Field(3, ge=1)


class ScheduleSection(BaseModel):
    """When training and probe runs happen."""

    model_config = ConfigDict(extra="forbid")

    interval_seconds: float = Field(30, gt=0)
    pending_chunks_trigger: int = Field(16, ge=1)
    probe_interval_seconds: float = Field(900, gt=0)


class BudgetSection(BaseModel):
    """Memory ceilings in MiB; None means no limit."""

    model_config = ConfigDict(extra="forbid")

    ram_mb: int | None = Field(4096, ge=1)
    vram_mb: int | None = Field(None, ge=1)


class CheckpointSection(BaseModel):
    """How many memory checkpoints to keep on disk."""

    model_config = ConfigDict(extra="forbid")

    keep: int = Field(5, ge=1)


class MetricsSection(BaseModel):
    """Prometheus endpoint; loopback only unless the operator says otherwise."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(9464, ge=0, le=65535)


class ServeSection(BaseModel):
    """The OpenAI-compatible HTTP API on the learning model (smfd.serve); loopback only by default."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8464, ge=0, le=65535)
    model_name: str = Field("smfd", min_length=1)  # the id /v1/models lists and requests must name
    api_key_file: Path | None = None  # a file holding the bearer token requests must send; None = no check
    max_concurrent: int = Field(8, ge=1)  # requests waiting or running; past this a request gets 429
    # pause_learner: a request runs between two optimizer steps of an update, on the last accepted
    # memory; wait: requests wait until the update is accepted or rolled back
    during_update: Literal["pause_learner", "wait"] = "pause_learner"
    default_max_tokens: int = Field(256, ge=1)  # when a request gives no max_tokens
    max_body_bytes: int = Field(1_000_000, ge=1024)  # a larger request body gets 413


class LoggingSection(BaseModel):
    """Log level and format.

    The YAML key is ``json``; the attribute is ``json_format`` because ``json`` would shadow
    a BaseModel method.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    level: Literal["debug", "info", "warning", "error"] = "info"
    json_format: bool = Field(True, alias="json")


class ProbeSuite(BaseModel):
    """A file of probe items used to check that learning does not break the model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    kind: Literal["cloze", "choice", "heldout"]
    path: Path
    limit: int | None = Field(None, ge=1)


class ProbesSection(BaseModel):
    """Probe suites and drift prompts."""

    model_config = ConfigDict(extra="forbid")

    builtin: bool = True  # also run the probe set shipped with smfd
    suites: list[ProbeSuite] = Field(default_factory=list)
    fast_subset: int = Field(8, ge=0)
    drift_prompts: Path | None = None

    @field_validator("suites")
    @classmethod
    def _unique_names(cls, suites: list[ProbeSuite]) -> list[ProbeSuite]:
        """Suite names label metrics and results; two suites with one name would mix their numbers."""
        names = [suite.name for suite in suites]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"suite names must be unique, repeated: {', '.join(duplicates)}")
        return suites


class GuardSection(BaseModel):
    """Thresholds that make the daemon roll back (or alert on) a harmful update."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    action: Literal["rollback", "alert"] = "rollback"
    max_accuracy_drop: float = Field(0.02, ge=0)
    max_nll_increase_ratio: float = Field(0.02, ge=0)
    max_drift_kl: float = Field(0.05, ge=0)
    warn_window: int = Field(20, ge=1)
    warn_rejected_share: float = Field(0.5, ge=0, lt=1)


class SmfdConfig(BaseModel):
    """The whole daemon configuration."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSection = Field(default_factory=ModelSection)
    memory: MemorySection = Field(default_factory=MemorySection)
    heal: HealSection = Field(default_factory=HealSection)
    train: TrainSection = Field(default_factory=TrainSection)
    chunking: ChunkingSection = Field(default_factory=ChunkingSection)
    surprise: SurpriseSection = Field(default_factory=SurpriseSection)
    sources: SourcesSection = Field(default_factory=SourcesSection)
    state_dir: Path = Path("./state")
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    probes: ProbesSection = Field(default_factory=ProbesSection)
    guard: GuardSection = Field(default_factory=GuardSection)
