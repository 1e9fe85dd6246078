"""The engine seam: the one protocol every engine implements, and the plain data that crosses it.

Wire types (pydantic protocol models) stop before this module; engines see only these dataclasses.
An engine admits a request in ``submit`` (raising an InhouseError there, before any byte is sent)
and then hands the caller a Generation to iterate.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from inhouse.config import SamplingDefaults
from inhouse.engine.collector import OutputCollector

__all__ = [
    "DEFAULTABLE",
    "TEXT",
    "Capability",
    "Delta",
    "Engine",
    "EngineInfo",
    "EngineState",
    "EngineStats",
    "GenerateRequest",
    "Generation",
    "ModelLoadError",
    "SamplingParams",
    "TokenLogprob",
    "Usage",
]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    min_tokens: int = 0
    # fields the client left out (of DEFAULTABLE): the serving model's defaults fill them, engine side
    unset: frozenset[str] = frozenset()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1

    def with_defaults(self, defaults: SamplingDefaults) -> SamplingParams:
        """These parameters with the model's defaults in the fields the client left out."""
        values = {name: getattr(defaults, name) for name in self.unset if getattr(defaults, name) is not None}
        if "top_k" in values:
            values["top_k"] = max(values["top_k"], 0)
        return replace(self, unset=self.unset - values.keys(), **values)


DEFAULTABLE = ("temperature", "top_p", "top_k", "repetition_penalty")  # max_tokens: see completion_budget


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One sequence to generate.  Exactly one of ``messages`` and ``prompt`` is set."""

    request_id: str
    sampling: SamplingParams
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    """What one choice used, as the engine counted it (an upstream's own count when it sends one)."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class Delta:
    """New output since the previous Delta.  ``finish_reason`` and ``usage`` are set on the last one only."""

    text: str = ""
    token_count: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None

    def merge(self, later: Delta) -> None:
        self.text += later.text
        self.token_count += later.token_count
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.finish_reason is not None:
            self.finish_reason = later.finish_reason
        if later.usage is not None:
            self.usage = later.usage


class ModelLoadError(Exception):
    """A model could not be loaded, with a message written for the operator: what failed and the fix.

    Only this exception's message is shown outside the log (in ``/health``); any other failure while
    loading is reported there as a generic "see the server log".
    """


class Capability(enum.Enum):
    """What a model can be asked for; its card in ``/v1/models`` lists them."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDINGS = "embeddings"
    RERANK = "rerank"
    TOOLS = "tools"
    VISION = "vision"
    JSON_SCHEMA = "json_schema"


TEXT = frozenset({Capability.CHAT, Capability.COMPLETION})


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class EngineInfo:
    kind: str
    context_length: int
    max_num_seqs: int
    device: str = "cpu"
    dtype: str = "float32"
    capabilities: frozenset[Capability] = TEXT  # a generator without a chat template: COMPLETION only


@dataclass(frozen=True, slots=True)
class EngineStats:
    state: EngineState
    running: int
    waiting: int
    kv_cache_tokens: int = 0
    kv_cache_usage: float = 0.0  # fraction of the engine's KV-cache budget in use


class Generation:
    """The caller's handle on one admitted request: iterate it for Deltas, abort it to stop early."""

    def __init__(self, request_id: str, prompt_tokens: int, collector: OutputCollector[Delta],
                 abort: Callable[[str], None], max_tokens: int = 0) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens  # the completion budget the engine granted (0: unknown, an upstream's default)
        self._collector = collector
        self._abort = abort
        self._done = False
        self._on_done: list[Callable[[], None]] = []

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """``callback()`` once, when the generation finished, failed or was aborted (the router's load count)."""
        self._on_done.append(callback)

    def _settle(self) -> None:
        callbacks, self._on_done = self._on_done, []
        for callback in callbacks:
            callback()

    def __aiter__(self) -> AsyncGenerator[Delta]:
        return self._iterate()

    async def _iterate(self) -> AsyncGenerator[Delta]:
        try:
            while not self._done:
                delta = await self._collector.get()
                if delta.finish_reason is not None:
                    self._done = True
                yield delta
        finally:
            if not self._done:
                self.abort()
            self._settle()

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._abort(self.request_id)
        self._settle()


class Engine(Protocol):
    """What the server needs from any engine: load, admit, report, close."""

    @property
    def info(self) -> EngineInfo: ...

    @property
    def state(self) -> EngineState: ...

    async def start(self) -> None:
        """Load weights.  Returns when ready; raises if loading failed."""

    async def submit(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        """Admit the choices of one call, all or none, or raise InhouseError (bad input, context length,
        queue full, not ready).  Nothing a request carries may fail any other request later."""

    def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...
