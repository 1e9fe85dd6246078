"""UpstreamEngine against a tiny in-process aiohttp server: chunks of the wrong shape are parsed defensively,
a bad first chunk is a failed attempt (UpstreamUnavailable from submit), a bad chunk later fails the generation,
and however the reader task ends (even closed or aborted) the collector is settled and the count drops."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from inhouse.config import UpstreamSpec
from inhouse.engine.base import GenerateRequest, Generation, SamplingParams, ToolCallDelta
from inhouse.engine.collector import OutputCollector
from inhouse.engine.upstream import UpstreamEngine, UpstreamUnavailableError, _body
from inhouse.engine.upstream_chunks import BadChunkError, Relay, parse_chunk
from inhouse.errors import ErrorCode, InhouseError

WORD = json.dumps({"choices": [{"index": 0, "delta": {"content": "Hi "}, "finish_reason": None}]})
FINISH = json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 7, "completion_tokens": 2}})
BAD = [b'{"choices":["oops"]}', b'{"choices":{"0":1}}', b'{"choices":[{"delta":"oops"}]}',
       b'{"choices":[{"delta":{"content":42}}]}', b'{"choices":[{"delta":{"content":{}}}]}',
       b'{"choices":[{"text":[1]}]}', b'{"choices":[{"delta":{},"finish_reason":7}]}',
       b'{"usage":{"prompt_tokens":[1]}}', b'{"usage":{"completion_tokens":true}}', b'{"usage":[1]}',
       b"[1,2]", b'"oops"', b"7", b"null", b"{nope", b'{"error":{"message":"boom"}}',
       b'{"choices":[{"delta":{"reasoning_content":5}}]}', b'{"choices":[{"delta":{"reasoning":["x"]}}]}',
       b'{"choices":[{"delta":{"tool_calls":{"index":0}}}]}', b'{"choices":[{"delta":{"tool_calls":["x"]}}]}',
       b'{"choices":[{"delta":{"tool_calls":[{"index":"0"}]}}]}',
       b'{"choices":[{"delta":{"tool_calls":[{"index":-1}]}}]}',
       b'{"choices":[{"delta":{"tool_calls":[{"function":"f"}]}}]}',
       b'{"choices":[{"delta":{"tool_calls":[{"id":1,"function":{"name":"f"}}]}}]}',
       b'{"choices":[{"delta":{"tool_calls":[{"function":{"name":"f","arguments":3}}]}}]}',
       b'{"choices":[{"delta":{"function_call":"f"}}]}']


@pytest.mark.parametrize("data", BAD, ids=[b.decode() for b in BAD])
def test_a_chunk_of_the_wrong_shape_is_a_bad_chunk(data: bytes) -> None:
    with pytest.raises(BadChunkError) as raised:
        parse_chunk(data)
    assert raised.value.reason.startswith("sent ")


def test_well_formed_chunks_parse() -> None:
    assert parse_chunk(WORD.encode()).text == "Hi "
    finish = parse_chunk(FINISH.encode())
    assert (finish.finish_reason, finish.prompt_tokens, finish.completion_tokens) == ("stop", 7, 2)
    assert parse_chunk(b'{"choices":[{"index":0,"text":"x","finish_reason":null}]}').text == "x"
    role = parse_chunk(b'{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}],"usage":null}')
    assert role.text == "" and role.finish_reason is None
    assert parse_chunk(b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}').prompt_tokens == 3


def _call(index: int | None = None, id: str | None = None, name: str | None = None,
          arguments: str | None = None) -> dict[str, object]:
    function = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None}
    call: dict[str, object] = {"type": "function", "function": function}
    if index is not None:
        call["index"] = index
    if id is not None:
        call["id"] = id
    return call


def _relay(*deltas: dict[str, object], finish: str = "tool_calls") -> list[ToolCallDelta]:
    """The seam's tool-call pieces of a stream of chat ``delta`` objects, ending with ``finish``."""
    relay, pieces = Relay(), []
    for delta in [*deltas, None]:
        choice = {"delta": delta or {}, "finish_reason": None if delta else finish}
        out = relay.add(parse_chunk(json.dumps({"choices": [choice]}).encode()))
        if out is not None and out.tool_calls:
            pieces += out.tool_calls
    return pieces


def test_tool_call_pieces_keep_the_first_id_and_name_then_arguments() -> None:
    pieces = _relay({"role": "assistant", "tool_calls": [_call(0, "call_a", "get_weather", "")]},
                    {"tool_calls": [_call(0, arguments='{"city": ')]},
                    {"tool_calls": [_call(0, arguments='"Paris"}')]})
    assert pieces == [ToolCallDelta(0, "call_a", "get_weather", ""), ToolCallDelta(0, arguments='{"city": '),
                      ToolCallDelta(0, arguments='"Paris"}')]


