"""FakeEngine: a deterministic scripted engine for gateway tests and benchmarks (``engine: fake``).

It answers every request with the configured reply (markup included: the server reads tool calls and thinking
out of it with the parsers the spec names, as from a local model), one word per token, optionally with a delay
per token, and optionally fails mid-stream after N tokens (``fake_fail_after``) to exercise error paths, or
dies altogether after N requests (``fake_die_after``: state FAILED and ``stats().alive`` False, as a local
engine whose loop thread died) to exercise the liveness probe.  Prompt tokens are counted as
whitespace-separated words.  It honours max_tokens, stop strings and the same queue bounds as a real engine,
so the server around it behaves as in production.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence as Seq

from inhouse.config import FakeSpec
from inhouse.engine.admission import AdmissionGate, completion_budget
from inhouse.engine.base import (
    TEXT,
    Capability,
    Delta,
    EngineInfo,
    EngineState,
    EngineStats,
    GenerateRequest,
    Generation,
    Usage,
)
from inhouse.engine.collector import OutputCollector
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["FakeEngine"]

_WORD = re.compile(r"\S+\s*")


class FakeEngine:
    def __init__(self, spec: FakeSpec) -> None:
        self.spec = spec
        self._state = EngineState.LOADING
        self._pieces = _WORD.findall(spec.fake_reply) or [spec.fake_reply]
        self._running = 0
        self._waiting = 0
        self._slots = asyncio.Semaphore(spec.max_num_seqs)
        self._gate = AdmissionGate(spec.name, spec.max_num_seqs + spec.max_waiting)
        self._tasks: set[asyncio.Task[None]] = set()
        self._finished = 0

    @property
    def info(self) -> EngineInfo:
        tool_parser = None if self.spec.tool_parser == "none" else self.spec.tool_parser
        return EngineInfo(kind="fake", context_length=self.spec.context_length or 4096,
                          max_num_seqs=self.spec.max_num_seqs,
                          capabilities=TEXT | {Capability.TOOLS} if tool_parser else TEXT, tool_parser=tool_parser,
                          reasoning_parser=None if self.spec.reasoning_parser == "none" else self.spec.reasoning_parser)

    @property
    def state(self) -> EngineState:
        return EngineState.FAILED if self._state is EngineState.READY and not self._alive() else self._state

    def _alive(self) -> bool:
        return self.spec.fake_die_after is None or self._finished < self.spec.fake_die_after

    async def start(self) -> None:
        self._state = EngineState.READY

    def stats(self) -> EngineStats:
        return EngineStats(state=self.state, running=self._running, waiting=self._waiting, alive=self._alive())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._state = EngineState.CLOSED

    async def submit(self, requests: Seq[GenerateRequest]) -> list[Generation]:
        if self.state is not EngineState.READY:
            raise InhouseError(ErrorCode.MODEL_UNAVAILABLE, f"model {self.spec.name!r} is not available")
        self._gate.check(len(requests))
        prompts = [_count_prompt(r) for r in requests]
        budgets = [completion_budget(prompt, r.sampling.max_tokens, self.info.context_length,
                                     self.spec.defaults.max_tokens or len(self._pieces), self.spec.clamp_max_tokens)
                   for r, prompt in zip(requests, prompts, strict=True)]
        self._gate.admit(len(requests))
        return [self._start(*admitted) for admitted in zip(requests, prompts, budgets, strict=True)]

    def _start(self, request: GenerateRequest, prompt_tokens: int, max_tokens: int) -> Generation:
        collector: OutputCollector[Delta] = OutputCollector(asyncio.get_running_loop())
        cancelled = asyncio.Event()
        self._waiting += 1
        task = asyncio.create_task(self._produce(request, prompt_tokens, max_tokens, collector, cancelled))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Generation(request.request_id, prompt_tokens, collector, lambda _rid: cancelled.set(), max_tokens)

    async def _produce(self, request: GenerateRequest, prompt_tokens: int, max_tokens: int,
                       collector: OutputCollector[Delta], cancelled: asyncio.Event) -> None:
        try:
            async with self._slots:
                self._waiting -= 1
                self._running += 1
                try:
                    await self._emit(request, prompt_tokens, max_tokens, collector, cancelled)
                finally:
                    self._running -= 1
        except asyncio.CancelledError:
            collector.fail(InhouseError(ErrorCode.MODEL_UNAVAILABLE, "the engine shut down"))
        finally:
            self._finished += 1
            self._gate.release()

    async def _emit(self, request: GenerateRequest, prompt_tokens: int, max_tokens: int,
                    collector: OutputCollector[Delta], cancelled: asyncio.Event) -> None:
        stops = request.sampling.stop
        text_so_far = ""
        for count, piece in enumerate(self._pieces[:max_tokens], start=1):
            if cancelled.is_set():
                return
            if self.spec.fake_fail_after is not None and count > self.spec.fake_fail_after:
                collector.fail(InhouseError(ErrorCode.ENGINE_ERROR, "the fake engine failed as configured"))
                return
            if self.spec.fake_token_delay:
                await asyncio.sleep(self.spec.fake_token_delay)
            candidate = text_so_far + piece
            cut = min((candidate.find(s) for s in stops if s in candidate), default=-1)
            if cut != -1:
                collector.put(Delta(text=candidate[len(text_so_far):cut], token_count=1, finish_reason="stop",
                                    usage=Usage(prompt_tokens, count)))
                return
            text_so_far = candidate
            last = count == min(max_tokens, len(self._pieces))
            finish = None if not last else ("stop" if count == len(self._pieces) else "length")
            collector.put(Delta(text=piece, token_count=1, finish_reason=finish,
                                usage=Usage(prompt_tokens, count) if finish else None))


def _count_prompt(request: GenerateRequest) -> int:
    if request.messages is not None:
        return sum(len(str(m.get("content") or "").split()) + 2 for m in request.messages)
    if isinstance(request.prompt, tuple):
        return len(request.prompt)
    return len((request.prompt or "").split())
