"""One thread runs the model: the learner's work, and the served requests between its steps.

Why one thread: PyTorch's CPU kernels parallelise with OpenMP, and every OS thread that runs them
keeps its own OpenMP team alive. Once the process has more OpenMP threads than cores, libgomp
stops spinning between parallel regions and every small op pays a sleep and a wake: measured on
2 cores, greedy generation fell from 29 to 17 tokens/s as soon as a second thread had run the
model. So the daemon's start-up, its updates and probes, and every API request run on the gate's
one worker thread (`ModelGate.pool`), and nothing else in the process runs torch.

The learner holds the gate for every span in which it uses the model (an update, a probe run),
because its work changes what a forward pass computes: training steps write value rows, surprise
scoring and probes bypass the memory for a moment. A served request is queued: it runs when the
learner is outside such a span, or — with `yield_to_requests` — at a pause point the learner
offers between two optimizer steps, where nothing is half-done and the learner can put the model
back to its last accepted state for the request (`accepted_view`). Requests run one at a time.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar

from smfd.model.memory import ProductKeyMemory
from smfd.model.retrofit import memory_switched
from smfd.store.patches import LayerPatch, apply_patches

T = TypeVar("T")


class ModelGate:
    """The model's lock and its one worker thread; queued requests go before the learner's next step."""

    def __init__(self, yield_to_requests: bool = True) -> None:
        self.yield_to_requests = yield_to_requests
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="smfd-model")  # the thread is made on first use
        self._lock = threading.RLock()
        self._pending: deque[Callable[[], None]] = deque()
        self._pending_lock = threading.Lock()

    @contextmanager
    def learner(self) -> Iterator[None]:
        """The learner's span of model use; queued requests wait for it, or for a pause point in it."""
        with self._lock:
            yield

    def run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run `fn` on the model's thread and wait for its result (start-up, `--once`, benchmarks)."""
        return self.pool.submit(fn, *args, **kwargs).result()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue a served request: it runs at the learner's next pause point, or as soon as the model is free."""
        with self._pending_lock:
            self._pending.append(job)
        self.pool.submit(self._serve_pending)

    def requests_waiting(self) -> bool:
        with self._pending_lock:
            return bool(self._pending)

    def pause_point(self, view: Callable[[], AbstractContextManager[None]]) -> None:
        """Inside `learner()`, between two steps: run the queued requests inside `view()` (the model as last
        accepted), then return to the learner. A no-op unless `yield_to_requests`."""
        if self.yield_to_requests and self.requests_waiting():
            with view():
                self._run_pending()

    def _serve_pending(self) -> None:
        with self._lock:
            self._run_pending()

    def _run_pending(self) -> None:
        while True:
            with self._pending_lock:
                if not self._pending:
                    return
                job = self._pending.popleft()
            job()  # a request's job reports its own errors to its client

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def accepted_view(memories: list[ProductKeyMemory], unaccepted: list[LayerPatch]) -> Iterator[None]:
    """The memory as last accepted, for as long as the context lasts; then exactly as it was.

    Reverts the rows of an update not yet accepted and turns on a memory the learner had bypassed
    for a base-model measurement; both come back on exit, bit for bit (rows are copied, not
    recomputed), so the learner goes on from where it paused.
    """
    if unaccepted:
        apply_patches(memories, unaccepted, revert=True)
    try:
        with memory_switched(memories, True):
            yield
    finally:
        if unaccepted:
            apply_patches(memories, unaccepted)
