"""VisionEngine: vision-language models (image-text-to-text) through transformers, requests batched by ``generate``.

Owns the worker thread and its queue, admission (context length, the queue bound) and aborts.  Each request
is built by the model's own processor (chat template with image placeholders, pixel values, image tokens
expanded).  The worker takes every request waiting at that moment (up to ``max_num_seqs``) and runs those with
the same sampling shape as one batch through transformers' own ``generate`` (``batch.py``: left padding, each row
its own budget, stops and abort; requests the processor is preparing at that moment are waited for, briefly);
a request that arrives once the call runs waits for the next call.  Tokens stream out as ``generate`` makes
them, and a row is finished as soon as it is done.  ``usage.prompt_tokens`` is the processor's input length,
image tokens included.  Tools, response_format and logprobs are refused (400).  State shared with request
coroutines: the job queue, the running map and the count of submits being prepared (under one lock), and each
job's collector.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from inhouse.config import LocalSpec
from inhouse.engine.admission import AdmissionGate, check_ready, completion_budget
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
from inhouse.engine.checkpoint import resolve_checkpoint
from inhouse.engine.collector import OutputCollector
from inhouse.engine.loading import WEIGHTS_LOCK, pick_device, pick_dtype
from inhouse.engine.threads import in_passing_thread
from inhouse.engine.vision.batch import compatible_groups, generate_batch
from inhouse.engine.vision.job import TextStream, VisionJob
from inhouse.engine.vision.processor import chat_messages, load_processor, model_inputs
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["VISION_CAPABILITIES", "VisionEngine", "chat_messages"]

log = logging.getLogger("inhouse.engine")

VISION_CAPABILITIES = frozenset({Capability.CHAT, Capability.VISION})
_GATHER_SECONDS = 0.25  # at most this long a call waits for the requests the processor is preparing


class VisionEngine:
    def __init__(self, spec: LocalSpec, cache_dir: Path) -> None:
        self.spec = spec
        self._cache_dir = cache_dir
        self._state = EngineState.LOADING
        self._info = EngineInfo(kind="transformers-vision", context_length=0, max_num_seqs=spec.max_num_seqs,
                                capabilities=VISION_CAPABILITIES)
        self._gate = AdmissionGate(spec.name, spec.max_num_seqs + spec.max_waiting)
        self._jobs: queue.Queue[list[VisionJob] | None] = queue.Queue()  # one item per submit: its jobs
        self._running: dict[str, VisionJob] = {}  # request id → admitted job not yet finished (abort looks here)
        self._batch_size = 0  # jobs in the ``generate`` call now running (stats)
        self.largest_batch = 0  # the most jobs one ``generate`` call has run so far
        self._lock = threading.Lock()
        self._arriving = 0  # submits being prepared by the processor right now (under the lock)
        self._arrived = threading.Condition(self._lock)  # notified when one of them is in the queue (or refused)
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
            await in_passing_thread(self._load)
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
        log.info("model %s ready (vision, up to %d requests in one batch): context %d tokens",
                 self.spec.name, self.spec.max_num_seqs, self._info.context_length)

    def _load(self) -> None:
        from transformers import AutoConfig, AutoModelForImageTextToText

        checkpoint = resolve_checkpoint(self.spec, self._cache_dir)
        device = pick_device(self.spec.device)
        dtype = pick_dtype(self.spec.dtype, device)
        log.info("loading %s (vision) from %s (%s, %s)", self.spec.name, checkpoint, device,
                 str(dtype).removeprefix("torch."))
        try:
            model_type = AutoConfig.from_pretrained(checkpoint, local_files_only=True).model_type
            processor = load_processor(checkpoint, model_type)
            with WEIGHTS_LOCK:  # from_pretrained sets torch's process-wide default dtype while it builds
                model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError, ImportError) as exc:
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
        tokenizer = getattr(processor, "tokenizer", None)
        if eos is None:  # no end in the generation config: the tokenizer's
            eos = getattr(tokenizer, "eos_token_id", None)
        self._stop_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # batches are padded (on the left, masked out)
        self._model, self._processor = model, processor
        self._info = EngineInfo(kind="transformers-vision", max_num_seqs=self.spec.max_num_seqs, device=str(device),
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
        with self._lock:
            self._arriving += 1
        try:
            for request in requests:
                text, inputs = await in_passing_thread(self._inputs, request)
                sampling = request.sampling.with_defaults(self.spec.defaults)
                job = VisionJob(request.request_id, text, list(request.images), inputs, sampling, 0,
                                OutputCollector(loop))
                job.max_tokens = completion_budget(job.prompt_tokens, sampling.max_tokens,
                                                   self._info.context_length, self.spec.defaults.max_tokens,
                                                   self.spec.clamp_max_tokens)
                jobs.append(job)
            self._gate.admit(len(jobs))
            with self._lock:
                self._running.update((job.request_id, job) for job in jobs)
            self._jobs.put(jobs)  # together: the choices of one call share a batch
        finally:
            with self._lock:
                self._arriving -= 1
                self._arrived.notify_all()
        return [Generation(j.request_id, j.prompt_tokens, j.collector, self._abort, j.max_tokens) for j in jobs]

    def _inputs(self, request: GenerateRequest) -> tuple[str, dict[str, Any]]:
        """One request's prompt through its chat template, and the processor's tensors for it (the images, the
        image tokens expanded)."""
        text = self._processor.apply_chat_template(chat_messages(request.messages or ()), tokenize=False,
                                                   add_generation_prompt=True, **request.chat_template_kwargs)
        try:
            return text, model_inputs(self._processor, [text], [list(request.images)])
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("request %s: the processor refused its input: %s", request.request_id, exc)
            raise InhouseError(ErrorCode.INVALID_REQUEST, "this model's processor could not take these messages "
                               "and images (does every image have its place in a user message?)",
                               param="messages") from None

    def _abort(self, request_id: str) -> None:
        with self._lock:
            job = self._running.get(request_id)
        if job is not None:
            job.aborted.set()

    def stats(self) -> EngineStats:
        with self._lock:
            admitted = len(self._running)
        running = min(admitted, self._batch_size)
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
        """Take what waits, run it in compatible batches, again; on close, fail what is left."""
        while (waiting := self._take()) is not None:
            for group in compatible_groups([job for job in waiting if not self._skip_aborted(job)],
                                           self.spec.max_num_seqs):
                self._serve(group)
        with self._lock:
            leftovers = list(self._running.values())
        for job in leftovers:
            job.collector.fail(InhouseError(ErrorCode.MODEL_UNAVAILABLE, f"model {self.spec.name!r} is shutting down"))

    def _take(self) -> list[VisionJob] | None:
        """Every job waiting now (blocks for the first, then lets the submits being prepared arrive, up to
        ``_GATHER_SECONDS``), or None when the engine closes."""
        first = self._jobs.get()
        if first is None:
            return None
        with self._lock:  # requests already being prepared join this call rather than wait for its end
            self._arrived.wait_for(lambda: self._arriving == 0, timeout=_GATHER_SECONDS)
        jobs = list(first)
        while True:
            try:
                more = self._jobs.get_nowait()
            except queue.Empty:
                return jobs
            if more is None:
                self._jobs.put(None)  # the next _take ends the loop, after these jobs
                return jobs
            jobs.extend(more)

    def _skip_aborted(self, job: VisionJob) -> bool:
        if job.aborted.is_set():
            self._release(job)
            return True
        return False

    def _serve(self, group: list[VisionJob]) -> None:
        """One batch; if the call fails, each job that got no output yet is retried on its own (so a request
        that fails the model fails alone), and a job that already streamed part of its answer fails."""
        streams = self._generate(group)
        for stream in streams or ():
            job = stream.job
            if not job.released and (stream.ids or len(group) == 1 or self._generate([job]) is not None):
                self._fail(job)

    def _generate(self, group: list[VisionJob]) -> list[TextStream] | None:
        """Run ``group`` as one batch: None when it went through, else its streams (the call failed)."""
        stop = set(self._stop_ids)
        streams = [TextStream(self._processor, job, stop) for job in group]
        self._batch_size = len(group)
        self.largest_batch = max(self.largest_batch, len(group))
        try:
            generate_batch(self._model, self._processor, streams, self._stop_ids, self._done)
            return None
        except Exception:
            log.exception("%d request(s) failed in generate (%s)", len(group), ", ".join(j.request_id for j in group))
            return streams
        finally:
            self._batch_size = 0

    def _done(self, stream: TextStream) -> None:
        """A row is done: its slot is free before its caller hears the end, so it may ask again at once."""
        self._release(stream.job)
        if not stream.job.aborted.is_set():
            stream.finish()

    def _release(self, job: VisionJob) -> None:
        """Once per job: it no longer counts against the queue bound."""
        with self._lock:  # one step, so stats() never shows a job gone whose slot the gate still holds
            if job.released:
                return
            job.released = True
            self._running.pop(job.request_id, None)
            self._gate.release()

    def _fail(self, job: VisionJob) -> None:
        if job.released:  # finished (or aborted) before the call failed
            return
        self._release(job)
        job.collector.fail(InhouseError(ErrorCode.ENGINE_ERROR, "the model failed while generating"))


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
