"""Restatement: extra training texts derived from a chunk before it is learned.

Memorising a chunk as one long sequence ties each fact to the exact text that precedes it,
so a question that starts cold does not reach it. Restating makes facts reachable from more
contexts. The restatement used here is cheap and cannot invent facts: every sentence of the
chunk also becomes its own training sequence, starting without the text before it (the way
a probe or a user prompt starts). Paraphrases written by the small frozen model were tried
and rejected: it rewrites dates and names (see the README's measurements).
"""

from __future__ import annotations

from smfd.text.sentences import split_sentences

MIN_SENTENCE_CHARS = 20


def sentence_restatements(text: str) -> list[str]:
    """Each sentence of `text` long enough to carry a fact, as its own training text."""
    sentences = [s.strip() for s in split_sentences(text)]
    if len(sentences) < 2:
        return []
    return [s for s in sentences if len(s) >= MIN_SENTENCE_CHARS]


def training_texts(chunks: list[str], restate: bool) -> list[str]:
    """The texts an update trains on: the chunks, plus their sentence restatements when enabled."""
    texts = list(chunks)
    if restate:
        for chunk in chunks:
            texts.extend(sentence_restatements(chunk))
    return texts
