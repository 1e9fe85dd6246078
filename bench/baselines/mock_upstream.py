"""A fast OpenAI-compatible mock (aiohttp, no model) for bench/gateway.py: fixed answers, 20-chunk streams."""

from __future__ import annotations

import argparse
import json

from aiohttp import web

WORDS = [f"w{i} " for i in range(20)]
USAGE = {"prompt_tokens": 8, "completion_tokens": 20, "total_tokens": 28}


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    head = {"id": "mock-1", "created": 0, "model": body.get("model")}
    if not body.get("stream"):
        return web.json_response({**head, "object": "chat.completion", "usage": USAGE, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "".join(WORDS)}, "finish_reason": "stop"}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for word in WORDS:
        chunk = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    last = {**head, "object": "chat.completion.chunk", "usage": USAGE,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    await response.write(b"data: " + json.dumps(last).encode() + b"\n\ndata: [DONE]\n\n")
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "mock", "object": "model"}]})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", chat), web.get("/v1/models", models)])
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)
