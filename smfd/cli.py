"""Command line: `smfd --config FILE [--once | --check]` runs the daemon; subcommands do the rest."""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from smfd import __version__
from smfd.errors import ConfigError, SmfdError
from smfd.heap import release_freed_memory_promptly
from smfd.paths import StatePaths

SUBCOMMANDS = ("bench", "probe", "ask", "status", "rollback")


def _daemon_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smfd",
        description="Sparse memory finetuning daemon. Subcommands: "
        + ", ".join(SUBCOMMANDS)
        + " (smfd SUBCOMMAND --help).",
    )
    parser.add_argument("--config", required=True, type=Path, help="YAML config file (see config/edge.yaml)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="learn everything pending, write the checkpoint, exit")
    mode.add_argument("--check", action="store_true", help="validate the config and model path, print the plan, exit")
    parser.add_argument("--version", action="version", version=f"smfd {__version__}")
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="YAML config file")


def _sub_parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"smfd {name}")
    if name == "probe":
        parser.description = "Score probe items with the learned memory and with the base model."
        _config_arg(parser)
        parser.add_argument("probes", type=Path, help="JSONL: {prompt,target} or {ctx,endings,label} per line")
        parser.add_argument("--json", action="store_true", help="one JSON object per item, then a summary line")
    elif name == "ask":
        parser.description = (
            "Complete a prompt with the learned model: through the running daemon's API when serve is on "
            "and it answers, else by loading the model here."
        )
        _config_arg(parser)
        parser.add_argument("prompt")
        parser.add_argument("--max-new-tokens", type=int, default=48)
        parser.add_argument("--base", action="store_true", help="answer with the frozen base model instead")
    elif name == "status":
        parser.description = "Documents by state, pending chunks, checkpoint version, last update and probes."
        _config_arg(parser)
        parser.add_argument("--json", action="store_true")
    elif name == "rollback":
        parser.description = "Restore an earlier memory version exactly (default: the one before the current)."
        _config_arg(parser)
        parser.add_argument("version", nargs="?", type=int)
    return parser


@contextmanager
def state_lock(state_dir: Path, what: str) -> Iterator[None]:
    """Exclusive lock on the state folder: one process changes the memory at a time."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(StatePaths(state_dir).lock, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SmfdError(
                f"{what}: another smfd process holds {StatePaths(state_dir).lock} (stop the daemon first)"
            ) from None
        yield


def _load_config(path: Path):
    from smfd.config import load_config, validate_model_path

    cfg = load_config(path)
    validate_model_path(cfg)
    return cfg


def run_daemon(args: argparse.Namespace) -> int:
    if args.check:
        from smfd.config import describe

        cfg = _load_config(args.config)
        print(describe(cfg))
        return 0
    from smfd.daemon.service import Daemon

    daemon = Daemon(args.config)
    with state_lock(daemon.cfg.state_dir, "smfd"):
        return daemon.run_once() if args.once else daemon.run_forever()


def _quiet_runtime(cfg, create: bool = False):
    from smfd.daemon.runtime import open_runtime
    from smfd.observe.logs import configure_logging

    configure_logging("warning", json=True)
    return open_runtime(cfg, create=create)


def cmd_probe(args: argparse.Namespace) -> int:
    from smfd.guard.probes import load_items, run_probes, summarize

    cfg = _load_config(args.config)
    items = load_items(args.probes)
    runtime = _quiet_runtime(cfg)
    results = run_probes(runtime.model, items)
    summary = summarize(results)
    summary["checkpoint_version"] = runtime.version
    for r in results:
        if args.json:
            print(
                json.dumps(
                    {
                        "id": r.item.id,
                        "kind": r.item.kind,
                        "base": {"nll": r.base.nll, "correct": r.base.correct},
                        "now": {"nll": r.now.nll, "correct": r.now.correct},
                    }
                )
            )
        else:
            mark = lambda ok: "yes" if ok else "no "  # noqa: E731
            print(
                f"{r.item.id:>12} {r.item.kind:6} base nll {r.base.nll:6.3f} correct {mark(r.base.correct)} | "
                f"now nll {r.now.nll:6.3f} correct {mark(r.now.correct)}"
            )
    if args.json:
        print(json.dumps({"summary": summary}))
    else:
        b, n = summary["base"], summary["now"]
        print(
            f"{summary['items']} items ({summary['cloze']} cloze, {summary['choice']} choice) at checkpoint "
            f"version {runtime.version}: accuracy base {b['accuracy']:.3f} -> now {n['accuracy']:.3f}, "
            f"mean NLL base {b['mean_nll']:.3f} -> now {n['mean_nll']:.3f}"
        )
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """Answer through the running daemon's API when it serves one; else load the model here."""
    from smfd.model.scoring import greedy_continuations
    from smfd.serve.client import api_url, ask_daemon

    if not args.prompt.strip():
        raise SmfdError("ask: the prompt is empty")
    cfg = _load_config(args.config)
    if not args.base:
        answered = ask_daemon(cfg.serve, args.prompt, args.max_new_tokens)
        if answered is not None:
            print(args.prompt + answered[0])
            print(f"(answered by the running daemon, memory version {answered[1]})", file=sys.stderr)
            return 0
        if cfg.serve.enabled:
            print(
                f"smfd ask: no daemon answers at {api_url(cfg.serve)}; loading the model here (this takes a while)",
                file=sys.stderr,
            )
    runtime = _quiet_runtime(cfg)
    model = runtime.model
    if args.base:
        with model.base():
            text = greedy_continuations(model.model, model.tokenizer, [args.prompt], args.max_new_tokens)[0]
    else:
        text = greedy_continuations(model.model, model.tokenizer, [args.prompt], args.max_new_tokens)[0]
    print(args.prompt + text)
    return 0


