"""The ``constrained_json`` parser: the tools envelope read back into content and tool call pieces, the same at
every split of the text; a call's id and name first, its arguments after; text that is no envelope kept whole;
and the choice parser's finish reason over it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from inhouse.engine.answer_schema import CONSTRAINED_JSON
from inhouse.engine.base import Delta, EngineInfo, GenerateRequest, SamplingParams, ToolCallDelta
from inhouse.server.parsers.choice import choice_parser
from inhouse.server.parsers.envelope import EnvelopeParser


@dataclass(frozen=True)
class Parsed:
    content: str
    calls: list[tuple[str, str]]  # (name, arguments text) per call index
    closed: int  # the parser's ``calls``


def splits(text: str) -> list[list[str]]:
    """Every way the brief asks for: pieces of every size 1..len, and a cut at every single position."""
    out = [[text[i:i + size] for i in range(0, len(text), size)] for size in range(1, len(text) + 1)]
    out += [[text[:i], text[i:]] for i in range(len(text) + 1)]
    return out


def check_pieces(pieces: list[ToolCallDelta]) -> list[tuple[str, str]]:
    """The calls the pieces make, after checking how they come: index 0, 1, ... never interleaved; the first piece
    of a call carries a ``call_`` id and the name, later ones only arguments."""
    calls: list[tuple[str, str]] = []
    for piece in pieces:
        if piece.index == len(calls):  # a new call
            assert piece.id is not None and piece.id.startswith("call_") and len(piece.id) > 5, piece
            assert piece.name is not None, piece
            calls.append((piece.name, piece.arguments))
        else:
            assert piece.index == len(calls) - 1, pieces  # the current call: calls never interleave
            assert piece.id is None and piece.name is None, piece
            name, arguments = calls[-1]
            calls[-1] = (name, arguments + piece.arguments)
    return calls


def parse(pieces: list[str]) -> Parsed:
    parser = EnvelopeParser()
    content, deltas = "", list[ToolCallDelta]()
    for piece in pieces:
        more, calls = parser.feed(piece)
        content, deltas = content + more, deltas + calls
    more, calls = parser.finish()
    return Parsed(content + more, check_pieces(deltas + calls), parser.calls)


def parse_every_way(text: str) -> Parsed:
    """The text parsed whole, and the same result at every split."""
    whole = parse([text])
    for pieces in splits(text):
        assert parse(pieces) == whole, pieces
    return whole


# ---- content ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "It is sunny.",
    'say "hi" \\ then\nnext\tline',
    "caf\u00e9 \U0001f600 \u5929\u6c14\u5f88\u597d",
    "",
    "}]{[,:",
], ids=["plain", "escapes", "unicode", "empty", "brackets"])
@pytest.mark.parametrize("ascii_only", [True, False], ids=["escaped", "raw"])
def test_a_content_string_is_decoded(value: str, ascii_only: bool) -> None:
    text = json.dumps({"content": value}, ensure_ascii=ascii_only)
    assert parse_every_way(text) == Parsed(value, [], 0)


def test_escapes_as_written_by_hand() -> None:
    text = r'{"content": "q\"b\\s\nn\u00e9\ud83d\ude00\u4e2d/\/"}'
    assert parse_every_way(text) == Parsed('q"b\\s\nn\u00e9\U0001f600\u4e2d//', [], 0)


def test_whitespace_between_tokens() -> None:
    assert parse_every_way(' \n{ "content" :\t"hi" }\n') == Parsed("hi", [], 0)


@pytest.mark.parametrize(("text", "content"), [
    ('{"content": {"a": [1, 2]}}', '{"a": [1, 2]}'),
    ('{"content": {"a": [1, 2]} }', '{"a": [1, 2]}'),
    ('{"content": [{"s": "}]\\""}]}', '[{"s": "}]\\""}]'),
    ('{"content": 42}', "42"),
    ('{"content": 42 }', "42"),  # a bug at some splits: see the report
    ('{"content": true}', "true"),
], ids=["object", "object_space", "list_with_brackets_in_a_string", "number", "number_space", "literal"])
def test_a_content_value_that_is_not_a_string_is_its_json_text(text: str, content: str) -> None:
    assert parse_every_way(text) == Parsed(content, [], 0)


@pytest.mark.parametrize("text", ["It is sunny.", "Sure: {not json}", '{"a" 1}', "  plain", "{}", "{ x"])
def test_text_that_is_not_an_envelope_passes_through_whole(text: str) -> None:
    assert parse_every_way(text) == Parsed(text, [], 0)


def test_text_cut_inside_the_head_comes_back_at_finish() -> None:
    for text in ['{"con', "{", ' { "', '{"get_wea', '{"a\\']:
        parser = EnvelopeParser()
        assert parser.feed(text) == ("", [])  # held: it may still become an envelope
        assert parser.finish() == (text, [])
        assert parser.calls == 0


def test_a_content_string_cut_short_keeps_what_was_decoded() -> None:
    assert parse_every_way('{"content": "It is sun') == Parsed("It is sun", [], 0)


# ---- calls ------------------------------------------------------------------------------------------------


def test_a_call_streams_its_id_and_name_then_its_arguments() -> None:
    arguments = {"city": "Z\u00fcrich", "days": [1, 2], "opts": {"unit": "c"}}
    text = json.dumps({"get_weather": arguments}, ensure_ascii=False)
    parsed = parse_every_way(text)
    assert parsed == Parsed("", [("get_weather", json.dumps(arguments, ensure_ascii=False))], 1)
    assert json.loads(parsed.calls[0][1]) == arguments
    parser = EnvelopeParser()
    _, first = parser.feed('{"get_weather":')
    assert len(first) == 1 and first[0].name == "get_weather" and first[0].arguments == ""
    _, later = parser.feed(' {"city": "Pa')
    assert later == [ToolCallDelta(0, arguments='{"city": "Pa')]
    assert parser.calls == 0  # not closed yet
    _, last = parser.feed('ris"}}')
    assert last == [ToolCallDelta(0, arguments='ris"}')]
    assert parser.calls == 1 and parser.finish() == ("", [])


def test_every_call_gets_its_own_id() -> None:
    ids = {EnvelopeParser().feed('{"f":')[1][0].id for _ in range(20)}
    assert len(ids) == 20
    parser = EnvelopeParser()
    _, pieces = parser.feed('[{"f": {}}, {"f": {}}]')
    assert len({p.id for p in pieces if p.id is not None}) == 2


def test_braces_and_quotes_inside_argument_strings() -> None:
    text = r'{"search": {"q": "a}b\"c", "r": "]\\"}}'
    assert parse_every_way(text) == Parsed("", [("search", r'{"q": "a}b\"c", "r": "]\\"}')], 1)
    assert json.loads(parse([text]).calls[0][1]) == {"q": 'a}b"c', "r": "]\\"}


def test_whitespace_around_a_call() -> None:
    text = ' {\n "f" :  { "a" : 1 }\n } '
    assert parse_every_way(text) == Parsed("", [("f", '{ "a" : 1 }')], 1)


def test_a_call_without_arguments() -> None:
    assert parse_every_way('{"now": {}}') == Parsed("", [("now", "{}")], 1)


def test_several_calls_in_a_list() -> None:
    text = '[{"get_weather": {"city": "Paris"}}, {"get_time": {"zone": "UTC"}}]'
    assert parse_every_way(text) == Parsed(
        "", [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "UTC"}')], 2)
    spaced = ' [ {"a": {}} ,\n{"b": {"x": "]"}} ] '
    assert parse_every_way(spaced) == Parsed("", [("a", "{}"), ("b", '{"x": "]"}')], 2)


def test_content_inside_a_list_is_a_call_named_content() -> None:
    """Only the top-level object's "content" key is an answer: inside a list every key names a tool."""
    assert parse_every_way('[{"content": {}}]') == Parsed("", [("content", "{}")], 1)


