"""Benchmark outputs: results.json, a Markdown table, and the learning-vs-forgetting plot.

Written again after every method finishes, so an interrupted run still leaves usable results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smfd.bench.data import PROBE_KINDS
from smfd.durable import atomic_write, atomic_write_json, atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_PNG = "learning_vs_forgetting.png"
CURVE_PNG = "stream_curve.png"


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def relative_metrics(base: dict[str, Any], method: dict[str, Any]) -> dict[str, Any]:
    """Forgetting and learning relative to the base model.

    hellaswag_drop: accuracy points lost; known_facts_retention: share of the base-correct known
    facts still correct (the same number as known_facts_acc, named for what it means);
    heldout_nll_increase_ratio: (method - base) / base; *_acc_gain: accuracy gained per probe kind.
    """
    b, m = base["retain"], method["retain"]
    drop = _difference(b["hellaswag_acc"], m["hellaswag_acc"])
    nll_change = _difference(m["heldout_nll"], b["heldout_nll"])
    relative = {
        "hellaswag_drop": None if drop is None else drop * 100,
        "known_facts_retention": m["known_facts_acc"],
        "heldout_nll_increase_ratio": None if nll_change is None else nll_change / b["heldout_nll"],
    }
    for kind in PROBE_KINDS:
        relative[f"{kind}_acc_gain"] = _difference(method["learn"][f"{kind}_acc"], base["learn"][f"{kind}_acc"])
    return relative


# ---------------------------------------------------------------- Markdown


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:+.{digits}f}{suffix}"


def _mb(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f}"


COLUMNS = (
    "method",
    "mem acc",
    "gen acc",
    "hard acc",
    "mem NLL",
    "gen NLL",
    "hard NLL",
    "HellaSwag",
    "HS drop (pts)",
    "known facts kept",
    "held-out NLL",
    "NLL +%",
    "drift KL",
    "train tok/s",
    "same-batch tok/s",
    "peak MB",
    "s/doc",
)


def _row(label: str, entry: dict[str, Any]) -> list[str]:
    learn, retain, cost = entry["learn"], entry["retain"], entry["cost"]
    relative = entry.get("relative", {})
    nll_ratio = relative.get("heldout_nll_increase_ratio")
    return [
        label,
        _pct(learn["mem_acc"]),
        _pct(learn["gen_acc"]),
        _pct(learn["hard_acc"]),
        _num(learn["mem_nll"]),
        _num(learn["gen_nll"]),
        _num(learn["hard_nll"]),
        _pct(retain["hellaswag_acc"]),
        _signed(relative.get("hellaswag_drop")),
        _pct(retain["known_facts_acc"]),
        _num(retain["heldout_nll"]),
        _signed(None if nll_ratio is None else nll_ratio * 100, 2),
        _num(retain["drift_kl"], 4),
        _num(cost.get("tokens_per_second"), 0),
        _num(cost.get("step_tokens_per_second_same_batch", cost.get("forward_tokens_per_second_same_batch")), 0),
        _mb(cost.get("peak_memory_bytes")),
        _num(cost.get("seconds_per_document"), 1),
    ]


def markdown(results: dict[str, Any]) -> str:
    budget, machine, retain = results["budget"], results["machine"], results["base"]["retain"]
    ranges = results["data"]["ranges"]
    lines = [
        f"# smfd bench: {results['model']}",
        "",
        f"Budget: {budget['documents']} documents fed one at a time, {budget['passes']} passes, batch {budget['batch_size']}, "
        f"sequence length {budget['seq_len']}, chunks of {budget['chunk_tokens']} tokens, restatement "
        f"{'on' if budget['restate'] else 'off'}: {budget['training_texts']} training texts, "
        f"{budget['tokens_per_pass']} tokens per pass (texts digest {budget['training_texts_sha256']}).",
        f"Retention sets: {retain['hellaswag_rows']} HellaSwag rows; {retain['known_facts_items']} of "
        f"{retain['known_facts_total']} known facts correct before learning (kept = share of those still correct); "
        f"held-out NLL on tokens {ranges['heldout_nll']['token_range']} of the held-out text, background statistics "
        f"from tokens {ranges['background']['token_range']} of {ranges['background']['source']}.",
        f"Machine: {machine['device']}{' (' + machine['gpu'] + ')' if machine.get('gpu') else ''}, "
        f"{machine['cpu_count']} CPUs, {machine['threads']} threads, torch {machine['torch']}, {machine['isolation']}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|",
        "| " + " | ".join(_row("base", results["base"])) + " |",
    ]
    for label, entry in results["methods"].items():
        lines.append("| " + " | ".join(_row(label.replace("|", "\\|"), entry)) + " |")
    lines += [
        "",
        "Accuracy: target contained in the greedy continuation. NLL: nats per target token. "
        "same-batch tok/s: one fixed batch of held-out text, identical for every method (base row: forward only). "
        "Peak MB: peak resident memory of the method's own process through loading and training, before evaluation "
        "(CUDA: peak allocated); base row: the model loaded.",
    ]
    budgets = {label: entry["budget"] for label, entry in results["methods"].items() if "budget" in entry}
    differing = {
        label: b
        for label, b in budgets.items()
        if (b["passes"], b["restate"], b["tokens_trained"])
        != (budget["passes"], budget["restate"], budget["tokens_planned"])
    }
    for label, b in differing.items():
        lines.append(
            f"- `{label}` ran with its own budget: {b['passes']} passes, restatement {'on' if b['restate'] else 'off'}, "
            f"{b['tokens_trained']} tokens trained (distillation queries included)."
        )
    if any(label == "in-context" for label in results["methods"]):
        lines.append(
            "- `in-context`: no training; each probe's prompt is preceded by its own document and a blank line "
            "(the ceiling); its retention columns are the base model's."
        )
    return "\n".join(lines + _reach_table(results) + _forgetting_table(results) + _curve_tables(results)) + "\n"


def _method_table(
    results: dict[str, Any], key: str, title: str, columns: list[str], cells: Any, note: str
) -> list[str]:
    """A table of one results section (`key`) with a row per method that has it, and a note under it."""
    sections = {label: entry[key] for label, entry in results["methods"].items() if entry.get(key)}
    if not sections:
        return []
    lines = ["", f"### {title}", "", "| method | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, section in sections.items():
        lines.append(f"| {label.replace('|', chr(92) + '|')} | " + " | ".join(cells(section)) + " |")
    return [*lines, "", note]


def _reach_table(results: dict[str, Any]) -> list[str]:
    """Where each memory method's probe reads land after learning (smfd.bench.reach)."""
    return _method_table(
        results,
        "reach",
        "Reach: the probes' last-token memory reads after learning",
        [
            "mem read on trained rows",
            "gen read on trained rows",
            "gen probes reaching any",
            "hard read on trained rows",
            "gen read on its mem probe's rows",
        ],
        lambda r: [
            _pct(r["mem_read_on_trained"]),
            _pct(r["gen_read_on_trained"]),
            _pct(r["gen_reaches_trained"]),
            _pct(r["hard_read_on_trained"]),
            _pct(r["gen_read_on_mem_rows"]),
        ],
        "Share of the read weight (after the read cut) at the token that predicts the target, on rows some update "
        "trained: a probe is answered from memory only through these rows, so this bounds recall of reworded prompts.",
    )


