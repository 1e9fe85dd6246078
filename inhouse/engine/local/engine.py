"""LocalEngine: the transformers engine with continuous batching, behind the Engine protocol.

Owns the engine thread and its loop (admit → schedule → run → sample → hand out → finish), admission
(context length, queue bounds) and aborts.  The only state shared with request coroutines is the
inbox and abort set (under one lock) and each request's OutputCollector.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from inhouse.config import LocalSpec
from inhouse.engine.admission import AdmissionGate, check_ready, completion_budget
from inhouse.engine.answer_schema import answer_schema
from inhouse.engine.base import (
    Capability,
    EngineInfo,
    EngineState,
    EngineStats,
    GenerateRequest,
    Generation,
    ModelLoadError,
    SamplingParams,
)
from inhouse.engine.collector import OutputCollector
from inhouse.engine.local.allocator import keep_freed_memory, release_freed_memory
from inhouse.engine.local.attention import prefers_flash, register
from inhouse.engine.local.attention_kernel import AttentionKernel
from inhouse.engine.local.detokenizer import IncrementalDetokenizer, StopMatcher
from inhouse.engine.local.grammar import Constraint, Grammars, apply_constraints
from inhouse.engine.local.kv_budget import kv_budget_tokens
from inhouse.engine.local.kv_tiers import KVTiers
from inhouse.engine.local.linear_kernel import LinearKernel
from inhouse.engine.local.loader import LoadedModel, load_model
from inhouse.engine.local.lora import LoraSet
from inhouse.engine.local.prefix_cache import PrefixCache
from inhouse.engine.local.runner import ModelRunner
from inhouse.engine.local.sampler import Sampler
from inhouse.engine.local.scheduler import Scheduler, Step
from inhouse.engine.local.sequence import Sequence, SequenceStatus
from inhouse.engine.prompt import PromptBuilder
from inhouse.engine.threads import in_passing_thread
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["LocalEngine"]

log = logging.getLogger("inhouse.engine")

_MAX_PREFILL_TOKENS = 4096
_IDLE_WAIT_SECONDS = 0.5
_IDLE_RELEASE_SECONDS = 2.0  # idle this long, the engine gives back its KV tiers and the memory steps left free


class LocalEngine:
    def __init__(self, spec: LocalSpec, cache_dir: Path) -> None:
        self.spec = spec
        self._cache_dir = cache_dir
        self._state = EngineState.LOADING
        self._info = EngineInfo(kind="transformers", context_length=0, max_num_seqs=spec.max_num_seqs)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inbox: list[Sequence] = []
        self._aborted: set[str] = set()
        self._admitted: dict[int, Sequence] = {}  # id → every sequence admitted and not finished, wherever it is
        self._gate = AdmissionGate(spec.name, spec.max_num_seqs + spec.max_waiting)
        self._running_count = 0
        self._waiting_count = 0
        self._kv_tokens = 0
        self._kv_bytes = 0
        self._kv_charged = 0
        self._tiers: KVTiers[Sequence] | None = None  # the engine thread's, once loaded
        self._budget_tokens = 0  # KV memory of the model, in tokens (kv_budget.py)
        self._prefix: PrefixCache | None = None  # the engine thread's; stats() reads its counters
        self._kernel: AttentionKernel | None = None  # the compiled attention, when it runs here
        self._linear_kernel: LinearKernel | None = None  # the compiled linear layers, when they run here
        self._flash = False  # long prompts' attention by PyTorch's flash attention (a CPU with AMX: attention.py)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._loaded: LoadedModel | None = None
        self._prompts: PromptBuilder | None = None
        self._grammars: Grammars | None = None
        self.lora: LoraSet | None = None  # the LoRA adapters served over this model (docs/lora.md), once loaded

    # ---- Engine protocol -------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def state(self) -> EngineState:
        if self._state is EngineState.READY and not self._loop_alive():
            return EngineState.FAILED
        return self._state

    def _loop_alive(self) -> bool:
        """The engine thread runs (or has not started, or was asked to stop)."""
        return self._thread is None or self._closing or self._thread.is_alive()

    async def start(self) -> None:
        keep_freed_memory()  # for the engine's steps (allocator.py); given back while it is idle
        try:
            loaded = await in_passing_thread(load_model, self.spec, self._cache_dir, register())
        except BaseException:
            self._state = EngineState.FAILED
            raise
        vocab_size = loaded.model.get_input_embeddings().num_embeddings
        self._loaded = loaded
        try:
            self._plan_memory(loaded)
        except BaseException:
            self._state = EngineState.FAILED
            raise
        self.lora = LoraSet(loaded.model, getattr(self.spec, "max_loras", 8), loaded.dtype, loaded.device)
        self._flash = prefers_flash(loaded.device, loaded.dtype)
        if self._flash:
            log.info("model %s: long prompts' attention by PyTorch's flash attention (the CPU has AMX)",
                     self.spec.name)
        self._kernel = await in_passing_thread(self._attention_kernel, loaded)
        self._linear_kernel = await in_passing_thread(self._linear_layers, loaded)
        self._grammars = await in_passing_thread(Grammars, loaded.tokenizer, vocab_size, loaded.stop_ids)
        self._prompts = PromptBuilder(loaded.tokenizer, vocab_size, loaded.context_length, self.spec.tool_parser,
                                      self.spec.reasoning_parser, can_constrain=self._grammars.available)
        capabilities = self._prompts.capabilities
        if Capability.CHAT in capabilities and self._grammars.available:
            capabilities |= {Capability.JSON_SCHEMA}
        self._info = EngineInfo(
            kind="transformers",
            context_length=loaded.context_length,
            max_num_seqs=self.spec.max_num_seqs,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            capabilities=capabilities,
            tool_parser=self._prompts.tool_parser,
            reasoning_parser=self._prompts.reasoning_parser,
        )
        self._thread = threading.Thread(target=self._run, args=(loaded,), name=f"engine-{self.spec.name}", daemon=True)
        self._thread.start()
        await self._warm_up()
        self._state = EngineState.READY
        log.info("model %s ready: context %d tokens, up to %d sequences at once",
                 self.spec.name, loaded.context_length, self.spec.max_num_seqs)

    async def _warm_up(self) -> None:
        """One token through the whole path (tokenize, prefill, sample, detokenize) before the engine says it is
        ready, so ``/ready`` waits for it and the first client does not pay for lazy initialisation."""
        request = GenerateRequest("warm-up", SamplingParams(max_tokens=1, temperature=0.0), prompt="Hello")
        try:
            for generation in await self._admit([request]):
                async for _ in generation:
                    pass
        except Exception as exc:
            log.exception("model %s failed its warm-up generation", self.spec.name)
            self._state = EngineState.FAILED
            await self.close()
            self._state = EngineState.FAILED
            raise ModelLoadError(f"model {self.spec.name!r} loaded but failed its first generation (warm-up); "
                                 "the reason is in the server log") from exc

    async def submit(self, requests: Seq[GenerateRequest]) -> list[Generation]:
        self._check_ready()
        return await self._admit(requests)

    async def _admit(self, requests: Seq[GenerateRequest]) -> list[Generation]:
        assert self._loaded is not None and self._prompts is not None
        self._gate.check(len(requests))  # a full engine refuses before tokenizing anything
        self._check_adapters(requests)
        prompts = await self._prompts.token_ids_all(requests)
        constraints = await self._constraints(requests)
        loop = asyncio.get_running_loop()
        seqs = []
        for request, prompt_ids, constraint in zip(requests, prompts, constraints, strict=True):
            sampling = request.sampling.with_defaults(self.spec.defaults)
            max_tokens = completion_budget(len(prompt_ids), sampling.max_tokens, self._info.context_length,
                                           self.spec.defaults.max_tokens, self.spec.clamp_max_tokens)
            seqs.append(Sequence(
                request_id=request.request_id,
                prompt_ids=prompt_ids,
                sampling=sampling,
                max_tokens=max_tokens,
                collector=OutputCollector(loop),
                detokenizer=IncrementalDetokenizer(self._loaded.tokenizer, prompt_ids),
                stop_matcher=StopMatcher(sampling.stop),
                generator=_seeded(sampling.seed),
                constraint=constraint,
                adapter=request.adapter,
            ))
        self._gate.admit(len(seqs))
        with self._lock:
            self._inbox.extend(seqs)
            self._admitted.update((id(seq), seq) for seq in seqs)
            self._wakeup.notify()
        return [Generation(s.request_id, len(s.prompt_ids), s.collector, self._abort, s.max_tokens) for s in seqs]

    def stats(self) -> EngineStats:
        prefix = self._prefix
        return EngineStats(
            state=self.state,
            alive=self._loop_alive(),
            running=self._running_count,
            waiting=self._waiting_count,
            kv_cache_tokens=self._kv_tokens,
            kv_cache_usage=self._kv_charged / max(1, self._budget_tokens),
            kv_cache_bytes=self._kv_bytes,
            kv_cache_budget_bytes=self._budget_tokens * (self._tiers.bytes_per_token if self._tiers else 0),
            prefix_cache_hit_tokens=prefix.hits if prefix else 0,
            prefix_cache_miss_tokens=prefix.misses if prefix else 0,
            prefix_cache_evictions=prefix.evictions if prefix else 0,
            prefix_cache_bytes=prefix.held_bytes if prefix else 0,
        )

    async def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._state = EngineState.CLOSED

    # ---- admission helpers ----------------------------------------------------------------

    async def _constraints(self, requests: Seq[GenerateRequest]) -> list[Constraint | None]:
        """Each request's answer grammar (None: free text); compiled off the event loop, or a 400."""
        grammars = self._grammars
        schemas = [answer_schema(r, self._info.tool_parser) for r in requests]
        if grammars is None or all(s is None for s in schemas):
            return [None] * len(requests)
        return await in_passing_thread(lambda: [grammars.constraint(s) for s in schemas])

    def _check_adapters(self, requests: Seq[GenerateRequest]) -> None:
        names = set(self.lora.names()) if self.lora is not None else set()
        for request in requests:
            if request.adapter is not None and request.adapter not in names:
                raise InhouseError(ErrorCode.MODEL_NOT_FOUND,
                                   f"The adapter '{request.adapter}' is not loaded on model '{self.spec.name}'",
                                   param="model")

    async def load_adapter(self, name: str, directory: Path) -> None:
        """Read, check and register a LoRA adapter off the event loop; AdapterError says what does not fit."""
        self._check_ready()
        assert self.lora is not None
        await in_passing_thread(self.lora.register, name, directory)

    def unload_adapter(self, name: str) -> None:
        """Forget an adapter (its requests in flight should have finished: the registry drains them first)."""
        if self.lora is not None:
            self.lora.unregister(name)

    def adapter_resident(self, name: str) -> bool:
        return self.lora is not None and name in self.lora.resident()

    def _check_ready(self) -> None:
        check_ready(self.spec.name, EngineState.CLOSED if self._closing else self.state)

    def _abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)
            self._wakeup.notify()

    # ---- the engine thread ----------------------------------------------------------------

    def _run(self, loaded: LoadedModel) -> None:
        """The engine loop; if it ever dies, its requests fail at once (and ``state`` turns FAILED)."""
        try:
            self._loop(loaded)
        except BaseException:
            log.critical("the engine loop of model %s died; the model cannot answer until the server restarts",
                         self.spec.name, exc_info=True)

    def _loop(self, loaded: LoadedModel) -> None:
        tiers, budget = self._tiers, self._budget_tokens
        assert tiers is not None
        runner = ModelRunner(loaded.model, tiers, loaded.device, self.lora, self._kernel, self._flash,
                             self._linear_kernel)
        tokenizer = loaded.tokenizer
        sampler = Sampler(lambda t: tokenizer.decode([t]), loaded.stop_ids)
        self._prefix = self._prefix_cache(tiers)
        scheduler = Scheduler(tiers, self.spec.max_num_seqs, _MAX_PREFILL_TOKENS, budget, self._prefix,
                              getattr(self.spec, "prefill_chunk_tokens", 512))
        try:
            while self._take_inbox(scheduler):
                step = scheduler.schedule()
                if step is None:
                    continue
                try:
                    self._step(step, runner, sampler, scheduler, loaded.stop_ids)
                except Exception:  # not one request's fault (each row's own failures are isolated in _step)
                    log.exception("engine step failed for model %s; failing the %d requests in it",
                                  self.spec.name, len(step.seqs))
                    for seq in step.seqs:
                        self._fail(seq, scheduler, "the model failed while generating")
                self._publish(scheduler)
        finally:  # closing, or the loop died: nobody will answer what is left
            self._fail_all()

    def _plan_memory(self, loaded: LoadedModel) -> None:
        """The KV tiers and the model's KV budget (ModelLoadError when it cannot hold one full context)."""
        self._tiers = KVTiers.for_model(loaded)
        self._budget_tokens = kv_budget_tokens(self.spec.name, getattr(self.spec, "kv_cache_gib", None), self._tiers,
                                               self.spec.max_num_seqs, str(loaded.device))
        log.info("model %s: KV memory %.2f GiB (%d tokens)", self.spec.name,
                 self._budget_tokens * self._tiers.bytes_per_token / 2**30, self._budget_tokens)

    def _attention_kernel(self, loaded: LoadedModel) -> AttentionKernel | None:
        """The compiled attention for a bf16 model on CPU (None: off in the config, or it cannot run here)."""
        wanted = getattr(self.spec, "attention_kernel", True)
        if not wanted or loaded.device.type != "cpu" or loaded.dtype != torch.bfloat16:
            return None
        kernel, why = AttentionKernel.load()
        if kernel is None:
            slower = "decode steps ~10%" if self._flash else "long prompts' attention 2-2.5x and decode steps ~10%"
            log.warning("model %s: the compiled attention cannot run here (%s); PyTorch's is used (%s slower)",
                        self.spec.name, why, slower)
        return kernel

    def _linear_layers(self, loaded: LoadedModel) -> LinearKernel | None:
        """The compiled linear layers for a bf16 model on CPU (None: off in the config, or not for this CPU)."""
        wanted = getattr(self.spec, "linear_kernel", True)
        if not wanted or loaded.device.type != "cpu" or loaded.dtype != torch.bfloat16:
            return None
        kernel, why = LinearKernel.load()
        if kernel is None:
            log.info("model %s: linear layers by oneDNN (the compiled ones do not run here: %s)", self.spec.name, why)
        else:
            log.info("model %s: linear layers by the compiled kernel (AVX512-BF16, no AMX)", self.spec.name)
        return kernel

    def _prefix_cache(self, tiers: KVTiers[Sequence]) -> PrefixCache | None:
        """The prefix cache of this model (None when the config turns it off: ``prefix_cache: false``)."""
        if not getattr(self.spec, "prefix_cache", True):
            return None
        budget = int(getattr(self.spec, "prefix_cache_gib", 1.0) * 2**30)
        lora = self.lora
        identity = f"{self.spec.name}@{self.spec.path}"
        return PrefixCache(tiers.bytes_per_token, budget, identity, lora.identity if lora is not None else str)

    def _step(self, step: Step, runner: ModelRunner, sampler: Sampler, scheduler: Scheduler,
              stop_ids: frozenset[int]) -> None:
        """Run, sample, hand out.  A row that fails on its own fails alone; the others go on."""
        seqs, logits = self._forward(step, runner, scheduler)
        if not seqs:
            return
        tokens, logprobs = sampler.sample(apply_constraints(logits, seqs), seqs)
        for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True):
            if token is None:
                self._fail(seq, scheduler, "the model produced no valid next token for this request")
                continue
            try:
                finished = seq.append(token, stop_ids, logprob)
            except Exception:
                log.exception("request %s failed while its output was decoded", seq.request_id)
                self._fail(seq, scheduler, "the model's output could not be decoded")
                continue
            if finished:
                self._finish(seq, scheduler, answered=True)
        scheduler.save_prefixes()

    def _forward(self, step: Step, runner: ModelRunner, scheduler: Scheduler) -> tuple[list[Sequence], torch.Tensor]:
        """The step's sequences whose next token is due, and their logits.  A step with prompts that fails is run
        again in parts: the decode rows alone (their failure is nobody's fault: it fails them all), then each
        prompt alone, failing only the prompts that fail alone."""
        started = time.perf_counter()
        try:
            logits = runner.run(step.decode, step.prefill, step.chunks)
        except Exception:
            if not step.prefill or (not step.decode and len(step.prefill) == 1):
                raise
            return self._forward_in_parts(step, runner, scheduler)
        if scheduler.pace is not None:
            scheduler.pace.ran(time.perf_counter() - started, len(step.decode), step.prompt_tokens, step.pairs)
        return _due(step, scheduler, step.decode, step.prefill, logits)

    def _forward_in_parts(self, step: Step, runner: ModelRunner,
                          scheduler: Scheduler) -> tuple[list[Sequence], torch.Tensor]:
        log.warning("a step with %d prompts failed for model %s; running them one by one",
                    len(step.prefill), self.spec.name)
        seqs, rows = (list(step.decode), [runner.decode(step.decode)]) if step.decode else ([], [])
        kept, broken = [], []
        for seq in step.prefill:
            try:
                rows.append(runner.prefill([seq], [step.chunk_of(seq)]))
                kept.append(seq)
            except Exception:
                log.exception("the prompt of request %s failed the model", seq.request_id)
                broken.append(seq)
        for seq in broken:
            self._fail(seq, scheduler, "the model failed on this request's prompt")
        return _due(step, scheduler, seqs, kept, torch.cat(rows) if rows else torch.empty(0))

    def _take_inbox(self, scheduler: Scheduler) -> bool:
        """Move new requests and aborts into the scheduler; sleep while idle.  After ``_IDLE_RELEASE_SECONDS`` of
        it, the KV tiers and the memory the steps left free go back to the system: not at once, since a server
        answering one request after another re-allocated and zeroed a long prompt's tier for each (7% of the
        engine's time on the RAG workload's open loop).  False when closing."""
        idle_since, released = time.monotonic(), False
        with self._lock:
            while not (self._inbox or self._aborted or self._closing or scheduler.has_work()):
                self._wakeup.wait(_IDLE_WAIT_SECONDS)
                if not released and time.monotonic() - idle_since >= _IDLE_RELEASE_SECONDS:
                    scheduler.tiers.shrink()
                    release_freed_memory()
                    self._kv_bytes = scheduler.tiers.allocated_bytes
                    released = True
            if self._closing:
                return False
            inbox, self._inbox = self._inbox, []
            aborted, self._aborted = self._aborted, set()
        for seq in inbox:
            scheduler.add(seq)
        for request_id in aborted:
            found = scheduler.find(request_id)
            if found is not None:
                self._finish(found, scheduler)
        self._publish(scheduler)
        return True

    def _publish(self, scheduler: Scheduler) -> None:
        """Counters read by stats() from other threads (plain ints: each assignment is atomic)."""
        self._running_count, self._waiting_count = len(scheduler.running), len(scheduler.waiting)
        self._kv_tokens = sum(seq.length for seq in scheduler.running)
        self._kv_bytes = scheduler.tiers.allocated_bytes
        self._kv_charged = scheduler.charged

    def _finish(self, seq: Sequence, scheduler: Scheduler, answered: bool = False) -> None:
        self._admitted.pop(id(seq), None)
        scheduler.finish(seq, answered)
        self._gate.release()

    def _fail(self, seq: Sequence, scheduler: Scheduler, message: str) -> None:
        """End one request with a 500 ``engine_error``; the others in its step go on."""
        if seq.status is SequenceStatus.FINISHED:
            return
        seq.collector.fail(InhouseError(ErrorCode.ENGINE_ERROR, message))
        self._finish(seq, scheduler)

    def _fail_all(self) -> None:
        """Fail every admitted sequence not finished: waiting, running, or lost by a loop that died mid-step."""
        with self._lock:
            leftovers, self._admitted, self._inbox = list(self._admitted.values()), {}, []
        for seq in leftovers:
            seq.collector.fail(InhouseError(ErrorCode.MODEL_UNAVAILABLE, f"model {self.spec.name!r} is shutting down"))


def _due(step: Step, scheduler: Scheduler, decode: list[Sequence], prefill: list[Sequence],
         logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
    """Of a step that ran ``decode`` then ``prefill`` (one logits row each), the sequences whose next token is due
    and their rows: every decode row, and the prompts now whole (a chunk that is not a prompt's last: not yet)."""
    due = set(map(id, scheduler.prefilled(step, prefill)))
    rows = [*range(len(decode)), *(len(decode) + i for i, seq in enumerate(prefill) if id(seq) in due)]
    return [*decode, *(seq for seq in prefill if id(seq) in due)], logits[rows]


def _seeded(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed % 2**64)  # any int64 seed (and seed + choice index) is a valid torch seed
    return generator
