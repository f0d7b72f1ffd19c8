"""Sentence-aware chunking of a document into pieces that fit the model's token budget.

Why: sparse memory finetuning learns from short spans; cutting mid-sentence teaches the
model broken facts, and a chunk far from its document's title loses what it is about.
So whole sentences are packed greedily, paragraphs are kept, and each chunk carries the
document's title as ``context``.

How the title context is applied (the choice, and why):

* The title is the first line when it looks like a heading (short, no terminal period,
  followed by more text and not by a lower-case continuation of a wrapped line); a
  leading Markdown ``#`` is dropped. Otherwise the title is the first sentence.
* Every chunk reports the title in ``Chunk.context``. ``Chunk.text`` (what is trained on)
  is ``context + "\\n" + body`` only when that still fits ``max_tokens``; otherwise it is
  just the body. The first chunk never gets the prefix: its body already starts with
  the title.
* So that the prefix usually fits, bodies after the first chunk are packed to
  ``max_tokens`` minus the title's cost, but only when the title costs at most a quarter
  of the budget. A longer title gets no reservation (and then rarely fits): learning
  the document's own text matters more than repeating a long title.

Token counts come from the caller's ``count_tokens`` and are always measured on the
final string, so ``n_tokens <= max_tokens`` holds even for tokenizers whose counts are
not additive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from smfd.errors import SmfdError
from smfd.text.sentences import _line_tagged_sentences, _paragraph_sentences, _paragraphs

TokenCounter = Callable[[str], int]

TITLE_MAX_CHARS = 150
TITLE_MAX_WORDS = 20
CONTEXT_MAX_SHARE = 4  # reserve room for the title only if it costs <= max_tokens / 4

# Words that end in a period without ending a sentence (compared lower-case, without the dot).


@dataclass(frozen=True)
class Chunk:
    """One training span.

    ``text`` is what to train on (possibly ``context + "\\n" + body``), ``n_tokens`` its
    token count, ``context`` the document title, ``body`` the document's own text in it.
    """

    text: str
    n_tokens: int
    context: str
    body: str


@dataclass(frozen=True)
class _Unit:
    """A sentence (or a piece of an over-long sentence), its paragraph, and whether it
    began a line of its own (a list item or heading) in the source."""

    text: str
    paragraph: int
    starts_line: bool = False


# ---------------------------------------------------------------- title


def _split_title(text: str) -> tuple[str, str | None, str]:
    """Return (context, heading_line_or_None, remaining_text).

    When the first line is a heading it becomes its own paragraph; otherwise the first
    sentence is the context and stays part of the text.
    """
    stripped = text.strip()
    first_line, _, rest = stripped.partition("\n")
    heading = _heading_title(first_line, rest)
    if heading:
        return heading, first_line.strip(), rest
    first_paragraph = _paragraphs(stripped)[0]
    return _paragraph_sentences(first_paragraph)[0], None, stripped


def _heading_title(first_line: str, rest: str) -> str:
    """The heading text if ``first_line`` looks like a title line, else ""."""
    line = first_line.strip()
    if not line or not rest.strip():
        return ""
    if len(line) > TITLE_MAX_CHARS or len(line.split()) > TITLE_MAX_WORDS:
        return ""
    if line[-1] in ".,;":
        return ""
    next_line = rest.lstrip(" \t")
    if next_line and not next_line.startswith("\n") and next_line[0].islower():
        return ""  # a hard-wrapped sentence continuing on the next line
    return line.lstrip("#").strip()


# ---------------------------------------------------------------- chunking


def chunk_text(
    text: str,
    count_tokens: TokenCounter,
    max_tokens: int,
    *,
    title_context: bool,
    overlap_sentences: int,
) -> list[Chunk]:
    """Split ``text`` into chunks of whole sentences, each at most ``max_tokens`` tokens.

    A sentence longer than the budget is split at word boundaries. With
    ``overlap_sentences`` > 0, each chunk repeats up to that many trailing sentences of
    the previous one (fewer when they would not leave room for new text).
    """
    if not text or not text.strip():
        raise SmfdError("empty document")
    if max_tokens < 1:
        raise SmfdError(f"max_tokens must be >= 1, got {max_tokens}")
    if overlap_sentences < 0:
        raise SmfdError(f"overlap_sentences must be >= 0, got {overlap_sentences}")
    context, heading, remaining = _split_title(text) if title_context else ("", None, text)
    body_budget = _body_budget(context, count_tokens, max_tokens)
    units = _units(heading, remaining, count_tokens, body_budget)
    spans = _pack(units, count_tokens, max_tokens, body_budget, overlap_sentences)
    return [_make_chunk(units, start, end, context, count_tokens, max_tokens) for start, end in spans]


def _body_budget(context: str, count_tokens: TokenCounter, max_tokens: int) -> int:
    """Tokens left for the body of a non-first chunk after reserving room for the title."""
    if not context:
        return max_tokens
    reserve = count_tokens(context + "\n")
    if reserve <= max_tokens // CONTEXT_MAX_SHARE:
        return max(max_tokens - reserve, 1)
    return max_tokens


def _units(heading: str | None, text: str, count_tokens: TokenCounter, budget: int) -> list[_Unit]:
    """Sentences tagged with their paragraph; over-long ones split so each fits ``budget``."""
    units: list[_Unit] = []
    paragraphs = ([heading] if heading else []) + _paragraphs(text)
    for index, paragraph in enumerate(paragraphs):
        sentences = [(paragraph, False)] if heading and index == 0 else _line_tagged_sentences(paragraph)
        for sentence, starts_line in sentences:
            for piece_index, piece in enumerate(_fit_sentence(sentence, count_tokens, budget)):
                units.append(_Unit(piece, index, starts_line and piece_index == 0))
    return units


def _fit_sentence(sentence: str, count_tokens: TokenCounter, budget: int) -> list[str]:
    """The sentence itself if it fits, else word-boundary pieces that each fit."""
    if count_tokens(sentence) <= budget:
        return [sentence]
    words: list[str] = []
    for word in sentence.split():
        words.extend(_split_word(word, count_tokens, budget))
    pieces: list[str] = []
    start = 0
    while start < len(words):
        end = _largest_fit(
            start + 1,
            min(len(words), start + budget),
            budget,
            count_tokens,
            lambda stop, start=start: " ".join(words[start:stop]),
        )
        pieces.append(" ".join(words[start:end]))
        start = end
    return pieces


def _split_word(word: str, count_tokens: TokenCounter, budget: int) -> list[str]:
    """A single word that alone exceeds the budget (a URL, a blob) is cut by characters."""
    if count_tokens(word) <= budget:
        return [word]
    pieces: list[str] = []
    start = 0
    while start < len(word):
        end = _largest_fit(start + 1, len(word), budget, count_tokens, lambda stop, start=start: word[start:stop])
        pieces.append(word[start:end])
        start = end
    return pieces


def _largest_fit(low: int, high: int, budget: int, count_tokens: TokenCounter, render: Callable[[int], str]) -> int:
    """Largest stop in [low, high] whose rendering fits ``budget``; ``low`` is assumed to fit.

    Galloping then binary search: token counts grow with appended text, so the cost is
    proportional to the piece found, not to ``high`` (a megabyte-long "word" stays linear).
    Whatever is returned has been measured (or is the one-item minimum), so the budget is
    never exceeded.
    """
    step = 1
    ceiling = high
    while low < ceiling:
        probe = min(low + step, ceiling)
        if count_tokens(render(probe)) <= budget:
            low = probe
            step *= 2
        else:
            ceiling = probe - 1
            break
    while low < ceiling:
        middle = (low + ceiling + 1) // 2
        if count_tokens(render(middle)) <= budget:
            low = middle
        else:
            ceiling = middle - 1
    return low


def _join(units: list[_Unit]) -> str:
    """Sentences of one paragraph joined by a space (a newline before list/heading lines),
    paragraphs by a blank line."""
    parts: list[str] = []
    for index, unit in enumerate(units):
        if index:
            parts.append(_separator(units[index - 1], unit))
        parts.append(unit.text)
    return "".join(parts)


def _separator(previous: _Unit, unit: _Unit) -> str:
    if unit.paragraph != previous.paragraph:
        return "\n\n"
    return "\n" if unit.starts_line else " "


def _pack(
    units: list[_Unit], count_tokens: TokenCounter, max_tokens: int, body_budget: int, overlap: int
) -> list[tuple[int, int]]:
    """Greedy (start, end) spans over ``units``; each span's joined text fits its budget."""
    spans: list[tuple[int, int]] = []
    start = 0
    while start < len(units):
        budget = max_tokens if start == 0 else body_budget
        minimum = spans[-1][1] + 1 if spans else start + 1
        end = _largest_fit(
            minimum,
            min(len(units), start + budget),
            budget,
            count_tokens,
            lambda stop, start=start: _join(units[start:stop]),
        )
        spans.append((start, end))
        if end >= len(units):
            break
        start = _next_start(units, start, end, overlap, count_tokens, body_budget)
    return spans


def _next_start(units: list[_Unit], start: int, end: int, overlap: int, count_tokens: TokenCounter, budget: int) -> int:
    """Where the next chunk starts: ``overlap`` units back, fewer if the next new unit would not fit."""
    candidate = max(end - overlap, start + 1)
    while candidate < end and count_tokens(_join(units[candidate : end + 1])) > budget:
        candidate += 1
    return candidate


def _make_chunk(
    units: list[_Unit], start: int, end: int, context: str, count_tokens: TokenCounter, max_tokens: int
) -> Chunk:
    body = _join(units[start:end])
    text = body
    if context and start > 0:
        with_context = f"{context}\n{body}"
        if count_tokens(with_context) <= max_tokens:
            text = with_context
    return Chunk(text=text, n_tokens=count_tokens(text), context=context, body=body)
