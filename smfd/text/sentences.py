"""Sentence splitting that keeps each sentence's own wording: abbreviations ("Dr.", "e.g."),
decimals ("3.5"), initials ("J. R. R. Tolkien"), list items and headings on their own lines."""

from __future__ import annotations

import re

ABBREVIATIONS = frozenset(
    {
        "mr",
        "mrs",
        "ms",
        "mx",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "mt",
        "ft",
        "rev",
        "hon",
        "gen",
        "col",
        "lt",
        "sgt",
        "capt",
        "cmdr",
        "adm",
        "gov",
        "sen",
        "rep",
        "pres",
        "supt",
        "messrs",
        "mme",
        "mlle",
        "vs",
        "v",
        "cf",
        "al",
        "approx",
        "ca",
        "viz",
        "fig",
        "figs",
        "eq",
        "eqs",
        "no",
        "nos",
        "vol",
        "vols",
        "pp",
        "ch",
        "chap",
        "sec",
        "art",
        "dept",
        "est",
        "ed",
        "eds",
        "op",
        "ibid",
        "incl",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "mon",
        "tue",
        "tues",
        "wed",
        "thu",
        "thur",
        "thurs",
        "fri",
        "sat",
        "sun",
        "ave",
        "blvd",
        "rd",
        "ln",
        "hwy",
        "dist",
        "univ",
        "assn",
        "bros",
    }
)

# Candidate sentence ends: terminal punctuation, optional closing quotes/brackets, whitespace.
_CANDIDATE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+")
# Full-width CJK terminators end a sentence without needing whitespace.
_CJK_END = re.compile(r"[\u3002\uff01\uff1f]+")
_WORD_BEFORE = re.compile(r"(\S+)$")
_LOOKBACK_CHARS = 64  # longer than any abbreviation or dotted initialism
_DOTTED_INITIALS = re.compile(r"^(?:[^\W\d_]\.)+[^\W\d_]$")  # e.g, i.e, U.S, p.m, Ph.D-like
_OPENERS = "\"'\u201c\u2018([\u00bf\u00a1"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
# Inside a paragraph, a line that starts a list item or heading starts a new sentence.
_BLOCK_LINE = re.compile(r"\n(?=[ \t]*(?:[-*+\u2022]\s|\d{1,3}[.)]\s|#{1,6}\s))")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences, paragraph by paragraph, keeping each sentence's own wording.

    Handles abbreviations ("Dr.", "e.g."), decimals ("3.5"), initials ("J. R. R. Tolkien")
    and list items / headings on their own lines.
    """
    sentences: list[str] = []
    for paragraph in _paragraphs(text):
        sentences.extend(_paragraph_sentences(paragraph))
    return sentences


def _paragraphs(text: str) -> list[str]:
    return [part.strip() for part in _PARAGRAPH_BREAK.split(text) if part.strip()]


def _paragraph_sentences(paragraph: str) -> list[str]:
    return [sentence for sentence, _ in _line_tagged_sentences(paragraph)]


def _line_tagged_sentences(paragraph: str) -> list[tuple[str, bool]]:
    """Sentences of one paragraph, each flagged True when it starts a list/heading line."""
    sentences: list[tuple[str, bool]] = []
    for block_index, block in enumerate(_BLOCK_LINE.split(paragraph)):
        start = 0
        for end in [*_sentence_ends(block), len(block)]:
            piece = block[start:end].strip()
            if piece:
                sentences.append((piece, block_index > 0 and start == 0))
            start = end
    return sentences


def _sentence_ends(block: str) -> list[int]:
    """Offsets where a sentence ends in ``block`` (after its punctuation and whitespace)."""
    ends = [match.end() for match in _CANDIDATE_END.finditer(block) if _is_boundary(block, match)]
    ends.extend(match.end() for match in _CJK_END.finditer(block))
    return sorted(set(ends))


def _is_boundary(block: str, match: re.Match[str]) -> bool:
    """A candidate ends a sentence unless the next word is not a sentence start or the
    word before the period is an abbreviation or an initial."""
    if not _starts_sentence(block, match.end()):
        return False
    punctuation = match.group(0).rstrip().rstrip("\"'\u201d\u2019)]")
    if punctuation != ".":
        return True  # "!", "?", "...", "?!" end sentences when a capital follows
    # Look back a bounded window only: scanning from the block start would be quadratic.
    window = block[max(0, match.start() - _LOOKBACK_CHARS) : match.start()]
    before = _WORD_BEFORE.search(window)
    word = before.group(1).lstrip(_OPENERS) if before else ""
    return not _is_abbreviation(word)


def _starts_sentence(block: str, index: int) -> bool:
    """True when ``block[index:]`` begins like a sentence: a capital or digit, maybe after an opener."""
    while index < len(block) and block[index] in _OPENERS:
        index += 1
    if index >= len(block):
        return False
    first = block[index]
    return first.isupper() or first.isdigit() or (first.isalpha() and not first.islower())


def _is_abbreviation(word: str) -> bool:
    if not word:
        return False
    if word.lower() in ABBREVIATIONS:
        return True
    if len(word) == 1 and word.isupper():
        return True  # an initial: "J. Smith"
    return bool(_DOTTED_INITIALS.match(word))
