"""VisionEngine: vision-language models (image-text-to-text) through transformers, one request at a time.

Owns the worker thread and its queue, admission (context length, the queue bound) and aborts.  Each request
is built by the model's own processor (chat template with image placeholders, pixel values, image tokens
expanded) and run by transformers' own ``generate`` — serialised: one request decodes at a time, the others
wait in order (no continuous batching of image rows).  Tokens stream out as ``generate`` makes them (a
streamer), an abort or a stop string ends ``generate`` at its next step (a stopping criterion).
``usage.prompt_tokens`` is the processor's input length, image tokens included.  Tools, response_format and
logprobs are refused (400).  State shared with request coroutines: the job queue and each job's collector.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inhouse.config import LocalSpec
from inhouse.engine.admission import AdmissionGate, check_ready, completion_budget
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
    Usage,
)
from inhouse.engine.checkpoint import resolve_checkpoint
from inhouse.engine.collector import OutputCollector
from inhouse.engine.loading import WEIGHTS_LOCK, pick_device, pick_dtype
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["VISION_CAPABILITIES", "VisionEngine", "chat_messages"]

log = logging.getLogger("inhouse.engine")

VISION_CAPABILITIES = frozenset({Capability.CHAT, Capability.VISION})


def chat_messages(messages: Seq[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as image-text-to-text chat templates take them: every content a list of parts,
    ``{"type": "text", "text": ...}`` or ``{"type": "image"}`` (the image itself goes to the processor)."""
    out = []
    for message in messages:
        content = message.get("content") or ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else [
            {"type": "image"} if part.get("type") == "image_url" else {"type": "text", "text": part.get("text") or ""}
            for part in content]
        out.append({"role": message["role"], "content": parts})
    return out


@dataclass
class _Job:
    request_id: str
    inputs: dict[str, Any]
    sampling: SamplingParams
    max_tokens: int
    collector: OutputCollector[Delta]
    aborted: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


