"""LoRA and full-finetuning baselines: they learn, touch only what they should, and ignore padding."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smfd.bench.baselines import FullFinetuneTrainer, LoraTrainer
from smfd.errors import SmfdError
from smfd.learn.updater import causal_lm_loss
from smfd.model.batch import TokenBatch, make_batch

PAD_ID = 0


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD_ID,
    )
    return LlamaForCausalLM(config).eval()


def fixed_batch() -> TokenBatch:
    generator = torch.Generator().manual_seed(1)
    lengths = (12, 9, 7)
    return make_batch([torch.randint(1, 128, (n,), generator=generator).tolist() for n in lengths], PAD_ID)


def with_extra_padding(batch: TokenBatch, extra: int) -> TokenBatch:
    pad = lambda t, value: torch.nn.functional.pad(t, (0, extra), value=value)  # noqa: E731
    return TokenBatch(pad(batch.input_ids, PAD_ID), pad(batch.attention_mask, 0), pad(batch.loss_mask, 0))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_lora_lowers_the_loss_on_a_fixed_batch() -> None:
    trainer = LoraTrainer(tiny_llama(), rank=4, alpha=8, lr=1e-2)
    results = trainer.run([fixed_batch()] * 8)
    assert len(results) == 8
    assert results[-1].loss < results[0].loss - 0.05
    assert all(r.rows_selected == {} and r.n_tokens == 28 and r.seconds > 0 for r in results)


def test_lora_starts_at_the_base_model_loss() -> None:
    """LoRA's B matrices start at zero, so the first reported loss is the untouched model's."""
    model, batch = tiny_llama(), fixed_batch()
    with torch.no_grad():
        base_loss = float(causal_lm_loss(model, batch))
    assert LoraTrainer(model, rank=4).step(batch).loss == pytest.approx(base_loss, abs=1e-6)


def test_lora_keeps_base_weights_bit_identical() -> None:
    trainer = LoraTrainer(tiny_llama(), rank=4, alpha=8, lr=1e-2, weight_decay=0.1)
    before = snapshot(trainer.model)
    trainer.run([fixed_batch()] * 3)
    after = snapshot(trainer.model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "LoRA training changed nothing"
    assert all("lora_" in name for name in changed), sorted(n for n in changed if "lora_" not in n)
    assert any("lora_B" in name for name in changed)


def test_lora_leaves_lm_head_and_embeddings_untargeted() -> None:
    trainer = LoraTrainer(tiny_llama(), rank=4)
    names = trainer.model.targeted_module_names
    assert len(names) == 14  # 7 linear layers x 2 decoder layers
    assert not any("lm_head" in name or "embed" in name for name in names)


def test_lora_restores_the_callers_module_mode() -> None:
    trainer = LoraTrainer(tiny_llama(), rank=4, dropout=0.1)
    trainer.model.eval()
    trainer.step(fixed_batch())
    assert not trainer.model.training


def test_full_finetune_changes_base_weights() -> None:
    model = tiny_llama()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainer = FullFinetuneTrainer(model, lr=1e-3)
    before = snapshot(model)
    results = trainer.run([fixed_batch()] * 4)
    after = snapshot(model)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert not torch.equal(before[name], after[name]), name
    assert results[-1].loss < results[0].loss


@pytest.mark.parametrize("make_trainer", [lambda m: LoraTrainer(m, rank=4), lambda m: FullFinetuneTrainer(m)])
def test_padding_does_not_change_the_loss(make_trainer) -> None:
    batch = fixed_batch()
    loss_plain = make_trainer(tiny_llama()).step(batch).loss
    loss_padded = make_trainer(tiny_llama()).step(with_extra_padding(batch, 6)).loss
    assert loss_padded == pytest.approx(loss_plain, abs=1e-5)


def test_run_stops_between_steps_when_asked() -> None:
    trainer = FullFinetuneTrainer(tiny_llama())
    checks = []

    def stop_on_third_check() -> bool:
        checks.append(None)
        return len(checks) == 3

    results = trainer.run([fixed_batch()] * 5, should_stop=stop_on_third_check)
    assert len(results) == 2


def test_describe_reports_trainable_parameters() -> None:
    lora = LoraTrainer(tiny_llama(), rank=4, alpha=8, lr=1e-3, weight_decay=0.0).describe()
    assert lora["method"] == "lora" and lora["rank"] == 4 and lora["alpha"] == 8
    assert lora["targets"] == 14 and lora["lr"] == 1e-3 and lora["weight_decay"] == 0.0
    assert lora["trainable_params"] > 0

    model = tiny_llama()
    full = FullFinetuneTrainer(model).describe()
    assert full["method"] == "full"
    assert full["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert full["trainable_params"] > lora["trainable_params"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank"),
        ({"lr": 0.0}, "learning rate"),
        ({"dropout": 1.0}, "dropout"),
        ({"weight_decay": -1}, "weight_decay"),
    ],
)
def test_lora_rejects_bad_settings(kwargs, message) -> None:
    with pytest.raises(SmfdError, match=message):
        LoraTrainer(tiny_llama(), **kwargs)


def test_lora_rejects_targets_that_match_nothing() -> None:
    with pytest.raises(SmfdError, match="no_such_layer"):
        LoraTrainer(tiny_llama(), target_modules=["no_such_layer"])
