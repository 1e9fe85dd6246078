"""Response wire models: every JSON body the server sends, as it is really rendered, for ``/openapi.json``.

Owns the shapes only; the routes still build their bodies with the builders next to the request models, and
these models describe those dicts field for field (``extra="forbid"``: a field the server adds without adding
it here breaks the contract test).  A field typed ``X | SkipJsonSchema[None] = None`` may be absent but is
never ``null``.  Nothing here knows about engines or HTTP.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

__all__ = [
    "Adapter",
    "AdapterDeleted",
    "AdapterList",
    "AdminModelList",
    "ApiKey",
    "ApiKeyList",
    "AuditList",
    "AuditRow",
    "AuditVerification",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Completion",
    "CompletionChunk",
    "EmbeddingList",
    "ErrorResponse",
    "Health",
    "ModelCard",
    "ModelList",
    "ModelStatus",
    "NewApiKey",
    "Ready",
    "ReloadResult",
    "RerankResult",
    "SwapResult",
]

EngineStateName = Literal["loading", "ready", "failed", "closed"]
ModelStateName = Literal["loading", "ready", "draining", "failed"]
Circuit = Literal["closed", "open", "half_open"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------- errors


class ErrorDetail(_Body):
    message: str = Field(description="written for the client; never an internal exception's text")
    type: str = Field(description="OpenAI's vocabulary: invalid_request_error, authentication_error, ...")
    param: str | None = Field(description="the offending request field, dotted (messages.0.role), if any")
    code: str | None = Field(description="inhouse's stable error code (README: the error table)")


class ErrorResponse(_Body):
    error: ErrorDetail


# ----------------------------------------------------------------------------------------------- generation


class PromptTokensDetails(_Body):
    cached_tokens: int = Field(description="prompt tokens served from the engine's prefix cache (0: none)")


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | SkipJsonSchema[None] = Field(
        default=None, description="when the engine counts cached prompt tokens (the transformers and vLLM engines "
                                  "always; an upstream when it sends them)")


class TopLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Body):
    content: list[TokenLogprob]


class FunctionCall(_Body):
    name: str
    arguments: str = Field(description="a JSON object's text (\"{}\" for no arguments)")


class ToolCall(_Body):
    id: str = Field(description="call_ and 24 letters or digits; the tool message answering it echoes it")
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Body):
    role: Literal["assistant"]
    content: str | None = Field(description="null only when the answer is tool calls and nothing else")
    tool_calls: list[ToolCall] | SkipJsonSchema[None] = Field(default=None, description="when the model called tools")
    function_call: FunctionCall | SkipJsonSchema[None] = Field(
        default=None, description="instead of tool_calls when the request sent legacy functions: the first call")
    reasoning_content: str | SkipJsonSchema[None] = Field(default=None, description="the model's thinking, if any")
    reasoning: str | SkipJsonSchema[None] = Field(default=None, description="the same thinking (vLLM's name)")


class ChatChoice(_Body):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None = Field(description="stop, length, tool_calls (function_call for legacy functions)")


class ChatCompletion(_Body):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str = Field(description="the model that answered (a fallback may differ from the one asked)")
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallChunk(_Body):
    name: str | SkipJsonSchema[None] = Field(default=None, description="in the call's first piece")
    arguments: str = Field(description="a fragment: a call's fragments joined are its arguments' JSON object")


class ToolCallChunk(_Body):
    """A piece of one tool call; all pieces of call ``index`` come before any of the next call's."""

    index: int
    id: str | SkipJsonSchema[None] = Field(default=None, description="in the call's first piece")
    type: Literal["function"] | SkipJsonSchema[None] = Field(default=None, description="in the call's first piece")
    function: FunctionCallChunk


class ChatDelta(_Body):
    role: Literal["assistant"] | SkipJsonSchema[None] = Field(default=None, description="first chunk only")
    content: str | SkipJsonSchema[None] = None
    reasoning_content: str | SkipJsonSchema[None] = Field(default=None, description="a piece of the thinking")
    reasoning: str | SkipJsonSchema[None] = Field(default=None, description="the same piece (vLLM's name)")
    tool_calls: list[ToolCallChunk] | SkipJsonSchema[None] = None
    function_call: FunctionCallChunk | SkipJsonSchema[None] = Field(default=None, description="legacy functions")


