"""New-knowledge recall probes: what should the model now answer about a document it learned?

A document may travel with a sidecar ``NAME.qa.jsonl`` beside ``NAME.txt`` (one JSON object per
line with non-empty string fields ``prompt`` and ``target``, and optionally ``kind``, a short label
such as ``verbatim`` or ``reworded`` that recall is also reported by): those pairs become the
document's recall probes. Without a sidecar, cloze probes are cut from the document's own sentences (the
last words of each sentence are the target), so recall is always measured.

The sidecar is read at intake, validated, and spooled beside the document's text as
``<hash>.qa.jsonl``; the learner reads it back when the document's update is accepted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from smfd.durable import atomic_write_text
from smfd.ingest.extract import RejectedInput, check_text, decode_utf8, jsonl_objects
from smfd.ingest.journal import ChunkRow, Journal
from smfd.text.sentences import split_sentences

SIDECAR_SUFFIX = ".qa.jsonl"
CUT_TARGET_WORDS = 2  # words cut from the end of a sentence to make its cloze target
CUT_MIN_WORDS = 6  # shorter sentences leave too little prompt to be a fair probe
MAX_SIDECAR_ITEMS = 1000

KIND_PATTERN = re.compile(r"[a-z0-9_-]{1,32}")  # a probe kind becomes a metric label: short, plain
SIDECAR_KIND = "sidecar"  # kind of a sidecar pair that names none
CLOZE_KIND = "cloze"  # kind of a probe cut from the learned text

RecallItem = dict[str, str]  # {"prompt": ..., "target": ..., "kind": ...}


def is_sidecar(name: str) -> bool:
    return name.lower().endswith(SIDECAR_SUFFIX)


def sidecar_for(document: Path) -> Path:
    """``inbox/NAME.txt`` -> ``inbox/NAME.qa.jsonl`` (the document's last suffix replaced)."""
    return document.with_name(document.stem + SIDECAR_SUFFIX)


def spooled_sidecar(spool_text_path: Path) -> Path:
    """Where intake keeps a document's probes: ``spool/<hash>.txt`` -> ``spool/<hash>.qa.jsonl``."""
    return spool_text_path.with_name(spool_text_path.stem + SIDECAR_SUFFIX)


def parse_sidecar(data: bytes, name: str) -> list[RecallItem]:
    """Validate a sidecar's bytes; raises RejectedInput naming the first bad line."""
    text = check_text(decode_utf8(data))
    items: list[RecallItem] = []
    try:
        for number, row in jsonl_objects(text, "bad_sidecar"):
            for key in ("prompt", "target"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise RejectedInput(f"line {number}: {key!r} must be a non-empty string", "bad_sidecar")
            kind = row.get("kind", SIDECAR_KIND)
            if not isinstance(kind, str) or not KIND_PATTERN.fullmatch(kind):
                raise RejectedInput(
                    f"line {number}: 'kind' must be 1-32 characters of a-z, 0-9, '_' or '-'", "bad_sidecar"
                )
            items.append({"prompt": row["prompt"].strip(), "target": row["target"].strip(), "kind": kind})
    except RejectedInput as rejection:
        raise RejectedInput(f"{name}: {rejection.reason}", rejection.code) from None
    if not items:
        raise RejectedInput(f"{name}: no prompt/target pairs", "bad_sidecar")
    if len(items) > MAX_SIDECAR_ITEMS:
        raise RejectedInput(f"{name}: {len(items)} pairs, more than the limit of {MAX_SIDECAR_ITEMS}", "bad_sidecar")
    return items


def write_items(path: Path, items: list[RecallItem]) -> None:
    atomic_write_text(path, "".join(json.dumps(item) + "\n" for item in items))


def read_items(path: Path) -> list[RecallItem]:
    """Items written by `write_items` (already validated at intake)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cut_cloze(texts: list[str]) -> list[RecallItem]:
    """Cloze probes cut from learned text: each long-enough sentence's last words are the target."""
    items = []
    for text in texts:
        for sentence in split_sentences(text):
            words = sentence.rstrip(" .!?;:").split()
            if len(words) >= CUT_MIN_WORDS:
                target = " ".join(words[-CUT_TARGET_WORDS:]).strip("\"'(),")
                if target:
                    items.append({"prompt": " ".join(words[:-CUT_TARGET_WORDS]), "target": target, "kind": CLOZE_KIND})
    return items


def recall_items(journal: Journal, chunks: list[ChunkRow]) -> list[RecallItem]:
    """Recall probes for learned chunks: each document's sidecar pairs, else clozes cut from its chunks."""
    by_document: dict[int, list[str]] = {}
    for chunk in chunks:
        by_document.setdefault(chunk.doc_id, []).append(chunk.text)
    items: list[RecallItem] = []
    for doc_id, texts in by_document.items():
        doc = journal.get_document(doc_id)
        sidecar = None if doc is None or doc.spool_path is None else spooled_sidecar(Path(doc.spool_path))
        if sidecar is not None and sidecar.exists():
            items.extend(read_items(sidecar))
        else:
            items.extend(cut_cloze(texts))
    return items
