"""The usage object: OpenAI's three counts, and ``prompt_tokens_details.cached_tokens`` only when an engine counted
the cached prompt tokens; what the builders render is what ``/openapi.json`` documents (``extra="forbid"``)."""

from __future__ import annotations

from inhouse.protocol.chat import chat_chunk, chat_completion
from inhouse.protocol.common import usage
from inhouse.protocol.completions import completion
from inhouse.protocol.responses import ChatCompletion, ChatCompletionChunk, Completion, Usage

CHOICE = {"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None, "finish_reason": "stop"}


def test_cached_tokens_are_a_detail_of_the_prompt_when_counted() -> None:
    assert usage(130, 2, 128) == {"prompt_tokens": 130, "completion_tokens": 2, "total_tokens": 132,
                                  "prompt_tokens_details": {"cached_tokens": 128}}
    assert usage(130, 2, 0)["prompt_tokens_details"] == {"cached_tokens": 0}  # counted, none: OpenAI sends 0
    assert usage(5, 1) == {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}  # not counted: left out


def test_the_rendered_usage_matches_the_documented_shape() -> None:
    for counted in (usage(130, 2, 128), usage(5, 1)):
        assert Usage.model_validate(counted).model_dump(exclude_none=True) == counted
        ChatCompletion.model_validate(chat_completion("chatcmpl-1", 1, "m", [CHOICE], counted))
        ChatCompletionChunk.model_validate(chat_chunk("chatcmpl-1", 1, "m", [], counted, True))
        Completion.model_validate(completion("cmpl-1", 1, "m", [{"index": 0, "text": "hi", "logprobs": None,
                                                                  "finish_reason": "stop"}], counted))
