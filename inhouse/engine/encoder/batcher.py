"""Dynamic micro-batching across requests: one worker thread runs forward passes one after another.

Owns the bounded queue of inputs, the choice of each batch, the worker thread and each caller's hand-off.
It knows nothing of models: a ``BatchRunner`` prepares inputs (tokenizes them, in the worker thread, one
call for many) and runs a batch of prepared inputs (one forward pass).  Sizes are tokens.

The worker's loop, read aloud: wait for inputs (an idle worker then waits up to ``batch_wait`` for company;
a busy one takes whatever queued meanwhile) → prepare the inputs at the front → cut a batch: the oldest
input, then the queued inputs nearest it in length, up to ``max_batch`` of them and ``max_batch_tokens``
padded tokens (longest × count) → run it → hand each caller its rows.

Each call is one ``_Job``: its rows come back through its own future, in its input order.  A cancelled
caller's inputs that have not run are dropped; a caller refused while its inputs were prepared (too long,
say) is failed with the runner's error and its other inputs dropped.  A forward pass that raises is re-run
one input at a time, and only the inputs that fail alone fail their callers (ENGINE_ERROR).  Nothing here
is shared with callers except the queue (under one lock) and each job's future.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, cast

from inhouse.engine.threads import run_in_passing_thread
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["BatchLimits", "BatchRunner", "BatchStats", "Batched", "Batcher"]

log = logging.getLogger("inhouse.engine")

I = TypeVar("I")  # noqa: E741  an input as the caller hands it over
P = TypeVar("P")  # an input prepared to run (tokenized)
R = TypeVar("R")  # one row of output
I_contra = TypeVar("I_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)


class BatchRunner(Protocol[I_contra, P, R_co]):
    """The model side of a Batcher; every method runs in the worker thread."""

    def prepare(self, inputs: Sequence[I_contra]) -> list[P | InhouseError]:
        """Each input ready to run, in order, or the error that refuses its whole call (e.g. too long)."""
        ...

    def size(self, prepared: P) -> int:
        """The tokens one prepared input takes (what ``longest × count`` is counted in)."""
        ...

    def run(self, batch: Sequence[P]) -> Sequence[R_co]:
        """One forward pass: one row per input, in order."""
        ...


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch: int  # inputs per forward pass
    max_batch_tokens: int  # padded tokens per forward pass (longest × count); a lone longer input still runs
    batch_wait: float  # seconds an idle worker waits for company
    max_waiting: int  # inputs queued beyond the max_batch a pass takes: more is 429


@dataclass(frozen=True, slots=True)
class BatchStats:
    running: int  # inputs in the forward pass now
    waiting: int  # queued inputs
    batches: int  # forward passes run since start
    batched_inputs: int  # inputs they carried
    max_batch: int  # the most inputs one pass carried


@dataclass(frozen=True, slots=True)
class Batched(Generic[R]):
    """One call's rows, in its input order, and the tokens they took."""

    rows: list[R]
    tokens: int


class _Job(Generic[R]):
    """One call: its rows as they arrive, and the future its caller awaits.  Mutated under the batcher lock."""

    __slots__ = ("done", "future", "left", "loop", "rows", "tokens")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[Batched[R]] = loop.create_future()
        self.rows: list[R | None] = [None] * count
        self.left = count
        self.tokens = 0
        self.done = False  # answered, failed or cancelled: its queued inputs are dropped

    def settle(self, outcome: Batched[R] | InhouseError) -> None:
        """Thread-safe: hand the caller its outcome (once; never to a caller that already left)."""

        def deliver() -> None:
            if self.future.done():
                return
            if isinstance(outcome, InhouseError):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)

        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(deliver)


class _Slot(Generic[I, P, R]):
    """One input of one job, waiting in the queue."""

    __slots__ = ("index", "item", "job", "prepared", "size")

    def __init__(self, job: _Job[R], index: int, item: I) -> None:
        self.job = job
        self.index = index
        self.item = item
        self.prepared: P | None = None
        self.size = 0


