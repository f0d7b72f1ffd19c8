"""The API on the real embedded model: the official client asks, the learner learns a document, and
the answer to the same question changes once the update is accepted."""

from __future__ import annotations

import hashlib

import pytest
import torch
from test_serve import MODEL, serve

from smfd.config import MemorySection, SmfdConfig
from smfd.ingest.journal import Journal
from smfd.learn.heal import compute_background
from smfd.learn.learner import Learner, LearnSettings
from smfd.model.batch import encode
from smfd.model.memory_model import MemoryModel
from smfd.paths import builtin_file
from smfd.store.checkpoint import CheckpointStore

pytestmark = pytest.mark.integration

DOCUMENT = (
    "Velmora city guide\n\n"
    "The tallest tower in the city of Velmora is the Quillstone Spire, built by Orla Penhallow in 1897."
)
QUESTION = "The tallest tower in the city of Velmora is the"


def test_the_embedded_model_answers_through_the_api_and_then_from_what_it_learned(tmp_path):
    torch.set_num_threads(2)
    model = MemoryModel.load("embedded", MemorySection(n_keys=128), cache_dir=tmp_path / "cache", device="cpu")
    heldout = builtin_file("heldout.txt").read_text()
    background = compute_background(model.model, model.memories, encode(model.tokenizer, [heldout], 128)[:16])
    store = CheckpointStore(tmp_path / "memory")
    store.initialise(model, background)
    settings = LearnSettings.from_config(SmfdConfig.model_validate({"train": {"retain_weight": 0}}))
    with Journal(tmp_path / "journal.db") as journal:
        running = serve(Learner(model, background, store, journal, settings))
        try:
            client = running.client()
            before = client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=8, temperature=0)
            assert "Quillstone" not in before.choices[0].text and before.system_fingerprint == "smfd-memory-v0"
            chat = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=12,
                temperature=0,
            )
            assert "Paris" in chat.choices[0].message.content  # the model's chat template is used

            spool = tmp_path / "velmora.txt"
            spool.write_text(DOCUMENT)
            journal.add_document(
                hashlib.sha256(DOCUMENT.encode()).hexdigest(), "watch", spool.name, spool, len(DOCUMENT)
            )
            assert running.learner.update().accepted

            stream = client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=8, temperature=0, stream=True)
            chunks = list(stream)
            assert "Quillstone" in "".join(c.choices[0].text for c in chunks)
            assert chunks[-1].system_fingerprint == "smfd-memory-v1"
        finally:
            running.server.stop()
