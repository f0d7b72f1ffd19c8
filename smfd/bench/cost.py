"""Step speed of several methods in one process on one fixed batch: `python -m smfd.bench.cost BENCH-ARGS [--rounds N]`.

`smfd bench` runs each method in its own process, so its same-batch rates carry the noise of
separate processes (allocator warm-up, what else the machine did at the time). This runs the
same measurement (`runner.same_batch_speed`, the bench's timing batch and settings) for every
method in one process, round after round, so their rates compare directly. It takes the bench's
own arguments (only the held-out text, model, methods, sizes and --out for the cache are used;
the data files are still checked) and prints one line per method with each round's tokens/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smfd.bench import runner
from smfd.bench.methods import BackgroundSource, build_learning
from smfd.bench.specs import parse_method_specs
from smfd.errors import SmfdError
from smfd.model.loading import load_base_model


def measure(argv: list[str], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Tokens/s per round for every method spec, all in this process: per step, and per update
    (the update's planning forward charged to --passes passes over the batch)."""
    cfg = runner.config_from_args(runner.build_parser().parse_args(argv))
    ctx = runner.open_context(cfg)
    batch = runner.timing_batch(ctx.split, ctx.tokenizer)
    background = BackgroundSource(
        ctx.split.background, ctx.split.background_text, Path(cfg.out) / "cache", ctx.source, False
    )
    learnings = []
    for spec in parse_method_specs(cfg.methods):
        model, tokenizer, _ = load_base_model(cfg.model, Path(cfg.cache_dir))
        learning, _ = build_learning(spec, model.to(ctx.device), tokenizer, cfg.learn_settings(), background)
        learnings.append((spec.label, learning))
    rates: dict[str, dict[str, list[float]]] = {label: {"step": [], "update": []} for label, _ in learnings}
    for _ in range(rounds):  # methods interleaved, so drift of the machine reaches each alike
        for label, learning in learnings:
            speed = runner.same_batch_speed(learning, batch, cfg.timing_steps, ctx.device, cfg.passes)
            rates[label]["step"].append(speed["step_tokens_per_second_same_batch"])
            rates[label]["update"].append(speed["update_tokens_per_second_same_batch"])
    return rates


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m smfd.bench.cost", add_help=False)
    parser.add_argument("--rounds", type=int, default=3)
    known, rest = parser.parse_known_args(argv)
    if known.rounds < 1:
        raise SmfdError(f"--rounds must be >= 1, got {known.rounds}")
    for label, kinds in measure(rest, known.rounds).items():
        for kind, values in kinds.items():
            print(
                f"{label}: same-batch {kind} tok/s per round {', '.join(f'{v:.0f}' for v in values)}; "
                f"median {sorted(values)[len(values) // 2]:.0f}"
            )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SmfdError as exc:
        print(f"smfd: error: {exc}", file=sys.stderr)
        sys.exit(2)