class VisionEngine:
    def __init__(self, spec: LocalSpec, cache_dir: Path) -> None:
        self.spec = spec
        self._cache_dir = cache_dir
        self._state = EngineState.LOADING
        self._info = EngineInfo(kind="transformers-vision", context_length=0, max_num_seqs=1,
                                capabilities=VISION_CAPABILITIES)
        self._gate = AdmissionGate(spec.name, 1 + spec.max_waiting)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._running: dict[str, _Job] = {}  # request id → admitted job not yet finished (abort looks here)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._model: Any = None
        self._processor: Any = None
        self._stop_ids: list[int] = []

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def state(self) -> EngineState:
        if self._state is EngineState.READY and self._thread is not None and not self._thread.is_alive():
            return EngineState.FAILED
        return self._state

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._load)
        except BaseException:
            self._state = EngineState.FAILED
            raise
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.spec.name}", daemon=True)
        self._thread.start()
        warm = GenerateRequest("warm-up", SamplingParams(max_tokens=1, temperature=0.0),
                               messages=({"role": "user", "content": "Hello"},))
        try:
            for generation in await self._admit([warm]):
                async for _ in generation:
                    pass
        except Exception as exc:
            log.exception("model %s failed its warm-up generation", self.spec.name)
            await self.close()
            self._state = EngineState.FAILED
            raise ModelLoadError(f"model {self.spec.name!r} loaded but failed its first generation (warm-up); "
                                 "the reason is in the server log") from exc
        self._state = EngineState.READY
        log.info("model %s ready (vision, one request at a time): context %d tokens",
                 self.spec.name, self._info.context_length)

    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        checkpoint = resolve_checkpoint(self.spec, self._cache_dir)
        device = pick_device(self.spec.device)
        dtype = pick_dtype(self.spec.dtype, device)
        log.info("loading %s (vision) from %s (%s, %s)", self.spec.name, checkpoint, device,
                 str(dtype).removeprefix("torch."))
        try:
            processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)  # type: ignore[no-untyped-call]
            with WEIGHTS_LOCK:  # from_pretrained sets torch's process-wide default dtype while it builds
                model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"model {self.spec.name!r}: cannot load {checkpoint} as a vision model: {exc}") \
                from exc
        model.to(device).eval()  # type: ignore[arg-type]
        if self.spec.chat_template:
            processor.chat_template = self.spec.chat_template
        if not getattr(processor, "chat_template", None):
            raise ModelLoadError(f"model {self.spec.name!r}: its processor has no chat template; set chat_template")
        text = model.config.get_text_config()
        limit = getattr(text, "max_position_embeddings", None) or 2048
        eos = model.generation_config.eos_token_id
        if eos is None:  # no end in the generation config: the tokenizer's
            eos = getattr(getattr(processor, "tokenizer", None), "eos_token_id", None)
        self._stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self._model, self._processor = model, processor
        self._info = EngineInfo(kind="transformers-vision", max_num_seqs=1, device=str(device),
                                context_length=min(self.spec.context_length or limit, limit),
                                dtype=str(dtype).removeprefix("torch."), capabilities=VISION_CAPABILITIES)

    # ---- admission --------------------------------------------------------------------------

    async def submit(self, requests: Seq[GenerateRequest]) -> list[Generation]:
        check_ready(self.spec.name, EngineState.CLOSED if self._closing else self.state)
        return await self._admit(requests)

    async def _admit(self, requests: Seq[GenerateRequest]) -> list[Generation]:
        for request in requests:
            _refuse_unsupported(request)
        self._gate.check(len(requests))
        loop = asyncio.get_running_loop()
        jobs = []
        for request in requests:
            inputs = await asyncio.to_thread(self._inputs, request)
            sampling = request.sampling.with_defaults(self.spec.defaults)
            job = _Job(request.request_id, inputs, sampling, 0, OutputCollector(loop))
            job.max_tokens = completion_budget(job.prompt_tokens, sampling.max_tokens, self._info.context_length,
                                               self.spec.defaults.max_tokens, self.spec.clamp_max_tokens)
            jobs.append(job)
        self._gate.admit(len(jobs))
        with self._lock:
            self._running.update((job.request_id, job) for job in jobs)
        for job in jobs:
            self._jobs.put(job)
        return [Generation(j.request_id, j.prompt_tokens, j.collector, self._abort, j.max_tokens) for j in jobs]

    def _inputs(self, request: GenerateRequest) -> dict[str, Any]:
        """The processor's tensors for one request: its chat template, the images, the image tokens expanded."""
        text = self._processor.apply_chat_template(chat_messages(request.messages or ()), tokenize=False,
                                                   add_generation_prompt=True, **request.chat_template_kwargs)
        images = list(request.images) or None
        try:
            inputs = self._processor(text=[text], images=[images] if images else None, return_tensors="pt")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("request %s: the processor refused its input: %s", request.request_id, exc)
            raise InhouseError(ErrorCode.INVALID_REQUEST, "this model's processor could not take these messages "
                               "and images (does every image have its place in a user message?)",
                               param="messages") from None
        return dict(inputs)

    def _abort(self, request_id: str) -> None:
        with self._lock:
            job = self._running.get(request_id)
        if job is not None:
            job.aborted.set()

    def stats(self) -> EngineStats:
        with self._lock:
            admitted = len(self._running)
        running = min(admitted, 1)
        return EngineStats(state=self.state, running=running, waiting=admitted - running,
                           alive=self._thread is None or self._closing or self._thread.is_alive())

    async def close(self) -> None:
        self._closing = True
        self._jobs.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._state = EngineState.CLOSED

    # ---- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            stream: _TextStream | None = None
            failed = False
            try:
                if not job.aborted.is_set():
                    stream = self._generate(job)
            except Exception:
                log.exception("request %s failed in generate", job.request_id)
                failed = True
            finally:  # the slot is free before the caller hears the end, so it may ask again at once
                with self._lock:
                    self._running.pop(job.request_id, None)
                self._gate.release()
            if failed:
                job.collector.fail(InhouseError(ErrorCode.ENGINE_ERROR, "the model failed while generating"))
            elif stream is not None and not job.aborted.is_set():
                stream.finish()
        for job in list(self._running.values()):
            job.collector.fail(InhouseError(ErrorCode.MODEL_UNAVAILABLE, f"model {self.spec.name!r} is shutting down"))

    def _generate(self, job: _Job) -> _TextStream:
        """One request through ``generate``, its tokens handed out as they come (the end is the caller's)."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        stream = _TextStream(self._processor, job, self._stop_ids)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                done = job.aborted.is_set() or stream.stopped
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        sampling = job.sampling
        options: dict[str, Any] = {"max_new_tokens": job.max_tokens, "do_sample": not sampling.greedy,
                                   "eos_token_id": self._stop_ids or None,
                                   "repetition_penalty": sampling.repetition_penalty}
        if not sampling.greedy:
            options |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or None}
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)  # best effort: torch's RNG is process-wide
        if sampling.ignore_eos or sampling.min_tokens:
            options["min_new_tokens"] = job.max_tokens if sampling.ignore_eos else sampling.min_tokens
        inputs = {k: v.to(self._model.device) if isinstance(v, torch.Tensor) else v for k, v in job.inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        with torch.inference_mode():
            self._model.generate(**inputs, streamer=stream, stopping_criteria=StoppingCriteriaList([_Stop()]),
                                 pad_token_id=self._stop_ids[0] if self._stop_ids else None, **options)
        return stream


class _TextStream:
    """A ``generate`` streamer: new token ids → text Deltas (held back while a character or a stop string may
    still be incomplete), and the last Delta with the finish reason and usage."""

    def __init__(self, processor: Any, job: _Job, stop_ids: list[int]) -> None:
        self._processor, self._job, self._stop_ids = processor, job, set(stop_ids)
        self._ids: list[int] = []
        self._sent = ""  # text handed out so far
        self._prompt_seen = False
        self.stopped = False  # a stop token or stop string ended the answer
        self._pending_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate's first call is the prompt
            self._prompt_seen = True
            return
        if self.stopped:
            return
        for token in value.reshape(-1).tolist():
            self._ids.append(int(token))
            self._pending_tokens += 1
            if int(token) in self._stop_ids and not self._job.sampling.ignore_eos:
                self.stopped = True
                break
        self._emit()

    def end(self) -> None:
        pass

    def _text(self) -> str:
        ids = [i for i in self._ids if i not in self._stop_ids]
        return str(self._processor.decode(ids, skip_special_tokens=True))

    def _emit(self, final: bool = False) -> None:
        text = self._text()
        stops = self._job.sampling.stop
        cut = min((text.find(s) for s in stops if s and s in text), default=-1)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        hold = 0 if final else max([len(s) - 1 for s in stops if s] + [0])
        if not final and text.endswith("\ufffd"):
            return
        ready = text[:len(text) - hold] if hold else text
        if len(ready) > len(self._sent) and ready.startswith(self._sent):
            self._job.collector.put(Delta(text=ready[len(self._sent):], token_count=self._pending_tokens))
            self._sent, self._pending_tokens = ready, 0

    def finish(self) -> None:
        self._emit(final=True)
        tokens = len(self._ids)
        hit_stop = self.stopped or (self._ids and self._ids[-1] in self._stop_ids)
        reason = "stop" if hit_stop or tokens < self._job.max_tokens else "length"
        self._job.collector.put(Delta(token_count=self._pending_tokens, finish_reason=reason,
                                      usage=Usage(self._job.prompt_tokens, tokens)))


def _refuse_unsupported(request: GenerateRequest) -> None:
    """What this engine does not do: a 400 naming the field, before anything runs."""
    if request.messages is None:
        raise InhouseError(ErrorCode.UNSUPPORTED, "this vision model serves chat completions only", param="prompt")
    for name, value in (("tools", request.tools), ("response_format", request.response_format)):
        if value:
            raise InhouseError(ErrorCode.UNSUPPORTED, f"{name} is not supported by vision models served locally",
                               param=name)
    if request.sampling.logprobs:
        raise InhouseError(ErrorCode.UNSUPPORTED, "logprobs are not supported by vision models served locally",
                           param="logprobs")
