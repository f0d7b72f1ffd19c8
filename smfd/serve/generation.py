"""Text generation for the API: `generate` on the last accepted memory, streamed piece by piece.

Runs on the model's thread (smfd.learn.gate), never the event loop. `transformers`' `generate` does the decoding
(KV cache, temperature, top-p); this module adds what the OpenAI API means on top of it: stop
strings cut out of the answer (and held back in a stream until they cannot be one), a seed
that repeats an answer without touching anyone else's random state, and the reason it ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from smfd.model.memory_model import MemoryModel


@dataclass(frozen=True)
class Sampling:
    """How to continue one prompt: OpenAI's meaning for each field (temperature 0 = greedy)."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None


@dataclass
class Generated:
    """What one generation produced, filled in as it runs."""

    prompt_tokens: int
    version: int = 0
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str = "length"  # "stop" (end of text or a stop string) | "length" | "cancelled"
    first_token_at: float | None = None  # time.monotonic() of the first generated token


def _stop_index(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Where the earliest stop string begins in `text` (searching from `start`), or None."""
    found = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still grow into a stop string (or finish a split character)."""
    held = len(text) - len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence decodes to U+FFFD
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if stop.startswith(text[-size:]):
                held = size
                break
    return held


class _TextStream(BaseStreamer):
    """Receives token ids from `generate`; passes on text that is final, ends at a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, result: Generated, stops: tuple[str, ...], emit) -> None:
        self.tokenizer = tokenizer
        self.result = result
        self.stops = stops
        self.emit = emit
        self.ids: list[int] = []
        self.prompt_seen = False
        self.sent = 0
        self.stopped = False
        self.longest_stop = max((len(s) for s in stops), default=0)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        if self.stopped:
            return
        if self.result.first_token_at is None:
            self.result.first_token_at = time.monotonic()
        self.ids.extend(int(i) for i in value.flatten().tolist())
        self.result.completion_tokens = len(self.ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = _stop_index(text, self.stops, max(0, self.sent - self.longest_stop)) if self.stops else None
        if cut is not None:
            self.stopped = True
            self._send(text[:cut])
            return
        self._send(text[: len(text) - _held_back(text, self.stops)])

    def end(self) -> None:
        if not self.stopped:
            self._send(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            piece = text[self.sent :]
            self.sent = len(text)
            self.result.text += piece
            self.emit(piece)


class _Halt(StoppingCriteria):
    """Ends generation at a stop string or when the client went away."""

    def __init__(self, stream: _TextStream, cancelled: threading.Event) -> None:
        self.stream = stream
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = self.stream.stopped or self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def generate(
    model: MemoryModel,
    version: int,
    prompt_ids: list[int],
    sampling: Sampling,
    emit: Callable[[str], None] = lambda piece: None,
    cancelled: threading.Event | None = None,
) -> Generated:
    """Continue `prompt_ids` (on the model's thread, the model as of `version`); `emit` gets each final
    piece of text as soon as it is known."""
    cancelled = cancelled or threading.Event()
    result = Generated(prompt_tokens=len(prompt_ids), version=version)
    if cancelled.is_set():
        result.finish_reason = "cancelled"
        return result
    tokenizer = model.tokenizer
    stream = _TextStream(tokenizer, result, sampling.stop, emit)
    device = model.device
    ids = torch.tensor([prompt_ids], device=device)
    options: dict = {"do_sample": False}
    if sampling.temperature > 0:
        options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=sampling.seed is not None):
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        output = model.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=sampling.max_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=stream,
            stopping_criteria=StoppingCriteriaList([_Halt(stream, cancelled)]),
            **options,
        )
    new_tokens = output.shape[1] - len(prompt_ids)
    ended_by_eos = new_tokens < sampling.max_tokens or (
        new_tokens and int(output[0, -1]) in _eos_ids(model.model.generation_config, tokenizer)
    )
    if cancelled.is_set():
        result.finish_reason = "cancelled"
    elif stream.stopped or ended_by_eos:
        result.finish_reason = "stop"
    return result


def _eos_ids(generation_config, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """The model's chat template applied to `messages`, ready for the assistant's turn.

    A tokenizer with no template (a base model) gets plain "role: text" lines and "assistant:".
    """
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(rendered, add_special_tokens=False).input_ids
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return tokenizer("\n".join([*lines, "assistant:"]), add_special_tokens=False).input_ids