def test_parallel_calls_a_whole_call_per_chunk_and_a_repeated_id() -> None:
    pieces = _relay({"tool_calls": [_call(0, "a", "f", '{"x": 1}')]},
                    {"tool_calls": [_call(1, "b", "g", "{")]}, {"tool_calls": [_call(1, "b", "g", "}")]})
    assert pieces == [ToolCallDelta(0, "a", "f", '{"x": 1}'), ToolCallDelta(1, "b", "g", "{"),
                      ToolCallDelta(1, arguments="}")]
    both = _relay({"tool_calls": [_call(0, "a", "f", "{}"), _call(1, "b", "g", "{}")]})
    assert both == [ToolCallDelta(0, "a", "f", "{}"), ToolCallDelta(1, "b", "g", "{}")]


def test_calls_without_index_are_told_apart_by_their_id() -> None:
    pieces = _relay({"tool_calls": [_call(id="a", name="f", arguments="{")]},
                    {"tool_calls": [_call(arguments="}")]},
                    {"tool_calls": [_call(id="b", name="g")]}, {"tool_calls": [_call(id="fresh", arguments="{}")]})
    assert pieces == [ToolCallDelta(0, "a", "f", "{"), ToolCallDelta(0, arguments="}"),
                      ToolCallDelta(1, "b", "g", ""), ToolCallDelta(1, arguments="{}")]
    [unnamed] = _relay({"tool_calls": [_call(0, name="f", arguments="{}")]})
    assert unnamed.id and unnamed.id.startswith("call_") and unnamed.name == "f"  # an id is made up
    legacy = _relay({"function_call": {"name": "f", "arguments": "{"}}, {"function_call": {"arguments": "}"}},
                    finish="function_call")
    assert [p.arguments for p in legacy] == ["{", "}"] and legacy[0].name == "f"


def test_tool_calls_that_cannot_be_placed_are_a_bad_chunk() -> None:
    with pytest.raises(BadChunkError, match="without a function name"):
        _relay({"tool_calls": [_call(0, "a", arguments="{}")]})
    with pytest.raises(BadChunkError, match="interleaved"):
        _relay({"tool_calls": [_call(0, "a", "f")]}, {"tool_calls": [_call(1, "b", "g")]},
               {"tool_calls": [_call(0, arguments="{}")]})


def test_finish_reasons_and_what_counts_as_a_token() -> None:
    relay = Relay()
    def finish(reason: str) -> str | None:
        delta = relay.add(parse_chunk(json.dumps({"choices": [{"delta": {}, "finish_reason": reason}]}).encode()))
        return delta.finish_reason if delta else None
    assert [finish(r) for r in ("stop", "length", "tool_calls", "function_call", "content_filter")] == \
        ["stop", "length", "tool_calls", "tool_calls", "stop"]
    relay.add(parse_chunk(b'{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"f"}}]}}]}'))
    assert finish("stop") == "tool_calls"  # the answer was a tool call, whatever the upstream called it
    counting = Relay()
    for data in (b'{"choices":[{"delta":{"reasoning_content":"hm"}}]}', b'{"choices":[{"delta":{"content":"x"}}]}',
                 b'{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"f"}}]}}]}',
                 b'{"choices":[{"delta":{"role":"assistant"}}]}'):
        counting.add(parse_chunk(data))
    assert counting.counted == 3


def _settled(*payloads: dict[str, object]) -> tuple[int, int | None]:
    """The (prompt, cached) tokens of the usage a Relay settles after these chunks (admission estimate: 9)."""
    relay, finishing = Relay(), None
    for payload in payloads:
        finishing = relay.add(parse_chunk(json.dumps(payload).encode())) or finishing
    assert finishing is not None
    usage = relay.settle(finishing, Generation("r", 9, OutputCollector(asyncio.get_running_loop()), lambda _: None))
    assert usage.usage is not None
    return usage.usage.prompt_tokens, usage.usage.cached_tokens


async def test_an_upstreams_cached_tokens_pass_through_when_they_make_sense() -> None:
    end = {"choices": [{"delta": {}, "finish_reason": "stop"}]}
    def usage(cached: object, prompt: int | None = 100) -> dict[str, object]:
        return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": 2,
                                         "prompt_tokens_details": {"cached_tokens": cached}}}
    assert _settled(end, usage(64)) == (100, 64)
    assert _settled(end, usage(0)) == (100, 0)
    assert _settled(end, usage(100)) == (100, 100)
    assert _settled({**usage(32), **end}) == (100, 32)  # on the finishing chunk itself
    assert _settled(end, usage(8, prompt=None)) == (9, 8)  # within the admission estimate
    for wrong in (101, -1, 1.5, "64", True, None, [64], {"n": 1}):
        assert _settled(end, usage(wrong)) == (100, None), wrong  # ignored, never a failed answer
    for details in (None, "x", [1], {}):
        assert _settled(end, {"choices": [], "usage": {"prompt_tokens": 100, "prompt_tokens_details": details}}) \
            == (100, None)
    assert _settled(end) == (9, None)  # no usage at all


