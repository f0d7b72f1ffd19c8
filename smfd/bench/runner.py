"""`smfd bench`: the command line, the per-method workers and the evaluation.

Protocol (the daemon's view of a stream): documents are fed one at a time in file order; per
document its training texts (chunks plus restatements, identical for every method) are encoded,
grouped into `passes` shuffled passes of batches and stepped through; SMF closes an update after
each document. Evaluation happens once, after the last document.

The base model and every method run in their own process (multiprocessing "spawn"), one after
the other, so peak memory is per method and no state leaks between methods. Workers receive and
return JSON; the base worker hands its next-token log-probabilities to the method workers as a
safetensors file in the output folder (deleted at the end unless --keep-logprobs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import textwrap
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smfd.model.batch import encode, make_batch
from smfd.bench import report
from smfd.bench.data import (
    PROBE_KINDS,
    ChoiceItem,
    Document,
    HeldoutSplit,
    KnownFact,
    SplitSizes,
    document_chunks,
    document_training_texts,
    load_documents,
    load_hellaswag,
    load_known_facts,
    load_text,
    split_heldout,
    texts_digest,
)
from smfd.bench.methods import BackgroundSource, Learning, build_learning
from smfd.bench.specs import (
    FULL_OPTIONS,
    IN_CONTEXT,
    LORA_OPTIONS,
    METHOD_NAMES,
    OPTION_SEPARATOR,
    SMF_OPTIONS,
    SPEC_SEPARATOR,
    MethodSpec,
    parse_method_specs,
)
from smfd.durable import atomic_write
from smfd.errors import SmfdError
from smfd.model.scoring import drift_kl, heldout_nll, next_token_logprobs, score_choice, score_cloze
from smfd.learn.distill import CONTEXT_SEPARATOR
from smfd.config import ChunkingSection
from smfd.learn.lesson import LearnSettings
from smfd.model.loading import load_base_model, resolve_model_source
from smfd.model.memory_model import pick_device
from smfd.learn.updater import causal_lm_loss
from smfd.model.batch import TokenBatch

DEFAULT_METHODS = "smf-kl,smf-tfidf,lora,full"
DEFAULT_CACHE_DIR = "~/.cache/smfd/models"
BASE_LOGPROBS_FILE = "base_logprobs.safetensors"
# (default, --quick value) for the sizes the quick preset shrinks.
PRESETS: dict[str, tuple[int | None, int | None]] = {
    "limit_docs": (None, 4),
    "hellaswag_rows": (1000, 200),
    "known_facts_rows": (None, 100),
    "heldout_windows": (64, 16),
    "drift_windows": (16, 8),
    "background_batches": (400, 100),
}
EVAL_BATCH = 32  # rows per progress step
CHOICE_PAIRS_PER_FORWARD = 16  # (context, ending) pairs per forward: bounds the full-vocabulary log-prob tensors

T = TypeVar("T")


@dataclass(frozen=True)
class BenchConfig:
    """Everything a worker needs, as plain JSON-able values."""

    docs: str
    limit_docs: int | None
    hellaswag: str
    hellaswag_rows: int
    known_facts: list[str]
    known_facts_rows: int | None
    heldout_text: str
    background_text: str | None
    methods: list[str]
    out: str
    model: str
    cache_dir: str
    device: str
    threads: int
    passes: int
    batch_size: int
    seq_len: int
    restate: bool
    chunk_tokens: int
    title_context: bool
    with_paraphrases: bool
    background_batches: int
    heldout_windows: int
    heldout_window_tokens: int
    drift_windows: int
    drift_window_tokens: int
    timing_steps: int
    timing_batch: int
    seed: int
    in_process: bool
    keep_logprobs: bool
    quick: bool

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BenchConfig":
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def learn_settings(self) -> LearnSettings:
        """The daemon's recipe with this run's budget: what SMF specs start from."""
        defaults = LearnSettings()
        chunking = ChunkingSection.model_validate({**defaults.chunking.model_dump(), "max_tokens": self.chunk_tokens,
                                                   "title_context": self.title_context})
        train = defaults.with_train(passes=self.passes, batch_size=self.batch_size, seq_len=self.seq_len, restate=self.restate)
        return replace(train, chunking=chunking)

    def split_sizes(self) -> SplitSizes:
        return SplitSizes(self.seq_len, self.background_batches, self.heldout_window_tokens, self.heldout_windows,
                          self.drift_window_tokens, self.drift_windows, self.timing_batch, self.seq_len)


# ---------------------------------------------------------------- command line


def _wrapped(names: object, indent: int) -> str:
    """Comma-separated names wrapped for the help epilog, continuation lines indented."""
    return textwrap.fill(", ".join(names), width=84, subsequent_indent=" " * indent)


def build_parser() -> argparse.ArgumentParser:
    defaults = LearnSettings()
    parser = argparse.ArgumentParser(
        prog="smfd bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Teach the same documents to sparse memory finetuning, LoRA and full finetuning, one document
            at a time as the daemon sees them, then measure what each learned (cloze probes: memorised,
            paraphrased, compositional) and what it kept (HellaSwag, known facts the base model got right,
            held-out NLL, next-token drift from the base), with speed and peak memory. Each method runs in
            its own process. Writes results.json, results.md and learning_vs_forgetting.png to --out."""),
        epilog=textwrap.dedent(f"""\
            method specs:
              NAME[:key=value{OPTION_SEPARATOR}key=value], several joined by '{SPEC_SEPARATOR}'. Quote the whole list in a shell
              (';' would end the command). A spec's text is its key in results.json.
              names:  {', '.join(METHOD_NAMES)}
              SMF:    {_wrapped(SMF_OPTIONS, 22)}
              lora:   {', '.join(LORA_OPTIONS)}
              full:   {', '.join(FULL_OPTIONS)}
              layers are decoder layers joined by '+' (e.g. 12+20); flags are 0/1.
              Unset keys take the engine defaults: SMF the daemon's learn settings and memory config;
              lora rank 16 on all linear layers with AdamW; full AdamW over every weight. passes and
              restate default to --passes and --restate, the same for every method.

            example:
              smfd bench --docs docs.json --hellaswag hellaswag.jsonl --known-facts facts.jsonl \\
                --heldout-text wiki.txt --quick --out bench-out \\
                --methods "smf-kl,smf-kl:lr=0.2;top_t=500,lora,lora:lr=1e-3,full"
            """),
    )
    data = parser.add_argument_group("data")
    data.add_argument("--docs", required=True, type=Path, metavar="FILE", help="fictional-knowledge JSON: documents to learn with their probes")
    data.add_argument("--limit-docs", type=int, metavar="N", help="learn only the first N documents (default: all; --quick: 4)")
    data.add_argument("--with-paraphrases", action="store_true",
                      help="also train on each document's 'paraphrases' (every method alike)")
    data.add_argument("--hellaswag", required=True, type=Path, metavar="FILE", help="HellaSwag JSONL (ctx, endings, label)")
    data.add_argument("--hellaswag-rows", type=int, metavar="N", help="score the first N rows (default 1000; --quick: 200)")
    data.add_argument("--known-facts", required=True, type=Path, nargs="+", action="extend", metavar="FILE",
                      help="JSONL with prompt+attribute or cloze+answer; several files allowed")
    data.add_argument("--known-facts-rows", type=int, metavar="N", help="use the first N known facts (default: all; --quick: 100)")
    data.add_argument("--heldout-text", required=True, type=Path, metavar="FILE",
                      help="plain general text: first token half -> SMF background statistics, second half -> NLL and drift")
    data.add_argument("--background-text", type=Path, metavar="FILE",
                      help="take background statistics from this text instead of the held-out text's first half")
    run = parser.add_argument_group("methods and budget")
    run.add_argument("--methods", action="append", metavar="SPECS",
                     help=f"comma-separated method specs (default {DEFAULT_METHODS}); may be repeated")
    run.add_argument("--passes", type=int, metavar="N", default=defaults.train.passes, help="passes over each document's texts (default %(default)s)")
    run.add_argument("--batch-size", type=int, metavar="N", default=defaults.train.batch_size, help="sequences per step (default %(default)s)")
    run.add_argument("--seq-len", type=int, metavar="N", default=defaults.train.seq_len, help="max tokens per training sequence (default %(default)s)")
    run.add_argument("--chunk-tokens", type=int, metavar="N", default=defaults.chunking.max_tokens, help="chunk size in tokens (default %(default)s)")
    run.add_argument("--restate", type=int, choices=(0, 1), default=int(defaults.train.restate),
                     help="add sentence restatements to the training texts of every method (default %(default)s)")
    run.add_argument("--seed", type=int, metavar="N", default=0, help="seed for batch order and adapter initialisation (default 0)")
    sizes = parser.add_argument_group("evaluation sizes")
    sizes.add_argument("--quick", action="store_true",
                       help="small preset: 4 docs, 200 HellaSwag rows, 100 known facts, 16 held-out and 8 drift windows, 100 background batches")
    sizes.add_argument("--background-batches", type=int, metavar="N", help="single-sequence background batches (default 400; --quick: 100)")
    sizes.add_argument("--heldout-windows", type=int, metavar="N", help="held-out NLL windows (default 64; --quick: 16)")
    sizes.add_argument("--heldout-window-tokens", type=int, default=256, metavar="N", help="tokens per held-out window (default 256)")
    sizes.add_argument("--drift-windows", type=int, metavar="N", help="drift windows (default 16; --quick: 8)")
    sizes.add_argument("--drift-window-tokens", type=int, default=64, metavar="N", help="tokens per drift window (default 64)")
    sizes.add_argument("--timing-steps", type=int, default=5, metavar="N",
                       help="timed steps on one fixed batch, after one warm-up (default 5)")
    machine = parser.add_argument_group("model and machine")
    machine.add_argument("--model", default="embedded", metavar="PATH", help="'embedded', a Hugging Face model folder or a .gguf file")
    machine.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, metavar="DIR", help="converted-model cache (default %(default)s)")
    machine.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default %(default)s: CUDA when available)")
    machine.add_argument("--threads", type=int, metavar="N", default=2, help="torch CPU threads per worker (default 2)")
    machine.add_argument("--in-process", action="store_true",
                         help="run every method in this process (for tests; peak memory is then not per method)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for results.json, results.md and the plot")
    out.add_argument("--keep-logprobs", action="store_true", help=f"keep {BASE_LOGPROBS_FILE} (large) after the run")
    return parser


