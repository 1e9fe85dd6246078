"""Admission rules every engine shares: the completion budget within the context window, and the
bound on requests in progress.

Owns the wording of context-length and queue-full errors, so all engines refuse alike.
"""

from __future__ import annotations

import threading

from inhouse.engine.base import EngineState
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["AdmissionGate", "check_ready", "completion_budget"]


def check_ready(model: str, state: EngineState) -> None:
    """503 ``model_loading`` (with Retry-After) while loading, 503 ``model_unavailable`` unless ready."""
    if state is EngineState.LOADING:
        raise InhouseError(ErrorCode.MODEL_LOADING, f"model {model!r} is still loading; retry shortly",
                           retry_after=5.0)
    if state is not EngineState.READY:
        raise InhouseError(ErrorCode.MODEL_UNAVAILABLE, f"model {model!r} is not available")


def completion_budget(prompt_tokens: int, asked: int | None, window: int, default: int | None, clamp: bool) -> int:
    """How many tokens a request may generate, or a 400 ``context_length_exceeded`` with the numbers."""
    if prompt_tokens >= window:
        raise InhouseError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"This model's maximum context length is {window} tokens. However, your prompt is "
            f"{prompt_tokens} tokens, which leaves no room for a completion. Please shorten the prompt.",
            param="messages",
        )
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
    """At most ``limit`` requests in progress (running + waiting); thread-safe."""

    def __init__(self, model: str, limit: int) -> None:
        self._model = model
        self._limit = limit
        self._lock = threading.Lock()
        self.in_progress = 0

    def admit(self) -> None:
        with self._lock:
            if self.in_progress >= self._limit:
                raise InhouseError(
                    ErrorCode.QUEUE_FULL,
                    f"model {self._model!r} is at capacity ({self.in_progress} requests in progress); "
                    "retry shortly",
                    retry_after=1.0,
                )
            self.in_progress += 1

    def release(self) -> None:
        with self._lock:
            self.in_progress -= 1