def test_reasoning_is_either_field_never_both() -> None:
    assert parse_chunk(b'{"choices":[{"delta":{"reasoning_content":"a"}}]}').reasoning == "a"
    assert parse_chunk(b'{"choices":[{"delta":{"reasoning":"b"}}]}').reasoning == "b"
    both = parse_chunk(b'{"choices":[{"delta":{"reasoning":"c","reasoning_content":"c"}}]}')
    assert both.reasoning == "c"
    delta = Relay().add(parse_chunk(b'{"choices":[{"delta":{"reasoning":"c","content":null}}]}'))
    assert delta is not None and delta.reasoning == "c" and delta.text == "" and delta.token_count == 1


def test_the_body_forwards_tools_images_and_response_format() -> None:
    image = {"role": "user", "content": [{"type": "text", "text": "what is it?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
    called = {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "type": "function",
                                                                  "function": {"name": "f", "arguments": "{}"}}]}
    answered = {"role": "tool", "content": "42", "tool_call_id": "a"}
    tools = ({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},)
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    request = GenerateRequest("r", SamplingParams(), messages=(image, called, answered), tools=tools,
                              tool_choice={"type": "function", "function": {"name": "f"}}, parallel_tool_calls=False,
                              response_format=schema)
    body = _body(request, UpstreamSpec(name="up", base_url="http://x/v1"))
    assert body["messages"] == [image, called, answered] and body["tools"] == list(tools)
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["parallel_tool_calls"] is False and body["response_format"] == schema
    plain = _body(GenerateRequest("r", SamplingParams(), messages=(image,), tool_choice="none"),
                  UpstreamSpec(name="up", base_url="http://x/v1"))
    assert not {"tools", "tool_choice", "parallel_tool_calls", "response_format"} & plain.keys()


class _Server:
    """Answers each POST with the next scripted body: a list of SSE data payloads, or ``stall`` to go silent."""

    def __init__(self) -> None:
        self.script: list[list[str] | str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.release = asyncio.Event()  # ends every stall (set before the server stops)
        self.bodies: list[dict[str, object]] = []  # every request body received, in order

    async def start(self) -> _Server:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.answer)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def answer(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        step = self.script.pop(0) if self.script else [WORD, FINISH]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # the engine may have hung up
            for payload in step if isinstance(step, list) else [WORD]:
                await response.write(f"data: {payload}\n\n".encode())
            if step == "stall":
                await self.release.wait()
            await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[_Server, UpstreamEngine]]:
    server = await _Server().start()
    engine = UpstreamEngine(UpstreamSpec(name="up", base_url=server.url, first_token_timeout=5,
                                      total_timeout=10))
    await engine.start()
    yield server, engine
    await engine.close()
    server.release.set()
    assert server.runner is not None
    await server.runner.cleanup()


def _request() -> list[GenerateRequest]:
    return [GenerateRequest("r1", SamplingParams(), messages=({"role": "user", "content": "hi"},))]


async def _read(generation: Generation) -> str:
    return "".join([delta.text async for delta in generation])


async def test_a_good_answer_passes_with_the_upstreams_usage(upstream: tuple[_Server, UpstreamEngine]) -> None:
    _, engine = upstream
    [generation] = await engine.submit(_request())
    deltas = [delta async for delta in generation]
    assert "".join(d.text for d in deltas) == "Hi "
    assert deltas[-1].usage is not None and deltas[-1].usage.prompt_tokens == 7  # the upstream's, with the end


async def test_a_bad_first_chunk_is_unavailable_and_a_later_one_fails_the_answer(
    upstream: tuple[_Server, UpstreamEngine]
) -> None:
    server, engine = upstream
    server.script = [['{"choices":["oops"]}', WORD, FINISH], [WORD, '{"choices":[{"delta":"oops"}]}', FINISH]]
    with pytest.raises(UpstreamUnavailableError, match="before its first token"):
        await engine.submit(_request())
    [generation] = await engine.submit(_request())
    with pytest.raises(InhouseError) as raised:
        await asyncio.wait_for(_read(generation), 5)
    assert raised.value.code is ErrorCode.UPSTREAM_ERROR and "mid-answer" in raised.value.message
    assert engine.stats().running == 0


async def test_closing_the_engine_fails_a_waiting_answer_instead_of_leaving_it(
    upstream: tuple[_Server, UpstreamEngine]
) -> None:
    server, engine = upstream
    server.script = ["stall"]
    [generation] = await engine.submit(_request())
    reading = asyncio.create_task(_read(generation))
    await asyncio.sleep(0.1)
    await engine.close()
    with pytest.raises(InhouseError) as raised:
        await asyncio.wait_for(reading, 5)
    assert raised.value.code is ErrorCode.UPSTREAM_ERROR
    assert engine.stats().running == 0


async def test_an_abort_before_the_reader_ran_still_releases_it(upstream: tuple[_Server, UpstreamEngine]) -> None:
    server, engine = upstream
    server.script = ["stall"]
    [generation] = await engine.submit(_request())
    generation.abort()  # before the reader task took its first step
    for _ in range(50):
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats().running == 0


async def test_a_tool_call_or_reasoning_is_a_first_token(upstream: tuple[_Server, UpstreamEngine]) -> None:
    server, engine = upstream
    think = json.dumps({"choices": [{"delta": {"reasoning": "let me see"}, "finish_reason": None}]})
    call = json.dumps({"choices": [{"delta": {"tool_calls": [_call(0, "a", "f", "{}")]}, "finish_reason": None}]})
    end = json.dumps({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    server.script = [[think, call, end]]
    [generation] = await engine.submit(_request())
    deltas = [delta async for delta in generation]
    assert "".join(d.reasoning for d in deltas) == "let me see"
    assert [c for d in deltas for c in d.tool_calls or []] == [ToolCallDelta(0, "a", "f", "{}")]
    assert deltas[-1].finish_reason == "tool_calls"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 2  # counted: no usage sent


async def test_a_seed_beyond_int64_is_forwarded_within_it(upstream: tuple[_Server, UpstreamEngine]) -> None:
    """The edge takes seeds up to 2**64 - 1 and the second choice adds 1: JSON encoders and vLLM refuse what
    does not fit in an int64, so the upstream gets the seed folded into it (as the vLLM engine does)."""
    server, engine = upstream
    hi = ({"role": "user", "content": "hi"},)
    for seed in (2**64 - 1, 2**64, -(2**63), 7):
        [generation] = await engine.submit([GenerateRequest(f"s{seed}", SamplingParams(seed=seed), messages=hi)])
        assert await _read(generation) == "Hi "
    sent = [body["seed"] for body in server.bodies]
    assert all(isinstance(s, int) and -(2**63) <= s < 2**63 for s in sent), sent
    assert sent[2:] == [-(2**63), 7]  # a seed that fits is sent as given


async def test_what_an_answer_may_use_is_known_before_it_runs(upstream: tuple[_Server, UpstreamEngine]) -> None:
    """``Generation.max_tokens`` is reserved against the key's token budget: the request's max_tokens, else the
    deployment's default (forwarded, so the upstream keeps to it), else what its configured window leaves."""
    server, _ = upstream
    hi = ({"role": "user", "content": "hi"},)
    specs = [UpstreamSpec(name="up", base_url=server.url),
             UpstreamSpec(name="up", base_url=server.url, defaults={"max_tokens": 40}),
             UpstreamSpec(name="up", base_url=server.url, context_length=1000)]
    granted = []
    for spec, asked in [(specs[0], 9), (specs[0], None), (specs[1], None), (specs[1], 9), (specs[2], None)]:
        engine = UpstreamEngine(spec)
        await engine.start()
        try:
            [generation] = await engine.submit([GenerateRequest("r", SamplingParams(max_tokens=asked), messages=hi)])
            assert await _read(generation) == "Hi "
        finally:
            await engine.close()
        granted.append(generation.max_tokens)
    assert granted[:4] == [9, 0, 40, 9]  # 0: unknown, no bound to reserve
    assert 1000 - 10 < granted[4] < 1000  # the window less the prompt's estimate
    assert [body.get("max_tokens") for body in server.bodies] == [9, None, 40, 9, None]


def test_a_call_the_upstream_gave_no_arguments_gets_an_empty_object() -> None:
    """Dify's agent json.loads a call's joined arguments: "" would not parse."""
    pieces = _relay({"tool_calls": [_call(0, "a", "now")]}, {"tool_calls": [_call(1, "b", "g", '{"x": 1}')]})
    assert pieces == [ToolCallDelta(0, "a", "now", ""), ToolCallDelta(0, arguments="{}"),
                      ToolCallDelta(1, "b", "g", '{"x": 1}')]
    relay = Relay()
    relay.add(parse_chunk(json.dumps({"choices": [{"delta": {"tool_calls": [_call(0, "c", "now")]}}]}).encode()))
    finishing = relay.add(parse_chunk(b'{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}'))
    assert finishing is not None
    loop = asyncio.new_event_loop()
    try:
        generation = Generation("r", 3, OutputCollector(loop), lambda _: None)
        settled = relay.settle(finishing, generation)
    finally:
        loop.close()
    assert settled.tool_calls == [ToolCallDelta(0, arguments="{}")] and settled.finish_reason == "tool_calls"
