"""``POST /v1/embeddings``."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from inhouse.engine.base import Capability, EmbedRequest
from inhouse.protocol.embeddings import EmbeddingRequest, embedding_list
from inhouse.server.body import read_model
from inhouse.server.context import context_of
from inhouse.server.oneshot import account, run_once
from inhouse.server.operations import embedder
from inhouse.server.render import json_response

__all__ = ["embeddings"]


async def embeddings(request: Request) -> Response:
    ctx = context_of(request)
    body = await read_model(request, EmbeddingRequest, ctx.settings.max_body_bytes)
    request_id = ctx.new_id("embd")
    work = EmbedRequest(request_id, body.inputs(), body.dimensions)
    routed = await run_once(request, body.model, request_id, Capability.EMBEDDINGS,
                            lambda d: embedder(d.engine, d.name).embed(work))
    result = routed.result
    await account(request, lambda: _texts(work), result.prompt_tokens)
    headers = {"x-request-id": request_id, "x-inhouse-deployment": routed.deployment.label}
    return json_response(embedding_list(result.vectors, routed.model, result.prompt_tokens, body.encoding_format),
                         headers=headers)


def _texts(work: EmbedRequest) -> str:
    return orjson.dumps([x if isinstance(x, str) else list(x) for x in work.inputs]).decode()
