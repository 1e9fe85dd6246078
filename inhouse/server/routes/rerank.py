"""``POST /v1/rerank`` (and ``/v2/rerank`` for Cohere v2 clients): documents by relevance to a query."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from inhouse.engine.base import Capability
from inhouse.engine.base import RerankRequest as RerankWork
from inhouse.protocol.embeddings import RerankRequest, rerank_result
from inhouse.server.body import read_model
from inhouse.server.context import context_of
from inhouse.server.oneshot import account, run_once
from inhouse.server.operations import reranker
from inhouse.server.render import json_response

__all__ = ["rerank"]


async def rerank(request: Request) -> Response:
    ctx = context_of(request)
    body = await read_model(request, RerankRequest, ctx.settings.max_body_bytes)
    request_id = ctx.new_id("rerank")
    work = RerankWork(request_id, body.query, body.texts())
    routed = await run_once(request, body.model, request_id, Capability.RERANK,
                            lambda d: reranker(d.engine, d.name).rerank(work))
    result = routed.result
    await account(request, lambda: orjson.dumps({"query": work.query, "documents": work.documents}).decode(),
                  result.prompt_tokens)
    headers = {"x-request-id": request_id, "x-inhouse-deployment": routed.deployment.label}
    return json_response(rerank_result(request_id, routed.model, work.documents, result.scores, body.top_n,
                                       body.return_documents, result.prompt_tokens), headers=headers)
