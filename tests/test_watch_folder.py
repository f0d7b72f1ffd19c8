"""The watch folder takes every file dropped into it exactly once, and only once it is
completely written; it never reaches outside the folder."""

import os
import time
from pathlib import Path

import pytest
from watchdog.events import FileCreatedEvent

from smfd.ingest.intake import Intake
from smfd.ingest.journal import Journal
from smfd.ingest.watch_folder import WatchFolderSource, _HintHandler, glob_match

SETTLE = 0.2


@pytest.fixture
def inbox(tmp_path):
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def intake(tmp_path):
    journal = Journal(tmp_path / "state" / "journal.db")
    yield Intake(journal, tmp_path / "state" / "spool", tmp_path / "state" / "quarantine", max_file_bytes=10_000)
    journal.close()


@pytest.fixture
def make_source(inbox, intake):
    started = []

    def make(**options):
        settings = {"settle_seconds": SETTLE, "rescan_seconds": 3600.0, **options}
        source = WatchFolderSource(inbox, intake, **settings)
        started.append(source)
        return source

    yield make
    for source in started:
        source.stop()


def poll_until(source, count, timeout=8.0):
    """Poll like the daemon does until `count` results arrived (or the timeout)."""
    results = []
    deadline = time.monotonic() + timeout
    while len(results) < count and time.monotonic() < deadline:
        results += source.poll()
        time.sleep(0.05)
    return results


def age(path: Path, seconds: float = 60.0) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_file_still_being_written_is_not_taken_until_stable(make_source, inbox, intake):
    source = make_source()
    growing = inbox / "growing.txt"
    growing.write_text("part one")
    deadline = time.monotonic() + 3 * SETTLE
    while time.monotonic() < deadline:  # keep writing for longer than the settle window
        assert source.poll() == []
        with growing.open("a") as handle:
            handle.write(" more")
        time.sleep(SETTLE / 4)
    results = poll_until(source, 1)
    assert [r.outcome for r in results] == ["queued"]
    spooled = Path(intake.journal.get_document(results[0].doc_id).spool_path).read_text()
    assert spooled.startswith("part one more") and spooled.endswith(" more")


@pytest.mark.parametrize("polling", [False, True], ids=["native", "polling"])
def test_running_observer_picks_up_a_newly_dropped_file(make_source, inbox, intake, polling):
    source = make_source(polling=polling)
    source.start()
    assert source.using_polling is polling
    assert source.rescans_total == 1  # the startup scan; rescan_seconds is an hour

    (inbox / "new.txt").write_text("fresh from the observer")
    results = poll_until(source, 1)

    assert [r.outcome for r in results] == ["queued"]
    assert source.events_total > 0 and source.rescans_total == 1
    assert not (inbox / "new.txt").exists()


def test_two_hundred_files_dropped_at_once_are_all_journaled(make_source, inbox, intake):
    source = make_source()
    source.start()
    for index in range(200):
        (inbox / f"doc-{index:03d}.txt").write_text(f"document number {index}")

    results = poll_until(source, 200, timeout=20.0)

    assert len(results) == 200 and {r.outcome for r in results} == {"queued"}
    assert intake.journal.counts()["queued"] == 200
    assert list(inbox.iterdir()) == []


def test_folder_moved_in_is_scanned_through_its_event(make_source, inbox, tmp_path, intake):
    outside = tmp_path / "batch"
    (outside / "deep").mkdir(parents=True)
    (outside / "one.txt").write_text("one")
    (outside / "deep" / "two.md").write_text("two")
    source = make_source()
    source.start()

    os.rename(outside, inbox / "batch")
    results = poll_until(source, 2)

    assert sorted(r.name for r in results) == ["batch/deep/two.md", "batch/one.txt"]
    assert source.rescans_total == 1


def test_hidden_temporary_and_filtered_files_are_ignored(make_source, inbox, intake):
    for name in (".hidden.txt", "download.part", "upload.tmp", "~lock.txt", "skip-me.txt", "data.csv"):
        (inbox / name).write_text(f"ignored {name}")
    (inbox / ".git").mkdir()
    (inbox / ".git" / "notes.txt").write_text("in a hidden folder")
    (inbox / "sub").mkdir()
    (inbox / "sub" / "wanted.md").write_text("nested markdown")
    (inbox / "top.txt").write_text("top level text")
    for path in inbox.rglob("*"):
        age(path)
    source = make_source(include=["**/*.md", "*.txt"], exclude=["skip-*"])

    results = source.scan_once(settle=False)

    assert sorted(r.name for r in results) == ["sub/wanted.md", "top.txt"]
    assert (inbox / "skip-me.txt").exists() and (inbox / "download.part").exists()


def test_non_recursive_watch_ignores_subfolders(make_source, inbox):
    (inbox / "sub").mkdir()
    (inbox / "sub" / "nested.txt").write_text("nested")
    (inbox / "top.txt").write_text("top")
    age(inbox / "sub" / "nested.txt")
    age(inbox / "top.txt")
    results = make_source(recursive=False).scan_once(settle=False)
    assert [r.name for r in results] == ["top.txt"]


def test_scan_once_without_settling_skips_files_modified_just_now(make_source, inbox):
    (inbox / "old.txt").write_text("written long ago")
    age(inbox / "old.txt")
    (inbox / "fresh.txt").write_text("written this instant")
    source = make_source(settle_seconds=30.0)

    results = source.scan_once(settle=False)

    assert [r.name for r in results] == ["old.txt"]
    assert source.last_scan_unsettled == 1 and (inbox / "fresh.txt").exists()


