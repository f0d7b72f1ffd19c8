"""Benchmark inputs: documents with probes, retention sets, held-out text, and the training texts.

Every loader checks its file completely and fails with a message that names the file and the
exact problem (line, document id, field), so a bad input never turns into a silently smaller
or dummy benchmark.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from smfd.errors import SmfdError
from smfd.text.chunker import chunk_text
from smfd.text.restate import training_texts

PROBE_KINDS = ("mem", "gen", "hard")
PROBE_FIELDS = {
    "mem": ("mem_input", "mem_target"),
    "gen": ("gen_input", "gen_target"),
    "hard": ("hard_gen_input", "hard_gen_target"),
}


@dataclass(frozen=True)
class Probe:
    prompt: str
    target: str


@dataclass(frozen=True)
class Document:
    """One document to learn and the cloze probes that test it."""

    doc_id: str
    text: str
    probes: dict[str, tuple[Probe, ...]]
    paraphrases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class KnownFact:
    prompt: str
    answer: str
    origin: str  # "file:line", so a result can be traced back to its source


@dataclass(frozen=True)
class HeldoutSplit:
    """Token ranges of the held-out text: background statistics never see the evaluation half."""

    background: list[list[int]]
    heldout_windows: list[list[int]]
    drift_windows: list[list[int]]
    timing_rows: list[list[int]]
    ranges: dict[str, Any]

    @property
    def background_text(self) -> str:
        """Where the background sequences came from, as a prepared memory's key names it ("file:NAME")."""
        return f"file:{self.ranges['background']['source']}"


