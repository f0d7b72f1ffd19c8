"""Intake turns found files and feed entries into spooled, journaled documents, and
puts everything it refuses into quarantine with a reason a user can read."""

import json
import os
from pathlib import Path

import pytest

from smfd.ingest.extract import RejectedInput, content_hash, extract_text, normalize_text
from smfd.ingest.intake import Intake
from smfd.ingest.journal import Journal
from smfd.ingest.sidecars import read_items, spooled_sidecar

MAX_BYTES = 1000


@pytest.fixture
def inbox(tmp_path):
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def intake(tmp_path):
    journal = Journal(tmp_path / "state" / "journal.db")
    yield Intake(
        journal,
        tmp_path / "state" / "spool",
        tmp_path / "state" / "quarantine",
        max_file_bytes=MAX_BYTES,
        jsonl_field="body",
    )
    journal.close()


def test_file_is_spooled_journaled_and_removed_from_the_inbox(intake, inbox):
    source = inbox / "note.txt"
    source.write_bytes(b"\xef\xbb\xbfHello\r\nworld\r\n")

    result = intake.claim_file(source, "watch", inbox, move=True)

    assert result.outcome == "queued"
    row = intake.journal.get_document(result.doc_id)
    assert (row.state, row.name, row.source) == ("queued", "note.txt", "watch")
    assert Path(row.spool_path).read_text(encoding="utf-8") == "Hello\nworld"
    assert row.content_hash == content_hash("Hello\nworld")
    assert not source.exists()


def test_duplicate_content_under_a_new_name_is_recorded_as_duplicate(intake, inbox):
    (inbox / "a.txt").write_text("same words\n")
    first = intake.claim_file(inbox / "a.txt", "watch", inbox, move=True)
    (inbox / "sub").mkdir()
    (inbox / "sub" / "b.md").write_bytes(b"same words\r\n")  # other name, other line ends

    second = intake.claim_file(inbox / "sub" / "b.md", "watch", inbox, move=True)

    assert (first.outcome, second.outcome) == ("queued", "duplicate")
    assert intake.journal.get_document(second.doc_id).duplicate_of == first.doc_id
    assert intake.journal.get_document(second.doc_id).name == "sub/b.md"
    counts = intake.journal.counts()
    assert (counts["queued"], counts["duplicate"]) == (1, 1)
    assert not (inbox / "sub" / "b.md").exists()