def _preset(args: argparse.Namespace, name: str) -> Any:
    explicit = getattr(args, name)
    default, quick = PRESETS[name]
    return explicit if explicit is not None else (quick if args.quick else default)


def _check_positive(values: dict[str, int | None]) -> None:
    for flag, value in values.items():
        if value is not None and value < 1:
            raise SmfdError(f"--{flag} must be >= 1, got {value}")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig(
        docs=str(args.docs), limit_docs=_preset(args, "limit_docs"),
        hellaswag=str(args.hellaswag), hellaswag_rows=_preset(args, "hellaswag_rows"),
        known_facts=[str(p) for p in args.known_facts], known_facts_rows=_preset(args, "known_facts_rows"),
        heldout_text=str(args.heldout_text), background_text=str(args.background_text) if args.background_text else None,
        methods=args.methods or [DEFAULT_METHODS], out=str(args.out), model=str(args.model),
        cache_dir=str(Path(args.cache_dir).expanduser()), device=args.device, threads=args.threads,
        passes=args.passes, batch_size=args.batch_size, seq_len=args.seq_len, restate=bool(args.restate),
        chunk_tokens=args.chunk_tokens, title_context=LearnSettings().chunking.title_context,
        with_paraphrases=args.with_paraphrases, background_batches=_preset(args, "background_batches"),
        heldout_windows=_preset(args, "heldout_windows"), heldout_window_tokens=args.heldout_window_tokens,
        drift_windows=_preset(args, "drift_windows"), drift_window_tokens=args.drift_window_tokens,
        timing_steps=args.timing_steps, timing_batch=LearnSettings().train.batch_size, seed=args.seed,
        in_process=args.in_process, keep_logprobs=args.keep_logprobs, quick=args.quick,
    )
    _check_positive({
        "limit-docs": cfg.limit_docs, "hellaswag-rows": cfg.hellaswag_rows, "known-facts-rows": cfg.known_facts_rows,
        "threads": cfg.threads, "passes": cfg.passes, "batch-size": cfg.batch_size, "chunk-tokens": cfg.chunk_tokens,
        "background-batches": cfg.background_batches, "heldout-windows": cfg.heldout_windows,
        "drift-windows": cfg.drift_windows, "timing-steps": cfg.timing_steps,
    })
    for flag, value in {"seq-len": cfg.seq_len, "heldout-window-tokens": cfg.heldout_window_tokens,
                        "drift-window-tokens": cfg.drift_window_tokens}.items():
        if value < 2:
            raise SmfdError(f"--{flag} must be >= 2, got {value}")
    return cfg


