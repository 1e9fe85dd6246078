"""Turns chat messages or a completion prompt into token ids, with the model's own chat template.

Owns the use of ``apply_chat_template`` (generation prompt added, the per-model override already set
on the tokenizer by the loader).  Never joins ``role: content`` by hand.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from jinja2 import TemplateError

from inhouse.engine.base import GenerateRequest
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["PromptBuilder"]

# apply_chat_template arguments a request's chat_template_kwargs may not override
_RESERVED = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "tokenize", "return_dict",
    "return_tensors", "padding", "truncation", "max_length", "continue_final_message",
})


# Requests with at most this many characters of text are tokenized on the event loop: that takes about
# 0.2 ms, while a hop to a worker thread can wait a whole GIL switch interval (5 ms) on a busy server.
INLINE_CHARS = 8192


class PromptBuilder:
    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._lock = threading.Lock()

    def token_ids(self, request: GenerateRequest) -> list[int]:
        with self._lock:
            return self._token_ids(request)

    async def token_ids_async(self, request: GenerateRequest) -> list[int]:
        """``token_ids`` without blocking the event loop: short prompts inline, long ones in a thread."""
        if _text_chars(request) <= INLINE_CHARS and self._lock.acquire(blocking=False):
            try:
                return self._token_ids(request)
            finally:
                self._lock.release()
        return await asyncio.to_thread(self.token_ids, request)

    def _token_ids(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            return self._chat(request)
        if isinstance(request.prompt, tuple):
            return list(request.prompt)
        return list(self._tok(request.prompt or "", add_special_tokens=True)["input_ids"])

    def _chat(self, request: GenerateRequest) -> list[int]:
        if not self._tok.chat_template:
            raise InhouseError(
                ErrorCode.UNSUPPORTED,
                "this model has no chat template; set chat_template for it in the config, or use /v1/completions",
            )
        try:
            text = self._tok.apply_chat_template(
                list(request.messages or ()),
                tools=list(request.tools) if request.tools else None,
                add_generation_prompt=True,
                tokenize=False,
                **{k: v for k, v in request.chat_template_kwargs.items() if k not in _RESERVED},
            )
        except TemplateError as exc:
            # the template's own raise_exception() text is written for users ("roles must alternate")
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"the chat template rejected the messages: {exc.message}",
                               param="messages") from None
        return list(self._tok(text, add_special_tokens=False)["input_ids"])


def _text_chars(request: GenerateRequest) -> int:
    if request.messages is None:
        return len(request.prompt) if isinstance(request.prompt, str) else 0
    total = sum(len(str(m.get("content") or "")) for m in request.messages)
    return total + (len(str(request.tools)) if request.tools else 0)