@pytest.mark.parametrize(
    ("filename", "content", "reason"),
    [
        ("empty.txt", b"", "empty"),
        ("blank.md", b"  \n\t\r\n ", "empty"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary content"),
        ("terminal.txt", bytes(range(1, 32)) * 4, "binary content"),
        ("latin1.txt", "caf\u00e9 au lait".encode("latin-1"), "invalid UTF-8 at byte 3"),
        ("huge.txt", b"x" * (MAX_BYTES + 1), f"file too large ({MAX_BYTES + 1} bytes > limit {MAX_BYTES})"),
        ("report.pdf", b"%PDF-1.7 text-ish", "unsupported file type .pdf"),
        ("README", b"no suffix", "unsupported file type (no suffix)"),
    ],
)
def test_rejected_files_are_quarantined_with_a_reason_file(intake, inbox, filename, content, reason):
    source = inbox / filename
    source.write_bytes(content)

    result = intake.claim_file(source, "watch", inbox, move=True)

    assert (result.outcome, result.reason) == ("quarantined", reason)
    moved = intake.quarantine_dir / filename
    assert moved.read_bytes() == content and not source.exists()
    reason_text = Path(f"{moved}.reason").read_text(encoding="utf-8")
    assert f"reason: {reason}\n" in reason_text and str(source) in reason_text
    row = intake.journal.get_document(result.doc_id)
    assert (row.state, row.reason) == ("quarantined", reason)


def test_quarantine_never_overwrites_an_earlier_rejected_file(intake, inbox):
    for content in (b"", b"   "):
        (inbox / "x.txt").write_bytes(content)
        intake.claim_file(inbox / "x.txt", "watch", inbox, move=True)
    names = sorted(p.name for p in intake.quarantine_dir.iterdir())
    assert names == ["x.1.txt", "x.1.txt.reason", "x.txt", "x.txt.reason"]
    assert (intake.quarantine_dir / "x.1.txt").read_bytes() == b"   "


def test_symlink_pointing_outside_the_root_is_not_followed(intake, inbox, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not learn me")
    before = os.stat(secret)
    (inbox / "link.txt").symlink_to(secret)

    result = intake.claim_file(inbox / "link.txt", "watch", inbox, move=True)

    assert (result.outcome, result.code) == ("quarantined", "outside_root")
    assert secret.read_text() == "do not learn me"
    assert os.stat(secret).st_ino == before.st_ino and os.stat(secret).st_mtime_ns == before.st_mtime_ns
    quarantined = intake.quarantine_dir / "link.txt"
    assert quarantined.is_symlink()  # the link itself was moved aside, its target never copied
    assert Path(f"{quarantined}.reason").exists()
    assert list(intake.spool_dir.iterdir()) == []
    assert intake.journal.live_document(content_hash("do not learn me")) is None


def test_symlink_inside_the_root_is_read(intake, inbox):
    (inbox / "real.txt").write_text("inside words")
    (inbox / "alias.txt").symlink_to(inbox / "real.txt")
    result = intake.claim_file(inbox / "alias.txt", "watch", inbox, move=True)
    assert result.outcome == "queued"
    assert (inbox / "real.txt").exists() and not (inbox / "alias.txt").is_symlink()


def test_fifo_is_quarantined_without_hanging(intake, inbox):
    os.mkfifo(inbox / "pipe.txt")
    result = intake.claim_file(inbox / "pipe.txt", "watch", inbox, move=True)
    assert (result.outcome, result.reason) == ("quarantined", "not a regular file")


def test_vanished_file_is_reported_and_nothing_is_journaled(intake, inbox):
    result = intake.claim_file(inbox / "gone.txt", "watch", inbox, move=True)
    assert (result.outcome, result.doc_id) == ("vanished", None)
    assert sum(intake.journal.counts().values()) == 0
    assert list(intake.quarantine_dir.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file_is_quarantined(intake, inbox):
    source = inbox / "locked.txt"
    source.write_text("private")
    source.chmod(0)
    result = intake.claim_file(source, "watch", inbox, move=True)
    assert (result.outcome, result.code) == ("quarantined", "unreadable")


def test_html_is_reduced_to_text_with_title_first(intake, inbox):
    source = inbox / "page.html"
    source.write_text(
        "<html><head><title>Tide  tables</title><style>p {color: red}</style>"
        "<script>var leaked = 1;</script></head>"
        "<body><h1>High water</h1><p>At 6&nbsp;am &amp; 6 pm.</p><div>Low <b>water</b><br>at noon.</div>"
        "<noscript>enable js</noscript></body></html>",
        encoding="utf-8",
    )
    result = intake.claim_file(source, "watch", inbox, move=True)
    text = Path(intake.journal.get_document(result.doc_id).spool_path).read_text(encoding="utf-8")
    assert text == "Tide tables\n\nHigh water\n\nAt 6\u00a0am & 6 pm.\n\nLow water\n\nat noon."


def test_jsonl_takes_the_configured_field_of_every_line_as_one_document(intake, inbox):
    source = inbox / "posts.jsonl"
    lines = [{"body": "first post", "id": 1}, {"body": "second post", "id": 2}]
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    result = intake.claim_file(source, "watch", inbox, move=True)
    text = Path(intake.journal.get_document(result.doc_id).spool_path).read_text(encoding="utf-8")
    assert text == "first post\n\nsecond post"


def test_jsonl_field_can_be_chosen_per_folder(intake, inbox):
    (inbox / "other.jsonl").write_text('{"text": "per-folder field"}\n', encoding="utf-8")
    result = intake.claim_file(inbox / "other.jsonl", "watch", inbox, move=True, jsonl_field="text")
    assert result.outcome == "queued"
    assert Path(intake.journal.get_document(result.doc_id).spool_path).read_text() == "per-folder field"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"body": "ok"}\n{"body": broken}\n', "invalid JSON on line 2"),
        ('{"body": "ok"}\n["a", "list"]\n', "line 2 is not a JSON object"),
        ('{"text": "wrong field"}\n', "line 1 has no field 'body'"),
        ('{"body": 42}\n', "line 1 has a non-string field 'body'"),
    ],
)
def test_bad_jsonl_is_quarantined_naming_the_line(intake, inbox, content, reason):
    (inbox / "bad.jsonl").write_text(content, encoding="utf-8")
    result = intake.claim_file(inbox / "bad.jsonl", "watch", inbox, move=True)
    assert result.outcome == "quarantined" and result.reason.startswith(reason)