# ---------------------------------------------------------------- inputs


@dataclass
class Inputs:
    documents: list[Document]
    hellaswag: list[ChoiceItem]
    known_facts: list[KnownFact]
    heldout_text: str
    background_text: str | None


def load_inputs(cfg: BenchConfig) -> Inputs:
    """Read and check every input file; any problem is an SmfdError naming the file."""
    return Inputs(
        documents=load_documents(Path(cfg.docs), cfg.limit_docs),
        hellaswag=load_hellaswag(Path(cfg.hellaswag), cfg.hellaswag_rows),
        known_facts=load_known_facts([Path(p) for p in cfg.known_facts], cfg.known_facts_rows),
        heldout_text=load_text(Path(cfg.heldout_text), "held-out text"),
        background_text=load_text(Path(cfg.background_text), "background text") if cfg.background_text else None,
    )


# ---------------------------------------------------------------- evaluation


def _batches(items: list[T], size: int, desc: str) -> list[list[T]]:
    groups = [items[i : i + size] for i in range(0, len(items), size)]
    return tqdm(groups, desc=desc, unit="batch", leave=False)  # type: ignore[return-value]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_learning(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, documents: list[Document],
                      label: str, in_context: bool = False) -> dict[str, Any]:
    """Cloze accuracy (target inside the greedy continuation) and mean target NLL per probe kind.

    `in_context`: each prompt is preceded by its own document's text and a blank line (the ceiling
    a learned memory is measured against).
    """
    correct: dict[str, list[float]] = {kind: [] for kind in PROBE_KINDS}
    nll: dict[str, list[float]] = {kind: [] for kind in PROBE_KINDS}
    for doc in tqdm(documents, desc=f"{label}: probes", unit="doc", leave=False):
        items = [(kind, p) for kind in PROBE_KINDS for p in doc.probes[kind]]
        prefix = doc.text + CONTEXT_SEPARATOR if in_context else ""
        scored = score_cloze(model, tokenizer, [(prefix + p.prompt, p.target) for _, p in items])
        for (kind, _), result in zip(items, scored):
            correct[kind].append(float(result.correct))
            nll[kind].append(result.nll)
    learn: dict[str, Any] = {}
    for kind in PROBE_KINDS:
        learn[f"{kind}_acc"] = _mean(correct[kind])
        learn[f"{kind}_nll"] = _mean(nll[kind])
        learn[f"{kind}_items"] = len(correct[kind])
    return learn