class ChatChunkChoice(_Body):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Body):
    """One ``data:`` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice] = Field(description="empty in the separate usage chunk (include_usage)")
    usage: Usage | None = Field(default=None, description="on the last chunk; null before it with include_usage")


class CompletionLogprobs(_Body):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(_Body):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(_Body):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Body):
    """One ``data:`` event of a streamed completion (OpenAI names its object ``text_completion`` too)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class StreamError(_Body):
    """The one event a stream carries if it fails after its first byte; ``data: [DONE]`` follows."""

    error: ErrorDetail


# ----------------------------------------------------------------------------------------------- embeddings


class EmbeddingUsage(_Body):
    prompt_tokens: int
    total_tokens: int


class Embedding(_Body):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 (encoding_format)")


class EmbeddingList(_Body):
    object: Literal["list"]
    data: list[Embedding] = Field(description="one per input, in input order")
    model: str
    usage: EmbeddingUsage


class RerankedDocument(_Body):
    text: str


class Reranked(_Body):
    index: int = Field(description="the document's position in the request")
    relevance_score: float = Field(ge=0, le=1)
    document: RerankedDocument | SkipJsonSchema[None] = Field(default=None, description="with return_documents")


class RerankResult(_Body):
    id: str
    model: str
    results: list[Reranked] = Field(description="by descending relevance, at most top_n")
    usage: EmbeddingUsage


# ----------------------------------------------------------------------------------------------- models


class DeploymentCard(_Body):
    name: str
    engine: str = Field(description="transformers, vllm, sentence-transformers, upstream or fake")
    status: EngineStateName
    healthy: bool
    circuit: Circuit
    in_flight: int
    weight: float
    version: str = Field(description="the version this deployment serves (a label, or v- and a checkpoint hash)")


class ModelCard(_Body):
    id: str
    object: Literal["model"]
    created: int
    owned_by: Literal["inhouse"]
    engine: str
    status: EngineStateName = Field(description="the first ready deployment's state, else the first's")
    state: ModelStateName = Field(description="the model's: ready when a deployment answers, draining while the "
                                  "server shuts down, loading while one may still load, else failed")
    capabilities: list[Literal["chat", "completion", "embeddings", "rerank", "tools", "vision", "json_schema"]] = \
        Field(description="what the model can be asked for")
    max_model_len: int | SkipJsonSchema[None] = None
    embedding_dimensions: int | SkipJsonSchema[None] = Field(default=None, description="embedding models")
    matryoshka_dimensions: list[int] | SkipJsonSchema[None] = Field(
        default=None, description="the sizes `dimensions` may ask for (empty: any up to embedding_dimensions)")
    rerank_method: Literal["cross-encoder", "embedding-cosine", "upstream"] | SkipJsonSchema[None] = Field(
        default=None, description="how rerank scores are made: a cross-encoder, or the cosine similarity of "
        "embeddings (clamped to [0, 1]; a weaker ranking than a cross-encoder's), or the upstream's")
    fallbacks: list[str] | SkipJsonSchema[None] = None
    deployments: list[DeploymentCard]
    version: str = Field(description="the versions serving, comma-separated (one, except during a change)")


class ModelList(_Body):
    object: Literal["list"]
    data: list[ModelCard] = Field(description="only the models the caller's key may use")


# ----------------------------------------------------------------------------------------------- health


class DeploymentHealth(_Body):
    deployment: str
    state: EngineStateName
    running: int
    waiting: int
    kv_cache_tokens: int
    kv_cache_usage: float
    healthy: bool
    circuit: Circuit
    in_flight: int
    alive: bool = Field(description="false: the engine's loop died (liveness fails; restart the process)")
    error: str | SkipJsonSchema[None] = Field(default=None, description="why the deployment failed to load")
    health_error: str | SkipJsonSchema[None] = Field(default=None, description="why its last health check failed")
    batches: int | SkipJsonSchema[None] = Field(default=None, description="encoders: forward passes run")
    batched_inputs: int | SkipJsonSchema[None] = Field(default=None, description="encoders: inputs they carried")
    max_batch: int | SkipJsonSchema[None] = Field(default=None, description="encoders: most inputs in one pass")


class ModelHealth(DeploymentHealth):
    """The model's first deployment, plus all of them."""

    deployments: list[DeploymentHealth]


class Health(_Body):
    status: Literal["ok", "unhealthy"] = Field(description="unhealthy (503): restart the process")
    problems: list[str] | SkipJsonSchema[None] = Field(
        default=None, description="unhealthy: why (an engine loop died, the audit writer is stuck)")
    models: dict[str, ModelHealth]


class Ready(_Body):
    status: Literal["ready", "loading", "draining"]
    models: dict[str, EngineStateName] = Field(description="by deployment label")


# ----------------------------------------------------------------------------------------------- admin


