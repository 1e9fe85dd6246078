"""The text parsers: thinking and tool calls split out of a choice's text, the same however the text is cut into
pieces; partial tags held back; text that is not a call passed through; Deltas' counts kept."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from inhouse.engine.base import Delta, EngineInfo, GenerateRequest, SamplingParams, ToolCallDelta, Usage
from inhouse.server.parsers import (
    ChoiceParser,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    ThinkParser,
    choice_parser,
)
from inhouse.server.parsers.choice import ToolParser

Calls = list[tuple[str, dict[str, Any]]]


def _cuts(text: str) -> list[list[str]]:
    """The text whole, char by char, split at every single point, and at random points."""
    out = [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]
    rng = random.Random(len(text))
    for _ in range(20):
        points = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6)))) if len(text) > 1 else []
        out.append([text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)])
    return out


def _parse(text: str, pieces: list[str], reasoning: bool, tools: str | None, opened: bool = False
           ) -> tuple[str, str, Calls, str | None, list[ToolCallDelta]]:
    kinds: dict[str, type[ToolParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser,
                                          "mistral": MistralParser}
    tool_parser = kinds[tools]() if tools else None
    parser = ChoiceParser(ThinkParser(opened) if reasoning else None, tool_parser)
    deltas = [parser(Delta(text=p, token_count=1)) for p in pieces[:-1]]
    deltas.append(parser(Delta(text=pieces[-1], token_count=1, finish_reason="stop", usage=Usage(3, len(pieces)))))
    assert sum(d.token_count for d in deltas) == len(pieces)
    assert deltas[-1].usage == Usage(3, len(pieces))
    assert all(d.finish_reason is None for d in deltas[:-1])
    merged = [p for d in deltas for p in d.tool_calls or ()]
    calls: Calls = []
    for piece in merged:
        if piece.id is not None:
            assert piece.index == len(calls)
            calls.append((piece.name or "", {}))
            args = ""
        args += piece.arguments
        calls[-1] = (calls[-1][0], json.loads(args) if args else {})
    return ("".join(d.text for d in deltas), "".join(d.reasoning for d in deltas), calls, deltas[-1].finish_reason,
            merged)


def _same_everywhere(text: str, reasoning: bool, tools: str | None, opened: bool = False
                     ) -> tuple[str, str, Calls, str | None]:
    results = {json.dumps(_parse(text, cut, reasoning, tools, opened)[:4]) for cut in _cuts(text)}
    assert len(results) == 1, results
    content, thought, calls, finish, _ = _parse(text, [text], reasoning, tools, opened)
    return content, thought, calls, finish


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


def test_think_block_is_reasoning_and_the_rest_content() -> None:
    text = "<think>\nLet me think.\nParis is in France.\n</think>\n\nThe capital is Paris."
    assert _same_everywhere(text, True, None) == ("The capital is Paris.",
                                                  "Let me think.\nParis is in France.", [], "stop")


def test_no_think_block_is_all_content_untouched() -> None:
    assert _same_everywhere("  Hello <b>world</b> <thin", True, None) == ("  Hello <b>world</b> <thin", "", [], "stop")


def test_think_opened_by_the_prompt() -> None:
    text = "I should answer briefly.\n</think>\n\nParis."
    assert _same_everywhere(text, True, None, opened=True) == ("Paris.", "I should answer briefly.", [], "stop")
    # a model that opens the block again anyway
    assert _same_everywhere("<think>hm</think>ok", True, None, opened=True) == ("ok", "hm", [], "stop")


def test_unclosed_think_is_all_reasoning() -> None:
    assert _same_everywhere("<think>still thinking about </thi", True, None) == (
        "", "still thinking about </thi", [], "stop")


def test_partial_tag_is_held_back() -> None:
    parser = ThinkParser()
    assert parser.feed("<thi") == ("", "")
    assert parser.feed("nk>abc</th") == ("abc", "")
    assert parser.feed("ink>x") == ("", "x")
    hermes = HermesParser()
    assert hermes.feed("Sure <tool_") == ("Sure", [])


def test_one_hermes_call() -> None:
    content, thought, calls, finish = _same_everywhere(CALL, False, "hermes")
    assert (content, thought, finish) == ("", "", "tool_calls")
    assert calls == [("get_weather", {"city": "Paris", "unit": "celsius"})]


def test_hermes_calls_with_text_and_thinking() -> None:
    text = ("<think>Need weather.</think>\nLet me check. \n" + CALL + "\n"
            + '<tool_call>{"name": "now"}</tool_call>\n')
    content, thought, calls, finish = _same_everywhere(text, True, "hermes")
    assert (content, thought, finish) == ("Let me check.", "Need weather.", "tool_calls")
    assert calls == [("get_weather", {"city": "Paris", "unit": "celsius"}), ("now", {})]


def test_hermes_arguments_always_an_object_and_ids_unique() -> None:
    text = '<tool_call>{"name": "a"}</tool_call><tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>'
    *_, pieces = _parse(text, [text], False, "hermes")
    heads = [p for p in pieces if p.id is not None]
    assert [p.arguments for p in pieces if p.id is None] == ["{}", '{"x": 1}']
    assert len({p.id for p in heads}) == 2
    for head in heads:
        assert head.id is not None and head.id.startswith("call_") and len(head.id) == 29
        assert head.id[5:].isalnum()


@pytest.mark.parametrize("text", [
    "<tool_call>{not json}</tool_call>",
    'Use it: <tool_call>{"arguments": {}}</tool_call> done',
    '<tool_call>{"name": "x", "arguments": [1]}</tool_call>',
    "<tool_call>unclosed",
])
def test_what_is_not_a_call_passes_through_as_content(text: str) -> None:
    assert _same_everywhere(text, False, "hermes") == (text, "", [], "stop")


def test_unclosed_but_whole_call_is_a_call() -> None:
    assert _same_everywhere('<tool_call>{"name": "f", "arguments": {"a": 1}}', False, "hermes")[2] == [("f", {"a": 1})]


def test_plain_answer_with_tools_keeps_its_whitespace() -> None:
    assert _same_everywhere("  Hello, world!\n", False, "hermes") == ("  Hello, world!\n", "", [], "stop")


def test_llama3_json() -> None:
    text = '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}'
    assert _same_everywhere(text, False, "llama3_json")[2:] == ([("f", {"a": 1}), ("g", {})], "tool_calls")
    assert _same_everywhere(' {"name": "f"} trailing', False, "llama3_json") == (' {"name": "f"} trailing', "",
                                                                                   [], "stop")
    assert _same_everywhere("Just text {}", False, "llama3_json") == ("Just text {}", "", [], "stop")


def test_mistral() -> None:
    text = 'Calling. [TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]'
    assert _same_everywhere(text, False, "mistral") == ("Calling. ", "", [("f", {"a": 1}), ("g", {})], "tool_calls")
    assert _same_everywhere("[TOOL_CALLS]oops", False, "mistral") == ("[TOOL_CALLS]oops", "", [], "stop")


def test_deltas_keep_logprobs_and_already_split_output() -> None:
    parser = ChoiceParser(ThinkParser(), None)
    given = Delta(text="x", token_count=2, reasoning="r", tool_calls=[ToolCallDelta(0, "id", "f", "{}")])
    out = parser(given)
    assert (out.reasoning, out.token_count, out.tool_calls) == ("r", 2, given.tool_calls)


def _request(tools: bool, tool_choice: str | None = None, **kwargs: Any) -> GenerateRequest:
    return GenerateRequest("r", SamplingParams(), messages=({"role": "user", "content": "hi"},),
                           tools=({"type": "function", "function": {"name": "f"}},) if tools else None,
                           tool_choice=tool_choice, chat_template_kwargs=kwargs)


def test_which_parsers_a_request_gets() -> None:
    info = EngineInfo("fake", 100, 1, tool_parser="hermes", reasoning_parser="think")
    assert choice_parser(EngineInfo("upstream", 100, 1), _request(True)) is None
    assert choice_parser(info, _request(False, enable_thinking=False)) is None
    no_tools = choice_parser(info, _request(True, "none"))
    assert no_tools is not None and no_tools(Delta(text="<tool_call>", finish_reason="stop")).text == "<tool_call>"
    both = choice_parser(info, _request(True))
    assert both is not None
    assert both(Delta(text=CALL, finish_reason="stop")).finish_reason == "tool_calls"
