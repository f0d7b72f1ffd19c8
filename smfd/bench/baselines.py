"""Comparison methods for the benchmark: LoRA and full finetuning, driven like `SparseUpdater`.

Both trainers expose `step(batch) -> StepResult`, `run(batches, should_stop)` and `describe()`,
and compute the loss with `smfd.learn.updater.causal_lm_loss` (LM head applied only where a loss is
taken), so loss values and step timings are comparable with the sparse updater.

Both mutate the model they are given (LoRA injects adapter layers into it; full finetuning
unfreezes and trains it): give each method its own freshly loaded model.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from smfd.errors import SmfdError
from smfd.learn.updater import StepResult, causal_lm_loss
from smfd.model.batch import TokenBatch


def _check_optimizer_settings(lr: float, weight_decay: float) -> None:
    """Reject settings AdamW would accept silently but that make a benchmark run meaningless."""
    if not lr > 0:
        raise SmfdError(f"learning rate must be > 0, got {lr}")
    if weight_decay < 0:
        raise SmfdError(f"weight_decay must be >= 0, got {weight_decay}")


def _count(parameters: Iterable[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)


def run_steps(
    step: Callable[[TokenBatch], StepResult], batches: Iterable[TokenBatch], should_stop: Callable[[], bool]
) -> list[StepResult]:
    """Step through batches, checking `should_stop` between optimizer steps."""
    results = []
    for batch in batches:
        if should_stop():
            break
        results.append(step(batch))
    return results


class _AdamWTrainer:
    """Shared step loop: loss, backward, AdamW step over `self.parameters`, clear gradients."""

    model: torch.nn.Module
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer

    def _loss_model(self) -> PreTrainedModel:
        """The transformers model `causal_lm_loss` reads its decoder and LM head from."""
        return self.model  # type: ignore[return-value]

    def _before_step(self) -> bool:
        """Hook to set module modes for the step; returns what `_after_step` needs to restore."""
        return self.model.training

    def _after_step(self, was_training: bool) -> None:
        self.model.train(was_training)

    def step(self, batch: TokenBatch) -> StepResult:
        """One forward/backward/AdamW step on `batch`; returns the loss before the step."""
        started = time.perf_counter()
        was_training = self._before_step()
        try:
            loss = causal_lm_loss(self._loss_model(), batch)
            loss.backward()
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self._after_step(was_training)
        return StepResult(float(loss.detach()), {}, batch.n_tokens, time.perf_counter() - started)

    def run(self, batches: Iterable[TokenBatch], should_stop: Callable[[], bool] = lambda: False) -> list[StepResult]:
        return run_steps(self.step, batches, should_stop)


class LoraTrainer(_AdamWTrainer):
    """LoRA adapters on the frozen base model, trained with AdamW.

    `target_modules="all-linear"` is peft's shorthand for every linear layer except the LM head.
    `.model` is the peft model; use it for evaluation and generation afterwards.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        rank: int = 16,
        alpha: float = 32,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        lr: float = 3e-4,
        weight_decay: float = 0.1,
    ) -> None:
        if rank < 1:
            raise SmfdError(f"LoRA rank must be >= 1, got {rank}")
        if not alpha > 0:
            raise SmfdError(f"LoRA alpha must be > 0, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise SmfdError(f"LoRA dropout must be in [0, 1), got {dropout}")
        _check_optimizer_settings(lr, weight_decay)
        config = LoraConfig(
            task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules
        )
        try:
            with warnings.catch_warnings():
                # peft calls a transformers method deprecated in transformers 5; the notice is not ours to act on.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                self.model: PeftModel = get_peft_model(model, config)
        except ValueError as error:
            raise SmfdError(f"cannot apply LoRA with target_modules={target_modules!r}: {error}") from error
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.target_modules = target_modules
        self.lr, self.weight_decay = lr, weight_decay
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        if not self.parameters:
            raise SmfdError(f"LoRA with target_modules={target_modules!r} left no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)

    def _loss_model(self) -> PreTrainedModel:
        """The wrapped transformers model: the adapters live inside it, so its decoder runs them.

        Going through `get_base_model()` rather than attribute forwarding on the PeftModel keeps
        `get_decoder()` / `get_output_embeddings()` the transformers methods whatever peft forwards.
        """
        return self.model.get_base_model()

    def _before_step(self) -> bool:
        """Train mode during the step so LoRA dropout applies; the caller's mode comes back afterwards."""
        was_training = self.model.training
        self.model.train()
        return was_training

    def describe(self) -> dict[str, Any]:
        return {
            "method": "lora",
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": self.target_modules,
            "targets": len(self.model.targeted_module_names),
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "trainable_params": _count(self.parameters),
        }


class FullFinetuneTrainer(_AdamWTrainer):
    """Every parameter trainable, AdamW over all of them.

    With tied input/output embeddings the shared matrix is one parameter, trained once (and
    counted once). AdamW keeps two state tensors per parameter in the parameter's dtype, so on
    a bf16 model small updates (lr around 1e-5) can round away: load in float32 for a fair run.
    """

    def __init__(self, model: PreTrainedModel, lr: float = 1e-5, weight_decay: float = 0.1) -> None:
        _check_optimizer_settings(lr, weight_decay)
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        self.parameters = list(model.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)

    def describe(self) -> dict[str, Any]:
        return {
            "method": "full",
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "trainable_params": _count(self.parameters),
            "tied_embeddings": bool(getattr(self.model.config, "tie_word_embeddings", False)),
            "param_dtype": str(self.parameters[0].dtype).removeprefix("torch."),
        }
