"""stream_events: opening chunks, deltas, the finish chunk with usage, the usage chunk, [DONE]; errors as one event;
the call ended (its sinks told) before [DONE].

Generations are real, fed through their collectors by the test; the renderer is a small one written here, so
what is checked is the order and content of events, not the chat wire format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson

from inhouse.audit.record import AuditRecord
from inhouse.engine.base import Delta, Generation, Usage
from inhouse.engine.collector import OutputCollector
from inhouse.errors import ErrorCode, InhouseError
from inhouse.server.call import Call
from inhouse.server.sse import DONE
from inhouse.server.streaming import stream_events


class _Renderer:
    def opening(self, index: int) -> dict[str, Any] | None:
        return {"index": index, "role": "assistant"}

    def choice(self, index: int, delta: Delta) -> dict[str, Any]:
        return {"index": index, "text": delta.text, "finish_reason": delta.finish_reason}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        out: dict[str, Any] = {"choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out


class _NoOpening(_Renderer):
    def opening(self, index: int) -> dict[str, Any] | None:
        return None


class _Sink:
    """A call sink that remembers what it saw (and what the stream had sent by then), and may refuse to keep it."""

    def __init__(self, keeps: bool = True) -> None:
        self.keeps = keeps
        self.seen: list[AuditRecord] = []

    async def __call__(self, record: AuditRecord) -> bool:
        self.seen.append(record)
        return self.keeps


class _Fed:
    """A Generation and the collector the test feeds it through; remembers aborts."""

    def __init__(self, request_id: str = "g", prompt_tokens: int = 5) -> None:
        self.collector: OutputCollector[Delta] = OutputCollector(asyncio.get_running_loop())
        self.aborted: list[str] = []
        self.generation = Generation(request_id, prompt_tokens, self.collector, self.aborted.append, max_tokens=16)

    def put(self, text: str, tokens: int = 1, finish: str | None = None, usage: Usage | None = None) -> None:
        self.collector.put(Delta(text=text, token_count=tokens, finish_reason=finish, usage=usage))


def shared_prompt(usages: Sequence[Usage]) -> Sequence[Usage]:
    """Chat: every choice answers the same prompt, counted once."""
    return usages[:1]


def new_call(*sinks: _Sink, keep_text: bool = False) -> Call:
    return Call(AuditRecord(at=0.0, request_id="r", method="POST", path="/v1/chat/completions"), sinks,
                keep_text=keep_text)


def parse(frames: list[bytes]) -> list[Any]:
    """Each frame as its JSON payload, and ``[DONE]`` as the string."""
    out: list[Any] = []
    for frame in frames:
        assert frame.startswith(b"data: ") and frame.endswith(b"\n\n"), frame
        out.append("[DONE]" if frame == DONE else orjson.loads(frame[len(b"data: "):-2]))
    return out


async def drain(stream: AsyncIterator[bytes]) -> list[Any]:
    return parse([frame async for frame in stream])


def errors_in(events: list[Any]) -> list[dict[str, Any]]:
    return [e for e in events if isinstance(e, dict) and "error" in e]


async def test_role_then_deltas_then_finish_with_usage_then_done() -> None:
    fed = _Fed(prompt_tokens=5)
    events = stream_events([fed.generation], shared_prompt, False, _Renderer())
    first = parse([await anext(events)])
    assert first == [{"choices": [{"index": 0, "role": "assistant"}]}]  # before anything was generated
    fed.put("Hel")
    fed.put("lo", tokens=2)
    fed.put("!", finish="stop")
    rest = await drain(events)
    assert "".join(c["choices"][0]["text"] for c in rest[:-1]) == "Hello!"
    finish = rest[-2]
    assert finish["choices"][0]["finish_reason"] == "stop"
    # no usage from the engine on its last delta: the prompt it admitted and the tokens counted on the way
    assert finish["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert all("usage" not in c and c["choices"][0]["finish_reason"] is None for c in rest[:-2])
    assert rest[-1] == "[DONE]"


async def test_each_delta_read_is_its_own_chunk() -> None:
    fed = _Fed()
    events = stream_events([fed.generation], shared_prompt, False, _Renderer())
    await anext(events)  # the opening chunk
    chunks = []
    for word in ("a", "b", "c"):
        fed.put(word)
        chunks.append(parse([await anext(events)])[0])
    assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", "c"]
    fed.put("", finish="length")
    rest = await drain(events)
    assert rest[0]["choices"][0]["finish_reason"] == "length" and rest[0]["usage"]["completion_tokens"] == 4
    assert rest[1:] == ["[DONE]"]


async def test_the_engines_own_usage_wins() -> None:
    fed = _Fed(prompt_tokens=5)  # an upstream's estimate at admission
    events = stream_events([fed.generation], shared_prompt, False, _Renderer())
    fed.put("a")
    fed.put("b", finish="stop", usage=Usage(prompt_tokens=11, completion_tokens=7))  # what it reported at the end
    out = await drain(events)
    assert out[-2]["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


async def test_include_usage_moves_usage_to_its_own_chunk() -> None:
    fed = _Fed(prompt_tokens=3)
    fed.put("hi", tokens=2, finish="stop", usage=Usage(3, 2))
    events = await drain(stream_events([fed.generation], shared_prompt, True, _Renderer()))
    assert events[0]["choices"][0]["role"] == "assistant"
    assert events[1] == {"choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}  # no usage here
    assert events[2] == {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    assert events[3:] == ["[DONE]"]


async def test_empty_deltas_send_nothing() -> None:
    fed = _Fed()
    events = stream_events([fed.generation], shared_prompt, False, _NoOpening())
    fed.put("", tokens=1)  # e.g. a token held back by a stop-string matcher
    fed.put("", tokens=1)
    await asyncio.sleep(0)
    fed.put("x", finish="stop")
    out = await drain(events)
    assert out[0]["choices"][0]["text"] == "x" and out[0]["usage"]["completion_tokens"] == 3
    assert out[1:] == ["[DONE]"]


async def test_an_error_mid_stream_is_one_error_event_then_done() -> None:
    fed = _Fed()
    events = stream_events([fed.generation], shared_prompt, False, _Renderer())
    fed.put("partial ")
    failure = InhouseError(ErrorCode.ENGINE_ERROR, "the engine failed; the answer is incomplete")
    fed.collector.fail(failure)
    out = await drain(events)
    assert out[0]["choices"][0]["role"] == "assistant"
    assert errors_in(out) == [failure.to_dict()]
    assert out[-2] == failure.to_dict() and out[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in out[1:-2]) == "partial "


async def test_an_unexpected_exception_is_an_internal_error_that_says_nothing_of_it() -> None:
    fed = _Fed()
    events = stream_events([fed.generation], shared_prompt, False, _Renderer())
    fed.collector.fail(RuntimeError("secret internal detail"))
    out = await drain(events)
    assert [e["error"]["code"] for e in errors_in(out)] == ["internal_error"]
    assert "secret" not in orjson.dumps(out).decode()
    assert out[-1] == "[DONE]"


async def test_several_choices_open_first_then_interleave_and_share_one_usage() -> None:
    feds = [_Fed("g0", prompt_tokens=4), _Fed("g1", prompt_tokens=4)]
    events = stream_events([f.generation for f in feds], shared_prompt, False, _Renderer())
    openings = parse([await anext(events), await anext(events)])
    assert [o["choices"][0] for o in openings] == [{"index": 0, "role": "assistant"},
                                                   {"index": 1, "role": "assistant"}]
    feds[1].put("b1 ")
    feds[0].put("a1 ")
    feds[0].put("a2", finish="stop")
    feds[1].put("b2", tokens=2, finish="length")
    out = await drain(events)
    text: dict[int, str] = {0: "", 1: ""}
    for chunk in out[:-1]:
        for choice in chunk["choices"]:
            text[choice["index"]] += choice["text"]
    assert text == {0: "a1 a2", 1: "b1 b2"}
    finishes = [c for c in out[:-1] if c["choices"][0]["finish_reason"] is not None]
    assert sorted(c["choices"][0]["finish_reason"] for c in finishes) == ["length", "stop"]
    assert "usage" not in finishes[0]  # only the last finish carries the call's usage
    assert finishes[1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert finishes[1] == out[-2] and out[-1] == "[DONE]"


async def test_prompts_of_decides_how_choices_prompts_add_up() -> None:
    feds = [_Fed("p0", prompt_tokens=3), _Fed("p1", prompt_tokens=8)]  # completions: two prompts, n=1
    for fed in feds:
        fed.put("x", finish="stop")
    out = await drain(stream_events([f.generation for f in feds], lambda us: us, True, _Renderer()))
    assert out[-2]["usage"] == {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}


async def test_cached_tokens_reach_the_usage_chunk_once_per_prompt() -> None:
    feds = [_Fed("g0", prompt_tokens=130), _Fed("g1", prompt_tokens=130)]  # chat, n=2: one prompt
    feds[0].put("a", finish="stop", usage=Usage(130, 1, 128))
    feds[1].put("b", finish="stop", usage=Usage(130, 1, 128))
    out = await drain(stream_events([f.generation for f in feds], shared_prompt, True, _Renderer()))
    assert out[-2] == {"choices": [], "usage": {"prompt_tokens": 130, "completion_tokens": 2, "total_tokens": 132,
                                                "prompt_tokens_details": {"cached_tokens": 128}}}
    two = [_Fed("p0", prompt_tokens=70), _Fed("p1", prompt_tokens=5)]  # completions: two prompts
    two[0].put("a", finish="stop", usage=Usage(70, 1, 64))
    two[1].put("b", finish="stop", usage=Usage(5, 1, 0))
    out = await drain(stream_events([f.generation for f in two], lambda us: us, False, _Renderer()))
    assert out[-2]["usage"]["prompt_tokens_details"] == {"cached_tokens": 64}


async def test_cached_tokens_are_left_out_when_an_engine_did_not_count_them() -> None:
    feds = [_Fed("p0", prompt_tokens=70), _Fed("p1", prompt_tokens=5)]
    feds[0].put("a", finish="stop", usage=Usage(70, 1, 64))
    feds[1].put("b", finish="stop", usage=Usage(5, 1))  # e.g. an upstream that did not say
    out = await drain(stream_events([f.generation for f in feds], lambda us: us, True, _Renderer()))
    assert out[-2]["usage"] == {"prompt_tokens": 75, "completion_tokens": 2, "total_tokens": 77}


async def test_one_choice_failing_ends_the_whole_stream_and_aborts_the_other() -> None:
    feds = [_Fed("g0"), _Fed("g1")]
    events = stream_events([f.generation for f in feds], shared_prompt, False, _Renderer())
    feds[0].collector.fail(InhouseError(ErrorCode.ENGINE_ERROR, "choice 0 failed"))
    out = await drain(events)
    assert [e["error"]["message"] for e in errors_in(out)] == ["choice 0 failed"]
    assert out[-1] == "[DONE]"
    assert feds[1].aborted == ["g1"]


async def test_the_call_ends_once_before_done_with_what_the_stream_sent() -> None:
    fed = _Fed(prompt_tokens=7)
    sink = _Sink()
    call = new_call(sink, keep_text=True)
    events = stream_events([fed.generation], shared_prompt, False, _Renderer(), call)
    assert call.streaming  # the middleware leaves ending it to the stream
    fed.put("one ")
    fed.put("two", finish="stop", usage=Usage(7, 2))
    seen_at_done = -1
    async for frame in events:
        if frame == DONE:
            seen_at_done = len(sink.seen)
    assert seen_at_done == 1  # the call had ended, and its sink seen it, when [DONE] was produced
    assert call.ended and len(sink.seen) == 1
    record = sink.seen[0]
    assert record.status == 200 and record.error_code is None and record.finish_reason == "stop"
    assert (record.prompt_tokens, record.completion_tokens) == (7, 2)
    assert record.response_text == "one two" and record.ttft_ms is not None


async def test_an_error_mid_stream_is_on_the_calls_record() -> None:
    fed = _Fed()
    sink = _Sink()
    events = stream_events([fed.generation], shared_prompt, False, _Renderer(), new_call(sink))
    fed.put("a")
    fed.collector.fail(InhouseError(ErrorCode.ENGINE_ERROR, "broke"))
    await drain(events)
    assert [r.error_code for r in sink.seen] == ["engine_error"]
    assert sink.seen[0].completion_tokens == 1  # what was sent before the failure


async def test_a_call_the_audit_log_cannot_keep_ends_with_an_error_not_a_clean_end() -> None:
    fed = _Fed()
    events = stream_events([fed.generation], shared_prompt, False, _Renderer(), new_call(_Sink(keeps=False)))
    fed.put("all of it", finish="stop")
    out = await drain(events)
    assert [e["error"]["code"] for e in errors_in(out)] == ["audit_unavailable"]
    assert out[-2] == errors_in(out)[0] and out[-1] == "[DONE]"


async def test_closing_the_stream_early_aborts_the_generation() -> None:
    fed = _Fed("only")
    events = stream_events([fed.generation], shared_prompt, False, _Renderer())
    fed.put("a")
    await anext(events)
    await anext(events)
    await events.aclose()  # type: ignore[attr-defined]
    assert fed.aborted == ["only"]
