"""Chunker: budgets are hard limits, no text is lost, sentences stay whole."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smfd.errors import SmfdError
from smfd.text.chunker import Chunk, chunk_text
from smfd.text.sentences import split_sentences


def count_words(text: str) -> int:
    """Whitespace token counter: one token per word."""
    return len(text.split())


def body_words(chunks: list[Chunk]) -> list[str]:
    return [word for chunk in chunks for word in chunk.body.split()]


ARTICLE = (
    "The Harbour Bridge\n\n"
    "Dr. Alice Smith designed the bridge in 1932. It spans 3.5 kilometres across the bay. "
    "Engineers, e.g. J. R. Brown, tested it for years. Was it safe? Yes, it was.\n\n"
    "Traffic grew quickly after the opening. Tolls paid for the upkeep by 1950."
)

WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789.,!?'\"()-", min_size=1, max_size=12)
SEPARATOR = st.sampled_from([" ", " ", " ", "\n", "\n\n", ". ", "? ", "\n- ", " Dr. ", " e.g. "])


@st.composite
def documents(draw: st.DrawFn) -> str:
    words = draw(st.lists(WORD, min_size=1, max_size=120))
    parts = [words[0]]
    for word in words[1:]:
        parts.append(draw(SEPARATOR))
        parts.append(word)
    return "".join(parts)


@settings(max_examples=150, deadline=None)
@given(
    text=documents(),
    max_tokens=st.integers(min_value=1, max_value=40),
    title_context=st.booleans(),
    overlap=st.integers(min_value=0, max_value=3),
)
def test_chunks_never_exceed_budget(text: str, max_tokens: int, title_context: bool, overlap: int) -> None:
    chunks = chunk_text(text, count_words, max_tokens, title_context=title_context, overlap_sentences=overlap)
    assert chunks
    for chunk in chunks:
        assert chunk.n_tokens == count_words(chunk.text)
        assert 0 < chunk.n_tokens <= max_tokens


@settings(max_examples=150, deadline=None)
@given(text=documents(), max_tokens=st.integers(min_value=1, max_value=40), title_context=st.booleans())
def test_no_word_lost_or_reordered(text: str, max_tokens: int, title_context: bool) -> None:
    chunks = chunk_text(text, count_words, max_tokens, title_context=title_context, overlap_sentences=0)
    assert body_words(chunks) == text.split()


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(min_size=1, max_size=300).filter(lambda text: text.strip()),
    max_tokens=st.integers(min_value=1, max_value=20),
)
def test_arbitrary_unicode_keeps_every_character(text: str, max_tokens: int) -> None:
    chunks = chunk_text(text, count_words, max_tokens, title_context=True, overlap_sentences=0)
    assert all(chunk.n_tokens <= max_tokens for chunk in chunks)
    assert "".join(body_words(chunks)) == "".join(text.split())


def test_character_budget_splits_an_overlong_word() -> None:
    """A tokenizer can count one huge word (a URL, a blob) as many tokens: it is still cut to fit."""
    blob = "x" * 95
    chunks = chunk_text(f"Intro sentence here. {blob} ends.", len, 20, title_context=False, overlap_sentences=0)
    assert all(chunk.n_tokens <= 20 for chunk in chunks)
    assert "".join("".join(chunk.body.split()) for chunk in chunks) == f"Introsentencehere.{blob}ends."


def test_sentences_stay_whole_when_they_fit() -> None:
    sentences = split_sentences(ARTICLE)
    chunks = chunk_text(ARTICLE, count_words, 14, title_context=False, overlap_sentences=0)
    chunk_sentences = [sentence for chunk in chunks for sentence in split_sentences(chunk.body)]
    assert chunk_sentences == sentences
    assert all(chunk.n_tokens <= 14 for chunk in chunks)


def test_greedy_packing_fills_chunks() -> None:
    text = "One two three. Four five six. Seven eight nine. Ten eleven twelve."
    chunks = chunk_text(text, count_words, 7, title_context=False, overlap_sentences=0)
    assert [chunk.text for chunk in chunks] == [
        "One two three. Four five six.",
        "Seven eight nine. Ten eleven twelve.",
    ]


def test_abbreviations_decimals_and_initials_do_not_split() -> None:
    text = (
        "Dr. Smith met Mrs. Jones at 3.5 p.m. on Jan. 5. "
        "They discussed e.g. budgets and i.e. costs. J. R. R. Tolkien wrote it. "
        "Was it late? It was! The U.S. Navy agreed."
    )
    assert split_sentences(text) == [
        "Dr. Smith met Mrs. Jones at 3.5 p.m. on Jan. 5.",
        "They discussed e.g. budgets and i.e. costs.",
        "J. R. R. Tolkien wrote it.",
        "Was it late?",
        "It was!",
        "The U.S. Navy agreed.",
    ]


def test_sentence_split_keeps_quotes_and_paragraphs() -> None:
    text = 'He said "Stop." Then he left.\n\nA new paragraph starts here.\n- a list item\n- another'
    assert split_sentences(text) == [
        'He said "Stop."',
        "Then he left.",
        "A new paragraph starts here.",
        "- a list item",
        "- another",
    ]


def test_overlong_sentence_is_split_at_word_boundaries() -> None:
    words = [f"w{index}" for index in range(25)]
    text = " ".join(words) + "."
    chunks = chunk_text(text, count_words, 10, title_context=False, overlap_sentences=0)
    assert [chunk.n_tokens for chunk in chunks] == [10, 10, 5]
    assert body_words(chunks) == text.split()


def test_paragraphs_are_kept_inside_a_chunk() -> None:
    chunks = chunk_text(
        "First para here.\n\nSecond para here.", count_words, 50, title_context=False, overlap_sentences=0
    )
    assert [chunk.text for chunk in chunks] == ["First para here.\n\nSecond para here."]


def test_heading_title_is_context_for_later_chunks() -> None:
    chunks = chunk_text(ARTICLE, count_words, 14, title_context=True, overlap_sentences=0)
    assert all(chunk.context == "The Harbour Bridge" for chunk in chunks)
    assert chunks[0].text.startswith("The Harbour Bridge\n\nDr. Alice Smith")
    for chunk in chunks[1:]:
        assert chunk.text == f"The Harbour Bridge\n{chunk.body}"
        assert chunk.n_tokens <= 14
    assert body_words(chunks) == ARTICLE.split()


def test_first_sentence_is_context_when_there_is_no_heading_line() -> None:
    text = "Bees make honey. They live in hives. Hives hold many bees."
    chunks = chunk_text(text, count_words, 7, title_context=True, overlap_sentences=0)
    assert all(chunk.context == "Bees make honey." for chunk in chunks)
    assert chunks[0].text == chunks[0].body  # already starts with the title
    assert chunks[1].text == "Bees make honey.\nHives hold many bees."


def test_context_is_left_out_when_it_would_not_fit() -> None:
    long_title = "A very long and wordy title line that keeps going on"
    text = f"{long_title}\n\nShort one here. Another short one. And a third one here."
    chunks = chunk_text(text, count_words, 12, title_context=True, overlap_sentences=0)
    assert len(chunks) >= 2
    for chunk in chunks:
        assert chunk.context == long_title
        assert chunk.n_tokens <= 12
    assert any(chunk.text == chunk.body for chunk in chunks[1:])


def test_wrapped_first_line_is_not_taken_as_a_heading() -> None:
    text = "The quick brown fox jumped over\nthe lazy dog. It ran away."
    chunks = chunk_text(text, count_words, 100, title_context=True, overlap_sentences=0)
    assert chunks[0].context == "The quick brown fox jumped over\nthe lazy dog."


def test_title_context_off_gives_plain_bodies() -> None:
    chunks = chunk_text(ARTICLE, count_words, 14, title_context=False, overlap_sentences=0)
    assert all(chunk.context == "" and chunk.text == chunk.body for chunk in chunks)


def test_overlap_repeats_trailing_sentences() -> None:
    text = "One is red. Two is blue. Three is green. Four is pink."
    chunks = chunk_text(text, count_words, 7, title_context=False, overlap_sentences=1)
    assert [chunk.text for chunk in chunks] == [
        "One is red. Two is blue.",
        "Two is blue. Three is green.",
        "Three is green. Four is pink.",
    ]


def test_overlap_shrinks_when_it_would_leave_no_room() -> None:
    text = "One is red. Two is blue. Three is green."
    chunks = chunk_text(text, count_words, 3, title_context=False, overlap_sentences=2)
    assert [chunk.text for chunk in chunks] == ["One is red.", "Two is blue.", "Three is green."]


@pytest.mark.parametrize("text", ["", "   \n\t  "])
def test_empty_document_is_an_error(text: str) -> None:
    with pytest.raises(SmfdError, match="empty document"):
        chunk_text(text, count_words, 10, title_context=True, overlap_sentences=0)


def test_bad_budget_is_an_error_naming_it() -> None:
    with pytest.raises(SmfdError, match="max_tokens"):
        chunk_text("Some text.", count_words, 0, title_context=True, overlap_sentences=0)
