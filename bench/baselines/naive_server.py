"""The naive baseline many guides publish: FastAPI + one ``pipeline("text-generation")`` call per request.

Owns only that recipe, on purpose: one global pipeline, a lock so requests are served one at a time, and a
"stream" made by generating the whole reply first, then splitting it on spaces into SSE chunks.  It must not
grow batching, a KV cache across requests or real token streaming: it is the floor the engine is measured
against.  Extras the bench needs (so token counts match the other contenders): ``ignore_eos`` becomes
``min_new_tokens = max_tokens``, and the final chunk carries ``usage``.

    python bench/baselines/naive_server.py --model DIR --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from transformers import pipeline

__all__ = ["build_app"]


def _generate(pipe: Any, body: dict[str, Any]) -> tuple[str, int, int]:
    """One blocking pipeline call: the reply text, prompt tokens and completion tokens."""
    max_tokens = int(body.get("max_tokens") or 128)
    kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "return_full_text": False}
    temperature = float(body.get("temperature", 1.0))
    kwargs.update({"do_sample": False} if temperature == 0.0 else {"do_sample": True, "temperature": temperature})
    if body.get("ignore_eos"):
        kwargs["min_new_tokens"] = max_tokens
    out = pipe(body["messages"], **kwargs)
    text = out[0]["generated_text"]
    tokenizer = pipe.tokenizer
    prompt_ids = tokenizer.apply_chat_template(
        body["messages"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    completion = max_tokens if body.get("ignore_eos") else len(tokenizer(text, add_special_tokens=False).input_ids)
    return text, len(prompt_ids), completion


def _chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None = None,
           usage: dict[str, int] | None = None) -> str:
    payload: dict[str, Any] = {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        payload["usage"] = usage
    return f"data: {json.dumps(payload)}\n\n"


async def _fake_stream(rid: str, model: str, text: str, usage: dict[str, int]) -> AsyncIterator[str]:
    yield _chunk(rid, model, {"role": "assistant", "content": ""})
    words = text.split(" ")
    for i, word in enumerate(words):
        yield _chunk(rid, model, {"content": word if i == 0 else " " + word})
    yield _chunk(rid, model, {}, finish="length", usage=usage)
    yield "data: [DONE]\n\n"


def build_app(pipe: Any, model_name: str) -> FastAPI:
    app = FastAPI()
    lock = asyncio.Lock()

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        async with lock:  # one request at a time: the pipeline is neither batched nor thread-safe
            text, prompt_tokens, completion_tokens = await run_in_threadpool(_generate, pipe, body)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            return StreamingResponse(_fake_stream(rid, model_name, text, usage), media_type="text/event-stream")
        message = {"role": "assistant", "content": text}
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": "length"}], "usage": usage,
        })

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local HF checkpoint directory")
    parser.add_argument("--name", default="smollm2-135m-instruct", help="model name echoed in responses")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    pipe = pipeline("text-generation", model=args.model, dtype=torch.bfloat16, device="cpu")
    uvicorn.run(build_app(pipe, args.name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
