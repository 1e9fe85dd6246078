"""Call: what one API call did, and the one event that ends it.

Owns the per-request record that the access middleware opens and routes reach with ``call_of``.  Routes
say which model was asked and answered, what the answer used and how it finished; then the call ends,
once, through ``end(status)``: its record is complete and every sink sees it (the audit log, and next
the metrics and the structured access log).  ``end`` returns False when a sink that must keep the call
(the audit log) could not: the answer must then not be acknowledged.  Who calls ``end``: a stream just
before its ``[DONE]``, the access middleware when any other response starts, or when the app returns
without a response (the client left, or the app failed).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from starlette.requests import Request

from inhouse.audit.record import AuditRecord
from inhouse.engine.base import Usage
from inhouse.errors import ErrorCode, InhouseError
from inhouse.keys.store import ApiKey

__all__ = ["Call", "CallSink", "call_of"]


class CallSink(Protocol):
    async def __call__(self, record: AuditRecord) -> bool:
        """Take the ended call's record; False if it could not be kept and the call must not be acknowledged."""


@dataclass
class Call:
    record: AuditRecord
    sinks: tuple[CallSink, ...] = ()
    started: float = field(default_factory=time.monotonic)
    key: ApiKey | None = None
    keep_text: bool = False
    # reserves tokens against the key's budget (429 insufficient_quota when they do not fit); set by the
    # access middleware for keys with a token budget
    budget: Callable[[int], Awaitable[None]] | None = None
    streaming: bool = False  # the answer is a stream, which ends the call itself before its [DONE]
    named: bool = False  # the client named the call (X-Request-ID): that stays its id, whatever the route says
    ended: bool = False
    _text: list[str] = field(default_factory=list)

    def asked(self, request_id: str, model: str, stream: bool) -> None:
        """The route parsed the request: refuse the model if the key may not use it, else note it."""
        if not self.named:
            self.record.request_id = request_id
        self.record.model, self.record.stream = model, stream
        if self.key is not None and not self.key.allows(model):
            raise InhouseError(ErrorCode.MODEL_NOT_ALLOWED,
                               f"this API key may not use the model '{model}'", param="model")

    async def reserve(self, tokens: int) -> None:
        """Hold ``tokens`` (prompt + max_tokens of what was admitted) against the key's budget, or raise 429."""
        if self.budget is not None:
            await self.budget(tokens)

    def served(self, model: str, deployment: str, version: str | None = None) -> None:
        """What answered: the asked model or a fallback, which deployment of it, and its version."""
        self.record.served_model, self.record.deployment = model, deployment
        self.record.model_version = version

    def prompt(self, text: str | None, tokens: int) -> None:
        """The prompt as admitted (its text kept when the audit log keeps text); ``used`` has the final count."""
        self.record.prompt_tokens = tokens
        if self.keep_text:
            self.record.prompt_text = text

    def output(self, text: str, tokens: int) -> None:
        """A piece of the answer (streaming) or all of it (blocking): the first one is the time to first token.
        Tokens are counted as they come, so a call that ends early still has what it used."""
        if text and self.record.ttft_ms is None:
            self.record.ttft_ms = round((time.monotonic() - self.started) * 1000, 3)
        self.record.completion_tokens = (self.record.completion_tokens or 0) + tokens
        if self.keep_text and text:
            self._text.append(text)
            self.record.response_text = "".join(self._text)

    def used(self, usage: Usage, finish_reason: str | None) -> None:
        """What the whole answer used (every choice) and how it finished."""
        self.record.prompt_tokens, self.record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        self.record.finish_reason = finish_reason

    def failed(self, code: ErrorCode) -> None:
        self.record.error_code = code.value

    async def end(self, status: int) -> bool:
        """The call is over: complete its record and hand it to every sink, once.  False if a sink could not
        keep it (the caller must not acknowledge the answer)."""
        if self.ended:
            return True
        self.ended = True
        self.record.status = status
        self.record.latency_ms = round((time.monotonic() - self.started) * 1000, 3)
        kept = True
        for sink in self.sinks:
            kept = await sink(self.record) and kept
        return kept

    @property
    def tokens(self) -> int:
        return (self.record.prompt_tokens or 0) + (self.record.completion_tokens or 0)


def call_of(request: Request) -> Call | None:
    """The call the access middleware opened for this request (None on public routes)."""
    call = request.scope.get("state", {}).get("call")
    return call if isinstance(call, Call) else None
