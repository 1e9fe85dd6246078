"""A fault-injecting OpenAI-compatible upstream, run as its own process: ``python -m tests.fault_upstream --port P``.

It answers ``/v1/chat/completions``, ``/v1/completions`` (blocking and SSE) and ``/v1/models`` with a
fixed reply, one word per chunk.  Tests script its next answers through ``POST /_script`` with a list
of steps, each used by one request then dropped (an empty list: behave normally):

    {"status": 500}            answer with that HTTP status and an OpenAI error body
    {"delay": 2.0}             wait before the response headers (a stall before the first byte)
    {"chunk_delay": 0.5}       wait between chunks
    {"drop_after": 2}          send that many chunks, then cut the connection
    {"stall_after": 2, "stall": 5.0}
                               send that many chunks (0: none), then go silent that long mid-stream
    {"words": 40}              reply with that many words (a long answer), not the fixed reply
    {"usage": false}           leave ``usage`` out (the gateway must count)
    {"cached_tokens": 3}       add ``usage.prompt_tokens_details.cached_tokens`` with that value (any JSON value;
                               the prompt is always 5 tokens)
    {"raw_chunks": ["{\"choices\":[\"oops\"]}", "[1]"]}
                               send each string verbatim as one ``data:`` event, then ``data: [DONE]``
                               (malformed or wrong-shaped chunks; ``chunk_delay`` applies)
    {"html": true}             answer 200 ``text/html`` (a proxy's error page) instead of SSE
    {"plain_json": true}       answer 200 ``application/json`` (a blocking completion), even when asked to stream
    {"empty_stream": true}     answer 200 ``text/event-stream`` with only a comment: no ``data:`` line at all

Chat answers can also be tool calls and reasoning (streamed, or whole in a blocking answer):

    {"tool_calls": "pieces"}   one call (get_weather, id call_1): id and name first, then argument fragments;
                               ``finish_reason: tool_calls`` and no content
    {"tool_calls": "parallel"} two calls (get_weather then get_time, indexes 0 and 1), each in pieces
    {"tool_calls": "whole"}    the one call whole in a single chunk
    {"tool_calls": "no_index"} the one call in pieces without ``index``, its id repeated on every piece
    {"reasoning": "reasoning_content"} (or "reasoning")
                               three words of thinking in that delta field before the answer

``GET /_log`` returns what it saw: one entry per request (model, stream, the request ``body``, and whether
the client disconnected before the end), so tests can prove that a client's disconnect reached the upstream
and that what the client sent (tools, images, ...) was forwarded.

It also answers ``/v1/embeddings`` and ``/v1/rerank`` (and ``/embeddings``, ``/rerank`` at the root, where TEI
serves rerank).  Embeddings are 8 numbers (or ``dimensions`` of them) derived from a hash of each input;
a rerank score is the share of the query's words found in the document.  The rerank answer has the shape
the request asked in: ``documents`` → Jina's ``{"results": [{index, relevance_score}], "usage"}``, ``texts``
→ TEI's ``[{index, score}]``, best first.  Their log entries also hold ``path`` and the request ``body``.
The same script steps apply (``status``, ``html``, ``usage: false``; ``delay`` notes a client that leaves
while it waits), and these:

    {"stall": 5.0}             send the headers, then nothing for that long, then the body
    {"usage": "total"}         report only ``usage.total_tokens``
    {"usage": "billed_units"}  no usage, only Cohere's ``meta.billed_units.search_units``
    {"base64": true}           embeddings as base64 little-endian float32, whatever ``encoding_format`` said
    {"reverse": true}          the data items (each with its index) in reverse order
    {"no_index": true}         data items without ``index``
    {"ignore_dimensions": true}
                               8-number vectors whatever ``dimensions`` asked
    {"logits": true}           rerank scores as logits (10 * score - 5) instead of probabilities
    {"score_key": "score"}     Jina-shaped results with ``score`` instead of ``relevance_score``
    {"malformed": "..."}       a wrong answer: for embeddings ``count`` (one vector short), ``type`` (a
                               string among the numbers), ``nan`` (a base64 vector with a NaN), ``dims``
                               (the last vector one number short), ``index`` (two items with index 0),
                               ``shape`` (``data`` is an object), ``json`` (not JSON); for rerank
                               ``missing_index`` (the last document unscored), ``index`` (an index out of
                               range), ``duplicate`` (one document scored twice), ``type`` (a score that is
                               a string), ``shape`` (``results`` is an object), ``json``
    {"raw_body": "..."}        send that string verbatim as the 200 ``application/json`` body

``running(name)`` serves it in a thread of this process (for in-process tests) and yields its base URL.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

REPLY = "Hello from the upstream server"
THOUGHT = ["Let ", "me ", "think"]
CALLS = [("call_1", "get_weather", ['{"city": ', '"Paris"}']), ("call_2", "get_time", ['{"zone": ', '"CET"}'])]
HTML = "<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"


class Upstream:
    def __init__(self, name: str, models: tuple[str, ...] = ("up-model",)) -> None:
        self.name = name
        self.models_listed = models
        self.script: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []

    async def set_script(self, request: Request) -> Response:
        self.script = list(await request.json())
        return JSONResponse({"ok": True})

    async def get_log(self, request: Request) -> Response:
        return JSONResponse(self.log)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "created": 0,
                                                         "owned_by": self.name} for model in self.models_listed]})

    async def complete(self, request: Request) -> Response:
        body = await request.json()
        step = self.script.pop(0) if self.script else {}
        entry: dict[str, Any] = {"model": body.get("model"), "stream": bool(body.get("stream")), "at": time.time(),
                                 "disconnected": False, "finished": False, "served_by": self.name,
                                 "path": request.url.path, "body": body}
        self.log.append(entry)
        if step.get("delay"):
            await asyncio.sleep(step["delay"])
        if step.get("status"):
            entry["finished"] = True
            return JSONResponse({"error": {"message": f"scripted {step['status']}", "type": "server_error",
                                           "param": None, "code": None}}, status_code=step["status"])
        if step.get("html"):
            entry["finished"] = True
            return HTMLResponse(HTML)
        answer = _Answer(self, body, step, request.url.path.endswith("chat/completions"))
        if not body.get("stream") or step.get("plain_json"):
            entry["finished"] = True
            return JSONResponse(answer.blocking())
        return StreamingResponse(_watched(answer.events(), entry), media_type="text/event-stream")

    async def embeddings(self, request: Request) -> Response:
        return await self._encode(request, _embeddings)

    async def rerank(self, request: Request) -> Response:
        return await self._encode(request, _rerank)

    async def _encode(self, request: Request, answer: Any) -> Response:
        """One blocking JSON answer (``answer(body, step)``), shaped by the next script step."""
        body = await request.json()
        step = self.script.pop(0) if self.script else {}
        entry: dict[str, Any] = {"model": body.get("model"), "stream": False, "at": time.time(),
                                 "disconnected": False, "finished": False, "served_by": self.name,
                                 "path": request.url.path, "body": body}
        self.log.append(entry)
        if step.get("delay") and await _left_while_waiting(request, step["delay"]):
            entry["disconnected"] = True
            return Response(status_code=499)
        if step.get("status"):
            entry["finished"] = True
            kind = "server_error" if step["status"] >= 500 else "invalid_request_error"
            return JSONResponse({"error": {"message": f"scripted {step['status']}", "type": kind, "param": None,
                                           "code": None}}, status_code=step["status"])
        if step.get("html"):
            entry["finished"] = True
            return HTMLResponse(HTML)
        text = step["raw_body"] if "raw_body" in step else answer(body, step)
        if step.get("stall"):
            return StreamingResponse(_watched(_stalled(text, step["stall"]), entry), media_type="application/json")
        entry["finished"] = True
        return Response(text, media_type="application/json")


def _vector(item: Any, size: int) -> list[float]:
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    return [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(size)]


def _tokens(item: Any) -> int:
    return len(item) if isinstance(item, list) else len(str(item).split()) or 1


def _usage(step: dict[str, Any], tokens: int) -> dict[str, Any]:
    """The usage (or Cohere meta) fields of an answer, as the step wants them."""
    kind = step.get("usage", True)
    if kind == "total":
        return {"usage": {"total_tokens": tokens}}
    if kind == "billed_units":
        return {"meta": {"billed_units": {"search_units": 1}}}
    return {"usage": {"prompt_tokens": tokens, "total_tokens": tokens}} if kind else {}


def _embeddings(body: dict[str, Any], step: dict[str, Any]) -> str:
    inputs = body.get("input")
    inputs = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
    size = 8 if step.get("ignore_dimensions") else body.get("dimensions") or 8
    vectors: list[Any] = [_vector(item, size) for item in inputs]
    if step.get("base64"):
        vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]
    bad = step.get("malformed")
    if bad == "json":
        return "{not json"
    if bad == "type":
        vectors[0][0] = "0.5"
    elif bad == "nan":
        vectors[0] = base64.b64encode(struct.pack("<2f", float("nan"), 1.0)).decode()
    elif bad == "dims":
        vectors[-1] = vectors[-1][:-1]
    items: list[dict[str, Any]] = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    if bad == "count":
        items.pop()
    elif bad == "index":
        items[-1]["index"] = 0
    if step.get("no_index"):
        for item in items:
            del item["index"]
    if step.get("reverse"):
        items.reverse()
    out: dict[str, Any] = {"object": "list", "data": {"0": items} if bad == "shape" else items,
                           "model": body.get("model")}
    return json.dumps(out | _usage(step, sum(_tokens(item) for item in inputs)))


def _rerank(body: dict[str, Any], step: dict[str, Any]) -> str:
    query = str(body.get("query"))
    tei = "texts" in body
    documents = [str(d) for d in body.get("texts" if tei else "documents") or []]
    words = set(query.lower().split()) or {""}
    scores = [len(words & set(d.lower().split())) / len(words) for d in documents]
    if step.get("logits"):
        scores = [10 * s - 5 for s in scores]
    key = "score" if tei else step.get("score_key", "relevance_score")
    results: list[dict[str, Any]] = sorted(({"index": i, key: s} for i, s in enumerate(scores)),
                                           key=lambda r: -r[key])[:body.get("top_n") or len(documents)]
    bad = step.get("malformed")
    if bad == "json":
        return "{not json"
    if bad == "missing_index":
        results = [r for r in results if r["index"] != len(documents) - 1]
    elif bad == "index":
        results[-1]["index"] = len(documents)
    elif bad == "duplicate":
        results[-1]["index"] = results[0]["index"]
    elif bad == "type":
        results[0][key] = "high"
    if tei:
        return json.dumps({"0": results} if bad == "shape" else results)
    tokens = sum(_tokens(query) + _tokens(d) for d in documents)
    out = {"id": "rerank-1", "model": body.get("model"), "results": {"0": results} if bad == "shape" else results}
    return json.dumps(out | _usage(step, tokens))


async def _left_while_waiting(request: Request, seconds: float) -> bool:
    """Waits ``seconds``; True as soon as the client hangs up instead."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            return True
        await asyncio.sleep(0.02)
    return False


