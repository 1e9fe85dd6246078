"""Call: what one API call did, filled in by the route and the stream as it goes, audited at its end.

Owns the per-request record that the access middleware creates and routes reach with ``call_of``.
Routes say which model was asked and answered and what it used; the streaming generator adds the
first-token time, tokens and finish reason as they happen.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from inhouse.audit.record import AuditRecord
from inhouse.errors import ErrorCode, InhouseError
from inhouse.keys.store import ApiKey

__all__ = ["Call", "call_of"]


@dataclass
class Call:
    record: AuditRecord
    started: float = field(default_factory=time.monotonic)
    key: ApiKey | None = None
    keep_text: bool = False
    # reserves tokens against the key's budget (429 insufficient_quota when they do not fit); set by the
    # access middleware for keys with a token budget
    budget: Callable[[int], Awaitable[None]] | None = None
    _text: list[str] = field(default_factory=list)

    def asked(self, request_id: str, model: str, stream: bool) -> None:
        """The route parsed the request: refuse the model if the key may not use it, else note it."""
        self.record.request_id, self.record.model, self.record.stream = request_id, model, stream
        if self.key is not None and not self.key.allows(model):
            raise InhouseError(ErrorCode.MODEL_NOT_ALLOWED,
                               f"this API key may not use the model '{model}'", param="model")

    async def reserve(self, tokens: int) -> None:
        """Hold ``tokens`` (prompt + max_tokens of what was admitted) against the key's budget, or raise 429."""
        if self.budget is not None:
            await self.budget(tokens)

    def served(self, model: str, deployment: str) -> None:
        """What answered: the asked model or a fallback, and which deployment of it."""
        self.record.served_model, self.record.deployment = model, deployment

    def prompt(self, text: str | None, tokens: int) -> None:
        self.record.prompt_tokens = tokens
        if self.keep_text:
            self.record.prompt_text = text

    def output(self, text: str, tokens: int) -> None:
        """A piece of the answer (streaming) or all of it (blocking)."""
        if text and self.record.ttft_ms is None:
            self.record.ttft_ms = round((time.monotonic() - self.started) * 1000, 3)
        self.record.completion_tokens = (self.record.completion_tokens or 0) + tokens
        if self.keep_text and text:
            self._text.append(text)
            self.record.response_text = "".join(self._text)

    def finished(self, reason: str | None) -> None:
        self.record.finish_reason = reason

    def failed(self, code: str) -> None:
        self.record.error_code = code

    @property
    def tokens(self) -> int:
        return (self.record.prompt_tokens or 0) + (self.record.completion_tokens or 0)


def call_of(request: Request) -> Call | None:
    """The call the access middleware opened for this request (None on public routes)."""
    call = request.scope.get("state", {}).get("call")
    return call if isinstance(call, Call) else None
