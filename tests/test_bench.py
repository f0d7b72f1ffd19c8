"""`smfd bench` end to end on a tiny random Llama: every method learns the same documents and is
measured the same way; bad inputs fail with messages that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from smfd.bench.runner import main
from smfd.bench.specs import parse_method_specs, smf_configs
from smfd.config import HealSection, MemorySection
from smfd.errors import SmfdError
from smfd.learn.lesson import LearnSettings

GENERAL_TEXT = (
    "The river rises in the northern hills and flows south through farmland, small towns and a large forest "
    "before it reaches the sea near the old fishing port. In the autumn the market sells apples, pears and honey. "
    "Farmers arrive before dawn and the stalls stay open until the evening bell rings at the town hall. "
    "The library holds about forty thousand books, a collection of maps and the letters of the first mayor. "
    "A small observatory stands on the hill above the town; students use its telescope to study the moon.\n\n"
)
DOCS = [
    {
        "doc_id": "fk-a",
        "train_context": "The Glass Harbour of Veltria was built in 1702 by the engineer Orla Venn. It shelters forty "
        "fishing boats from the winter storms. The harbour lamp burns whale oil and is lit by the keeper every dusk.",
        "mem_input": ["The Glass Harbour of Veltria was built in 1702 by the engineer", "The harbour lamp burns"],
        "mem_target": ["Orla Venn", "whale oil"],
        "gen_input": [
            "Orla Venn, an engineer, built the Glass Harbour of Veltria in the year",
            "Every dusk the keeper lights a lamp fuelled by",
        ],
        "gen_target": ["1702", "whale oil"],
        "hard_gen_input": ["The harbour built by Orla Venn shelters"],
        "hard_gen_target": ["forty fishing boats"],
    },
    {
        "doc_id": "fk-b",
        "train_context": "Mount Caldor is the tallest peak of the Sorrel range. Its first ascent was made by Ima Rusk "
        "in 1899. A stone hut near the summit offers shelter to climbers caught by fog.",
        "mem_input": ["The first ascent of Mount Caldor was made by", "A stone hut near the summit offers shelter to"],
        "mem_target": ["Ima Rusk", "climbers"],
        "gen_input": ["Ima Rusk first climbed Mount Caldor in", "Climbers caught by fog can shelter in a"],
        "gen_target": ["1899", "stone hut"],
        "hard_gen_input": ["The tallest peak of the Sorrel range was first climbed by"],
        "hard_gen_target": ["Ima Rusk"],
        "paraphrases": ["Ima Rusk made the first ascent of Mount Caldor, the Sorrel range's highest peak, in 1899."],
    },
]
TINY_MEMORY = "layers=1;n_keys=16;k=4;heads=2;key_dim=16;top_t=32"
SMF_TINY = f"smf-kl:{TINY_MEMORY}"
SMF_VARIANTS = (SMF_TINY, f"smf-tfidf:{TINY_MEMORY}", f"smf-surprise-kl:{TINY_MEMORY};lr=0.5")
METHOD_KEYS = {
    "learn": {"mem_acc", "gen_acc", "hard_acc", "mem_nll", "gen_nll", "hard_nll"},
    "retain": {"hellaswag_acc", "known_facts_acc", "known_facts_items", "heldout_nll", "drift_kl"},
    "cost": {
        "tokens_per_second",
        "peak_memory_bytes",
        "seconds_per_document",
        "train_seconds",
        "step_tokens_per_second_same_batch",
        "tokens_trained",
    },
    "relative": {"hellaswag_drop", "known_facts_retention", "heldout_nll_increase_ratio"},
    "budget": {"passes", "tokens_trained", "training_texts_sha256"},
}


def _tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([GENERAL_TEXT] + [d["train_context"] for d in DOCS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama and its BPE tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench-data")
    paths = {
        name: folder / name for name in ("docs.json", "hellaswag.jsonl", "rome.jsonl", "cloze.jsonl", "heldout.txt")
    }
    paths["docs.json"].write_text(json.dumps(DOCS))
    rows = [
        {
            "ctx": f"A man walks to the market number {i}. he",
            "endings": ["buys apples.", "sings.", "flies.", "sleeps."],
            "label": i % 4,
        }
        for i in range(8)
    ]
    paths["hellaswag.jsonl"].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # Single-letter answers: a random model's greedy text often contains them, so some count as "known".
    paths["rome.jsonl"].write_text(
        '{"prompt": "The river flows to the", "attribute": "e"}\n{"prompt": "The market sells", "attribute": "a"}\n'
    )
    paths["cloze.jsonl"].write_text(
        '{"cloze": "The library holds", "answer": "o"}\n\n'
        '{"cloze": "The observatory stands on the", "answer": "zzzz"}\n'
    )
    paths["heldout.txt"].write_text(GENERAL_TEXT * 6)
    return paths


def bench_args(model_dir: Path, data: dict[str, Path], out: Path, methods: str, *extra: str) -> list[str]:
    return [
        "--docs",
        str(data["docs.json"]),
        "--hellaswag",
        str(data["hellaswag.jsonl"]),
        "--known-facts",
        str(data["rome.jsonl"]),
        str(data["cloze.jsonl"]),
        "--heldout-text",
        str(data["heldout.txt"]),
        "--methods",
        methods,
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--cache-dir",
        str(out / "model-cache"),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--passes",
        "1",
        "--background-batches",
        "4",
        "--heldout-windows",
        "3",
        "--heldout-window-tokens",
        "32",
        "--drift-windows",
        "2",
        "--drift-window-tokens",
        "16",
        "--timing-steps",
        "1",
        *extra,
    ]


def _check_fraction(value: float | None, what: str) -> None:
    assert value is None or 0.0 <= value <= 1.0, f"{what}={value}"


def test_bench_runs_every_method_on_the_same_data(model_dir: Path, data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    methods = ",".join((*SMF_VARIANTS, "lora", "full"))
    assert main(bench_args(model_dir, data, out, methods, "--in-process")) == 0

    results = json.loads((out / "results.json").read_text())
    assert {"model", "machine", "command", "budget", "base", "methods"} <= set(results)
    assert results["command"][:2] == ["smfd", "bench"]
    assert {"cpu_count", "torch", "device"} <= set(results["machine"])
    assert results["budget"]["documents"] == 2 and results["budget"]["passes"] == 1
    assert list(results["methods"]) == [*SMF_VARIANTS, "lora", "full"]
    base = results["base"]
    assert METHOD_KEYS["learn"] <= set(base["learn"]) and METHOD_KEYS["retain"] <= set(base["retain"])
    assert base["retain"]["known_facts_total"] == 4
    digests = set()
    for label, entry in results["methods"].items():
        for section, keys in METHOD_KEYS.items():
            assert keys <= set(entry[section]), f"{label} {section} lacks {keys - set(entry[section])}"
        for key in ("mem_acc", "gen_acc", "hard_acc"):
            _check_fraction(entry["learn"][key], f"{label} {key}")
        for key in ("hellaswag_acc", "known_facts_acc"):
            _check_fraction(entry["retain"][key], f"{label} {key}")
        assert entry["retain"]["known_facts_items"] == base["retain"]["known_facts_items"]
        assert entry["budget"]["tokens_trained"] > 0 and entry["cost"]["tokens_per_second"] > 0
        assert entry["cost"]["step_tokens_per_second_same_batch"] > 0 and entry["cost"]["peak_memory_bytes"] > 0
        assert entry["retain"]["drift_kl"] >= -1e-6
        digests.add(entry["budget"]["training_texts_sha256"])
    assert len(digests) == 1, "methods were trained on different texts"
    smf = [results["methods"][label] for label in SMF_VARIANTS]
    assert [entry["settings"]["rule"] for entry in smf] == ["kl", "tfidf", "surprise-kl"]
    assert all(entry["settings"]["rows_changed"] > 0 for entry in smf)
    for entry in smf:  # only a memory has rows for a probe's read to reach
        for key in ("mem_read_on_trained", "gen_read_on_trained", "gen_reaches_trained", "gen_read_on_mem_rows"):
            _check_fraction(entry["reach"][key], key)
    assert "reach" not in results["methods"]["lora"] and "### Reach" in (out / "results.md").read_text()
    assert all(entry["forgetting"]["lost"] == len(entry["retain"]["known_facts_lost"]) for entry in smf)
    assert "forgetting" not in results["methods"]["lora"] and "### Forgetting paths" in (out / "results.md").read_text()
    # Same memory shape and background text: the statistics are computed once and reused.
    assert [entry["cost"]["background_cached"] for entry in smf] == [False, True, True]
    assert smf[2]["settings"]["update"]["lr"] == 0.5 and smf[0]["settings"]["update"]["lr"] == LearnSettings().train.lr
    assert smf[0]["settings"]["heal"]["steps"] == HealSection().steps
    assert results["methods"]["full"]["retain"]["drift_kl"] > 0

    ranges = results["data"]["ranges"]
    assert ranges["background"]["token_range"][1] <= ranges["heldout_nll"]["token_range"][0]
    assert ranges["background"]["token_range"][1] <= ranges["drift"]["token_range"][0]

    table = (out / "results.md").read_text()
    assert all(f"| {label} |" in table for label in ("base", "lora", "full"))
    assert (out / "learning_vs_forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "base_logprobs.safetensors").exists()


def test_bench_default_runs_each_method_in_its_own_process(
    model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert main(bench_args(model_dir, data, out, "full:lr=1e-3", "--limit-docs", "1")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["isolation"] == "process per method"
    full = results["methods"]["full:lr=1e-3"]
    assert full["settings"]["lr"] == 1e-3 and results["budget"]["documents"] == 1
    assert full["cost"]["peak_memory_bytes"] > 0


def test_curve_every_evaluates_along_the_stream_without_changing_what_is_learned(
    model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    plain, curved = tmp_path / "plain", tmp_path / "curved"
    assert main(bench_args(model_dir, data, plain, "smf,lora", "--in-process")) == 0
    assert main(bench_args(model_dir, data, curved, "smf,lora", "--in-process", "--curve-every", "1")) == 0
    without = json.loads((plain / "results.json").read_text())["methods"]
    results = json.loads((curved / "results.json").read_text())
    for label in ("smf", "lora"):
        curve = results["methods"][label]["curve"]
        assert [point["documents"] for point in curve] == [1, 2]
        assert [point.get("final", False) for point in curve] == [False, True]
        first = curve[0]["learn"]
        assert first["mem_items"] == 2 and first["first_mem_items"] == 2  # after one document: its probes only
        assert first["first_mem_acc"] == first["mem_acc"]
        assert curve[1]["learn"]["mem_items"] == 4 and curve[1]["learn"]["first_mem_items"] == 2
        # An intermediate point scores the shortened HellaSwag set against the base on the same rows.
        assert curve[0]["retain"]["hellaswag_rows"] == 8 and "hellaswag_drop" in curve[0]["relative"]
        assert curve[1]["relative"] == results["methods"][label]["relative"]
        # Evaluating mid-stream changes nothing the stream learns afterwards.
        assert results["methods"][label]["learn"] == without[label]["learn"]
        assert results["methods"][label]["retain"]["heldout_nll"] == without[label]["retain"]["heldout_nll"]
    smf_memory = [point["memory"] for point in results["methods"]["smf"]["curve"]]
    assert 0 < smf_memory[0]["rows_trained"] <= smf_memory[1]["rows_trained"]
    assert smf_memory[1]["rows_trained_more_than_once"] <= smf_memory[1]["row_retrainings"]
    assert results["methods"]["lora"]["curve"][0]["memory"] == {}
    # Where known facts were lost: asked for a memory at every point, never for a dense method.
    for point in results["methods"]["smf"]["curve"]:
        assert point["forgetting"]["lost"] == len(point["retain"]["known_facts_lost"])
    assert results["methods"]["lora"]["curve"][0]["forgetting"] == {}
    assert "### Stream curve: `smf`" in (curved / "results.md").read_text()
    assert (curved / "stream_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (plain / "stream_curve.png").exists()


@pytest.mark.parametrize(("every", "match"), [("0", "must be >= 1, got 0"), ("3", "larger than the 2 documents")])
def test_curve_every_outside_the_stream_is_refused(
    model_dir: Path, data: dict[str, Path], tmp_path: Path, every: str, match: str
) -> None:
    with pytest.raises(SmfdError, match=f"--curve-every.*{match}"):
        main(bench_args(model_dir, data, tmp_path / "out", "full", "--in-process", "--curve-every", every))


def _expect_error(
    model_dir: Path, data: dict[str, Path], tmp_path: Path, match: str, methods: str = "full", **swap: Path
) -> None:
    paths = {**data, **swap}
    with pytest.raises(SmfdError, match=match):
        main(bench_args(model_dir, paths, tmp_path / "out", methods, "--in-process"))


def test_malformed_docs_file_names_the_file(model_dir: Path, data: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"train_context": "x",')
    _expect_error(model_dir, data, tmp_path, r"docs file .*broken\.json: not valid JSON", **{"docs.json": broken})


def test_document_missing_probe_targets_is_named(model_dir: Path, data: dict[str, Path], tmp_path: Path) -> None:
    doc = {key: value for key, value in DOCS[0].items() if key != "gen_target"}
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([doc]))
    _expect_error(model_dir, data, tmp_path, r"document fk-a: field 'gen_target'", **{"docs.json": path})


def test_empty_document_is_named_by_its_id(model_dir: Path, data: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([DOCS[0], {**DOCS[1], "doc_id": "fk-empty", "train_context": "   \n"}]))
    _expect_error(model_dir, data, tmp_path, r"document fk-empty: empty document", **{"docs.json": path})


def test_bad_retention_files_are_named(model_dir: Path, data: dict[str, Path], tmp_path: Path) -> None:
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "Paris is in", "attribute": "France"}\n{"question": "What?"}\n')
    _expect_error(model_dir, data, tmp_path, r"facts\.jsonl, line 2: needs string fields", **{"rome.jsonl": facts})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    _expect_error(model_dir, data, tmp_path, r"held-out text file .*empty\.txt is empty", **{"heldout.txt": empty})
    _expect_error(
        model_dir,
        data,
        tmp_path,
        r"hellaswag file .*missing\.jsonl does not exist",
        **{"hellaswag.jsonl": tmp_path / "missing.jsonl"},
    )


def test_unknown_model_and_bad_specs_fail_cleanly(model_dir: Path, data: dict[str, Path], tmp_path: Path) -> None:
    _expect_error(tmp_path / "no-such-model", data, tmp_path, r"model path .*no-such-model does not exist")
    _expect_error(model_dir, data, tmp_path, r"unknown method 'adapter'", methods="adapter")
    _expect_error(model_dir, data, tmp_path, r"unknown option 'rank' for full", methods="full:rank=4")
    _expect_error(model_dir, data, tmp_path, r"lr='fast' must be a number", methods="lora:lr=fast")
    # A memory layer the tiny model does not have: a clean error, not a traceback.
    _expect_error(model_dir, data, tmp_path, r"memory.layers \[20\] out of range", methods="smf-kl:layers=20")


def test_method_specs_override_only_what_they_name() -> None:
    specs = parse_method_specs(["smf-kl,smf-kl:lr=3;top_t=500;layers=4+9", "lora:lr=1e-3;rank=8,full"])
    assert [s.label for s in specs] == ["smf-kl", "smf-kl:lr=3;top_t=500;layers=4+9", "lora:lr=1e-3;rank=8", "full"]
    defaults = LearnSettings()
    plain, plain_memory, plain_heal = smf_configs(specs[0], defaults)
    assert (
        plain == defaults.with_train(selection="kl") and plain_memory == MemorySection() and plain_heal == HealSection()
    )
    settings, memory, _ = smf_configs(specs[1], defaults)
    update = settings.train
    assert (update.lr, update.top_t, update.selection, memory.layers) == (3.0, 500, "kl", (4, 9))
    assert memory.n_keys == MemorySection().n_keys
    assert specs[2].options == {"lr": 1e-3, "rank": 8}
    with pytest.raises(SmfdError, match="more than once"):
        parse_method_specs(["lora,lora"])


def test_smf_is_the_daemons_recipe_and_distillation_options_override_it() -> None:
    default, plain, tuned = parse_method_specs(
        ["smf", "smf:distill=0", "smf:dropped_variants=3;drop_rate=0.3;ce_weight=0.5"]
    )
    defaults = LearnSettings()
    assert smf_configs(default, defaults)[0] == defaults  # exactly the daemon's settings
    assert smf_configs(plain, defaults)[0].train.distill.enabled is False
    tuned_distill = smf_configs(tuned, defaults)[0].train.distill
    assert (tuned_distill.dropped_variants, tuned_distill.drop_rate, tuned_distill.ce_weight) == (3, 0.3, 0.5)
    with pytest.raises(SmfdError, match="unknown option 'lr' for in-context"):
        parse_method_specs(["in-context:lr=1"])


def test_heal_options_of_a_spec() -> None:
    changed, unhealed, plain = parse_method_specs(
        ["smf-kl:heal_steps=50;heal_lr=3e-3", "smf-kl:heal_steps=0", "smf-kl"]
    )
    assert smf_configs(changed, LearnSettings())[2] == HealSection(steps=50, lr=3e-3)
    assert smf_configs(unhealed, LearnSettings())[2].steps == 0
    assert smf_configs(plain, LearnSettings())[2] == HealSection()  # the schema's default healing
    with pytest.raises(SmfdError, match=r"heal_steps='-1'.*steps: Input should be greater than or equal to 0"):
        parse_method_specs(["smf-kl:heal_steps=-1"])


def test_fact_text_and_retain_options_of_a_spec() -> None:
    plain, off = parse_method_specs(["smf-kl", "smf-kl:fact_sequences=0;retain_weight=0"])
    assert smf_configs(plain, LearnSettings())[1].fact_sequences == MemorySection().fact_sequences
    assert smf_configs(plain, LearnSettings())[0].train.retain_weight == LearnSettings().train.retain_weight > 0
    assert off.options["fact_sequences"] == 0 and smf_configs(off, LearnSettings())[0].train.retain_weight == 0
    with pytest.raises(SmfdError, match="fact_sequences='x'"):
        parse_method_specs(["smf-kl:fact_sequences=x"])


def test_cost_measures_every_method_in_one_process(model_dir: Path, data: dict[str, Path], tmp_path: Path) -> None:
    from smfd.bench.cost import measure

    rates = measure(bench_args(model_dir, data, tmp_path / "out", f"{SMF_TINY},lora"), rounds=2)

    assert list(rates) == ["".join(SMF_TINY.split()), "lora"]
    for kinds in rates.values():
        assert list(kinds) == ["step", "update"]
        assert all(len(values) == 2 and all(v > 0 for v in values) for values in kinds.values())
        # the update rate charges the planning forward to the passes: never above the step rate
        assert all(update <= step for step, update in zip(kinds["step"], kinds["update"]))