def _forgetting_table(results: dict[str, Any]) -> list[str]:
    """Where each memory method lost the known facts it lost (smfd.bench.forgetting)."""
    return _method_table(
        results,
        "forgetting",
        "Forgetting paths: the known facts lost, asked again with the memory silenced in one place",
        [
            "lost",
            "lost when asked alone",
            "back without the answer read",
            "back without the context reads",
            "answer read on trained rows (lost / kept)",
            "context reads on trained rows (lost / kept)",
        ],
        lambda f: [
            str(f["lost"]),
            str(f["lost_unbatched"]),
            str(f["back_without_answer_read"]),
            str(f["back_without_context_reads"]),
            f"{_pct(f['lost_answer_read_on_trained'])} / {_pct(f['kept_answer_read_on_trained'])}",
            f"{_pct(f['lost_context_read_on_trained'])} / {_pct(f['kept_context_read_on_trained'])}",
        ],
        "The answer read is the memory's output at the prompt's last token and at each generated token; the context "
        "reads are its output at the earlier prompt tokens, which reach the answer through attention.",
    )


CURVE_COLUMNS = (
    "documents",
    "mem acc",
    "gen acc",
    "first-N mem acc",
    "known facts kept",
    "HellaSwag drop (pts, rows)",
    "NLL +%",
    "drift KL",
    "rows trained",
    "trained more than once",
    "background read share",
)


