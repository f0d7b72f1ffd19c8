"""`smfd bench`: the command line, the per-method workers and the evaluation.

Protocol (the daemon's view of a stream): documents are fed one at a time in file order; per
document its training texts (chunks plus restatements, identical for every method) are encoded,
grouped into `passes` shuffled passes of batches and stepped through; SMF closes an update after
each document. Evaluation happens after the last document and, with --curve-every N, after every
N documents as well (smfd.bench.curve).

The base model and every method run in their own process (multiprocessing "spawn"), one after
the other, so peak memory is per method and no state leaks between methods (a worker is stopped
when the benchmark process dies, however it dies). Workers receive and
return JSON; the base worker hands its next-token log-probabilities to the method workers as a
safetensors file in the output folder (deleted at the end unless --keep-logprobs).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from smfd.bench import report
from smfd.bench.context import WorkerContext, evaluate_retention, logprobs_path, open_context
from smfd.bench.curve import (
    CurveReference,
    check_curve_every,
    curve_point,
    final_point,
    intermediate_points,
    known_facts_forgetting,
)
from smfd.bench.data import texts_digest
from smfd.bench.measure import (
    evaluate_heldout,
    evaluate_learning,
    forward_speed,
    hellaswag_correct,
    known_facts_correct,
    learning_scores,
    logprobs,
    peak_memory,
    same_batch_speed,
    summarise_learning,
    timing_batch,
)
from smfd.bench.methods import BackgroundSource, Learning, build_learning
from smfd.bench.options import CURVE_HELLASWAG_ROWS, BenchConfig, build_parser, config_from_args, load_inputs
from smfd.bench.specs import (
    IN_CONTEXT,
    MethodSpec,
    parse_method_specs,
)
from smfd.durable import atomic_write
from smfd.errors import SmfdError
from smfd.heap import release_freed_memory_promptly
from smfd.model.batch import encode
from smfd.model.loading import resolve_model_source

# ---------------------------------------------------------------- workers


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
    atomic_write(logprobs_path(ctx.cfg), lambda tmp: save_file(tensors, str(tmp)))
    n_known = sum(known)
    hellaswag = hellaswag_correct(model, tok, ctx.inputs.hellaswag, "base")
    retain = {
        "hellaswag_acc": sum(hellaswag) / len(hellaswag),
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
        "curve_reference": {
            "base_hellaswag_acc": sum(hellaswag[:CURVE_HELLASWAG_ROWS]) / len(hellaswag[:CURVE_HELLASWAG_ROWS]),
            "base_heldout_nll": retain["heldout_nll"],
        },
        "budget": _budget(ctx, ctx.texts(ctx.cfg.restate), ctx.cfg.passes, ctx.cfg.restate),
        "ranges": ctx.split.ranges,
        "model": ctx.model_name,
        "device": str(ctx.device),
        "gpu": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else None,
    }


PointHook = Callable[[int], dict[str, Any]]


def train_documents(
    ctx: WorkerContext, learning: Learning, passes: int, restate: bool, label: str, point: PointHook | None = None
) -> dict[str, Any]:
    """Feed documents one at a time, as the daemon does; returns the training cost (and the curve's points).

    `point(n)` evaluates the model after n documents, at the counts `intermediate_points` names;
    its time is not part of the training cost.
    """
    steps, tokens, step_seconds, doc_seconds, losses, curve = 0, 0, 0.0, [], [], []
    documents = list(zip(ctx.inputs.documents, ctx.chunks))
    pauses = set(intermediate_points(len(documents), ctx.cfg.curve_every)) if point is not None else set()
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
        if index + 1 in pauses:
            assert point is not None
            curve.append(point(index + 1))
    return {
        "steps": steps,
        "tokens_trained": tokens,
        "step_seconds": step_seconds,
        "tokens_per_second": tokens / step_seconds if step_seconds else None,
        "train_seconds": sum(doc_seconds),
        "seconds_per_document": sum(doc_seconds) / len(doc_seconds),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "curve": curve,
    }


def run_method(
    ctx: WorkerContext, spec: MethodSpec, known_correct: list[int], reference: dict[str, float] | None = None
) -> dict[str, Any]:
    passes = spec.options.get("passes", ctx.cfg.passes)
    restate = spec.options.get("restate", ctx.cfg.restate)
    texts = ctx.texts(restate)
    setup_started = time.perf_counter()
    background = BackgroundSource(
        ctx.split.background, ctx.split.background_text, Path(ctx.cfg.out) / "cache", ctx.source
    )
    learning, setup = build_learning(spec, ctx.model, ctx.tokenizer, ctx.cfg.learn_settings(), background)
    setup_seconds = time.perf_counter() - setup_started
    point = None
    if ctx.cfg.curve_every is not None and reference is not None:
        curve_reference = CurveReference(
            ctx.inputs.hellaswag[:CURVE_HELLASWAG_ROWS],
            reference["base_hellaswag_acc"],
            reference["base_heldout_nll"],
        )

        def point(n: int) -> dict[str, Any]:
            return curve_point(ctx, learning, curve_reference, known_correct, n, spec.label)

    train_cost = train_documents(ctx, learning, passes, restate, spec.label, point)
    curve = train_cost.pop("curve")
    trained = peak_memory(ctx.device)
    model = learning.eval_model()
    model.eval()
    eval_started = time.perf_counter()
    scores = learning_scores(model, ctx.tokenizer, ctx.inputs.documents, spec.label)
    learn = summarise_learning(scores)
    reach = learning.reach(ctx.inputs.documents)
    retain = evaluate_retention(ctx, model, known_correct, spec.label)
    forgetting = known_facts_forgetting(ctx, learning, known_correct, retain["known_facts_lost"])
    cost = {
        **train_cost,
        "setup_seconds": setup_seconds,
        "eval_seconds": time.perf_counter() - eval_started,
        "curve_eval_seconds": sum(p["eval_seconds"] for p in curve),
        **trained,
        **peak_memory(ctx.device, "peak_memory_eval"),
        **setup,
    }
    settings = {"spec": spec.label, "name": spec.name, "options": spec.options, **learning.describe()}
    # After evaluation, so the timing steps cannot change what was measured.
    cost.update(
        same_batch_speed(learning, timing_batch(ctx.split, ctx.tokenizer), ctx.cfg.timing_steps, ctx.device, passes)
    )
    result = {
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
    if reach:
        result["reach"] = reach
    if forgetting:
        result["forgetting"] = forgetting
    if point is not None:
        first = summarise_learning(scores[: ctx.cfg.curve_every], "first_")
        result["curve"] = [*curve, final_point(len(scores), {**learn, **first}, retain, learning.memory(), forgetting)]
    return result


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
    release_freed_memory_promptly()  # as the daemon does, so peaks compare like with like
    request = json.loads(request_json)
    cfg = BenchConfig.from_json(request["config"])
    ctx = open_context(cfg)
    if request["role"] == "base":
        result = run_base(ctx)
    elif request["role"] == IN_CONTEXT:
        result = run_in_context(ctx, request["base"])
    else:
        result = run_method(
            ctx, MethodSpec.from_json(request["spec"]), request["known_correct"], request.get("curve_reference")
        )
    return json.dumps(result)


PR_SET_PDEATHSIG = 1  # from linux/prctl.h


def _stop_with_parent(parent: int) -> None:
    """Worker initializer: on Linux the worker gets SIGTERM when the benchmark process dies, so stopping
    the benchmark by its pid never leaves a worker training on for the hours a curve can take."""
    if sys.platform == "linux" and ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed for a benchmark worker: {os.strerror(errno)}")
    if os.getppid() != parent:  # the benchmark died before the signal was asked for
        os._exit(1)


def worker_pool() -> ProcessPoolExecutor:
    """A pool of one freshly spawned worker process that does not outlive this process."""
    return ProcessPoolExecutor(
        max_workers=1, mp_context=get_context("spawn"), initializer=_stop_with_parent, initargs=(os.getpid(),)
    )


def call_worker(cfg: BenchConfig, request: dict[str, Any], label: str) -> dict[str, Any]:
    """Run one worker in a fresh spawned process (or in this one with --in-process) and decode its JSON."""
    payload = json.dumps({"config": asdict(cfg), **request})
    if cfg.in_process:
        return json.loads(worker_main(payload))
    with worker_pool() as pool:
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
    check_curve_every(cfg.curve_every, len(inputs.documents))
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
                request = {
                    "role": "method",
                    "spec": spec.to_json(),
                    "known_correct": base["known_correct"],
                    "curve_reference": base["curve_reference"],
                }
            method = call_worker(cfg, request, spec.label)
            method["relative"] = report.relative_metrics(results["base"], method)
            if "curve" in method:  # the last point is the final evaluation: the same forgetting figures
                method["curve"][-1]["relative"] = method["relative"]
            results["methods"][spec.label] = method
            report.write_reports(out, results)
    finally:
        if not cfg.keep_logprobs:
            logprobs_path(cfg).unlink(missing_ok=True)
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