# ---------------------------------------------------------------- reading files


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise SmfdError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise SmfdError(f"{what} path {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SmfdError(f"{what} file {path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise SmfdError(f"cannot read {what} file {path}: {exc}") from exc
    if not text.strip():
        raise SmfdError(f"{what} file {path} is empty")
    return text


def _jsonl_rows(path: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; any line that is not a JSON object is an error."""
    rows = []
    for number, line in enumerate(_read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SmfdError(f"{what} file {path}, line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise SmfdError(f"{what} file {path}, line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _string_list(record: dict[str, Any], key: str, where: str) -> list[str]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SmfdError(f"{where}: field {key!r} must be a list of strings")
    return value


def _parse_document(record: Any, index: int, path: Path) -> Document:
    if not isinstance(record, dict):
        raise SmfdError(f"docs file {path}: entry {index} is a {type(record).__name__}, expected an object")
    doc_id = str(record.get("doc_id") or f"doc-{index}")
    where = f"docs file {path}, document {doc_id}"
    text = record.get("train_context")
    if not isinstance(text, str):
        raise SmfdError(f"{where}: field 'train_context' is missing or not a string")
    if not text.strip():
        raise SmfdError(f"{where}: empty document (blank train_context)")
    probes = {}
    for kind, (input_key, target_key) in PROBE_FIELDS.items():
        inputs, targets = _string_list(record, input_key, where), _string_list(record, target_key, where)
        if len(inputs) != len(targets):
            raise SmfdError(f"{where}: {input_key} has {len(inputs)} entries but {target_key} has {len(targets)}")
        blank = [i for i, (p, t) in enumerate(zip(inputs, targets)) if not p.strip() or not t.strip()]
        if blank:
            raise SmfdError(f"{where}: {kind} probe {blank[0]} has an empty prompt or target")
        probes[kind] = tuple(Probe(p, t) for p, t in zip(inputs, targets))
    if not any(probes.values()):
        raise SmfdError(f"{where}: no probes (mem_input, gen_input and hard_gen_input are all empty)")
    paraphrases = _string_list(record, "paraphrases", where) if "paraphrases" in record else []
    return Document(doc_id, text, probes, tuple(p for p in paraphrases if p.strip()))


def load_documents(path: Path, limit: int | None = None) -> list[Document]:
    """The fictional-knowledge documents, in file order (the first `limit` of them; all are checked)."""
    try:
        records = json.loads(_read_text(path, "docs"))
    except json.JSONDecodeError as exc:
        raise SmfdError(f"docs file {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(records, list):
        raise SmfdError(f"docs file {path}: expected a JSON list of documents, got {type(records).__name__}")
    if not records:
        raise SmfdError(f"docs file {path}: contains no documents")
    documents = [_parse_document(record, index, path) for index, record in enumerate(records)]
    seen: set[str] = set()
    for doc in documents:
        if doc.doc_id in seen:
            raise SmfdError(f"docs file {path}: doc_id {doc.doc_id!r} appears twice")
        seen.add(doc.doc_id)
    return documents if limit is None else documents[:limit]


def load_hellaswag(path: Path, rows: int | None) -> list[ChoiceItem]:
    """The first `rows` HellaSwag items (`ctx`, `endings`, `label`)."""
    items = []
    for number, row in _jsonl_rows(path, "hellaswag"):
        if rows is not None and len(items) >= rows:
            break
        where = f"hellaswag file {path}, line {number}"
        context, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
        if not isinstance(context, str) or not context.strip():
            raise SmfdError(f"{where}: field 'ctx' is missing or empty")
        if (
            not isinstance(endings, list)
            or len(endings) < 2
            or not all(isinstance(e, str) and e.strip() for e in endings)
        ):
            raise SmfdError(f"{where}: field 'endings' must be a list of at least 2 non-empty strings")
        if isinstance(label, str) and label.isdigit():
            label = int(label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
            raise SmfdError(f"{where}: field 'label' must be an integer index into endings, got {label!r}")
        items.append(ChoiceItem(context, tuple(endings), label))
    if not items:
        raise SmfdError(f"hellaswag file {path} has no items")
    return items


def _known_fact(row: dict[str, Any], where: str) -> KnownFact:
    for prompt_key, answer_key in (("prompt", "attribute"), ("cloze", "answer")):
        prompt, answer = row.get(prompt_key), row.get(answer_key)
        if isinstance(prompt, str) and isinstance(answer, str):
            if not prompt.strip() or not answer.strip():
                raise SmfdError(f"{where}: empty {prompt_key!r} or {answer_key!r}")
            return KnownFact(prompt, answer, where)
    raise SmfdError(f"{where}: needs string fields 'prompt' and 'attribute' (ROME form) or 'cloze' and 'answer'")


def load_known_facts(paths: list[Path], limit: int | None = None) -> list[KnownFact]:
    """Known-fact cloze items from every file, in order (the first `limit` overall)."""
    facts = []
    for path in paths:
        rows = _jsonl_rows(path, "known-facts")
        if not rows:
            raise SmfdError(f"known-facts file {path} has no items")
        facts.extend(_known_fact(row, f"known-facts file {path}, line {number}") for number, row in rows)
    return facts if limit is None else facts[:limit]


def load_text(path: Path, what: str) -> str:
    return _read_text(path, what)


# ---------------------------------------------------------------- held-out split


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


def _windows(ids: list[int], size: int, count: int) -> list[list[int]]:
    pieces = [ids[i : i + size] for i in range(0, len(ids), size)]
    return [p for p in pieces if len(p) > 1][:count]


def _timing_rows(ids: list[int], rows: int, width: int) -> list[list[int]]:
    """`rows` x `width` tokens of held-out text, wrapping around when the text is shorter."""
    needed = rows * width
    cycled = (ids * (needed // len(ids) + 1))[:needed]
    return [cycled[r * width : (r + 1) * width] for r in range(rows)]


@dataclass(frozen=True)
class SplitSizes:
    background_seq_len: int
    background_batches: int
    heldout_window: int
    heldout_windows: int
    drift_window: int
    drift_windows: int
    timing_batch: int
    timing_seq_len: int


def split_heldout(
    tokenizer: PreTrainedTokenizerBase,
    heldout_text: str,
    heldout_name: str,
    sizes: SplitSizes,
    background_text: str | None = None,
    background_name: str | None = None,
) -> HeldoutSplit:
    """Background from the first token half (or a separate file); evaluation windows from the second half only."""
    ids = _tokens(tokenizer, heldout_text)
    middle = len(ids) // 2
    evaluation = ids[middle:]
    if background_text is None:
        background_ids, background_source = ids[:middle], heldout_name
    else:
        background_ids, background_source = _tokens(tokenizer, background_text), background_name
    background = _windows(background_ids, sizes.background_seq_len, sizes.background_batches)
    heldout = _windows(evaluation, sizes.heldout_window, sizes.heldout_windows)
    drift = _windows(evaluation, sizes.drift_window, sizes.drift_windows)
    if not background:
        raise SmfdError(
            f"background text {background_source} is too short: {len(background_ids)} tokens give no background batch"
        )
    if not heldout or not drift:
        raise SmfdError(f"held-out text {heldout_name} is too short: its second half has {len(evaluation)} tokens")
    used = lambda windows: sum(len(w) for w in windows)  # noqa: E731
    ranges = {
        "heldout_text": heldout_name,
        "heldout_tokens": len(ids),
        "background": {
            "source": background_source,
            "token_range": [0, used(background)],
            "batches": len(background),
            "seq_len": sizes.background_seq_len,
        },
        "heldout_nll": {
            "token_range": [middle, middle + used(heldout)],
            "windows": len(heldout),
            "window": sizes.heldout_window,
        },
        "drift": {"token_range": [middle, middle + used(drift)], "windows": len(drift), "window": sizes.drift_window},
        "timing_batch": {"token_range_start": middle, "rows": sizes.timing_batch, "seq_len": sizes.timing_seq_len},
    }
    timing = _timing_rows(evaluation, sizes.timing_batch, sizes.timing_seq_len)
    return HeldoutSplit(background, heldout, drift, timing, ranges)


# ---------------------------------------------------------------- training texts


def document_chunks(
    doc: Document,
    tokenizer: PreTrainedTokenizerBase,
    chunk_tokens: int,
    title_context: bool,
    with_paraphrases: bool,
    overlap_sentences: int,
) -> list[str]:
    """The document chunked as the daemon chunks it (plus its paraphrases, chunked the same way, if asked)."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

    sources = [doc.text, *(doc.paraphrases if with_paraphrases else ())]
    chunks = []
    for source in sources:
        try:
            chunks.extend(
                chunk.text
                for chunk in chunk_text(
                    source, count, chunk_tokens, title_context=title_context, overlap_sentences=overlap_sentences
                )
            )
        except SmfdError as exc:
            raise SmfdError(f"document {doc.doc_id}: {exc}") from exc
    return chunks


def document_training_texts(chunks: list[str], restate: bool) -> list[str]:
    return training_texts(chunks, restate)


def texts_digest(texts_per_document: list[list[str]]) -> str:
    """A short hash of every training text in order: equal digests prove two methods saw the same data."""
    digest = hashlib.sha256()
    for texts in texts_per_document:
        for text in texts:
            digest.update(text.encode())
            digest.update(b"\x00")
        digest.update(b"\x01")
    return digest.hexdigest()[:16]