def test_a_call_cut_before_it_closes_does_not_count() -> None:
    parsed = parse_every_way('{"get_weather": {"city": "Par')
    assert parsed == Parsed("", [("get_weather", '{"city": "Par')], 0)
    assert parse_every_way('{"get_weather": {"city": "Paris"}') == Parsed(
        "", [("get_weather", '{"city": "Paris"}')], 0)  # the arguments closed, the envelope did not
    assert parse_every_way('[{"a": {}}, {"b": {"x"') == Parsed("", [("a", "{}"), ("b", '{"x"')], 1)


# ---- defects found by these tests, fixed -------------------------------------------------------------------------


def test_a_list_that_is_not_an_envelope_passes_through_whole() -> None:
    """The module promises "text is never lost"; a JSON list that holds no calls loses its opening bracket."""
    for text in ["[1, 2]", '["a"]']:
        assert parse([text]) == Parsed(text, [], 0)


def test_a_lone_high_surrogate_does_not_swallow_the_closing_quote() -> None:
    """``\\ud83d`` not followed by a low surrogate escape: the content is the replacement character (a lone
    surrogate cannot be sent as UTF-8), not the escape and the envelope's closing ``"}`` as raw text."""
    text = r'{"content": "a\ud83db"}'
    assert parse([text]) == Parsed("a\ufffdb", [], 0)


