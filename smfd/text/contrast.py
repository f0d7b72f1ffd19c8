"""Contrast sentences: a document's sentences with its names swapped for names the model already knows.

A fictional document's facts are stated in the same relation phrasings as real facts ("… is a
country in", "… died in the city of"). At the token that predicts such a fact, the memory's
read depends mostly on the phrasing, so rows trained to say a document's answer there are read
by the model's own known-fact prompts too, and those lose their answers (the benchmark's
forgetting paths: most lost known facts are lost through the answer token's read, on rows
documents trained). A contrast sentence keeps the document's phrasing but names someone or
something else; the update is asked to leave the memory's output on it where it was, from the
first swapped name on, so what it writes is tied to the document's own names.

The replacement names come from text the frozen model wrote (its statements of fact), so they
are entities the model itself knows about; the document's names are the capitalised words it
uses somewhere other than at the start of a sentence.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from smfd.text.sentences import split_sentences

# A name: capitalised words (hyphen- or dash-joined parts allowed) separated by single spaces.
_WORD = r"[A-Z][a-zA-Z]+(?:[-–][A-Z][a-zA-Z]+)*"
_NAME = re.compile(rf"{_WORD}(?: {_WORD})*")
MIN_NAME_CHARS = 3


@dataclass(frozen=True)
class ContrastText:
    """A sentence with its names swapped; `start` is the character offset of the first swap."""

    text: str
    start: int


def inner_names(text: str) -> set[str]:
    """Capitalised word runs that `text` uses somewhere other than at the start of a sentence."""
    names = set()
    for sentence in split_sentences(text):
        sentence = sentence.strip()
        names.update(
            m.group(0) for m in _NAME.finditer(sentence) if m.start() > 0 and len(m.group(0)) >= MIN_NAME_CHARS
        )
    return names


def known_names(statements: list[str]) -> list[str]:
    """The names in the model's own statements, sorted (the pool contrast sentences draw from)."""
    names: set[str] = set()
    for statement in statements:
        names |= inner_names(statement)
    return sorted(names)


def contrast_texts(sentences: list[str], pool: list[str], rng: random.Random) -> list[ContrastText]:
    """Each sentence that uses one of the document's names, with every such name swapped for a pool name.

    Within a sentence each document name gets its own pool name (drawn by `rng`, never one of the
    document's names); a sentence without a document name has nothing to contrast and is skipped.
    """
    document_names = set()
    for sentence in sentences:
        document_names |= inner_names(sentence)
    candidates = [name for name in pool if name not in document_names]
    if not document_names or not candidates:
        return []
    # Longest first, so "New Mars" is swapped as one name before "Mars" could match inside it.
    pattern = re.compile("|".join(re.escape(n) for n in sorted(document_names, key=len, reverse=True)))
    contrasts = []
    for sentence in sentences:
        matches = [m for m in pattern.finditer(sentence) if _whole_word(sentence, m.start(), m.end())]
        if not matches:
            continue
        names = sorted({m.group(0) for m in matches})
        drawn = rng.sample(candidates, k=min(len(names), len(candidates)))
        swap = {name: drawn[i % len(drawn)] for i, name in enumerate(names)}
        contrasts.append(ContrastText(_swapped(sentence, matches, swap), matches[0].start()))
    return contrasts


def _whole_word(text: str, start: int, end: int) -> bool:
    before = text[start - 1] if start > 0 else " "
    after = text[end] if end < len(text) else " "
    return not before.isalnum() and not after.isalpha()


def _swapped(sentence: str, matches: list[re.Match[str]], swap: dict[str, str]) -> str:
    parts, position = [], 0
    for match in matches:
        parts += [sentence[position : match.start()], swap[match.group(0)]]
        position = match.end()
    return "".join(parts) + sentence[position:]
