"""Which parsers a chat template implies (``inhouse.engine.prompt``): the names the server's parsers go by."""

from __future__ import annotations

import pytest

from inhouse.engine.prompt import detect_reasoning_parser, detect_tool_parser

LLAMA31 = ('{{- "Given the following functions, respond with a JSON for a function call with its proper arguments '
           'that best answers the given prompt.\\n\\n" }}{{- \'Respond in the format {"name": function name, '
           '"parameters": dictionary of argument name and its value}.\' }}{{ "<|eot_id|>" }}')


@pytest.mark.parametrize(("template", "expected"), [
    ("{% for call in message.tool_calls %}<tool_call>\n{{ call | tojson }}</tool_call>{% endfor %}", "hermes"),
    ("{{ '[AVAILABLE_TOOLS]' }}{{ tools | tojson }}{{ '[TOOL_CALLS]' }}", "mistral"),
    (LLAMA31, "llama3_json"),
    ("{{ '<|python_tag|>' + call | tojson }}", "llama3_json"),
    ("{{ '<|im_start|>' + message['content'] + '<|im_end|>' }}", None),
])
def test_tool_parser_from_the_template(template: str, expected: str | None) -> None:
    assert detect_tool_parser(template) == expected


def test_reasoning_parser_from_the_template() -> None:
    qwen3 = "{% if enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    assert detect_reasoning_parser(qwen3, "<|im_start|>assistant\n") == "think"
    assert detect_reasoning_parser("{{ '<｜Assistant｜><think>\\n' }}", "<｜Assistant｜><think>\n") == "think_open"
    assert detect_reasoning_parser("{{ messages }}", "assistant:") is None
