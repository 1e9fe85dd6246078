"""The engine seam: the protocols engines implement, and the plain data that crosses them.

Wire types (pydantic protocol models) stop before this module; engines see only these dataclasses.
Every engine has the ``Engine`` lifecycle (info, state, start, stats, close) and serves one or more
operations, each its own protocol: a ``Generator`` admits a request in ``submit`` (raising an
InhouseError there, before any byte is sent) and hands the caller a Generation to iterate; an
``Embedder`` turns texts into vectors, a ``Reranker`` scores documents against a query.  What an
engine serves is also in ``info.capabilities`` (the cards in ``/v1/models``), known before it loads.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from inhouse.config import SamplingDefaults
from inhouse.engine.collector import OutputCollector

__all__ = [
    "DEFAULTABLE",
    "TEXT",
    "Capability",
    "Delta",
    "EmbedRequest",
    "Embedder",
    "Embeddings",
    "Engine",
    "EngineInfo",
    "EngineState",
    "EngineStats",
    "GenerateRequest",
    "Generation",
    "Generator",
    "ModelLoadError",
    "RerankRequest",
    "RerankScores",
    "Reranker",
    "SamplingParams",
    "TokenLogprob",
    "ToolCallDelta",
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
    """One sequence to generate.  Exactly one of ``messages`` and ``prompt`` is set.

    ``messages`` are OpenAI-shaped dicts; a message's ``content`` is a string, or a list of parts when it has
    parts other than text (images), which only an engine that serves VISION may accept.  ``tools`` are
    OpenAI tool definitions (legacy ``functions`` already turned into tools), ``tool_choice`` is ``"auto"``,
    ``"none"``, ``"required"`` or ``{"type": "function", "function": {"name": ...}}``; ``response_format``
    is OpenAI's object as sent.  An upstream engine forwards all of them."""

    request_id: str
    sampling: SamplingParams
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | tuple[int, ...] | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    # the decoded images of the messages' image parts, in order of appearance (PIL.Image.Image, RGB), filled
    # by the server (``inhouse.server.images``) for an engine that serves VISION; the parts keep their URLs
    images: tuple[Any, ...] = ()
    adapter: str | None = None  # a LoRA adapter of the engine's base model (set by AdapterEngine); None: the base


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    """What one choice used, as the engine counted it (an upstream's own count when it sends one).

    ``cached_tokens``: how many of the prompt tokens were served from a prefix cache (OpenAI's
    ``usage.prompt_tokens_details.cached_tokens``); None when the engine does not know (an upstream that did not
    say), 0 when it knows none were."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of one tool call of a choice.  The first piece of call ``index`` (0, 1, ... in order; calls never
    interleave) carries its ``id`` and ``name``; every piece may carry a fragment of its ``arguments`` (JSON
    text: the fragments of a call, joined, are its arguments object)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class Delta:
    """New output since the previous Delta.  ``finish_reason`` and ``usage`` are set on the last one only.

    ``text`` is answer content, ``reasoning`` the model's thinking (split from ``<think>`` or relayed from an
    upstream), ``tool_calls`` pieces of tool calls (``finish_reason`` is then ``"tool_calls"``)."""

    text: str = ""
    token_count: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] | None = None

    def merge(self, later: Delta) -> None:
        self.text += later.text
        self.reasoning += later.reasoning
        self.token_count += later.token_count
        if later.tool_calls is not None:
            self.tool_calls = (self.tool_calls or []) + later.tool_calls
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
    # embedding models: the vector size (0: not known yet, or not an embedder), and the sizes ``dimensions``
    # may ask for: None when the model was not trained for truncation (Matryoshka), () for any size up to it
    embedding_dimensions: int = 0
    matryoshka_dimensions: tuple[int, ...] | None = None
    # rerankers: how the scores are made ("cross-encoder", "embedding-cosine", "upstream")
    rerank_method: str | None = None
    # generators: how the server reads tool calls and thinking out of the model's text (None: it does not;
    # an upstream sends them already split)
    tool_parser: str | None = None
    reasoning_parser: str | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    state: EngineState
    running: int
    waiting: int
    kv_cache_tokens: int = 0
    kv_cache_usage: float = 0.0  # fraction of the engine's KV-cache budget in use
    # batching encoders (embeddings, rerank): forward passes run and the inputs they carried, since start
    batches: int = 0
    batched_inputs: int = 0
    max_batch: int = 0  # the most inputs one forward pass carried
    # False: the engine's worker (its loop thread) died; it will never answer again and the process should be
    # restarted (the server's liveness probe fails).  The state is then FAILED.
    alive: bool = True
    # the transformers engine's prefix cache (docs/engine.md), since start: prompt tokens whose KV was reused
    # (hits) or computed (misses) while it was on, blocks evicted to stay within its budget, and bytes held now;
    # the vLLM engine fills the hits and misses from vLLM's own prefix cache
    prefix_cache_hit_tokens: int = 0
    prefix_cache_miss_tokens: int = 0
    prefix_cache_evictions: int = 0
    prefix_cache_bytes: int = 0
    # the transformers engine's KV memory (docs/engine.md): bytes its tiers hold now (the prefix cache apart), and
    # its budget (kv_cache_gib); kv_cache_usage is then the share of the budget the running sequences reserve
    kv_cache_bytes: int = 0
    kv_cache_budget_bytes: int = 0


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


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """Texts (or token-id lists, in the model's own vocabulary) to embed, in order."""

    request_id: str
    inputs: tuple[str | tuple[int, ...], ...]
    dimensions: int | None = None  # truncate each vector to this size (Matryoshka models only)


@dataclass(frozen=True, slots=True)
class Embeddings:
    """One float32 row per input, in input order, and the tokens the inputs took (as the model counted)."""

    vectors: npt.NDArray[np.float32]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class RerankRequest:
    request_id: str
    query: str
    documents: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RerankScores:
    """One relevance score in [0, 1] per document, in input order (the route sorts and cuts)."""

    scores: tuple[float, ...]
    prompt_tokens: int


@runtime_checkable
class Engine(Protocol):
    """What every engine has, whatever it serves: load, report, close."""

    @property
    def info(self) -> EngineInfo: ...

    @property
    def state(self) -> EngineState: ...

    async def start(self) -> None:
        """Load weights.  Returns when ready; raises if loading failed."""

    def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...


@runtime_checkable
class Generator(Engine, Protocol):
    """Chat and text completion."""

    async def submit(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        """Admit the choices of one call, all or none, or raise InhouseError (bad input, context length,
        queue full, not ready).  Nothing a request carries may fail any other request later."""


@runtime_checkable
class Embedder(Engine, Protocol):
    async def embed(self, request: EmbedRequest) -> Embeddings:
        """The request's vectors, or InhouseError (bad input, too long when strict, queue full, not ready).
        Cancelling the caller drops its inputs that have not run yet; nothing one request carries may fail
        another batched with it."""


@runtime_checkable
class Reranker(Engine, Protocol):
    async def rerank(self, request: RerankRequest) -> RerankScores:
        """Each document's relevance to the query, as ``embed`` for errors, cancelling and batching."""