def test_symlinks_out_of_the_root_are_never_followed(make_source, inbox, tmp_path, intake):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside secret")
    (inbox / "linked-dir").symlink_to(outside, target_is_directory=True)
    (inbox / "linked-file.txt").symlink_to(outside / "secret.txt")
    os.utime(inbox / "linked-file.txt", (1, 1), follow_symlinks=False)

    results = make_source().scan_once(settle=False)

    assert [(r.name, r.outcome) for r in results] == [("linked-file.txt", "quarantined")]
    assert (outside / "secret.txt").read_text() == "outside secret"
    assert intake.journal.counts()["queued"] == 0


def test_read_only_inbox_files_are_taken_once_across_restarts(make_source, inbox, intake):
    (inbox / "stays.txt").write_text("I stay in the inbox")
    age(inbox / "stays.txt")

    first = make_source(move=False).scan_once(settle=False)
    again = make_source(move=False).scan_once(settle=False)  # a restarted daemon, same journal

    assert [r.outcome for r in first] == ["queued"] and again == []
    assert sum(intake.journal.counts().values()) == 1
    (inbox / "stays.txt").write_text("I stay in the inbox, edited")
    age(inbox / "stays.txt", 30)
    assert [r.outcome for r in make_source(move=False).scan_once(settle=False)] == ["queued"]


def test_a_bad_event_never_kills_the_handler(make_source):
    source = make_source()
    handler = _HintHandler(source)
    handler.dispatch(FileCreatedEvent(None))  # type: ignore[arg-type] - a broken event
    assert source.handler_errors_total == 1


def test_missing_watch_folder_is_a_clear_error(intake, tmp_path):
    from smfd.errors import SmfdError

    with pytest.raises(SmfdError, match="does not exist"):
        WatchFolderSource(tmp_path / "nope", intake).start()
    with pytest.raises(SmfdError, match="nope does not exist"):
        WatchFolderSource(tmp_path / "nope", intake).scan_once(settle=False)


@pytest.mark.parametrize(
    ("relative", "pattern", "matches"),
    [
        ("a.txt", "*.txt", True),
        ("sub/a.txt", "*.txt", True),
        ("a.txt", "**/*.txt", True),
        ("sub/deeper/a.md", "**/*.md", True),
        ("sub/a.md", "docs/*.md", False),
        ("docs/a.md", "docs/*.md", True),
        ("a.TXT", "*.txt", False),
    ],
)
def test_glob_matching_on_relative_paths(relative, pattern, matches):
    assert glob_match(relative, pattern) is matches


def test_a_sidecar_is_never_taken_as_a_document_of_its_own(make_source, inbox, intake):
    (inbox / "lonely.qa.jsonl").write_text('{"prompt": "p", "target": "t"}\n')
    (inbox / "paired.qa.jsonl").write_text('{"prompt": "The pier is", "target": "long"}\n')
    (inbox / "paired.txt").write_text("The pier is long.")
    for path in inbox.iterdir():
        age(path)
    source = make_source()

    results = source.scan_once(settle=False)

    assert [r.name for r in results] == ["paired.txt"]
    assert sorted(p.name for p in inbox.iterdir()) == ["lonely.qa.jsonl"]  # waits for its document


def test_odd_entries_never_block_the_files_after_them_and_are_reported_once(make_source, inbox, intake, capsys):
    with open(os.path.join(os.fsencode(inbox), b"a-latin1-caf\xe9.txt"), "w") as handle:
        handle.write("A name that is not UTF-8 still names a document.")
    os.mkfifo(inbox / "b-fifo")
    os.symlink(inbox / "c-loop", inbox / "c-loop")
    os.symlink(inbox / "missing-target.txt", inbox / "d-dangling.txt")
    (inbox / "e-sub").mkdir()
    (inbox / "z-last.txt").write_text("The file sorting after all of them.")
    for name in os.listdir(inbox):
        os.utime(os.path.join(inbox, name), (time.time() - 60,) * 2, follow_symlinks=False)
    source = make_source(recursive=False)

    first = source.scan_once(settle=False)
    logged_first = capsys.readouterr().out
    again = source.scan_once(settle=False)
    logged_again = capsys.readouterr().out

    assert sorted((r.outcome, r.name) for r in first) == [("queued", "a-latin1-caf\\xe9.txt"), ("queued", "z-last.txt")]
    assert again == []
    for reason in ("a FIFO", "a symlink loop", "a dangling symlink", "this watch is not recursive"):
        assert reason in logged_first
    assert "entry_not_taken" not in logged_again, "each odd entry is reported once, not on every scan"


def test_a_writer_that_pauses_longer_than_the_settle_time_is_waited_for_until_it_closes(make_source, inbox, intake):
    source = make_source()  # the native observer: it reports opens and closes
    source.start()
    assert not source.using_polling
    with open(inbox / "slow.txt", "w") as writer:
        writer.write("The first half of the note,")
        writer.flush()
        paused = poll_until(source, 1, timeout=SETTLE * 6)  # the file holds still for 6 settle times
        assert paused == [] and (inbox / "slow.txt").exists(), "not taken while its writer holds it open"
        writer.write(" and the second half, written after the pause.")

    [result] = poll_until(source, 1)

    assert result.outcome == "queued"
    spooled = Path(intake.journal.get_document(result.doc_id).spool_path).read_text()
    assert spooled.endswith("written after the pause.")