def _curve_row(point: dict[str, Any]) -> list[str]:
    learn, retain, memory = point["learn"], point["retain"], point.get("memory") or {}
    relative = point.get("relative", {})
    ratio = relative.get("heldout_nll_increase_ratio")
    return [
        str(point["documents"]),
        _pct(learn["mem_acc"]),
        _pct(learn["gen_acc"]),
        _pct(learn.get("first_mem_acc")),
        _pct(retain["known_facts_acc"]),
        f"{_signed(relative.get('hellaswag_drop'))} ({retain['hellaswag_rows']})",
        _signed(None if ratio is None else ratio * 100, 2),
        _num(retain["drift_kl"], 4),
        str(memory["rows_trained"]) if memory else "–",
        str(memory["rows_trained_more_than_once"]) if memory else "–",
        _pct(memory.get("background_read_share"), 2) if memory else "–",
    ]


def _curve_tables(results: dict[str, Any]) -> list[str]:
    """One table per method run with --curve-every: its points along the stream."""
    lines: list[str] = []
    for label, entry in results["methods"].items():
        if "curve" not in entry:
            continue
        lines += [
            "",
            f"### Stream curve: `{label}`",
            "",
            "| " + " | ".join(CURVE_COLUMNS) + " |",
            "|" + "|".join("---:" for _ in CURVE_COLUMNS) + "|",
        ]
        lines += ["| " + " | ".join(_curve_row(point)) + " |" for point in entry["curve"]]
    if lines:
        lines += [
            "",
            "first-N: the first --curve-every documents of the stream (are early documents overwritten?). "
            "Intermediate points score the first HellaSwag rows only, against the base model on the same rows; "
            "the last point is the full evaluation above.",
        ]
    return lines


# ---------------------------------------------------------------- plot


def _point(entry: dict[str, Any], axis: str) -> float | None:
    relative = entry.get("relative", {})
    if axis == "nll":
        ratio = relative.get("heldout_nll_increase_ratio")
        return None if ratio is None else ratio * 100
    return relative.get("hellaswag_drop")


