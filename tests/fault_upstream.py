"""A fault-injecting OpenAI-compatible upstream, run as its own process: ``python -m tests.fault_upstream --port P``.

It answers ``/v1/chat/completions``, ``/v1/completions`` (blocking and SSE) and ``/v1/models`` with a
fixed reply, one word per chunk.  Tests script its next answers through ``POST /_script`` with a list
of steps, each used by one request then dropped (an empty list: behave normally):

    {"status": 500}            answer with that HTTP status and an OpenAI error body
    {"delay": 2.0}             wait before the response headers (a stall before the first byte)
    {"chunk_delay": 0.5}       wait between chunks
    {"drop_after": 2}          send that many chunks, then cut the connection
    {"usage": false}           leave ``usage`` out (the gateway must count)

``GET /_log`` returns what it saw: one entry per request (model, stream, and whether the client
disconnected before the end), so tests can prove that a client's disconnect reached the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

REPLY = "Hello from the upstream server"


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
        chat = request.url.path.endswith("chat/completions")
        words = [w + " " for w in REPLY.split(" ")]
        words[-1] = words[-1].strip()
        usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)}
        with_usage = step.get("usage", True)
        header = {"id": f"up-{len(self.log)}", "created": int(time.time()), "model": body.get("model"),
                  "system_fingerprint": self.name}
        if not body.get("stream"):
            entry["finished"] = True
            choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                                       "finish_reason": "stop"} if chat else
                                      {"index": 0, "text": "".join(words), "finish_reason": "stop"})
            out = {**header, "object": "chat.completion" if chat else "text_completion", "choices": [choice]}
            if with_usage:
                out["usage"] = usage
            return JSONResponse(out)

        async def events() -> Any:
            try:
                for i, word in enumerate(words):
                    if step.get("drop_after") is not None and i >= step["drop_after"]:
                        raise ConnectionResetError("scripted drop")
                    delta = {"content": word} if chat else None
                    choice = ({"index": 0, "delta": delta, "finish_reason": None} if chat else
                              {"index": 0, "text": word, "finish_reason": None})
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield f"data: {json.dumps({**header, 'object': obj, 'choices': [choice]})}\n\n"
                    if step.get("chunk_delay"):
                        await asyncio.sleep(step["chunk_delay"])
                final = ({"index": 0, "delta": {}, "finish_reason": "stop"} if chat else
                         {"index": 0, "text": "", "finish_reason": "stop"})
                last: dict[str, Any] = {**header, "object": "chat.completion.chunk" if chat else "text_completion",
                                        "choices": [final]}
                if with_usage and (body.get("stream_options") or {}).get("include_usage"):
                    last["usage"] = usage
                yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
                entry["finished"] = True
            except asyncio.CancelledError:
                entry["disconnected"] = True
                raise

        return StreamingResponse(events(), media_type="text/event-stream")


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