def evaluate_hellaswag(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[ChoiceItem], label: str) -> float:
    correct = 0
    for group in _batches(items, EVAL_BATCH, f"{label}: hellaswag"):
        results = score_choice(model, tokenizer, [(i.context, list(i.endings), i.label) for i in group],
                               batch_size=CHOICE_PAIRS_PER_FORWARD)
        correct += sum(r.correct for r in results)
    return correct / len(items)


def known_facts_correct(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: list[KnownFact], label: str) -> list[bool]:
    out: list[bool] = []
    for group in _batches(facts, EVAL_BATCH, f"{label}: known facts"):
        out.extend(r.correct for r in score_cloze(model, tokenizer, [(f.prompt, f.answer) for f in group]))
    return out


def evaluate_heldout(model: PreTrainedModel, windows: list[list[int]], label: str) -> float:
    """Mean NLL per predicted token over all windows (token-weighted across batches)."""
    total, count = 0.0, 0
    for group in _batches(windows, 4, f"{label}: held-out NLL"):
        n = sum(len(w) - 1 for w in group)
        total += heldout_nll(model, group) * n
        count += n
    return total / count


def logprobs(model: PreTrainedModel, windows: list[list[int]]) -> list[torch.Tensor]:
    return next_token_logprobs(model, windows)