def test_read_only_inbox_keeps_the_file_and_remembers_it(intake, inbox):
    source = inbox / "keep.txt"
    source.write_text("keep me")
    result = intake.claim_file(source, "watch", inbox, move=False)
    info = os.stat(source)
    assert result.outcome == "queued" and source.read_text() == "keep me"
    assert intake.journal.is_seen_file(source, info.st_size, info.st_mtime_ns)

    (inbox / "bad.bin").write_bytes(b"\x00\x01")
    rejected = intake.claim_file(inbox / "bad.bin", "watch", inbox, move=False)
    assert rejected.outcome == "quarantined" and (inbox / "bad.bin").exists()
    assert (intake.quarantine_dir / "bad.bin.reason").exists()


def test_feed_entries_share_the_spool_and_duplicate_detection(intake, inbox):
    first = intake.submit_text("Breaking: tide is high.\n", "Tide report", source="feed")
    (inbox / "copy.txt").write_text("Breaking: tide is high.")
    again = intake.claim_file(inbox / "copy.txt", "watch", inbox, move=True)
    empty = intake.submit_text("   ", "Empty entry", source="feed")

    assert (first.outcome, again.outcome, empty.outcome) == ("queued", "duplicate", "quarantined")
    assert empty.reason == "empty"
    row = intake.journal.get_document(first.doc_id)
    assert (row.source, row.name) == ("feed", "Tide report")
    assert Path(row.spool_path).read_text(encoding="utf-8") == "Breaking: tide is high."


def test_document_failing_every_attempt_moves_to_quarantine(intake):
    result = intake.submit_text("poison text", "entry", source="feed")
    spooled = Path(intake.journal.get_document(result.doc_id).spool_path)
    assert intake.fail_document(result.doc_id, "chunker crashed", max_attempts=2) == "queued"
    assert spooled.exists()
    assert intake.fail_document(result.doc_id, "chunker crashed", max_attempts=2) == "failed"

    row = intake.journal.get_document(result.doc_id)
    assert not spooled.exists() and Path(row.spool_path).parent == intake.quarantine_dir
    assert "reason: chunker crashed" in Path(f"{row.spool_path}.reason").read_text()


def test_extract_rejections_carry_reason_and_code():
    with pytest.raises(RejectedInput) as caught:
        extract_text(b"ok\xff\xfe", "x.txt")
    assert (caught.value.reason, caught.value.code) == ("invalid UTF-8 at byte 2", "invalid_utf8")
    assert normalize_text("\ufeffa\r\nb\rc  ") == "a\nb\nc"