def status_report(cfg) -> dict:
    from smfd.guard.verdict import VerdictTally
    from smfd.ingest.journal import DOCUMENT_STATES, Journal
    from smfd.store.checkpoint import CheckpointStore

    journal_path = StatePaths(cfg.state_dir).journal
    report: dict = {"state_dir": str(cfg.state_dir)}
    if journal_path.exists():
        journal = Journal(journal_path, readonly=True)
        try:
            report["documents"] = journal.counts()
            report["pending_chunks"] = journal.pending_chunk_count()
            report["pending_tokens"] = journal.pending_token_count()
            report["guard"] = VerdictTally.of(journal.recent_verdicts(cfg.guard.warn_window), cfg.guard).as_dict()
            last = journal.last_update()
            report["last_update"] = (
                None
                if last is None
                else {
                    "version": last.version,
                    "timestamp": last.timestamp,
                    "chunks": last.n_chunks,
                    "rows": last.n_rows,
                    "seconds": last.seconds,
                    "accepted": last.accepted,
                    "measures": last.measures,
                }
            )
        finally:
            journal.close()
    else:
        report.update(
            {
                "documents": dict.fromkeys(DOCUMENT_STATES, 0),
                "pending_chunks": 0,
                "pending_tokens": 0,
                "guard": None,
                "last_update": None,
            }
        )
    store = CheckpointStore(StatePaths(cfg.state_dir).memory, keep=cfg.checkpoint.keep)
    report["checkpoint_version"] = store.version if store.exists() else None
    report["memory_fill"] = store.memory_fill() if store.exists() else None
    startup_file = StatePaths(cfg.state_dir).startup  # the stage the daemon last reported while starting
    report["startup"] = json.loads(startup_file.read_text()) if startup_file.exists() else None
    probes_file = StatePaths(cfg.state_dir).probe_last
    report["last_probes"] = json.loads(probes_file.read_text()) if probes_file.exists() else None
    return report


def cmd_status(args: argparse.Namespace) -> int:
    from smfd.config import load_config

    report = status_report(load_config(args.config))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    startup = report["startup"]
    if startup and startup["stage"] != "ready":
        since = time.strftime("%H:%M:%S", time.localtime(startup["updated_at"]))
        print(f"starting: {startup['stage']} ({startup['percent']}%, since {since})")
    docs = report["documents"]
    print("documents: " + ", ".join(f"{k} {v}" for k, v in docs.items()))
    print(f"pending chunks: {report['pending_chunks']} ({report['pending_tokens']} tokens)")
    print(f"checkpoint version: {report['checkpoint_version']}")
    if report["memory_fill"]:
        fill = report["memory_fill"]
        print(
            f"memory: {fill['rows_trained']} of {fill['rows_total']} rows trained; "
            f"{fill['background_read_share']:.1%} of ordinary text's reads land on them; "
            f"{fill.get('row_retrainings', 0)} row trainings overwrote earlier ones"
        )
    guard = report["guard"]
    if guard and guard["accepted"] + guard["rejected"]:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(guard["reasons"].items())) or "none"
        print(
            f"guard: {guard['accepted']} of the last {guard['accepted'] + guard['rejected']} updates accepted; "
            f"rolled back: {reasons}"
        )
        if guard["alarming"]:
            print("WARNING: most recent updates were rolled back: the daemon has mostly stopped learning")
    last = report["last_update"]
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["timestamp"]))
        print(
            f"last update: version {last['version']} at {when}, {last['chunks']} chunks, {last['rows']} rows, "
            f"{last['seconds']:.1f} s, {'accepted' if last['accepted'] else 'rolled back'}"
        )
    else:
        print("last update: none yet")
    if report["last_probes"]:
        print("last probes: " + json.dumps(report["last_probes"].get("summary", report["last_probes"])))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Restore a memory version; the documents only the removed versions held become rolled_back in the journal."""
    from smfd.ingest.journal import Journal

    cfg = _load_config(args.config)
    with state_lock(cfg.state_dir, "rollback"):
        runtime = _quiet_runtime(cfg)
        target = runtime.version - 1 if args.version is None else args.version
        runtime.store.rollback(runtime.model, target)
        journal_path = StatePaths(cfg.state_dir).journal
        rolled_back: list[int] = []
        if journal_path.exists():
            with Journal(journal_path) as journal:
                rolled_back = journal.mark_rolled_back(target, f"memory rolled back to version {target}")
    print(
        f"memory restored to version {target} (was {runtime.version}); "
        f"{len(rolled_back)} document(s) it no longer holds are now rolled_back (drop them again to relearn them)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    release_freed_memory_promptly()  # before any model work: see smfd.heap
    try:
        if argv and argv[0] == "bench":
            from smfd.bench.runner import main as bench_main

            return bench_main(argv[1:])
        if argv and argv[0] in SUBCOMMANDS:
            name = argv[0]
            args = _sub_parser(name).parse_args(argv[1:])
            return {"probe": cmd_probe, "ask": cmd_ask, "status": cmd_status, "rollback": cmd_rollback}[name](args)
        return run_daemon(_daemon_parser().parse_args(argv))
    except ConfigError as exc:
        print(f"smfd: {exc}", file=sys.stderr)
        return exc.exit_code
    except SmfdError as exc:
        print(f"smfd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