class AdminDeployment(_Body):
    name: str
    engine: str
    state: Literal["loading", "ready", "draining", "failed", "closed"]
    alive: bool
    healthy: bool
    circuit: Circuit
    in_flight: int
    running: int
    waiting: int
    weight: float
    error: str | SkipJsonSchema[None] = Field(default=None, description="why it failed to load or is down")


class AdminModel(_Body):
    id: str
    object: Literal["model"]
    state: ModelStateName
    deployments: list[AdminDeployment]


class AdminModelList(_Body):
    """Every served model's state, whatever the admin key's model list."""

    object: Literal["list"]
    draining: bool = Field(description="the server is shutting down (SIGTERM)")
    in_flight: int = Field(description="API calls being answered")
    data: list[AdminModel]


class ApiKey(_Body):
    """A key as the admin API shows it: never its secret or the secret's hash."""

    id: str
    name: str
    prefix: str = Field(description="the secret's first characters, to recognise it")
    admin: bool
    models: list[str] | None = Field(description="the models it may use; null: every model")
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    token_budget: int | None
    budget_period: Literal["day", "month"] | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    status: Literal["active", "revoked", "expired"]


class NewApiKey(ApiKey):
    secret: str = Field(description="shown once, in this answer only")


class ApiKeyList(_Body):
    object: Literal["list"]
    data: list[ApiKey]


class AuditRow(_Body):
    seq: int
    at: float
    request_id: str
    key_id: str | None
    key_name: str | None
    client_ip: str | None
    method: str
    path: str
    model: str | None
    served_model: str | None
    deployment: str | None
    status: int
    error_code: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float
    ttft_ms: float | None
    stream: bool
    finish_reason: str | None
    prompt_text: str | None
    response_text: str | None
    prev_hash: str
    row_hash: str
    client_subject: str | None = Field(default=None, description="the client certificate's subject (mTLS), RFC 4514")
    model_version: str | None = Field(default=None, description="the version of the deployment that answered")


class AuditList(_Body):
    object: Literal["list"]
    data: list[AuditRow] = Field(description="newest first")
    at: float = Field(description="when the search ran (unix seconds)")


class AuditVerification(_Body):
    ok: bool
    rows: int = Field(description="rows checked before the first problem")
    problem: str | None


# ----------------------------------------------------------------------------------------------- adapters, swaps


class Adapter(_Body):
    """A LoRA adapter model (docs/lora.md): over a local base its PEFT ``path``, over an upstream its
    ``upstream_model``."""

    object: Literal["adapter"]
    name: str
    base: str
    path: str | SkipJsonSchema[None] = None
    upstream_model: str | SkipJsonSchema[None] = None
    state: EngineStateName
    resident: bool | None = Field(description="its weights are in memory now (null: the engine does not say)")


class AdapterList(_Body):
    object: Literal["list"]
    data: list[Adapter]


class AdapterDeleted(_Body):
    object: Literal["adapter"]
    name: str
    deleted: Literal[True]


class SwapResult(_Body):
    """What a swap, rollback or reload of one model did (docs/swaps.md)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    object: Literal["model.swap"]
    model: str
    kind: Literal["swap", "rollback", "reload"]
    from_: str = Field(alias="from", description="the versions serving before")
    to: str | None = Field(description="the new versions (null: refused before they were built)")
    at: float
    outcome: Literal["swapped", "promoted", "rolled_back", "failed"]
    reason: str | SkipJsonSchema[None] = None
    share: float | SkipJsonSchema[None] = None
    window_s: float | SkipJsonSchema[None] = None
    ended_after_s: float | SkipJsonSchema[None] = None
    ended_early: bool | SkipJsonSchema[None] = None
    canary: dict[str, float | int | None] | SkipJsonSchema[None] = None
    baseline: dict[str, float | int | None] | SkipJsonSchema[None] = None


class VersionDeployment(_Body):
    name: str
    version: str
    state: EngineStateName
    in_flight: int


class ModelStatus(_Body):
    object: Literal["model.status"]
    name: str
    versions: list[str]
    deployments: list[VersionDeployment]
    canary: dict[str, Any] | None = Field(description="the canary running now, or null")
    previous_versions: int = Field(description="versions a rollback can go back to")
    last_swap: SwapResult | None


class ReloadResult(_Body):
    object: Literal["reload"]
    added: list[str]
    removed: list[str]
    swapped: list[str]
    unchanged: list[str]
    failed: dict[str, str] = Field(description="model → why its swap was refused (it keeps serving)")
    kept: list[str] = Field(description="LoRA adapters loaded at runtime (not in the file) over a base it still serves")
