"""The probe set shipped inside the package: findable as package data, well formed, and usable as-is.

A broken shipped probe file would only show up when the daemon first runs its probes on a device,
so these checks catch it at test time instead. The real model is not loaded here.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PROBE_FILES = ("known_facts.jsonl", "choice.jsonl", "heldout.txt", "drift_prompts.txt")


def probes_dir() -> Traversable:
    """The installed probes folder, found the same way the daemon finds it."""
    return files("smfd") / "data"


def read_jsonl(name: str) -> list[dict]:
    """Parse one JSON object per non-empty line, naming the file and line of any bad line."""
    items = []
    text = (probes_dir() / name).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            pytest.fail(f"{name}:{number} is not valid JSON: {exc}")
        assert isinstance(item, dict), f"{name}:{number} is not a JSON object"
        items.append(item)
    return items


def duplicates(values: list[str]) -> list[str]:
    return sorted({value for value in values if values.count(value) > 1})


@pytest.mark.parametrize("name", PROBE_FILES)
def test_probe_file_is_package_data(name: str) -> None:
    resource = probes_dir() / name
    assert resource.is_file(), f"{name} is not findable via importlib.resources"
    assert resource.read_text(encoding="utf-8").strip(), f"{name} is empty"


def test_known_facts_are_well_formed_cloze_items() -> None:
    items = read_jsonl("known_facts.jsonl")
    assert len(items) >= 100
    for item in items:
        assert set(item) == {"id", "prompt", "target"}, f"unexpected keys in {item}"
        assert all(isinstance(item[key], str) and item[key].strip() for key in item), f"empty field in {item}"
        assert item["prompt"] == item["prompt"].strip(), f"prompt of {item['id']} has surrounding whitespace"
        assert 1 <= len(item["target"].split()) <= 3, f"target of {item['id']} is not 1-3 words"
        # Scoring checks whether the continuation contains the target; a one- or two-character
        # target would match almost any continuation and never show forgetting.
        assert len(item["target"].strip()) >= 3, f"target of {item['id']} is too short to score reliably"


def test_known_fact_ids_and_prompts_are_unique() -> None:
    items = read_jsonl("known_facts.jsonl")
    assert duplicates([item["id"] for item in items]) == []
    assert duplicates([item["prompt"] for item in items]) == []


def test_choice_items_have_four_distinct_endings_and_a_valid_label() -> None:
    items = read_jsonl("choice.jsonl")
    assert len(items) >= 40
    for item in items:
        assert set(item) == {"id", "ctx", "endings", "label"}, f"unexpected keys in {item}"
        assert isinstance(item["ctx"], str) and item["ctx"].strip(), f"empty ctx in {item['id']}"
        endings = item["endings"]
        assert isinstance(endings, list) and len(endings) == 4, f"{item['id']} does not have 4 endings"
        assert all(isinstance(e, str) and e.strip() for e in endings), f"empty ending in {item['id']}"
        assert len(set(endings)) == 4, f"{item['id']} repeats an ending"
        label = item["label"]
        assert isinstance(label, int) and not isinstance(label, bool), f"label of {item['id']} is not an int"
        assert 0 <= label < len(endings), f"label of {item['id']} is out of range"


def test_choice_ids_are_unique_and_labels_use_every_position() -> None:
    """A set whose answer is always in one position would reward a positional bias, not knowledge."""
    items = read_jsonl("choice.jsonl")
    assert duplicates([item["id"] for item in items]) == []
    assert {item["label"] for item in items} == {0, 1, 2, 3}


def test_heldout_text_is_long_enough_prose() -> None:
    text = (probes_dir() / "heldout.txt").read_text(encoding="utf-8")
    assert len(text.split()) >= 1000
    lines = [line for line in text.splitlines() if line.strip()]
    assert not any(line.lstrip().startswith(("-", "*", "#")) for line in lines), "heldout text should be prose"


def test_drift_prompts_are_unique_non_empty_lines() -> None:
    text = (probes_dir() / "drift_prompts.txt").read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    assert len(prompts) >= 30
    assert duplicates(prompts) == []


@pytest.mark.parametrize(("name", "kind"), [("known_facts.jsonl", "cloze"), ("choice.jsonl", "choice")])
def test_shipped_suites_load_with_the_probe_loader(name: str, kind: str) -> None:
    """The daemon reads suites with smfd.guard.probes.load_items; the shipped files must pass it unchanged."""
    from importlib.resources import as_file

    from smfd.guard.probes import load_items

    with as_file(probes_dir() / name) as path:
        items = load_items(path)
    assert len(items) == len(read_jsonl(name))
    assert {item.kind for item in items} == {kind}
