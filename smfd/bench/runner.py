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

import json
import os
import platform
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smfd.bench import report
from smfd.bench.data import (
    HeldoutSplit,
    document_chunks,
    document_training_texts,
    split_heldout,
    texts_digest,
)
from smfd.bench.measure import (
    evaluate_heldout,
    evaluate_hellaswag,
    evaluate_learning,
    forward_speed,
    known_facts_correct,
    logprobs,
    peak_memory,
    same_batch_speed,
    timing_batch,
)
from smfd.bench.methods import BackgroundSource, Learning, build_learning
from smfd.bench.options import BASE_LOGPROBS_FILE, BenchConfig, Inputs, build_parser, config_from_args, load_inputs
from smfd.bench.specs import (
    IN_CONTEXT,
    MethodSpec,
    parse_method_specs,
)
from smfd.durable import atomic_write
from smfd.errors import SmfdError
from smfd.learn.lesson import LearnSettings
from smfd.model.batch import encode
from smfd.model.loading import load_base_model, resolve_model_source
from smfd.model.memory_model import pick_device
from smfd.model.scoring import drift_kl

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
    split = split_heldout(
        tokenizer, inputs.heldout_text, cfg.heldout_text, cfg.split_sizes(), inputs.background_text, cfg.background_text
    )
    overlap = LearnSettings().chunking.overlap_sentences
    chunks = [
        document_chunks(d, tokenizer, cfg.chunk_tokens, cfg.title_context, cfg.with_paraphrases, overlap)
        for d in tqdm(inputs.documents, desc="chunking", unit="doc", leave=False)
    ]
    return WorkerContext(cfg, inputs, model, tokenizer, source.display_name, str(source.path), device, split, chunks)


def _logprobs_path(cfg: BenchConfig) -> Path:
    return Path(cfg.out) / BASE_LOGPROBS_FILE


def _budget(ctx: WorkerContext, texts: list[list[str]], passes: int, restate: bool) -> dict[str, Any]:
    sequences = [encode(ctx.tokenizer, t, ctx.cfg.seq_len) for t in texts]
    tokens_per_pass = sum(len(s) for doc in sequences for s in doc)
    return {
        "documents": len(texts),
        "passes": passes,
        "restate": restate,
        "batch_size": ctx.cfg.batch_size,
        "seq_len": ctx.cfg.seq_len,
        "chunk_tokens": ctx.cfg.chunk_tokens,
        "title_context": ctx.cfg.title_context,
        "with_paraphrases": ctx.cfg.with_paraphrases,
        "chunks": sum(len(c) for c in ctx.chunks),
        "training_texts": sum(len(t) for t in texts),
        "training_sequences": sum(len(s) for s in sequences),
        "tokens_per_pass": tokens_per_pass,
        "tokens_planned": tokens_per_pass * passes,
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
    cost = {
        "eval_seconds": time.perf_counter() - started,
        **loaded,
        **peak_memory(ctx.device, "peak_memory_eval"),
        "forward_tokens_per_second_same_batch": forward_speed(
            model, timing_batch(ctx.split, tok), ctx.cfg.timing_steps, ctx.device
        ),
    }
    return {
        "learn": learn,
        "retain": retain,
        "cost": cost,
        "known_correct": [i for i, ok in enumerate(known) if ok],
        "budget": _budget(ctx, ctx.texts(ctx.cfg.restate), ctx.cfg.passes, ctx.cfg.restate),
        "ranges": ctx.split.ranges,
        "model": ctx.model_name,
        "device": str(ctx.device),
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
        "steps": steps,
        "tokens_trained": tokens,
        "step_seconds": step_seconds,
        "tokens_per_second": tokens / step_seconds if step_seconds else None,
        "train_seconds": sum(doc_seconds),
        "seconds_per_document": sum(doc_seconds) / len(doc_seconds),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def evaluate_retention(
    ctx: WorkerContext, model: PreTrainedModel, known_correct: list[int], label: str
) -> dict[str, Any]:
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
    cost = {
        **train_cost,
        "setup_seconds": setup_seconds,
        "eval_seconds": time.perf_counter() - eval_started,
        **trained,
        **peak_memory(ctx.device, "peak_memory_eval"),
        **setup,
    }
    settings = {"spec": spec.label, "name": spec.name, "options": spec.options, **learning.describe()}
    # After evaluation, so the timing steps cannot change what was measured.
    cost.update(
        same_batch_speed(learning, timing_batch(ctx.split, ctx.tokenizer), ctx.cfg.timing_steps, ctx.device, passes)
    )
    return {
        "learn": learn,
        "retain": retain,
        "cost": cost,
        "settings": settings,
        "budget": {
            **_budget(ctx, texts, passes, restate),
            "steps": train_cost["steps"],
            "tokens_trained": train_cost["tokens_trained"],
        },
    }


def run_in_context(ctx: WorkerContext, base: dict[str, Any]) -> dict[str, Any]:
    """The in-context ceiling: no training, each probe asked with its document in the prompt; retention is the base's."""
    started = time.perf_counter()
    learn = evaluate_learning(ctx.model, ctx.tokenizer, ctx.inputs.documents, IN_CONTEXT, in_context=True)
    cost = {"eval_seconds": time.perf_counter() - started, **peak_memory(ctx.device, "peak_memory_eval")}
    settings = {
        "spec": IN_CONTEXT,
        "name": IN_CONTEXT,
        "options": {},
        "method": "no training; each probe prompt preceded by its document's text and a blank line",
    }
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
        "cpu_count": os.cpu_count(),
        "threads": cfg.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": base["device"],
        "gpu": base["gpu"],
        "isolation": "in-process" if cfg.in_process else "process per method",
    }


def run_benchmark(cfg: BenchConfig, argv: Sequence[str]) -> dict[str, Any]:
    inputs = load_inputs(cfg)  # fail on bad files before any model is loaded
    specs = parse_method_specs(cfg.methods)
    resolve_model_source(cfg.model)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = call_worker(cfg, {"role": "base"}, "base")
    results: dict[str, Any] = {
        "model": base["model"],
        "machine": machine_info(cfg, base),
        "command": ["smfd", "bench", *argv],
        "budget": base["budget"],
        "data": {
            "docs": cfg.docs,
            "documents": [d.doc_id for d in inputs.documents],
            "hellaswag": cfg.hellaswag,
            "known_facts": cfg.known_facts,
            "ranges": base["ranges"],
        },
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
