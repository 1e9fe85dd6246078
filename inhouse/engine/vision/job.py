"""One admitted request inside the vision engine, and the text stream of its answer.

``VisionJob`` owns a request's prompt (templated text, images, the processor's tensors for it alone), its
sampling, its completion budget, its collector and its abort flag.  ``TextStream`` turns the job's new token ids
into text Deltas (held back while a character or a stop string may still be incomplete) and sends the last
Delta with the finish reason and usage.  Touched by the worker thread only, except ``aborted`` (any thread).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from PIL.Image import Image

from inhouse.engine.base import Delta, SamplingParams, Usage
from inhouse.engine.collector import OutputCollector

__all__ = ["TextStream", "VisionJob"]


@dataclass(eq=False)
class VisionJob:
    request_id: str
    text: str  # the prompt through the chat template, image placeholders not yet expanded
    images: list[Image]
    inputs: dict[str, Any]  # the processor's tensors for this prompt alone
    sampling: SamplingParams
    max_tokens: int
    collector: OutputCollector[Delta]
    aborted: threading.Event = field(default_factory=threading.Event)
    released: bool = False  # no longer counted by the admission gate (the engine's, under its lock)

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


class TextStream:
    def __init__(self, processor: Any, job: VisionJob, stop_ids: set[int]) -> None:
        self._processor, self.job, self._stop_ids = processor, job, stop_ids
        self.ids: list[int] = []
        self._sent = ""  # text handed out so far
        self.stopped = False  # a stop token or stop string ended the answer
        self.finished = False  # the last Delta went out
        self._pending_tokens = 0

    @property
    def done(self) -> bool:
        """Nothing more to add: stopped, out of budget, or aborted."""
        return self.stopped or len(self.ids) >= self.job.max_tokens or self.job.aborted.is_set()

    def add(self, token: int) -> None:
        if self.done:
            return
        self.ids.append(token)
        self._pending_tokens += 1
        if token in self._stop_ids and not self.job.sampling.ignore_eos:
            self.stopped = True
        self._emit()

    def _text(self) -> str:
        ids = [i for i in self.ids if i not in self._stop_ids]
        return str(self._processor.decode(ids, skip_special_tokens=True))

    def _emit(self, final: bool = False) -> None:
        text = self._text()
        stops = self.job.sampling.stop
        cut = min((text.find(s) for s in stops if s and s in text), default=-1)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        hold = 0 if final else max([len(s) - 1 for s in stops if s] + [0])
        if not final and text.endswith("\ufffd"):
            return
        ready = text[:len(text) - hold] if hold else text
        if len(ready) > len(self._sent) and ready.startswith(self._sent):
            self.job.collector.put(Delta(text=ready[len(self._sent):], token_count=self._pending_tokens))
            self._sent, self._pending_tokens = ready, 0

    def finish(self) -> None:
        """The last Delta: the rest of the text, the finish reason and usage (once)."""
        if self.finished:
            return
        self.finished = True
        self._emit(final=True)
        tokens = len(self.ids)
        hit_stop = self.stopped or (self.ids and self.ids[-1] in self._stop_ids)
        reason = "stop" if hit_stop or tokens < self.job.max_tokens else "length"
        self.job.collector.put(Delta(token_count=self._pending_tokens, finish_reason=reason,
                                     usage=Usage(self.job.prompt_tokens, tokens)))