# ---------------------------------------------------------------- timing and memory


def peak_memory(device: torch.device, prefix: str = "peak_memory") -> dict[str, Any]:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on CPU.

    Read right after training, so evaluation (whose full-vocabulary log-probs can outgrow a
    small model's training) does not decide the method's cost; then again after evaluation.
    On CUDA the peak counter is reset after each reading; ru_maxrss cannot be reset.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
        return {f"{prefix}_bytes": peak, f"{prefix}_kind": "cuda_max_allocated", f"{prefix}_rss_bytes": rss}
    return {f"{prefix}_bytes": rss, f"{prefix}_kind": "ru_maxrss"}


def timing_batch(split: HeldoutSplit, tokenizer: PreTrainedTokenizerBase) -> TokenBatch:
    return make_batch(split.timing_rows, tokenizer.pad_token_id)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def same_batch_speed(learning: Learning, batch: TokenBatch, steps: int, device: torch.device, passes: int) -> dict[str, Any]:
    """Like-for-like step speed on one fixed batch, each method as its update runs it.

    The update is opened as in training (`begin_document`: SMF plans its slots there, and that
    forward fills its frozen-prefix cache), then one warm-up and `steps` timed steps. The
    planning time is reported, and `update_tokens_per_second_same_batch` charges it to an
    update of `passes` passes over the batch, so the prefix cache's saving is not counted free.
    """
    surprise = learning.surprise(batch.input_ids.tolist())
    if surprise is not None:
        batch = TokenBatch(batch.input_ids, batch.attention_mask, batch.loss_mask, torch.stack(surprise))
    batch = batch.to(device)
    _sync(device)
    started = time.perf_counter()
    learning.begin_document([batch])
    _sync(device)
    plan_seconds = time.perf_counter() - started
    learning.step(batch)
    seconds = 0.0
    for _ in range(steps):
        _sync(device)
        started = time.perf_counter()
        learning.step(batch)
        _sync(device)
        seconds += time.perf_counter() - started
    learning.end_document()
    step_seconds = seconds / steps
    return {
        "step_tokens_per_second_same_batch": batch.n_tokens / step_seconds,
        "step_seconds_same_batch": step_seconds,
        "plan_seconds_same_batch": plan_seconds,
        "update_tokens_per_second_same_batch": passes * batch.n_tokens / (plan_seconds + passes * step_seconds),
        "same_batch_shape": list(batch.input_ids.shape),
    }


@torch.no_grad()
def forward_speed(model: PreTrainedModel, batch: TokenBatch, steps: int, device: torch.device) -> float:
    """Tokens per second of the loss forward alone on the timing batch: the floor under every method's step."""
    batch = batch.to(device)
    causal_lm_loss(model, batch)
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        causal_lm_loss(model, batch)
    _sync(device)
    return steps * batch.n_tokens / (time.perf_counter() - started)


# ---------------------------------------------------------------- workers


@dataclass
class WorkerContext:
    cfg: BenchConfig
    inputs: Inputs
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_name: str
    model_id: str
    device: torch.device
    split: HeldoutSplit
    chunks: list[list[str]]

    def texts(self, restate: bool) -> list[list[str]]:
        return [document_training_texts(c, restate) for c in self.chunks]


def open_context(cfg: BenchConfig) -> WorkerContext:
    """Everything a benchmark process shares between methods: data, base model, device, held-out split, chunks."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    inputs = load_inputs(cfg)
    model, tokenizer, source = load_base_model(cfg.model, Path(cfg.cache_dir))
    device = pick_device(cfg.device)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    split = split_heldout(tokenizer, inputs.heldout_text, cfg.heldout_text, cfg.split_sizes(),
                          inputs.background_text, cfg.background_text)
    overlap = LearnSettings().chunking.overlap_sentences
    chunks = [document_chunks(d, tokenizer, cfg.chunk_tokens, cfg.title_context, cfg.with_paraphrases, overlap)
              for d in tqdm(inputs.documents, desc="chunking", unit="doc", leave=False)]
    return WorkerContext(cfg, inputs, model, tokenizer, source.display_name, str(source.path), device, split, chunks)


def _logprobs_path(cfg: BenchConfig) -> Path:
    return Path(cfg.out) / BASE_LOGPROBS_FILE


def _budget(ctx: WorkerContext, texts: list[list[str]], passes: int, restate: bool) -> dict[str, Any]:
    sequences = [encode(ctx.tokenizer, t, ctx.cfg.seq_len) for t in texts]
    tokens_per_pass = sum(len(s) for doc in sequences for s in doc)
    return {
        "documents": len(texts), "passes": passes, "restate": restate, "batch_size": ctx.cfg.batch_size,
        "seq_len": ctx.cfg.seq_len, "chunk_tokens": ctx.cfg.chunk_tokens, "title_context": ctx.cfg.title_context,
        "with_paraphrases": ctx.cfg.with_paraphrases, "chunks": sum(len(c) for c in ctx.chunks),
        "training_texts": sum(len(t) for t in texts), "training_sequences": sum(len(s) for s in sequences),
        "tokens_per_pass": tokens_per_pass, "tokens_planned": tokens_per_pass * passes,
        "training_texts_sha256": texts_digest(texts),
    }


def run_base(ctx: WorkerContext) -> dict[str, Any]:
    """Evaluate the untouched model; save its drift log-probs; find the known facts it gets right."""
    loaded = peak_memory(ctx.device)  # the model alone: the floor under every method's training peak
    started = time.perf_counter()
    model, tok = ctx.model, ctx.tokenizer
    learn = evaluate_learning(model, tok, ctx.inputs.documents, "base")
    known = known_facts_correct(model, tok, ctx.inputs.known_facts, "base")
    base_lp = logprobs(model, ctx.split.drift_windows)
    tensors = {f"window_{i:04d}": lp.contiguous() for i, lp in enumerate(base_lp)}
    atomic_write(_logprobs_path(ctx.cfg), lambda tmp: save_file(tensors, str(tmp)))
    n_known = sum(known)
    retain = {
        "hellaswag_acc": evaluate_hellaswag(model, tok, ctx.inputs.hellaswag, "base"),
        "hellaswag_rows": len(ctx.inputs.hellaswag),
        "known_facts_acc": 1.0 if n_known else None,
        "known_facts_items": n_known,
        "known_facts_total": len(known),
        "known_facts_base_acc": n_known / len(known) if known else None,
        "heldout_nll": evaluate_heldout(model, ctx.split.heldout_windows, "base"),
        "drift_kl": 0.0,
    }
    cost = {"eval_seconds": time.perf_counter() - started, **loaded, **peak_memory(ctx.device, "peak_memory_eval"),
            "forward_tokens_per_second_same_batch": forward_speed(model, timing_batch(ctx.split, tok), ctx.cfg.timing_steps, ctx.device)}
    return {
        "learn": learn, "retain": retain, "cost": cost,
        "known_correct": [i for i, ok in enumerate(known) if ok],
        "budget": _budget(ctx, ctx.texts(ctx.cfg.restate), ctx.cfg.passes, ctx.cfg.restate),
        "ranges": ctx.split.ranges, "model": ctx.model_name, "device": str(ctx.device),
        "gpu": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else None,
    }


def train_documents(ctx: WorkerContext, learning: Learning, passes: int, restate: bool, label: str) -> dict[str, Any]:
    """Feed documents one at a time, as the daemon does; returns the training cost."""
    steps, tokens, step_seconds, doc_seconds, losses = 0, 0, 0.0, [], []
    documents = list(zip(ctx.inputs.documents, ctx.chunks))
    for index, (document, chunks) in enumerate(tqdm(documents, desc=f"{label}: learn", unit="doc")):
        started = time.perf_counter()
        batches = learning.document_batches(document.text, chunks, passes, restate, ctx.cfg.seed + index)
        planning = time.perf_counter()
        learning.begin_document(batches)
        step_seconds += time.perf_counter() - planning  # selection planning is part of the update's cost
        for batch in batches:
            result = learning.step(batch)
            steps, tokens, step_seconds = steps + 1, tokens + result.n_tokens, step_seconds + result.seconds
            losses.append(result.loss)
        learning.end_document()
        doc_seconds.append(time.perf_counter() - started)
    return {
        "steps": steps, "tokens_trained": tokens, "step_seconds": step_seconds,
        "tokens_per_second": tokens / step_seconds if step_seconds else None,
        "train_seconds": sum(doc_seconds), "seconds_per_document": sum(doc_seconds) / len(doc_seconds),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
    }


def evaluate_retention(ctx: WorkerContext, model: PreTrainedModel, known_correct: list[int], label: str) -> dict[str, Any]:
    facts = [ctx.inputs.known_facts[i] for i in known_correct]
    still = known_facts_correct(model, ctx.tokenizer, facts, label) if facts else []
    base_lp = load_file(str(_logprobs_path(ctx.cfg)))
    base_windows = [base_lp[f"window_{i:04d}"] for i in range(len(base_lp))]
    return {
        "hellaswag_acc": evaluate_hellaswag(model, ctx.tokenizer, ctx.inputs.hellaswag, label),
        "hellaswag_rows": len(ctx.inputs.hellaswag),
        "known_facts_acc": sum(still) / len(still) if still else None,
        "known_facts_items": len(facts),
        "heldout_nll": evaluate_heldout(model, ctx.split.heldout_windows, label),
        "drift_kl": drift_kl(base_windows, logprobs(model, ctx.split.drift_windows)),
    }


def run_method(ctx: WorkerContext, spec: MethodSpec, known_correct: list[int]) -> dict[str, Any]:
    passes = spec.options.get("passes", ctx.cfg.passes)
    restate = spec.options.get("restate", ctx.cfg.restate)
    texts = ctx.texts(restate)
    setup_started = time.perf_counter()
    background = BackgroundSource(ctx.split.background, Path(ctx.cfg.out) / "cache", ctx.model_id)
    learning, setup = build_learning(spec, ctx.model, ctx.tokenizer, ctx.cfg.learn_settings(), background)
    setup_seconds = time.perf_counter() - setup_started
    train_cost = train_documents(ctx, learning, passes, restate, spec.label)
    trained = peak_memory(ctx.device)
    model = learning.eval_model()
    model.eval()
    eval_started = time.perf_counter()
    learn = evaluate_learning(model, ctx.tokenizer, ctx.inputs.documents, spec.label)
    retain = evaluate_retention(ctx, model, known_correct, spec.label)
    cost = {**train_cost, "setup_seconds": setup_seconds, "eval_seconds": time.perf_counter() - eval_started,
            **trained, **peak_memory(ctx.device, "peak_memory_eval"), **setup}
    settings = {"spec": spec.label, "name": spec.name, "options": spec.options, **learning.describe()}
    # After evaluation, so the timing steps cannot change what was measured.
    cost.update(same_batch_speed(learning, timing_batch(ctx.split, ctx.tokenizer), ctx.cfg.timing_steps, ctx.device, passes))
    return {"learn": learn, "retain": retain, "cost": cost, "settings": settings,
            "budget": {**_budget(ctx, texts, passes, restate), "steps": train_cost["steps"],
                       "tokens_trained": train_cost["tokens_trained"]}}


def run_in_context(ctx: WorkerContext, base: dict[str, Any]) -> dict[str, Any]:
    """The in-context ceiling: no training, each probe asked with its document in the prompt; retention is the base's."""
    started = time.perf_counter()
    learn = evaluate_learning(ctx.model, ctx.tokenizer, ctx.inputs.documents, IN_CONTEXT, in_context=True)
    cost = {"eval_seconds": time.perf_counter() - started, **peak_memory(ctx.device, "peak_memory_eval")}
    settings = {"spec": IN_CONTEXT, "name": IN_CONTEXT, "options": {},
                "method": "no training; each probe prompt preceded by its document's text and a blank line"}
    return {"learn": learn, "retain": dict(base["retain"]), "cost": cost, "settings": settings}


def worker_main(request_json: str) -> str:
    """Entry point of a worker process: JSON request in, JSON result out."""
    request = json.loads(request_json)
    cfg = BenchConfig.from_json(request["config"])
    ctx = open_context(cfg)
    if request["role"] == "base":
        result = run_base(ctx)
    elif request["role"] == IN_CONTEXT:
        result = run_in_context(ctx, request["base"])
    else:
        result = run_method(ctx, MethodSpec.from_json(request["spec"]), request["known_correct"])
    return json.dumps(result)


def call_worker(cfg: BenchConfig, request: dict[str, Any], label: str) -> dict[str, Any]:
    """Run one worker in a fresh spawned process (or in this one with --in-process) and decode its JSON."""
    payload = json.dumps({"config": asdict(cfg), **request})
    if cfg.in_process:
        return json.loads(worker_main(payload))
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return json.loads(pool.submit(worker_main, payload).result())
        except BrokenProcessPool as exc:
            raise SmfdError(f"the {label} worker process died before returning results (out of memory?)") from exc


# ---------------------------------------------------------------- the run


def machine_info(cfg: BenchConfig, base: dict[str, Any]) -> dict[str, Any]:
    import transformers

    return {
        "cpu_count": os.cpu_count(), "threads": cfg.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": base["device"], "gpu": base["gpu"], "isolation": "in-process" if cfg.in_process else "process per method",
    }


def run_benchmark(cfg: BenchConfig, argv: Sequence[str]) -> dict[str, Any]:
    inputs = load_inputs(cfg)  # fail on bad files before any model is loaded
    specs = parse_method_specs(cfg.methods)
    resolve_model_source(cfg.model)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = call_worker(cfg, {"role": "base"}, "base")
    results: dict[str, Any] = {
        "model": base["model"], "machine": machine_info(cfg, base), "command": ["smfd", "bench", *argv],
        "budget": base["budget"],
        "data": {"docs": cfg.docs, "documents": [d.doc_id for d in inputs.documents], "hellaswag": cfg.hellaswag,
                 "known_facts": cfg.known_facts, "ranges": base["ranges"]},
        "base": {key: base[key] for key in ("learn", "retain", "cost")},
        "methods": {},
    }
    report.write_reports(out, results)
    try:
        for spec in specs:
            if spec.name == IN_CONTEXT:
                request = {"role": IN_CONTEXT, "base": {"retain": base["retain"]}}
            else:
                request = {"role": "method", "spec": spec.to_json(), "known_correct": base["known_correct"]}
            method = call_worker(cfg, request, spec.label)
            method["relative"] = report.relative_metrics(results["base"], method)
            results["methods"][spec.label] = method
            report.write_reports(out, results)
    finally:
        if not cfg.keep_logprobs:
            _logprobs_path(cfg).unlink(missing_ok=True)
    return results


def main(argv: list[str]) -> int:
    """`smfd bench ARGS...`; user errors raise SmfdError, argparse's usage errors return 2."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    cfg = config_from_args(args)
    results = run_benchmark(cfg, argv)
    print(report.summary_line(Path(cfg.out), results))
    return 0
