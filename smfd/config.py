"""Daemon configuration: schema, YAML loading, environment overrides, summaries.

The config is a YAML file validated by pydantic models that forbid unknown keys, so a
typo such as ``recursve`` fails at startup with the key path instead of being ignored.
Relative paths are resolved against the config file's folder, so the daemon behaves the
same whatever its working directory is (systemd starts it in ``/``).

Environment variables ``SMFD_<SECTION>__<KEY>=value`` override single values; the double
underscore separates nesting levels, names are case-insensitive, and values are read as
YAML scalars (``SMFD_TRAIN__LR=100`` is a number, ``SMFD_METRICS__ENABLED=false`` a bool).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from smfd.errors import ConfigError

EMBEDDED_MODEL = "embedded"
ENV_PREFIX = "SMFD_"
ENV_NESTING = "__"


# --------------------------------------------------------------------------- schema


class ModelSection(BaseModel):
    """Which base model to load and where it may run."""

    model_config = ConfigDict(extra="forbid")

    path: str = EMBEDDED_MODEL
    threads: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: Path | None = None  # None means <state_dir>/model-cache (filled in by load_config)


class MemorySection(BaseModel):
    """Shape of the sparse memory layers added to the model."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(default_factory=lambda: [-2], min_length=1)  # negative: counted from the top
    n_keys: int = Field(512, ge=2)
    heads: int = Field(4, ge=1)
    k: int = Field(8, ge=1)
    key_dim: int = Field(128, ge=1)
    value_init: Literal["zero"] = "zero"
    query_norm: bool = True  # standardise queries with general-text statistics (spreads slot usage)
    read_temperature: float = Field(0.3, gt=0)  # softmax temperature of each token's read over its k slots
    min_read_weight: float = Field(0.2, ge=0, lt=1)  # reads at or below this weight count for nothing
    # General text for background slot statistics; None samples text from the frozen model itself.
    background_text: Path | None = None
    background_sequences: int = Field(256, ge=8)
    # The model's own statements of fact, sampled once: counted as ordinary text in the slot
    # statistics and watched by the retain penalty (smfd.learn.interference); 0 = none.
    fact_sequences: int = Field(256, ge=0)

    @model_validator(mode="after")
    def _k_fits_keys(self) -> MemorySection:
        """Top-k lookup cannot pick more keys than exist; catch it before building tensors."""
        if self.k > self.n_keys:
            raise ValueError(f"k ({self.k}) must not exceed n_keys ({self.n_keys})")
        return self


class HealSection(BaseModel):
    """Training of the memory's addressing on the general text, once, when the state is created."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(300, ge=0)  # 0 = off
    lr: float = Field(1e-3, gt=0)
    tokens_per_step: int = Field(1024, ge=2)


class DistillSection(BaseModel):
    """Context distillation (smfd.learn.distill): the memory learns what the frozen model predicts with the document in context."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    top_k: int = Field(32, ge=1)  # teacher tokens kept per position
    dropped_variants: int = Field(2, ge=0)  # copies of each sentence with words dropped
    drop_rate: float = Field(0.15, ge=0, lt=1)  # share of words dropped in such a copy
    shuffled_variants: int = Field(1, ge=0)  # copies of each sentence behind another sentence of the document
    min_shift: float = Field(0.05, ge=0)  # tokens the document moves less than this (KL, nats) are not trained
    ce_weight: float = Field(0.0, ge=0)  # next-token NLL beside the KL; 0 = pure distillation
    max_context_tokens: int = Field(2048, ge=16)  # a longer document is distilled chunk by chunk


class TrainSection(BaseModel):
    """How memory slots are chosen and updated for each batch of new text."""

    model_config = ConfigDict(extra="forbid")

    selection: Literal["kl", "tfidf", "surprise-kl"] = "surprise-kl"
    top_t: int = Field(1000, ge=1)
    lr: float = Field(12.0, gt=0)
    normalize: bool = True  # lr is the RMS change per element of the selected rows per step
    normalize_once: bool = False  # divide by the update's first gradient RMS only: later steps shrink
    scope: Literal["step", "update"] = "update"  # top_t chosen once per update, or afresh per optimizer step
    retain_weight: float = Field(5.0, ge=0)  # interference penalty (smfd.learn.interference); 0 = off
    retain_tokens: int = Field(16384, ge=1)  # tokens of the retain text the penalty watches (statements first)
    prefix_cache_mb: int = Field(256, ge=0)  # hidden states below the memory kept through an update; 0 = off
    passes: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=8)
    restate: bool = True
    max_documents: int = Field(1, ge=1)  # documents claimed per update
    distill: DistillSection = Field(default_factory=DistillSection)


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
    logging: LoggingSection = Field(default_factory=LoggingSection)
    probes: ProbesSection = Field(default_factory=ProbesSection)
    guard: GuardSection = Field(default_factory=GuardSection)


