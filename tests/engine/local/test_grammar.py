"""response_format enforced by constrained decoding: the transformers engine, in-process on the tiny model.

The tiny model's weights are random, so any JSON in its answers comes from the grammar.  Constrained rows share
their steps with free rows (which must still run to their length) and with rows of other schemas.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from inhouse.config import TransformersSpec
from inhouse.engine.answer_schema import CONSTRAINED_JSON, answer_schema
from inhouse.engine.base import Capability, GenerateRequest, Generation, SamplingParams
from inhouse.engine.collector import OutputCollector
from inhouse.engine.local.detokenizer import IncrementalDetokenizer, StopMatcher
from inhouse.engine.local.engine import LocalEngine
from inhouse.engine.local.grammar import Constraint
from inhouse.engine.local.sequence import Sequence
from inhouse.errors import ErrorCode, InhouseError
from inhouse.server.parsers.envelope import EnvelopeParser

HI = ({"role": "user", "content": "hello"},)
TOKENS = 24
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
FLAGS: dict[str, Any] = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "count"],
    "additionalProperties": False,
}


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
async def engine(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[LocalEngine]:
    engine = LocalEngine(TransformersSpec(name="tiny", path=str(tiny_model_dir), dtype="float32", max_num_seqs=8,
                                          max_waiting=8), cache_dir)
    await engine.start()
    yield engine
    await engine.close()


def request(name: str, response_format: dict[str, Any] | None, seed: int, temperature: float = 0.8,
            max_tokens: int = 200) -> GenerateRequest:
    return GenerateRequest(name, SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed),
                           messages=HI, response_format=response_format)


def free(i: int) -> GenerateRequest:
    return GenerateRequest(f"free-{i}", SamplingParams(max_tokens=TOKENS, ignore_eos=True, temperature=0.8, seed=i),
                           messages=HI)


async def answer(generation: Generation) -> tuple[str, str | None, int]:
    text, finish, tokens = "", None, 0
    async for delta in generation:
        text, finish, tokens = text + delta.text, delta.finish_reason or finish, tokens + delta.token_count
    return text, finish, tokens


async def idle(engine: LocalEngine) -> bool:
    """Every admitted request released (the engine thread releases right after the last delta)."""
    for _ in range(500):
        if engine._gate.in_progress == 0:
            return True
        await asyncio.sleep(0.01)
    return False


async def submit_together(engine: LocalEngine, requests: list[GenerateRequest]) -> list[tuple[str, str | None, int]]:
    """One submit per request (as separate HTTP calls would), all in the engine before its next step."""
    generations = [g for r in requests for g in await engine.submit([r])]
    return list(await asyncio.gather(*(answer(g) for g in generations)))


async def test_the_engine_card_says_json_schema(engine: LocalEngine) -> None:
    assert Capability.JSON_SCHEMA in engine.info.capabilities


async def test_constrained_rows_answer_valid_json_beside_free_rows(engine: LocalEngine) -> None:
    requests = [free(0), request("person-greedy", schema_format(PERSON), 0, temperature=0.0),
                request("object", {"type": "json_object"}, 1, temperature=0.0), free(1),
                request("person-sampled", schema_format(PERSON), 2), free(2)]
    results = await submit_together(engine, requests)
    for i in (0, 3, 5):
        assert results[i][1:] == ("length", TOKENS), results[i]
    for i in (1, 4):
        text, finish, _ = results[i]
        assert finish == "stop", results[i]
        jsonschema_rs.validate(PERSON, json.loads(text))
    text, finish, _ = results[2]
    assert finish == "stop" and isinstance(json.loads(text), dict), results[2]


async def test_two_schemas_in_one_batch(engine: LocalEngine) -> None:
    requests = [request(f"{name}-{seed}", schema_format(schema), seed)
                for seed in range(3) for name, schema in (("person", PERSON), ("flags", FLAGS))]
    results = await submit_together(engine, requests)
    for (text, finish, _), schema in zip(results, [PERSON, FLAGS] * 3, strict=True):
        assert finish == "stop", text
        jsonschema_rs.validate(schema, json.loads(text))


async def test_the_same_schema_compiles_once(engine: LocalEngine) -> None:
    assert engine._grammars is not None
    before = engine._grammars._compile.cache_info()
    await submit_together(engine, [request(f"again-{i}", schema_format(FLAGS), i) for i in range(2)])
    after = engine._grammars._compile.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 2


@pytest.mark.parametrize("schema", [{"type": "foo"}, {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
                                    ["not", "an", "object"]], ids=["unknown_type", "dangling_ref", "not_an_object"])
async def test_an_invalid_schema_is_a_400_at_submit_and_takes_no_slot(engine: LocalEngine, schema: Any) -> None:
    assert await idle(engine)
    with pytest.raises(InhouseError) as refused:
        await engine.submit([free(0), request("bad", schema_format(schema), 0)])
    assert refused.value.code is ErrorCode.INVALID_REQUEST
    assert refused.value.param == "response_format.json_schema.schema"
    assert engine._gate.in_progress == 0


async def test_text_format_is_free_text(engine: LocalEngine) -> None:
    [result] = await submit_together(engine, [GenerateRequest(
        "text", SamplingParams(max_tokens=TOKENS, ignore_eos=True, seed=3), messages=HI,
        response_format={"type": "text"})])
    assert result[1:] == ("length", TOKENS)


async def test_max_tokens_cuts_a_constrained_answer_with_length(engine: LocalEngine) -> None:
    """The grammar holds for every token, but a cut answer is a prefix of valid JSON, not valid JSON (as with
    OpenAI: the client sees finish_reason "length")."""
    [(text, finish, tokens)] = await submit_together(engine, [request("cut", schema_format(PERSON), 0, max_tokens=5)])
    assert (finish, tokens) == ("length", 5)
    assert '{"name":"'.startswith(text) or text.startswith('{"name":"')  # a prefix of the answer
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


class BrokenConstraint(Constraint):
    def __init__(self) -> None:
        pass

    def fill(self, bitmask: Any, row: int) -> None:
        raise RuntimeError("a grammar engine bug")


async def test_a_broken_constraint_fails_its_row_alone(engine: LocalEngine) -> None:
    assert engine._loaded is not None and engine._prompts is not None
    assert await idle(engine)
    good = [free(i) for i in range(2)] + [request("person", schema_format(PERSON), 0, temperature=0.0)]
    generations = [g for r in good for g in await engine.submit([r])]
    [prompt] = await engine._prompts.token_ids_all([free(9)])
    collector = OutputCollector(asyncio.get_running_loop())  # type: ignore[var-annotated]
    broken = Sequence("broken", prompt, SamplingParams(max_tokens=TOKENS), TOKENS, collector,
                      IncrementalDetokenizer(engine._loaded.tokenizer, prompt), StopMatcher(()),
                      constraint=BrokenConstraint())
    with engine._lock:
        engine._gate.admit()
        engine._inbox.append(broken)
        engine._wakeup.notify()
    generations.append(Generation("broken", len(prompt), collector, engine._abort))
    results = await asyncio.gather(*(answer(g) for g in generations[:3]))
    assert [r[1:] for r in results[:2]] == [("length", TOKENS)] * 2
    jsonschema_rs.validate(PERSON, json.loads(results[2][0]))
    with pytest.raises(InhouseError) as failed:
        await answer(generations[3])
    assert failed.value.code is ErrorCode.ENGINE_ERROR
    assert await idle(engine)


# ---- the tools envelope of a template that knows no tools (the tiny ChatML template) ------------------------

LOOKUP: dict[str, Any] = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"key": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["key", "n"]}}}
PING: dict[str, Any] = {"type": "function", "function": {"name": "ping"}}


def tools_request(name: str, seed: int, tools: tuple[dict[str, Any], ...] = (LOOKUP, PING),
                  tool_choice: str | None = None, parallel: bool | None = None, max_tokens: int = 60,
                  response_format: dict[str, Any] | None = None) -> GenerateRequest:
    return GenerateRequest(name, SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed), messages=HI,
                           tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel,
                           response_format=response_format)


def read_envelope(text: str) -> tuple[str, list[tuple[str, str]], int]:
    """(content, [(name, arguments)], closed calls) as the constrained_json parser reads the answer."""
    parser = EnvelopeParser()
    content, pieces = parser.feed(text)
    more, more_pieces = parser.finish()
    calls: dict[int, tuple[str, str]] = {}
    for piece in pieces + more_pieces:
        name, arguments = calls.get(piece.index, (piece.name or "", ""))
        calls[piece.index] = (name, arguments + piece.arguments)
    return content + more, [calls[i] for i in sorted(calls)], parser.calls


async def test_the_tiny_template_gets_the_tools_envelope(engine: LocalEngine) -> None:
    assert engine.info.tool_parser == CONSTRAINED_JSON
    assert Capability.TOOLS in engine.info.capabilities


@pytest.mark.parametrize("tool_choice", [None, "required"])
@pytest.mark.parametrize("parallel", [None, True])
async def test_the_tools_envelope_compiles(engine: LocalEngine, tool_choice: str | None,
                                          parallel: bool | None) -> None:
    assert engine._grammars is not None
    schema = answer_schema(tools_request("s", 0, tool_choice=tool_choice, parallel=parallel), CONSTRAINED_JSON)
    assert schema is not None and schema.param == "tools"
    assert isinstance(engine._grammars.constraint(schema), Constraint)


async def test_a_constrained_call_reads_back_as_a_call(engine: LocalEngine) -> None:
    requests = [tools_request(f"call-{seed}", seed, tools=(LOOKUP,), tool_choice="required") for seed in range(3)]
    for text, finish, _ in await submit_together(engine, requests):
        assert finish == "stop", text
        assert list(json.loads(text)) == ["lookup"]
        content, calls, closed = read_envelope(text)
        assert (content, closed, [name for name, _ in calls]) == ("", 1, ["lookup"]), text
        arguments = json.loads(calls[0][1])
        assert arguments["key"] in ("a", "b") and 0 <= arguments["n"] <= 9 and set(arguments) == {"key", "n"}


async def test_constrained_answers_under_auto_are_whole_envelopes(engine: LocalEngine) -> None:
    """With a bounded content (a response_format) and bounded calls, every answer completes within its tokens."""
    requests = [tools_request(f"auto-{seed}", seed, tools=(LOOKUP,), response_format=schema_format(FLAGS))
                for seed in range(6)]
    schema = answer_schema(requests[0], CONSTRAINED_JSON)
    assert schema is not None
    envelope = json.loads(schema.text)
    for text, finish, _ in await submit_together(engine, requests):
        assert finish == "stop", text
        answer = json.loads(text)
        jsonschema_rs.validate(envelope, answer)
        content, calls, closed = read_envelope(text)
        if "content" in answer:
            assert (json.loads(content), calls, closed) == (answer["content"], [], 0), text
        else:
            [(name, arguments)] = answer.items()
            assert (content, calls, closed) == ("", [(name, json.dumps(arguments, separators=(",", ":")))], 1)


async def test_cut_answers_read_back_as_far_as_they_got(engine: LocalEngine) -> None:
    """A free content string or a parallel list of calls runs out of tokens: what was read so far is kept."""
    requests = [tools_request(f"cut-{seed}", seed, parallel=seed % 2 == 0 or None, max_tokens=16) for seed in range(4)]
    for text, finish, _ in await submit_together(engine, requests):
        content, calls, closed = read_envelope(text)
        assert finish in ("stop", "length"), text
        if text.startswith('{"content":"'):
            assert calls == [] and content and text.startswith('{"content":"' + content[:1]), text
        else:
            assert text.startswith(("[{", '{"lookup":', '{"ping":')) and calls, text
            assert {name for name, _ in calls} <= {"lookup", "ping"}, text
            assert closed in (len(calls), len(calls) - 1), text  # only the last call may be cut
            for _, arguments in calls[:closed]:
                assert isinstance(json.loads(arguments), dict), text


async def test_a_tool_llguidance_cannot_enforce_is_a_400_on_tools(engine: LocalEngine) -> None:
    assert await idle(engine)
    bad = {"type": "function", "function": {"name": "odd", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}
    with pytest.raises(InhouseError) as refused:
        await engine.submit([free(0), tools_request("bad", 0, tools=(LOOKUP, bad))])
    assert refused.value.code is ErrorCode.INVALID_REQUEST and refused.value.status == 400
    assert refused.value.param == "tools"
    assert engine._gate.in_progress == 0
    assert engine._grammars is not None
    with pytest.raises(InhouseError) as direct:
        engine._grammars.constraint(answer_schema(tools_request("bad", 0, tools=(bad,)), CONSTRAINED_JSON))
    assert direct.value.param == "tools"


async def test_a_tool_named_content_is_a_400_at_submit(engine: LocalEngine) -> None:
    assert await idle(engine)
    content = {"type": "function", "function": {"name": "content"}}
    with pytest.raises(InhouseError) as refused:
        await engine.submit([tools_request("content", 0, tools=(content,))])
    assert refused.value.param == "tools" and engine._gate.in_progress == 0