def test_sidecar_probes_are_spooled_with_their_document_and_removed(intake, inbox):
    (inbox / "harbour.qa.jsonl").write_text(
        '{"prompt": "The bridge opened in", "target": "1911"}\n'
        '{"prompt": "The bridge\'s opening year was", "target": "1911", "kind": "reworded"}\n'
    )
    (inbox / "harbour.txt").write_text("The harbour bridge opened in 1911.")

    result = intake.claim_file(inbox / "harbour.txt", "watch", inbox, move=True)

    assert result.outcome == "queued"
    spool = Path(intake.journal.get_document(result.doc_id).spool_path)
    assert read_items(spooled_sidecar(spool)) == [
        {"prompt": "The bridge opened in", "target": "1911", "kind": "sidecar"},
        {"prompt": "The bridge's opening year was", "target": "1911", "kind": "reworded"},
    ]
    assert list(inbox.iterdir()) == []


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"prompt": "The bridge opened in"}\n', "line 1: 'target' must be a non-empty string"),
        ('{"prompt": "a", "target": "b"}\nnot json\n', "invalid JSON on line 2"),
        ("\n\n", "empty"),
        ('{"prompt": "a", "target": "b", "kind": "Re worded!"}\n', "line 1: 'kind' must be 1-32 characters"),
    ],
)
def test_bad_sidecar_is_quarantined_and_the_document_still_queued(intake, inbox, content, reason):
    (inbox / "harbour.qa.jsonl").write_text(content)
    (inbox / "harbour.txt").write_text("The harbour bridge opened in 1911.")

    result = intake.claim_file(inbox / "harbour.txt", "watch", inbox, move=True)

    assert result.outcome == "queued"
    assert not spooled_sidecar(Path(intake.journal.get_document(result.doc_id).spool_path)).exists()
    reason_file = intake.quarantine_dir / "harbour.qa.jsonl.reason"
    assert reason in reason_file.read_text()
    assert list(inbox.iterdir()) == []


def test_sidecar_symlink_out_of_the_folder_is_not_read(intake, inbox, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"prompt": "secret", "target": "value"}\n')
    (inbox / "harbour.qa.jsonl").symlink_to(outside)
    (inbox / "harbour.txt").write_text("The harbour bridge opened in 1911.")

    result = intake.claim_file(inbox / "harbour.txt", "watch", inbox, move=True)

    assert not spooled_sidecar(Path(intake.journal.get_document(result.doc_id).spool_path)).exists()
    assert "outside the watch folder" in (intake.quarantine_dir / "harbour.qa.jsonl.reason").read_text()
    assert outside.read_text() == '{"prompt": "secret", "target": "value"}\n'


class Killed(BaseException):
    """The process dies here (nothing after it runs)."""


def test_a_file_whose_intake_was_cut_short_by_a_crash_is_not_journaled_twice(intake, inbox, monkeypatch):
    source = inbox / "note.txt"
    source.write_text("The ferry leaves at dawn.")
    with monkeypatch.context() as patched:
        patched.setattr(intake, "_remove_source", lambda path: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):  # journaled and spooled, killed before the inbox file was removed
            intake.claim_file(source, "watch", inbox, move=True)

    again = intake.claim_file(source, "watch", inbox, move=True)  # the restarted daemon finds it

    assert again.outcome == "taken_before" and not source.exists()
    assert intake.journal.counts()["queued"] == 1 and intake.journal.counts()["duplicate"] == 0


def test_a_file_that_grows_while_it_is_taken_stays_for_its_next_version(intake, inbox, monkeypatch):
    source = inbox / "log.txt"
    source.write_text("First line of the log.")
    journal_text = intake._journal_text

    def writer_appends_meanwhile(*args, **kwargs):
        result = journal_text(*args, **kwargs)
        with open(source, "a") as handle:
            handle.write(" Second line, written late.")
        return result

    monkeypatch.setattr(intake, "_journal_text", writer_appends_meanwhile)
    first = intake.claim_file(source, "watch", inbox, move=True)
    monkeypatch.undo()

    assert first.outcome == "queued" and source.exists(), "the appended text is not lost with the file"
    second = intake.claim_file(source, "watch", inbox, move=True)
    assert second.outcome == "queued" and second.doc_id != first.doc_id and not source.exists()
    assert "Second line" in Path(intake.journal.get_document(second.doc_id).spool_path).read_text()