async def _stalled(text: str, seconds: float) -> AsyncIterator[str]:
    await asyncio.sleep(seconds)  # the headers are out already
    yield text


class _Answer:
    """The reply to one request, as one blocking body or as SSE events shaped by the script step."""

    def __init__(self, up: Upstream, body: dict[str, Any], step: dict[str, Any], chat: bool) -> None:
        self.step, self.chat = step, chat
        count = step.get("words")
        self.words = [f"w{i} " for i in range(count)] if count else [w + " " for w in REPLY.split(" ")]
        self.words[-1] = self.words[-1].strip()
        self.usage = {"prompt_tokens": 5, "completion_tokens": len(self.words), "total_tokens": 5 + len(self.words)}
        if "cached_tokens" in step:
            self.usage["prompt_tokens_details"] = {"cached_tokens": step["cached_tokens"]}
        self.with_usage = step.get("usage", True)
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.header = {"id": f"up-{len(up.log)}", "created": int(time.time()), "model": body.get("model"),
                       "system_fingerprint": up.name}

    @property
    def calls(self) -> list[tuple[str, str, list[str]]]:
        kind = self.step.get("tool_calls") if self.chat else None
        return [] if not kind else CALLS if kind == "parallel" else CALLS[:1]

    def blocking(self) -> dict[str, Any]:
        text = "".join(self.words)
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                                   "finish_reason": "stop"} if self.chat else
                                  {"index": 0, "text": text, "finish_reason": "stop"})
        if self.calls:
            calls = [{"id": call_id, "type": "function", "function": {"name": name, "arguments": "".join(pieces)}}
                     for call_id, name, pieces in self.calls]
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
            choice["finish_reason"] = "tool_calls"
        if self.chat and self.step.get("reasoning"):
            choice["message"][self.step["reasoning"]] = "".join(THOUGHT)
        out = {**self.header, "object": "chat.completion" if self.chat else "text_completion", "choices": [choice]}
        if self.with_usage:
            out["usage"] = self.usage
        return out

    def deltas(self) -> list[dict[str, Any]]:
        """The chat deltas of the answer, in order: thinking, then tool calls or the words."""
        out: list[dict[str, Any]] = [{self.step["reasoning"]: word} for word in THOUGHT] if self.step.get(
            "reasoning") else []
        kind = self.step.get("tool_calls")
        for index, (call_id, name, pieces) in enumerate(self.calls):
            whole = kind == "whole"
            head = {"index": index, "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": "".join(pieces) if whole else ""}}
            out.append({"content": None, "tool_calls": [head]})
            if whole:
                continue
            out += [{"tool_calls": [{"index": index, "function": {"arguments": piece}}]} for piece in pieces]
        if kind == "no_index":
            for delta in out:
                for call in delta.get("tool_calls", []):
                    del call["index"]
                    call["id"] = CALLS[0][0]
        return out + ([] if self.calls else [{"content": word} for word in self.words])

    def chunk(self, delta: dict[str, Any] | None, finish: str | None = None) -> str:
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": (delta or {}).get("content") or "", "finish_reason": finish}
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out: dict[str, Any] = {**self.header, "object": obj, "choices": [choice]}
        if finish is not None and self.with_usage and self.include_usage:
            out["usage"] = self.usage
        return json.dumps(out)

    async def events(self) -> AsyncIterator[str]:
        step = self.step
        if step.get("empty_stream"):
            yield ": nothing to say\n\n"
            return
        if step.get("raw_chunks") is not None:
            for raw in step["raw_chunks"]:
                yield f"data: {raw}\n\n"
                await self._pace()
            yield "data: [DONE]\n\n"
            return
        for i, delta in enumerate(self.deltas() if self.chat else [{"content": word} for word in self.words]):
            if step.get("stall_after") == i:
                await asyncio.sleep(step.get("stall", 60.0))
            if step.get("drop_after") is not None and i >= step["drop_after"]:
                raise ConnectionResetError("scripted drop")
            yield f"data: {self.chunk(delta)}\n\n"
            await self._pace()
        yield f"data: {self.chunk(None, 'tool_calls' if self.calls else 'stop')}\n\n"
        yield "data: [DONE]\n\n"

    async def _pace(self) -> None:
        if self.step.get("chunk_delay"):
            await asyncio.sleep(self.step["chunk_delay"])


