"""Start-up recovery: settle what an earlier run left half done, before anything new is taken.

Leftovers of interrupted writes (temporary files, patches above the manifest's version) are removed.

A document is `processing` from the moment the learner claims it until the journal records the
checkpoint that holds its update. A crash in between leaves it there. Two cases, told apart by
the checkpoint itself, which records with each update (in the same durable step) which documents
and chunks it learned:

- the checkpoint holds the document's update: the journal catches up (chunks learned, document
  done with that version), so it is not learned a second time;
- it does not: the update never landed, the document is requeued and learned again from its text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from smfd.durable import remove_leftover_temp_files
from smfd.ingest.journal import Journal
from smfd.store.checkpoint import CheckpointStore

log = structlog.get_logger("smfd.daemon.recovery")


@dataclass(frozen=True)
class Recovery:
    settled: list[int]  # document ids the checkpoint already held: now done
    requeued: int  # documents whose update never landed: queued again


def remove_leftovers(state_dir: Path, store: CheckpointStore) -> int:
    """Temporary files and patches that interrupted writes left behind; returns how many were removed."""
    removed = remove_leftover_temp_files(state_dir)
    if store.exists():
        removed += store.remove_stray_patches()
    if removed:
        log.info("leftovers_removed", count=len(removed), files=[str(p) for p in removed[:10]])
    return len(removed)


def recover_interrupted_documents(journal: Journal, store: CheckpointStore) -> Recovery:
    """Settle or requeue every document an earlier run left `processing` (see the module docstring)."""
    committed = store.committed_documents() if store.exists() else {}
    settled = journal.settle_committed({doc_id: (c.version, c.chunk_ids) for doc_id, c in committed.items()})
    if settled:
        log.warning("documents_settled", count=len(settled), reason="already learned by the checkpoint before a crash")
    requeued = journal.requeue_processing()
    if requeued:
        log.info("documents_requeued", count=requeued, reason="left processing by an earlier run")
    return Recovery(settled, requeued)


def settle_rolled_back(journal: Journal, version: int) -> list[int]:
    """Documents marked done by versions above the loaded `version` -> rolled_back; returns their ids.

    Call once the memory is loaded: a rollback that stopped between the checkpoint and the journal,
    or a damaged patch the checkpoint fell back past, leaves the journal ahead of the memory.
    """
    rolled_back = journal.mark_rolled_back(version, f"memory is at version {version}; drop the file again to relearn")
    if rolled_back:
        log.warning("documents_rolled_back", count=len(rolled_back), version=version, documents=rolled_back[:20])
    return rolled_back