def test_text_after_the_envelope_is_content_and_closing_brackets_are_not() -> None:
    assert parse(['{"content": "hi"} } ]']) == Parsed("hi", [], 0)
    assert parse(['{"content": "hi"} trailing']) == Parsed("hi trailing", [], 0)


# ---- the choice parser over the envelope ----------------------------------------------------------------------


INFO = EngineInfo(kind="local", context_length=512, max_num_seqs=1, tool_parser=CONSTRAINED_JSON)
TOOLS = ({"type": "function", "function": {"name": "get_weather", "parameters": {}}},)


def chat(tools: tuple[dict[str, Any], ...] | None = TOOLS, tool_choice: str | None = None) -> GenerateRequest:
    return GenerateRequest("r", SamplingParams(), messages=({"role": "user", "content": "hi"},), tools=tools,
                           tool_choice=tool_choice)


def run_choice(pieces: list[str], finish: str, request: GenerateRequest | None = None
               ) -> tuple[str, list[ToolCallDelta], str | None]:
    parser = choice_parser(INFO, request or chat())
    assert parser is not None
    text, calls, reason = "", list[ToolCallDelta](), None
    for i, piece in enumerate(pieces):
        out = parser(Delta(text=piece, token_count=1, finish_reason=finish if i == len(pieces) - 1 else None))
        assert out.token_count == 1
        text, calls, reason = text + out.text, calls + (out.tool_calls or []), out.finish_reason
    return text, calls, reason


def test_a_choice_that_called_a_tool_finishes_with_tool_calls() -> None:
    text, calls, reason = run_choice(['{"get_', 'weather": {"city', '": "Paris"}}'], "stop")
    assert (text, reason) == ("", "tool_calls")
    assert check_pieces(calls) == [("get_weather", '{"city": "Paris"}')]


def test_a_choice_that_answered_keeps_its_finish_reason() -> None:
    assert run_choice(['{"content": "Hel', 'lo"}'], "stop") == ("Hello", [], "stop")


def test_a_call_cut_by_length_keeps_length() -> None:
    """The call's pieces so far are sent, but it never closed: no ``tool_calls`` finish."""
    text, calls, reason = run_choice(['{"get_weather": ', '{"city": "Pa'], "length")
    assert (text, reason) == ("", "length")
    assert check_pieces(calls) == [("get_weather", '{"city": "Pa')]


def test_a_closed_call_cut_by_length_is_tool_calls() -> None:
    """Once a call closed, the choice called a tool, whatever cut the envelope's end."""
    _, _, reason = run_choice(['[{"get_weather": {}}', ", {"], "length", chat())
    assert reason == "tool_calls"


def test_no_envelope_parser_without_tools_or_with_tool_choice_none() -> None:
    assert choice_parser(INFO, chat(tools=None)) is None
    assert choice_parser(INFO, chat(tool_choice="none")) is None