def plot(results: dict[str, Any], path: Path) -> None:
    """Learning (mem and gen accuracy) against forgetting (held-out NLL increase, HellaSwag drop)."""
    import matplotlib  # imported here: workers never plot, and pyplot is slow to import

    matplotlib.use("Agg")  # files only, never a window: the benchmark runs on headless machines
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    figure, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    entries = [("base", {**results["base"], "relative": {"heldout_nll_increase_ratio": 0.0, "hellaswag_drop": 0.0}})]
    entries += list(results["methods"].items())
    palette = plt.get_cmap("tab10")
    colours = {
        label: "black" if label == "base" else palette((index - 1) % 10) for index, (label, _) in enumerate(entries)
    }
    highest = 0.0
    for axis, (key, title) in zip(
        axes, (("nll", "held-out NLL increase (%)"), ("hellaswag", "HellaSwag drop (points)"))
    ):
        for label, entry in entries:
            x = _point(entry, key)
            for kind, marker in (("mem", "o"), ("gen", "^")):
                y = entry["learn"][f"{kind}_acc"]
                if x is not None and y is not None:
                    axis.scatter([x], [y * 100], color=colours[label], marker=marker, s=60, alpha=0.85, zorder=3)
                    highest = max(highest, y * 100)
        axis.axvline(0, color="grey", linewidth=0.8, linestyle=":")
        axis.set_xlabel(title)
        axis.grid(True, alpha=0.3)
    axes[0].set_ylim(-2, max(10.0, highest * 1.1 + 2))
    axes[0].set_ylabel("probe accuracy (%)")
    kinds = [
        Line2D([], [], marker="o", linestyle="", color="grey", label="memorisation (mem_acc)"),
        Line2D([], [], marker="^", linestyle="", color="grey", label="paraphrase (gen_acc)"),
    ]
    methods = [Line2D([], [], marker="s", linestyle="", color=colour, label=label) for label, colour in colours.items()]
    axes[1].legend(handles=kinds, loc="best", fontsize=8)
    figure.legend(handles=methods, loc="lower center", ncol=min(len(methods), 4), fontsize=8, frameon=False)
    documents = results["budget"]["documents"]
    figure.suptitle(f"Learning vs forgetting: {results['model']} ({documents} document{'' if documents == 1 else 's'})")
    figure.tight_layout(rect=(0, 0.06 + 0.03 * ((len(methods) - 1) // 4), 1, 1))
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)


CURVE_PANELS = (
    (
        "recall over all documents learned (%)",
        lambda p: _scaled(p["learn"]["mem_acc"]),
        lambda p: _scaled(p["learn"]["gen_acc"]),
    ),
    ("known facts kept (%)", lambda p: _scaled(p["retain"]["known_facts_acc"]), None),
    ("held-out NLL increase (%)", lambda p: _scaled(p["relative"].get("heldout_nll_increase_ratio")), None),
    (
        "recall of the first documents (%)",
        lambda p: _scaled(p["learn"].get("first_mem_acc")),
        lambda p: _scaled(p["learn"].get("first_gen_acc")),
    ),
)


def _scaled(value: float | None) -> float | None:
    return None if value is None else value * 100


def plot_curve(results: dict[str, Any], path: Path) -> None:
    """Recall and retention against documents learned, one colour per method (solid: memorised, dashed: reworded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    palette = plt.get_cmap("tab10")
    curves = [(label, entry["curve"]) for label, entry in results["methods"].items() if "curve" in entry]
    for axis, (title, solid, dashed) in zip(axes.flat, CURVE_PANELS):
        for index, (label, points) in enumerate(curves):
            counts = [p["documents"] for p in points]
            for values, style, suffix in ((solid, "-", ""), (dashed, "--", " (reworded)")):
                if values is None:
                    continue
                ys = [values(p) for p in points]
                axis.plot(counts, ys, style, marker="o", color=palette(index % 10), label=label + suffix)
        axis.set_title(title, fontsize=10)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, loc="best")
    for axis in axes[1]:
        axis.set_xlabel("documents learned")
    figure.suptitle(f"Along the stream: {results['model']}")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    plt.close(figure)


def write_reports(out: Path, results: dict[str, Any]) -> None:
    atomic_write_json(out / RESULTS_JSON, results)
    atomic_write_text(out / RESULTS_MD, markdown(results))
    plot(results, out / PLOT_PNG)
    if any("curve" in entry for entry in results["methods"].values()):
        plot_curve(results, out / CURVE_PNG)


def summary_line(out: Path, results: dict[str, Any]) -> str:
    return (
        f"wrote {out / RESULTS_JSON}, {out / RESULTS_MD} and {out / PLOT_PNG} "
        f"(base + {len(results['methods'])} methods)"
    )