# --------------------------------------------------------------------------- YAML


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys, which PyYAML would silently collapse to the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line_of: dict[Any, int] = {}
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` legitimately repeats keys that the mapping then overrides
            key = self.construct_object(key_node, deep=True)
            try:
                first_line = first_line_of.get(key)
            except TypeError:
                continue  # unhashable key: the base class reports it
            line = key_node.start_mark.line + 1
            if first_line is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} on line {line} (first defined on line {first_line})",
                    key_node.start_mark,
                )
            first_line_of[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read the config file into a dict, turning every way it can fail into a ConfigError."""
    try:
        with path.open("r", encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty; write '{{}}' to use every default")
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections at the top level, got {type(data).__name__}"
        )
    return data


# --------------------------------------------------------------------------- environment overrides


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, Any]]:
    """Collect ``SMFD_*`` overrides as {key path: (variable name, parsed value)}.

    Variables with ``__`` are always overrides, so a misspelt section fails validation loudly.
    Single-segment variables apply only when they name a top-level key (``SMFD_STATE_DIR``), so
    other ``SMFD_`` variables the CLI or unit file may use are left alone.
    """
    top_level = set(SmfdConfig.model_fields)
    overrides: dict[tuple[str, ...], tuple[str, Any]] = {}
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        segments = tuple(rest.split(ENV_NESTING))
        if len(segments) == 1 and segments[0] not in top_level:
            continue
        if not all(segments):
            raise ConfigError(f"environment variable {name}: empty key between '{ENV_NESTING}' separators")
        overrides[segments] = (name, _parse_env_value(name, environ[name]))
    return overrides


def _parse_env_value(name: str, raw: str) -> Any:
    """Read an override value as YAML so numbers, booleans and flow lists get their natural types."""
    try:
        return yaml.load(raw, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"environment variable {name} is not a valid YAML value: {exc}") from None


def _apply_override(data: dict[str, Any], key_path: tuple[str, ...], env_name: str, value: Any) -> None:
    """Set one value deep inside the raw config, creating sections and indexing lists as needed."""
    node: Any = data
    for depth, key in enumerate(key_path):
        last = depth == len(key_path) - 1
        where = ".".join(key_path[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"environment variable {env_name}: {where} is not an item of a {len(node)}-item list")
            index = int(key)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"environment variable {env_name}: {'.'.join(key_path[:depth])} is not a section")
        if last:
            node[key] = value
            continue
        if node.get(key) is None:
            if key_path[depth + 1].isdigit():
                raise ConfigError(
                    f"environment variable {env_name}: {where} is not listed in the config file; "
                    "list items can only be overridden when the file lists them"
                )
            node[key] = {}
        node = node[key]


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Apply every override in place; return {key path: variable name} for error messages."""
    sources: dict[tuple[str, ...], str] = {}
    for key_path, (env_name, value) in _env_overrides(environ).items():
        _apply_override(data, key_path, env_name, value)
        sources[key_path] = env_name
    return sources


# --------------------------------------------------------------------------- paths


def _resolve_against(path: Path, base_dir: Path) -> Path:
    """Make ``path`` absolute, reading relative paths from the config folder rather than the cwd."""
    expanded = path.expanduser()
    return Path(os.path.abspath(expanded if expanded.is_absolute() else base_dir / expanded))


def resolve_paths(cfg: SmfdConfig, base_dir: Path) -> SmfdConfig:
    """Return a copy of ``cfg`` with every filesystem path absolute, and the model cache defaulted."""
    state_dir = _resolve_against(cfg.state_dir, base_dir)
    model_path = cfg.model.path
    if model_path != EMBEDDED_MODEL:
        model_path = str(_resolve_against(Path(model_path), base_dir))
    cache_dir = state_dir / "model-cache"
    if cfg.model.cache_dir is not None:
        cache_dir = _resolve_against(cfg.model.cache_dir, base_dir)
    watch = [
        folder.model_copy(update={"path": _resolve_against(folder.path, base_dir)}) for folder in cfg.sources.watch
    ]
    suites = [suite.model_copy(update={"path": _resolve_against(suite.path, base_dir)}) for suite in cfg.probes.suites]
    drift = None if cfg.probes.drift_prompts is None else _resolve_against(cfg.probes.drift_prompts, base_dir)
    background = cfg.memory.background_text
    if background is not None:
        background = _resolve_against(background, base_dir)
    return cfg.model_copy(
        update={
            "state_dir": state_dir,
            "memory": cfg.memory.model_copy(update={"background_text": background}),
            "model": cfg.model.model_copy(update={"path": model_path, "cache_dir": cache_dir}),
            "sources": cfg.sources.model_copy(update={"watch": watch}),
            "probes": cfg.probes.model_copy(update={"suites": suites, "drift_prompts": drift}),
        }
    )


# --------------------------------------------------------------------------- loading


def _format_validation_error(path: Path, exc: ValidationError, env_sources: Mapping[tuple[str, ...], str]) -> str:
    """One line per problem, each starting with the dotted key path, e.g. ``train.lr: Input should be ...``."""
    lines = [f"invalid config {path}:"]
    for error in exc.errors(include_url=False):
        loc = tuple(str(part) for part in error["loc"])
        key = ".".join(loc) or "(top level)"
        line = f"  {key}: {error['msg']}"
        value = error.get("input")
        if isinstance(value, (str, int, float, bool)) and error["type"] != "missing":
            line += f" (got {_short_repr(value)})"
        env_name = next((name for key_path, name in env_sources.items() if loc[: len(key_path)] == key_path), None)
        if env_name is not None:
            line += f" [from environment variable {env_name}]"
        lines.append(line)
    return "\n".join(lines)


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> SmfdConfig:
    """Load, override from the environment, validate, and resolve paths; raise ConfigError on any problem.

    ``environ`` defaults to ``os.environ``; pass a dict to make overrides explicit (tests, --check).
    """
    path = Path(path)
    data = _read_yaml_mapping(path)
    env_sources = _apply_env(data, os.environ if environ is None else environ)
    try:
        cfg = SmfdConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc, env_sources)) from None
    base_dir = Path(os.path.abspath(path.expanduser())).parent
    return resolve_paths(cfg, base_dir)


def validate_model_path(cfg: SmfdConfig) -> None:
    """Check that model.path is "embedded", an existing folder, or an existing .gguf file.

    Kept out of load_config so a config can be loaded and summarised before the model is copied in.
    """
    model_path = cfg.model.path
    if model_path == EMBEDDED_MODEL:
        return
    candidate = Path(model_path)
    if candidate.is_dir():
        return
    if candidate.is_file() and candidate.suffix.lower() == ".gguf":
        return
    expected = f'give a model folder, a .gguf file, or "{EMBEDDED_MODEL}"'
    if candidate.is_file():
        raise ConfigError(f"model.path: {model_path} is a file but not a .gguf file; {expected}")
    raise ConfigError(f"model.path: {model_path} does not exist; {expected}")


# --------------------------------------------------------------------------- summary


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def _limit_mb(value: int | None) -> str:
    return "no limit" if value is None else f"{value} MiB"


def _describe_watch(folder: WatchFolder) -> str:
    mode = "move into spool" if folder.move else "copy into spool"
    options = [
        mode,
        "recursive" if folder.recursive else "top level only",
        "polling" if folder.polling else "native events",
    ]
    text = f"    {folder.path} ({', '.join(options)}); include {' '.join(folder.include)}"
    if folder.exclude:
        text += f"; exclude {' '.join(folder.exclude)}"
    return text


def _describe_sources(cfg: SmfdConfig) -> list[str]:
    sources = cfg.sources
    lines = ["  watch folders:" if sources.watch else "  watch folders: none"]
    lines += [_describe_watch(folder) for folder in sources.watch]
    lines.append("  feeds:" if sources.feeds else "  feeds: none")
    lines += [
        f"    {feed.url} every {feed.interval_seconds:g}s (timeout {feed.timeout_seconds:g}s)" for feed in sources.feeds
    ]
    lines.append(
        f"  intake: files settle {sources.settle_seconds:g}s, rescan every {sources.rescan_seconds:g}s, "
        f"max {sources.max_file_bytes} bytes, {sources.max_attempts} attempts before quarantine"
    )
    return lines


def _describe_learning(cfg: SmfdConfig) -> list[str]:
    memory, train, chunking = cfg.memory, cfg.train, cfg.chunking
    return [
        f"  memory: layers {', '.join(map(str, memory.layers))}{_from_top(memory.layers)}; {memory.n_keys} keys, {memory.heads} heads, "
        f"top-{memory.k}, key dim {memory.key_dim}, values init {memory.value_init}",
        f"  healing: {cfg.heal.steps} addressing steps when the state is created" if cfg.heal.steps else "  healing: off",
        f"  training: selection {train.selection}, top_t {train.top_t}, lr {train.lr:g}, {train.passes} passes, "
        f"batch {train.batch_size} x {train.seq_len} tokens, restate {_on_off(train.restate)}",
        _describe_retain(cfg),
        f"  chunking: up to {chunking.max_tokens} tokens, overlap {chunking.overlap_sentences} sentences, "
        f"title context {_on_off(chunking.title_context)}",
        f"  surprise: skip chunks below {cfg.surprise.skip_below_nats:g} nats/token",
        f"  schedule: train every {cfg.schedule.interval_seconds:g}s or at {cfg.schedule.pending_chunks_trigger} "
        f"pending chunks; probes every {cfg.schedule.probe_interval_seconds:g}s",
    ]


def _from_top(layers: list[int]) -> str:
    """The check does not load the model, so negative layers are explained rather than resolved."""
    return " (negative: counted from the top block, -1 being the last)" if any(layer < 0 for layer in layers) else ""


def _describe_retain(cfg: SmfdConfig) -> str:
    train, facts = cfg.train, cfg.memory.fact_sequences
    if train.retain_weight <= 0:
        return "  retain penalty: off"
    text = f"{facts} statements of fact sampled from the model, then the general text" if facts else "the general text"
    return f"  retain penalty: weight {train.retain_weight:g} on {train.retain_tokens} tokens of {text}"


def _describe_operations(cfg: SmfdConfig) -> list[str]:
    metrics, guard, probes = cfg.metrics, cfg.guard, cfg.probes
    metrics_text = f"http://{metrics.host}:{metrics.port}/metrics" if metrics.enabled else "off"
    suites = ", ".join(
        f"{suite.name} ({suite.kind}, {suite.path}{'' if suite.limit is None else f', limit {suite.limit}'})"
        for suite in probes.suites
    )
    guard_text = (
        f"{guard.action} when accuracy drops > {guard.max_accuracy_drop:g}, NLL rises > "
        f"{guard.max_nll_increase_ratio:.0%}, drift KL > {guard.max_drift_kl:g}"
        if guard.enabled
        else "off"
    )
    return [
        f"  budget: RAM {_limit_mb(cfg.budget.ram_mb)}, VRAM {_limit_mb(cfg.budget.vram_mb)}",
        f"  checkpoints: keep {cfg.checkpoint.keep}",
        f"  probes: {'built-in set' if probes.builtin else 'no built-in set'}"
        f"{'; ' + suites if suites else ''}; fast subset {probes.fast_subset}; "
        f"drift prompts {probes.drift_prompts or ('built-in' if probes.builtin else 'none')}",
        f"  guard: {guard_text}",
        f"  metrics: {metrics_text}",
        f"  logging: {cfg.logging.level}, {'JSON' if cfg.logging.json_format else 'plain text'}",
    ]


def describe(cfg: SmfdConfig) -> str:
    """A readable summary of what the daemon would do with this config (shown by ``--check``)."""
    model = cfg.model
    cache_dir = model.cache_dir or cfg.state_dir / "model-cache"
    lines = [
        "smfd configuration",
        f"  model: {model.path} (device {model.device}, {model.threads} threads, cache {cache_dir})",
        f"  state: {cfg.state_dir}",
        *_describe_sources(cfg),
        *_describe_learning(cfg),
        *_describe_operations(cfg),
    ]
    return "\n".join(lines)
