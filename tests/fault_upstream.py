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
    {"raw_chunks": ["{\"choices\":[\"oops\"]}", "[1]"]}
                               send each string verbatim as one ``data:`` event, then ``data: [DONE]``
                               (malformed or wrong-shaped chunks; ``chunk_delay`` applies)
    {"html": true}             answer 200 ``text/html`` (a proxy's error page) instead of SSE
    {"plain_json": true}       answer 200 ``application/json`` (a blocking completion), even when asked to stream
    {"empty_stream": true}     answer 200 ``text/event-stream`` with only a comment: no ``data:`` line at all

``GET /_log`` returns what it saw: one entry per request (model, stream, and whether the client
disconnected before the end), so tests can prove that a client's disconnect reached the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

REPLY = "Hello from the upstream server"
HTML = "<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"


class Upstream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.script: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []

    async def set_script(self, request: Request) -> Response:
        self.script = list(await request.json())
        return JSONResponse({"ok": True})

    async def get_log(self, request: Request) -> Response:
        return JSONResponse(self.log)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "up-model", "object": "model", "created": 0,
                                                         "owned_by": self.name}]})

    async def complete(self, request: Request) -> Response:
        body = await request.json()
        step = self.script.pop(0) if self.script else {}
        entry: dict[str, Any] = {"model": body.get("model"), "stream": bool(body.get("stream")), "at": time.time(),
                                 "disconnected": False, "finished": False, "served_by": self.name}
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


class _Answer:
    """The reply to one request, as one blocking body or as SSE events shaped by the script step."""

    def __init__(self, up: Upstream, body: dict[str, Any], step: dict[str, Any], chat: bool) -> None:
        self.step, self.chat = step, chat
        count = step.get("words")
        self.words = [f"w{i} " for i in range(count)] if count else [w + " " for w in REPLY.split(" ")]
        self.words[-1] = self.words[-1].strip()
        self.usage = {"prompt_tokens": 5, "completion_tokens": len(self.words), "total_tokens": 5 + len(self.words)}
        self.with_usage = step.get("usage", True)
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.header = {"id": f"up-{len(up.log)}", "created": int(time.time()), "model": body.get("model"),
                       "system_fingerprint": up.name}

    def blocking(self) -> dict[str, Any]:
        text = "".join(self.words)
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": text},
                                   "finish_reason": "stop"} if self.chat else
                                  {"index": 0, "text": text, "finish_reason": "stop"})
        out = {**self.header, "object": "chat.completion" if self.chat else "text_completion", "choices": [choice]}
        if self.with_usage:
            out["usage"] = self.usage
        return out

    def chunk(self, word: str | None, finish: str | None = None) -> str:
        if self.chat:
            choice = {"index": 0, "delta": {} if word is None else {"content": word}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": word or "", "finish_reason": finish}
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
        for i, word in enumerate(self.words):
            if step.get("stall_after") == i:
                await asyncio.sleep(step.get("stall", 60.0))
            if step.get("drop_after") is not None and i >= step["drop_after"]:
                raise ConnectionResetError("scripted drop")
            yield f"data: {self.chunk(word)}\n\n"
            await self._pace()
        yield f"data: {self.chunk(None, 'stop')}\n\n"
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


def build(name: str) -> Starlette:
    up = Upstream(name)
    return Starlette(routes=[
        Route("/_script", up.set_script, methods=["POST"]),
        Route("/_log", up.get_log, methods=["GET"]),
        Route("/v1/models", up.models, methods=["GET"]),
        Route("/v1/chat/completions", up.complete, methods=["POST"]),
        Route("/v1/completions", up.complete, methods=["POST"]),
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="upstream")
    args = parser.parse_args()
    uvicorn.run(build(args.name), host="127.0.0.1", port=args.port, log_level="warning")
