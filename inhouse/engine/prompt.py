"""Turns chat messages or a completion prompt into token ids, with the model's own chat template.

Owns the use of ``apply_chat_template`` (generation prompt added, the per-model override already set
on the tokenizer by the loader), and every check a prompt gets before an engine admits it: its size
against the window (a cheap bound before any tokenizing, so a megabyte prompt costs microseconds to
refuse), the template arguments a request may set, and token ids (prompt and ``stop_token_ids``) within
the vocabulary: vLLM fails an out-of-vocabulary stop token id only once the request runs.  Never joins
``role: content`` by hand.

Tokenizing goes straight to the tokenizer's Rust backend, which is safe to share between threads and
releases the GIL while it works: long prompts are tokenized in worker threads side by side, without a
lock that would queue every request behind the longest one.

Also reads, from the chat template, how the model writes tool calls and thinking (``tool_parser`` and
``reasoning_parser``, the names the server's parsers go by), unless the config named them; a template that
shows no tools gets ``constrained_json`` on an engine that can enforce it (``inhouse.engine.tool_prompt``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

from jinja2 import TemplateError

from inhouse.engine.admission import context_exceeded
from inhouse.engine.answer_schema import CONSTRAINED_JSON
from inhouse.engine.base import TEXT, Capability, GenerateRequest
from inhouse.engine.tool_prompt import tool_messages
from inhouse.errors import ErrorCode, InhouseError

__all__ = ["RESERVED_TEMPLATE_ARGS", "PromptBuilder", "detect_reasoning_parser", "detect_tool_parser"]

# Names a request's chat_template_kwargs may not set: apply_chat_template's and the renderer's own
# arguments, and the template globals transformers provides.
RESERVED_TEMPLATE_ARGS = frozenset({
    "conversation", "conversations", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "raise_exception", "strftime_now",
})

# Requests with at most this many characters of text are tokenized on the event loop: that takes about
# 0.2 ms, while a hop to a worker thread can wait a whole GIL switch interval (5 ms) on a busy server.
INLINE_CHARS = 8192
# A text normalizer (NFKC) can shrink text; with one, the size bound leaves this much room for it.
_NORMALIZE_MARGIN = 2


def detect_tool_parser(template: str) -> str | None:
    """How a model whose chat template is ``template`` writes tool calls, or None if the template shows no tools."""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ('"parameters"' in template and "<|eot_id|>" in template):
        return "llama3_json"
    return None


def detect_reasoning_parser(template: str, generation_prompt: str) -> str | None:
    """``think`` for a template with ``<think>`` blocks, ``think_open`` when its generation prompt (of a one-message
    conversation) already opens the block, so the answer starts inside it; else None."""
    if "<think>" not in template:
        return None
    return "think_open" if generation_prompt.rstrip().endswith("<think>") else "think"


class PromptBuilder:
    def __init__(self, tokenizer: Any, vocab_size: int, window: int, tool_parser: str = "none",
                 reasoning_parser: str = "none", can_constrain: bool = False) -> None:
        """``tool_parser``/``reasoning_parser`` as configured: a parser's name, ``auto`` (read from the chat
        template) or ``none``.  ``can_constrain``: the engine enforces an answer schema, so a chat template that
        knows no tools still gets them (``constrained_json``: described in the system turn, the answer held to the
        tools envelope)."""
        self._tok = tokenizer
        self._vocab_size = vocab_size
        self._window = window
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if self._backend is not None:  # what the wrapper does on every call; once here, so calls never mutate it
            self._backend.no_truncation()
            self._backend.no_padding()
        self._lock = threading.Lock()  # only for a tokenizer without a Rust backend
        # No token covers more than its vocabulary entry's length: characters, or bytes for byte-level BPE
        # (each character of its entries stands for one byte), the tighter bound for CJK text.
        self._units_per_token = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self._in_bytes = self._backend is not None and type(self._backend.decoder).__name__ == "ByteLevel"
        if self._backend is None or self._backend.normalizer is not None:
            self._units_per_token *= _NORMALIZE_MARGIN
        template = self._template_text()
        self.tool_parser = detect_tool_parser(template) if tool_parser == "auto" else _named(tool_parser)
        if tool_parser == "auto" and self.tool_parser is None:
            self.tool_parser = CONSTRAINED_JSON
        if self.tool_parser == CONSTRAINED_JSON and not can_constrain:
            self.tool_parser = None
        self.reasoning_parser = _named(reasoning_parser)
        if reasoning_parser in ("auto", "think") and template:
            found = detect_reasoning_parser(template if reasoning_parser == "auto" else "<think>",
                                            self._generation_prompt())
            self.reasoning_parser = found
        if not template:
            self.tool_parser = self.reasoning_parser = None

    @property
    def capabilities(self) -> frozenset[Capability]:
        """Chat needs a chat template (the model's own or the configured override); tools need a tool parser."""
        if not self._tok.chat_template:
            return frozenset({Capability.COMPLETION})
        return TEXT | {Capability.TOOLS} if self.tool_parser else TEXT

    def _template_text(self) -> str:
        template = self._tok.chat_template
        if isinstance(template, dict):  # named templates (default, tool_use, ...)
            return "\n".join(str(t) for t in template.values())
        return template or ""

    def _generation_prompt(self) -> str:
        try:
            text: str = self._tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                      tokenize=False)
        except Exception:  # a template that needs more than one plain message: no prompt to read
            return ""
        return text

    async def token_ids_all(self, requests: Sequence[GenerateRequest]) -> list[list[int]]:
        """The prompt of every request; the choices of one call share one prompt, tokenized once."""
        done: dict[object, list[int]] = {}
        out = []
        for request in requests:
            self._check_ids(request.sampling.stop_token_ids, "stop_token_ids")
            key: object = id(request.messages) if request.messages is not None else request.prompt
            if key not in done:
                done[key] = await self.token_ids_async(request)
            out.append(done[key])
        return out

    async def token_ids_async(self, request: GenerateRequest) -> list[int]:
        """``token_ids`` without blocking the event loop: short prompts inline, long ones in a thread."""
        text = request.prompt if request.messages is None else [m.get("content") for m in request.messages]
        at_least = _size(text, _utf8_bytes if self._in_bytes else len) // self._units_per_token
        if at_least >= self._window:  # refused without tokenizing: cheap, whatever the size
            raise context_exceeded(self._window, f"at least {at_least} tokens")
        if _size((request.prompt, request.messages, request.tools, request.chat_template_kwargs), len) <= INLINE_CHARS:
            return self.token_ids(request)
        return await asyncio.to_thread(self.token_ids, request)

    def token_ids(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            ids = self._encode(self._render(request), special=False)
        elif isinstance(request.prompt, tuple):
            ids = list(request.prompt)
            self._check_ids(ids, "prompt")
        else:
            ids = self._encode(request.prompt or "", special=True)
        if not ids:
            raise InhouseError(ErrorCode.INVALID_REQUEST, "the prompt is empty: it has no tokens", param="prompt")
        return ids

    def _check_ids(self, ids: Sequence[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self._vocab_size), None)
        if bad is not None:
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"token id {bad} is out of range: this model's vocabulary "
                               f"has ids 0..{self._vocab_size - 1}", param=param)

    def _encode(self, text: str, special: bool) -> list[int]:
        if self._backend is not None:
            ids: list[int] = self._backend.encode_batch([text], add_special_tokens=special)[0].ids
            return ids
        with self._lock:
            return list(self._tok(text, add_special_tokens=special)["input_ids"])

    def _render(self, request: GenerateRequest) -> str:
        if not self._tok.chat_template:
            raise InhouseError(
                ErrorCode.UNSUPPORTED,
                "this model has no chat template; set chat_template for it in the config, or use /v1/completions",
            )
        reserved = sorted(RESERVED_TEMPLATE_ARGS.intersection(request.chat_template_kwargs))
        if reserved:
            raise InhouseError(ErrorCode.INVALID_REQUEST,
                               f"chat_template_kwargs may not set '{reserved[0]}': the server sets it",
                               param=f"chat_template_kwargs.{reserved[0]}")
        messages, tools = list(request.messages or ()), request.tools if request.tool_choice != "none" else None
        if tools and self.tool_parser == CONSTRAINED_JSON:  # a template without tools: the tools are in the turns
            messages, tools = tool_messages(request), None
        try:
            text: str = self._tok.apply_chat_template(
                messages,
                tools=list(tools) if tools else None,
                add_generation_prompt=True,
                tokenize=False,
                **request.chat_template_kwargs,
            )
        except TemplateError as exc:
            # the template's own raise_exception() text is written for users ("roles must alternate")
            raise InhouseError(ErrorCode.INVALID_REQUEST, f"the chat template rejected the messages: {exc.message}",
                               param="messages") from None
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError):
            # a template that cannot handle what the request sent (a tool or kwarg of an unexpected shape)
            raise InhouseError(ErrorCode.INVALID_REQUEST, "the model's chat template could not render these "
                               "messages, tools and chat_template_kwargs", param="messages") from None
        return text


def _named(parser: str) -> str | None:
    return None if parser in ("none", "auto") else parser


def _utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _size(value: object, measure: Callable[[str], int]) -> int:
    """The total ``measure`` (characters or bytes) of the strings inside ``value`` (dict values, not keys),
    walked without recursion.  For the messages' contents this is text every chat template renders, so it
    bounds the prompt from below."""
    total = 0
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += measure(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total
