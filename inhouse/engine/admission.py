"""Admission rules every engine shares: the completion budget within the context window, and the
bound on requests in progress.

Owns the wording of context-length and queue-full errors, so all engines refuse alike.
"""

from __future__ import annotations

import threading

from inhouse.engine.base import EngineState
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["AdmissionGate", "check_ready", "completion_budget", "context_exceeded"]


def check_ready(model: str, state: EngineState) -> None:
    """503 ``model_loading`` (with Retry-After) while loading, 503 ``model_unavailable`` unless ready."""
    if state is EngineState.LOADING:
        raise InhouseError(ErrorCode.MODEL_LOADING, f"model {model!r} is still loading; retry shortly",
                           retry_after=5.0)
    if state is not EngineState.READY:
        raise InhouseError(ErrorCode.MODEL_UNAVAILABLE, f"model {model!r} is not available")


def context_exceeded(window: int, prompt_size: str) -> InhouseError:
    """400 ``context_length_exceeded`` for a prompt of ``prompt_size`` ("1234 tokens", "at least 5000 tokens")."""
    return InhouseError(
        ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        f"This model's maximum context length is {window} tokens. However, your prompt is {prompt_size}, "
        "which leaves no room for a completion. Please shorten the prompt.",
        param="messages",
    )


def completion_budget(prompt_tokens: int, asked: int | None, window: int, default: int | None, clamp: bool) -> int:
    """How many tokens a request may generate, or a 400 ``context_length_exceeded`` with the numbers."""
    if prompt_tokens >= window:
        raise context_exceeded(window, f"{prompt_tokens} tokens")
    room = window - prompt_tokens
    if asked is None:
        return min(default or room, room)
    if asked > room and not clamp:
        raise InhouseError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, {asked} for the completion "
            f"via max_tokens). Please reduce the length of the prompt or max_tokens (at most {room} here).",
            param="max_tokens",
        )
    return min(asked, room)


class AdmissionGate:
    """At most ``limit`` requests in progress (running + waiting); thread-safe.

    The choices of one call are admitted together or not at all (``admit(count)``), so a call with many
    choices never holds some slots while it waits for others.  A call with more choices than the engine
    could ever hold is the request's fault: 400 with the numbers, never a 429 its client would retry forever.
    """

    def __init__(self, model: str, limit: int) -> None:
        self._model = model
        self._limit = limit
        self._lock = threading.Lock()
        self.in_progress = 0

    def check(self, count: int = 1) -> None:
        """Refuse now what ``admit(count)`` would refuse: cheap, so a full engine answers 429 before tokenizing."""
        if count > self._limit:
            raise InhouseError(
                ErrorCode.INVALID_REQUEST,
                f"this request asks for {count} choices (prompts × n), but model {self._model!r} holds at most "
                f"{self._limit} requests at once (max_num_seqs + max_waiting); ask for fewer choices",
                param="n",
            )
        if self.in_progress + count > self._limit:
            raise InhouseError(
                ErrorCode.QUEUE_FULL,
                f"model {self._model!r} is at capacity ({self.in_progress} requests in progress); retry shortly",
                retry_after=1.0,
            )

    def admit(self, count: int = 1) -> None:
        with self._lock:
            self.check(count)
            self.in_progress += count

    def release(self, count: int = 1) -> None:
        with self._lock:
            self.in_progress -= count