async def _watched(events: AsyncIterator[str], entry: dict[str, Any]) -> AsyncIterator[str]:
    """``events``, noting in the log entry whether they all went out or the client left first."""
    try:
        async for text in events:
            yield text
        entry["finished"] = True
    except asyncio.CancelledError:
        entry["disconnected"] = True
        raise


def build(name: str, models: tuple[str, ...] = ("up-model",)) -> Starlette:
    up = Upstream(name, models)
    return Starlette(routes=[
        Route("/_script", up.set_script, methods=["POST"]),
        Route("/_log", up.get_log, methods=["GET"]),
        Route("/v1/models", up.models, methods=["GET"]),
        Route("/v1/chat/completions", up.complete, methods=["POST"]),
        Route("/v1/completions", up.complete, methods=["POST"]),
        Route("/v1/embeddings", up.embeddings, methods=["POST"]),
        Route("/embeddings", up.embeddings, methods=["POST"]),
        Route("/v1/rerank", up.rerank, methods=["POST"]),
        Route("/rerank", up.rerank, methods=["POST"]),
    ])


@contextlib.contextmanager
def running(name: str = "upstream") -> Iterator[str]:
    """This upstream served on a free loopback port by a thread of this process: yields ``http://127.0.0.1:P``."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build(name), log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fault upstream did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--model", action="append", help="a model id /v1/models lists (repeatable; default up-model)")
    args = parser.parse_args()
    uvicorn.run(build(args.name, tuple(args.model or ["up-model"])), host="127.0.0.1", port=args.port,
                log_level="warning")
