"""Turn the bytes of an incoming file into the plain text smfd learns from.

Policy (chosen so that the model never learns from mangled input):

* Text must be UTF-8. Invalid UTF-8 is rejected ("invalid UTF-8 at byte N") rather
  than repaired with replacement characters: a mis-encoded file would otherwise
  teach the model mojibake. Re-encode the file and drop it again.
* Binary content (any NUL byte, or more than 10% control characters) is rejected.
* Empty or whitespace-only text is rejected.
* ``.txt``/``.text``/``.md``/``.markdown``: the decoded text as is.
* ``.html``/``.htm``: reduced with the standard library's html.parser; script, style
  and other non-content elements are dropped, block elements become paragraph
  breaks, and the ``<title>`` is kept as the first line.
* ``.jsonl``: one JSON object per line; the configured field of every line is
  taken and the records are joined, separated by a blank line, into ONE document
  (one file = one journal row = one quarantine decision). A line that is not a
  JSON object, or lacks the field as a string, rejects the whole file naming the line.
* Any other suffix is rejected ("unsupported file type .xyz").

Every accepted text is normalised (NFC, LF line ends, no BOM, no surrounding
whitespace) and hashed on that normalised form, so the same content arriving with
different line endings is recognised as a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from smfd.errors import SmfdError

TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown"})
HTML_SUFFIXES = frozenset({".html", ".htm"})
JSONL_SUFFIXES = frozenset({".jsonl"})
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | JSONL_SUFFIXES

MAX_CONTROL_RATIO = 0.10
# Control characters that ordinary text does not contain. Allowed: tab, LF, VT, FF, CR, and ESC
# (ANSI colours in logs). Counted with bytes.translate / a regex: files can be megabytes.
_BINARY_CONTROL_BYTES = bytes(b for b in range(0x20) if b not in b"\t\n\x0b\x0c\r\x1b") + b"\x7f"
_BINARY_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f]")


class RejectedInput(SmfdError):
    """Input that smfd will not learn from.

    ``reason`` is short human text ("invalid UTF-8 at byte 12"); ``code`` is a bounded
    machine name ("invalid_utf8") fit for a metrics label.
    """

    def __init__(self, reason: str, code: str):
        super().__init__(reason)
        self.reason = reason
        self.code = code


def normalize_text(text: str) -> str:
    """The canonical form that is spooled and hashed."""
    text = text.removeprefix("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).strip()


def content_hash(normalized_text: str) -> str:
    """SHA-256 hex digest of the normalised text (the journal key)."""
    return hashlib.sha256(normalized_text.encode("utf-8")).hexdigest()


def check_binary(data: bytes) -> None:
    """Reject bytes that are clearly not text."""
    if b"\x00" in data:
        raise RejectedInput("binary content", "binary")
    if not data:
        return
    controls = len(data) - len(data.translate(None, _BINARY_CONTROL_BYTES))
    if controls / len(data) > MAX_CONTROL_RATIO:
        raise RejectedInput("binary content", "binary")


def decode_utf8(data: bytes) -> str:
    """Strict UTF-8 decode; the reason names the first bad byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RejectedInput(f"invalid UTF-8 at byte {exc.start}", "invalid_utf8") from exc


def check_text(text: str) -> str:
    """Normalise already-decoded text (e.g. a feed entry) and reject empty or binary-looking text."""
    if "\x00" in text:
        raise RejectedInput("binary content", "binary")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RejectedInput(f"invalid Unicode at character {exc.start}", "invalid_utf8") from exc
    normalized = normalize_text(text)
    if not normalized:
        raise RejectedInput("empty", "empty")
    controls = len(_BINARY_CONTROL_CHARS.findall(normalized))
    if controls / len(normalized) > MAX_CONTROL_RATIO:
        raise RejectedInput("binary content", "binary")
    return normalized


def extract_text(data: bytes | Path, name: str, jsonl_field: str = "text") -> str:
    """Return the normalised text of a file named ``name`` or raise RejectedInput.

    ``data`` is the file's bytes (or a path to read them from); ``name`` only supplies the suffix.
    """
    raw = data.read_bytes() if isinstance(data, Path) else data
    suffix = Path(name).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        label = suffix if suffix else "(no suffix)"
        raise RejectedInput(f"unsupported file type {label}", "unsupported_type")
    check_binary(raw)
    text = decode_utf8(raw).removeprefix("\ufeff")
    if suffix in HTML_SUFFIXES:
        text = html_to_text(text)
    elif suffix in JSONL_SUFFIXES:
        text = jsonl_to_text(text, jsonl_field)
    return check_text(text)


def jsonl_objects(text: str, code: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; RejectedInput(code) names the first bad line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RejectedInput(f"invalid JSON on line {number}: {exc.msg}", code) from exc
        if not isinstance(obj, dict):
            raise RejectedInput(f"line {number} is not a JSON object", code)
        yield number, obj


def jsonl_to_text(text: str, field: str) -> str:
    """Join the ``field`` of every JSON-object line with blank lines; blank lines are skipped."""
    records = []
    for number, obj in jsonl_objects(text, "bad_jsonl"):
        value = obj.get(field)
        if not isinstance(value, str):
            problem = "has no" if value is None else "has a non-string"
            raise RejectedInput(f"line {number} {problem} field {field!r}", "bad_jsonl")
        if value.strip():
            records.append(normalize_text(value))
    return "\n\n".join(records)


_SKIPPED_ELEMENTS = frozenset({"script", "style", "noscript", "template", "svg", "iframe", "object"})
_BLOCK_ELEMENTS = frozenset(
    {
        "p",
        "div",
        "br",
        "li",
        "ul",
        "ol",
        "dl",
        "dt",
        "dd",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "tr",
        "table",
        "section",
        "article",
        "aside",
        "header",
        "footer",
        "nav",
        "main",
        "blockquote",
        "pre",
        "hr",
        "figure",
        "figcaption",
        "form",
        "details",
        "summary",
        "address",
    }
)
_VOID_ELEMENTS = frozenset(
    {
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "track",
        "wbr",
    }
)
_SPACES = re.compile(r"[ \t\r\n\f\v]+")


class _TextExtractor(HTMLParser):
    """Collects visible text as paragraphs; the <title> separately."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title_parts: list[str] = []
        self.paragraphs: list[str] = []
        self._current: list[str] = []
        self._skip_depth = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _SKIPPED_ELEMENTS and tag not in _VOID_ELEMENTS:
            self._skip_depth += 1
        elif tag in _BLOCK_ELEMENTS:
            self._break()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_ELEMENTS:
            self._break()

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in _SKIPPED_ELEMENTS:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in _BLOCK_ELEMENTS:
            self._break()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
        elif self._skip_depth == 0:
            self._current.append(data)

    def _break(self) -> None:
        paragraph = _SPACES.sub(" ", "".join(self._current)).strip()
        if paragraph:
            self.paragraphs.append(paragraph)
        self._current = []

    def text(self) -> str:
        self._break()
        title = _SPACES.sub(" ", "".join(self.title_parts)).strip()
        parts = ([title] if title else []) + self.paragraphs
        return "\n\n".join(parts)


def html_to_text(html: str) -> str:
    """Visible text of an HTML document, title first, paragraphs separated by blank lines."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()
