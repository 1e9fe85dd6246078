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
from inhouse.engine.base import GenerateRequest, Generation, SamplingParams
from inhouse.engine.upstream import UpstreamEngine, UpstreamUnavailableError, _BadChunkError, _parse_chunk
from inhouse.errors import ErrorCode, InhouseError

WORD = json.dumps({"choices": [{"index": 0, "delta": {"content": "Hi "}, "finish_reason": None}]})
FINISH = json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 7, "completion_tokens": 2}})
BAD = [b'{"choices":["oops"]}', b'{"choices":{"0":1}}', b'{"choices":[{"delta":"oops"}]}',
       b'{"choices":[{"delta":{"content":42}}]}', b'{"choices":[{"delta":{"content":{}}}]}',
       b'{"choices":[{"text":[1]}]}', b'{"choices":[{"delta":{},"finish_reason":7}]}',
       b'{"usage":{"prompt_tokens":[1]}}', b'{"usage":{"completion_tokens":true}}', b'{"usage":[1]}',
       b"[1,2]", b'"oops"', b"7", b"null", b"{nope", b'{"error":{"message":"boom"}}']


@pytest.mark.parametrize("data", BAD, ids=[b.decode() for b in BAD])
def test_a_chunk_of_the_wrong_shape_is_a_bad_chunk(data: bytes) -> None:
    with pytest.raises(_BadChunkError) as raised:
        _parse_chunk(data)
    assert raised.value.reason.startswith("sent ")


def test_well_formed_chunks_parse() -> None:
    assert _parse_chunk(WORD.encode()).text == "Hi "
    finish = _parse_chunk(FINISH.encode())
    assert (finish.finish_reason, finish.prompt_tokens, finish.completion_tokens) == ("stop", 7, 2)
    assert _parse_chunk(b'{"choices":[{"index":0,"text":"x","finish_reason":null}]}').text == "x"
    role = _parse_chunk(b'{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}],"usage":null}')
    assert role.text == "" and role.finish_reason is None
    assert _parse_chunk(b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}').prompt_tokens == 3


class _Server:
    """Answers each POST with the next scripted body: a list of SSE data payloads, or ``stall`` to go silent."""

    def __init__(self) -> None:
        self.script: list[list[str] | str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.release = asyncio.Event()  # ends every stall (set before the server stops)

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
