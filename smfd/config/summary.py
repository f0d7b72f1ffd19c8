"""The plan `smfd --config FILE --check` prints: what the daemon will do with a config."""

from __future__ import annotations

from smfd.config.schema import SmfdConfig, WatchFolder
from smfd.paths import StatePaths

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
        f"top-{memory.k}, key dim {memory.key_dim}, value rows start at zero",
        f"  healing: {cfg.heal.steps} addressing steps when the state is created"
        if cfg.heal.steps
        else "  healing: off",
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
    serve = cfg.serve
    serve_text = (
        f"http://{serve.host}:{serve.port}/v1 as model {serve.model_name!r}, up to {serve.max_concurrent} requests, "
        f"{'bearer key from ' + str(serve.api_key_file) if serve.api_key_file else 'no key'}; during an update: "
        f"{serve.during_update.replace('_', ' ')}"
        if serve.enabled
        else "off"
    )
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
        f"  serve: {serve_text}",
        f"  logging: {cfg.logging.level}, {'JSON' if cfg.logging.json_format else 'plain text'}",
    ]


def describe(cfg: SmfdConfig) -> str:
    """A readable summary of what the daemon would do with this config (shown by ``--check``)."""
    model = cfg.model
    cache_dir = model.cache_dir or StatePaths(cfg.state_dir).model_cache
    lines = [
        "smfd configuration",
        f"  model: {model.path} (device {model.device}, {model.threads} threads, cache {cache_dir})",
        f"  state: {cfg.state_dir}",
        *_describe_sources(cfg),
        *_describe_learning(cfg),
        *_describe_operations(cfg),
    ]
    return "\n".join(lines)