class Batcher(Generic[I, P, R]):
    def __init__(self, runner: BatchRunner[I, P, R], limits: BatchLimits, name: str) -> None:
        self._runner = runner
        self._limits = limits
        self._name = name
        self._lookahead = 4 * limits.max_batch  # queued inputs prepared and considered for one batch
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: list[_Slot[I, P, R]] = []
        self._running = 0
        self._batches = 0
        self._batched_inputs = 0
        self._max_batch = 0
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def capacity(self) -> int:
        """Inputs in progress (running and queued) at most."""
        return self._limits.max_batch + self._limits.max_waiting

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=f"encoder-{self._name}", daemon=True)
        self._thread.start()

    def stats(self) -> BatchStats:
        return BatchStats(running=self._running, waiting=len(self._queue), batches=self._batches,
                          batched_inputs=self._batched_inputs, max_batch=self._max_batch)

    async def submit(self, items: Sequence[I], param: str = "input") -> Batched[R]:
        """Queue one call's inputs and await their rows, or raise InhouseError (queue full, a refused input,
        an input the model failed on, shutting down).  Cancelling the caller drops its inputs not yet run."""
        if len(items) > self.capacity:
            raise InhouseError(
                ErrorCode.INVALID_REQUEST,
                f"this request has {len(items)} inputs, but model {self._name!r} holds at most {self.capacity} "
                "at once; send fewer per request",
                param=param,
            )
        if not items:
            return Batched([], 0)
        job: _Job[R] = _Job(asyncio.get_running_loop(), len(items))
        with self._lock:
            if self._closing:
                raise InhouseError(ErrorCode.MODEL_UNAVAILABLE, f"model {self._name!r} is shutting down")
            in_progress = self._running + len(self._queue)
            if in_progress + len(items) > self.capacity:
                raise InhouseError(
                    ErrorCode.QUEUE_FULL,
                    f"model {self._name!r} is at capacity ({in_progress} inputs in progress); retry shortly",
                    retry_after=1.0,
                )
            self._queue.extend(_Slot(job, index, item) for index, item in enumerate(items))
            self._wakeup.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            with self._lock:
                self._drop(job)
            raise

    async def close(self) -> None:
        """Stop the worker (after the pass it is running) and fail every queued call."""
        with self._lock:
            self._closing = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._fail_queued()

    # ---- the worker thread ----------------------------------------------------------------

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._execute(batch)
        self._fail_queued()

    def _next_batch(self) -> list[_Slot[I, P, R]] | None:
        """The next batch to run ([] when every input looked at was refused or dropped), None when closing."""
        with self._lock:
            idle = False
            while not self._queue and not self._closing:
                idle = True
                self._wakeup.wait()
            if idle and self._limits.batch_wait > 0:
                deadline = time.monotonic() + self._limits.batch_wait
                while (len(self._queue) < self._limits.max_batch and not self._closing
                       and (left := deadline - time.monotonic()) > 0):
                    self._wakeup.wait(left)
            if self._closing:
                return None
            window = self._queue[:self._lookahead]
        self._prepare([slot for slot in window if slot.prepared is None])
        with self._lock:
            live = [slot for slot in window if not slot.job.done]
            batch = self._cut(live) if live else []
            if batch:
                taken = {id(slot) for slot in batch}
                self._queue = [slot for slot in self._queue if id(slot) not in taken]
                self._running = len(batch)
        return batch

    def _prepare(self, slots: list[_Slot[I, P, R]]) -> None:
        """Tokenize the slots (one runner call); a refused input fails its call and drops the call's others."""
        if not slots:
            return
        try:
            prepared = self._runner.prepare([slot.item for slot in slots])
        except Exception:
            log.exception("model %s: preparing %d inputs failed; preparing them one by one", self._name, len(slots))
            prepared = [self._prepare_alone(slot) for slot in slots]
        refused: list[tuple[_Job[R], InhouseError]] = []
        for slot, outcome in zip(slots, prepared, strict=True):
            if isinstance(outcome, InhouseError):
                refused.append((slot.job, outcome))
            else:
                slot.prepared = outcome
                slot.size = self._runner.size(outcome)
        with self._lock:
            for job, error in refused:
                self._fail(job, error)

    def _prepare_alone(self, slot: _Slot[I, P, R]) -> P | InhouseError:
        try:
            return self._runner.prepare([slot.item])[0]
        except Exception:
            log.exception("model %s: input %d of a request could not be prepared", self._name, slot.index)
            return InhouseError(ErrorCode.ENGINE_ERROR, f"the model could not read input {slot.index} of this request")

    def _cut(self, live: list[_Slot[I, P, R]]) -> list[_Slot[I, P, R]]:
        """The oldest input, then the inputs nearest it in length while the batch fits both limits."""
        head = live[0]
        ordered = sorted(live, key=lambda slot: slot.size)
        at = ordered.index(head)
        shorter, longer = ordered[:at], ordered[at + 1:][::-1]  # the nearest of each at its end
        batch, longest = [head], head.size
        while len(batch) < self._limits.max_batch and (shorter or longer):
            take_longer = bool(longer) and (not shorter or
                                            longer[-1].size - head.size <= head.size - shorter[-1].size)
            pick = longer[-1] if take_longer else shorter[-1]
            if (len(batch) + 1) * max(longest, pick.size) > self._limits.max_batch_tokens:
                if take_longer:
                    longer = []  # no longer input fits; a shorter one still may
                    continue
                break  # not even a shorter one fits
            (longer if take_longer else shorter).pop()
            batch.append(pick)
            longest = max(longest, pick.size)
        return batch

    def _execute(self, batch: list[_Slot[I, P, R]]) -> None:
        """One forward pass; when it raises, each input again alone, failing only those that fail alone."""
        try:
            rows: Sequence[R | None] = run_in_passing_thread(self._runner.run, [_prepared(slot) for slot in batch])
            if len(rows) != len(batch):
                raise RuntimeError(f"the runner returned {len(rows)} rows for {len(batch)} inputs")
        except Exception:
            if len(batch) > 1:
                log.warning("model %s: a batch of %d inputs failed; running them one by one", self._name, len(batch))
            rows = [self._run_alone(slot) for slot in batch]
        with self._lock:
            self._running = 0  # counted before any caller hears back, so its stats() include its own pass
            self._batches += 1
            self._batched_inputs += len(batch)
            self._max_batch = max(self._max_batch, len(batch))
            for slot, row in zip(batch, rows, strict=True):
                if row is None:
                    self._fail(slot.job, InhouseError(
                        ErrorCode.ENGINE_ERROR, f"the model failed on input {slot.index} of this request"))
                else:
                    self._deliver(slot, row)

    def _run_alone(self, slot: _Slot[I, P, R]) -> R | None:
        if slot.job.done:  # its call already failed (an earlier input of it failed alone) or left
            return None
        try:
            return run_in_passing_thread(self._runner.run, [_prepared(slot)])[0]
        except Exception:
            log.exception("model %s: input %d of a request failed the model", self._name, slot.index)
            return None

    # ---- job bookkeeping (under the lock) -------------------------------------------------

    def _deliver(self, slot: _Slot[I, P, R], row: R) -> None:
        job = slot.job
        if job.done:
            return
        job.rows[slot.index] = row
        job.tokens += slot.size
        job.left -= 1
        if job.left == 0:
            job.done = True
            job.settle(Batched(cast(list[R], job.rows), job.tokens))

    def _fail(self, job: _Job[R], error: InhouseError) -> None:
        if not job.done:
            self._drop(job)
            job.settle(error)

    def _drop(self, job: _Job[R]) -> None:
        job.done = True
        self._queue = [slot for slot in self._queue if slot.job is not job]

    def _fail_queued(self) -> None:
        with self._lock:
            jobs = {id(slot.job): slot.job for slot in self._queue}
            for job in jobs.values():
                self._fail(job, InhouseError(ErrorCode.MODEL_UNAVAILABLE, f"model {self._name!r} is shutting down"))
            self._queue = []


def _prepared(slot: _Slot[I, P, R]) -> P:
    assert slot.prepared is not None, "a batch holds prepared inputs only"
    return slot.prepared
