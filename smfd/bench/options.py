"""`smfd bench`'s command line: the run's configuration (BenchConfig), its presets and its inputs."""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from smfd.bench.data import (
    ChoiceItem,
    Document,
    KnownFact,
    SplitSizes,
    load_documents,
    load_hellaswag,
    load_known_facts,
    load_text,
)
from smfd.bench.specs import (
    FULL_OPTIONS,
    LORA_OPTIONS,
    METHOD_NAMES,
    OPTION_SEPARATOR,
    SMF_OPTIONS,
    SPEC_SEPARATOR,
)
from smfd.config import ChunkingSection
from smfd.errors import SmfdError
from smfd.learn.lesson import LearnSettings

DEFAULT_METHODS = "in-context,smf,lora,full"  # the ceiling, the daemon's recipe, the two dense baselines
DEFAULT_CACHE_DIR = "~/.cache/smfd/models"
BASE_LOGPROBS_FILE = "base_logprobs.safetensors"
CURVE_HELLASWAG_ROWS = 200  # HellaSwag rows scored at a curve's intermediate points (the last one scores all)
# (default, --quick value) for the sizes the quick preset shrinks.
PRESETS: dict[str, tuple[int | None, int | None]] = {
    "limit_docs": (None, 4),
    "hellaswag_rows": (1000, 200),
    "known_facts_rows": (None, 100),
    "heldout_windows": (64, 16),
    "drift_windows": (16, 8),
    "background_batches": (400, 100),
}


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
    curve_every: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchConfig:
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def learn_settings(self) -> LearnSettings:
        """The daemon's recipe with this run's budget: what SMF specs start from."""
        defaults = LearnSettings()
        chunking = ChunkingSection.model_validate(
            {**defaults.chunking.model_dump(), "max_tokens": self.chunk_tokens, "title_context": self.title_context}
        )
        train = defaults.with_train(
            passes=self.passes, batch_size=self.batch_size, seq_len=self.seq_len, restate=self.restate
        )
        return replace(train, chunking=chunking)

    def split_sizes(self) -> SplitSizes:
        return SplitSizes(
            self.seq_len,
            self.background_batches,
            self.heldout_window_tokens,
            self.heldout_windows,
            self.drift_window_tokens,
            self.drift_windows,
            self.timing_batch,
            self.seq_len,
        )


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
              names:  {", ".join(METHOD_NAMES)}
              SMF:    {_wrapped(SMF_OPTIONS, 22)}
              lora:   {", ".join(LORA_OPTIONS)}
              full:   {", ".join(FULL_OPTIONS)}
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
    data.add_argument(
        "--docs",
        required=True,
        type=Path,
        metavar="FILE",
        help="fictional-knowledge JSON: documents to learn with their probes",
    )
    data.add_argument(
        "--limit-docs", type=int, metavar="N", help="learn only the first N documents (default: all; --quick: 4)"
    )
    data.add_argument(
        "--with-paraphrases",
        action="store_true",
        help="also train on each document's 'paraphrases' (every method alike)",
    )
    data.add_argument(
        "--hellaswag", required=True, type=Path, metavar="FILE", help="HellaSwag JSONL (ctx, endings, label)"
    )
    data.add_argument(
        "--hellaswag-rows", type=int, metavar="N", help="score the first N rows (default 1000; --quick: 200)"
    )
    data.add_argument(
        "--known-facts",
        required=True,
        type=Path,
        nargs="+",
        action="extend",
        metavar="FILE",
        help="JSONL with prompt+attribute or cloze+answer; several files allowed",
    )
    data.add_argument(
        "--known-facts-rows", type=int, metavar="N", help="use the first N known facts (default: all; --quick: 100)"
    )
    data.add_argument(
        "--heldout-text",
        required=True,
        type=Path,
        metavar="FILE",
        help="plain general text: first token half -> SMF background statistics, second half -> NLL and drift",
    )
    data.add_argument(
        "--background-text",
        type=Path,
        metavar="FILE",
        help="take background statistics from this text instead of the held-out text's first half",
    )
    run = parser.add_argument_group("methods and budget")
    run.add_argument(
        "--methods",
        action="append",
        metavar="SPECS",
        help=f"comma-separated method specs (default {DEFAULT_METHODS}); may be repeated",
    )
    run.add_argument(
        "--passes",
        type=int,
        metavar="N",
        default=defaults.train.passes,
        help="passes over each document's texts (default %(default)s)",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        default=defaults.train.batch_size,
        help="sequences per step (default %(default)s)",
    )
    run.add_argument(
        "--seq-len",
        type=int,
        metavar="N",
        default=defaults.train.seq_len,
        help="max tokens per training sequence (default %(default)s)",
    )
    run.add_argument(
        "--chunk-tokens",
        type=int,
        metavar="N",
        default=defaults.chunking.max_tokens,
        help="chunk size in tokens (default %(default)s)",
    )
    run.add_argument(
        "--restate",
        type=int,
        choices=(0, 1),
        default=int(defaults.train.restate),
        help="add sentence restatements to the training texts of every method (default %(default)s)",
    )
    run.add_argument(
        "--seed", type=int, metavar="N", default=0, help="seed for batch order and adapter initialisation (default 0)"
    )
    run.add_argument(
        "--curve-every",
        type=int,
        metavar="N",
        help="also evaluate after every N documents: results.json gains 'curve', stream_curve.png plots it "
        f"(intermediate points score the first {CURVE_HELLASWAG_ROWS} HellaSwag rows only)",
    )
    sizes = parser.add_argument_group("evaluation sizes")
    sizes.add_argument(
        "--quick",
        action="store_true",
        help="small preset: 4 docs, 200 HellaSwag rows, 100 known facts, 16 held-out and 8 drift windows, 100 background batches",
    )
    sizes.add_argument(
        "--background-batches",
        type=int,
        metavar="N",
        help="single-sequence background batches (default 400; --quick: 100)",
    )
    sizes.add_argument(
        "--heldout-windows", type=int, metavar="N", help="held-out NLL windows (default 64; --quick: 16)"
    )
    sizes.add_argument(
        "--heldout-window-tokens", type=int, default=256, metavar="N", help="tokens per held-out window (default 256)"
    )
    sizes.add_argument("--drift-windows", type=int, metavar="N", help="drift windows (default 16; --quick: 8)")
    sizes.add_argument(
        "--drift-window-tokens", type=int, default=64, metavar="N", help="tokens per drift window (default 64)"
    )
    sizes.add_argument(
        "--timing-steps",
        type=int,
        default=5,
        metavar="N",
        help="timed steps on one fixed batch, after one warm-up (default 5)",
    )
    machine = parser.add_argument_group("model and machine")
    machine.add_argument(
        "--model", default="embedded", metavar="PATH", help="'embedded', a Hugging Face model folder or a .gguf file"
    )
    machine.add_argument(
        "--cache-dir", default=DEFAULT_CACHE_DIR, metavar="DIR", help="converted-model cache (default %(default)s)"
    )
    machine.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default %(default)s: CUDA when available)",
    )
    machine.add_argument("--threads", type=int, metavar="N", default=2, help="torch CPU threads per worker (default 2)")
    machine.add_argument(
        "--in-process",
        action="store_true",
        help="run every method in this process (for tests; peak memory is then not per method)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="folder for results.json, results.md and the plot"
    )
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
        docs=str(args.docs),
        limit_docs=_preset(args, "limit_docs"),
        hellaswag=str(args.hellaswag),
        hellaswag_rows=_preset(args, "hellaswag_rows"),
        known_facts=[str(p) for p in args.known_facts],
        known_facts_rows=_preset(args, "known_facts_rows"),
        heldout_text=str(args.heldout_text),
        background_text=str(args.background_text) if args.background_text else None,
        methods=args.methods or [DEFAULT_METHODS],
        out=str(args.out),
        model=str(args.model),
        cache_dir=str(Path(args.cache_dir).expanduser()),
        device=args.device,
        threads=args.threads,
        passes=args.passes,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        restate=bool(args.restate),
        chunk_tokens=args.chunk_tokens,
        title_context=LearnSettings().chunking.title_context,
        with_paraphrases=args.with_paraphrases,
        background_batches=_preset(args, "background_batches"),
        heldout_windows=_preset(args, "heldout_windows"),
        heldout_window_tokens=args.heldout_window_tokens,
        drift_windows=_preset(args, "drift_windows"),
        drift_window_tokens=args.drift_window_tokens,
        timing_steps=args.timing_steps,
        timing_batch=LearnSettings().train.batch_size,
        seed=args.seed,
        in_process=args.in_process,
        keep_logprobs=args.keep_logprobs,
        quick=args.quick,
        curve_every=args.curve_every,
    )
    _check_positive(
        {
            "limit-docs": cfg.limit_docs,
            "hellaswag-rows": cfg.hellaswag_rows,
            "known-facts-rows": cfg.known_facts_rows,
            "threads": cfg.threads,
            "passes": cfg.passes,
            "batch-size": cfg.batch_size,
            "chunk-tokens": cfg.chunk_tokens,
            "background-batches": cfg.background_batches,
            "heldout-windows": cfg.heldout_windows,
            "drift-windows": cfg.drift_windows,
            "timing-steps": cfg.timing_steps,
        }
    )
    for flag, value in {
        "seq-len": cfg.seq_len,
        "heldout-window-tokens": cfg.heldout_window_tokens,
        "drift-window-tokens": cfg.drift_window_tokens,
    }.items():
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
