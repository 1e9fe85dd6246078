"""The upstream health probe's verdicts and reasons, against an in-process aiohttp server.

``GET /models`` must answer 200 with a model list holding the id the engine asks for (``upstream_model``, else
the public name); anything else is a failure whose reason the operator reads in ``/health``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from inhouse.config import UpstreamSpec
from inhouse.engine.upstream import UpstreamEngine

LISTED = {"object": "list", "data": [{"id": "qwen/Qwen2.5-7B", "object": "model"}, {"id": "llama3:latest"}]}


class _Models:
    """Answers ``GET /v1/models`` with ``status`` and ``body`` (JSON, or text as is), and chat with ``chat``."""

    def __init__(self) -> None:
        self.status, self.body, self.chat = 200, LISTED, 200
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> _Models:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.complete)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"
        return self

    async def models(self, request: web.Request) -> web.Response:
        if isinstance(self.body, str):
            return web.Response(status=self.status, text=self.body, content_type="text/html")
        return web.json_response(self.body, status=self.status)

    async def complete(self, request: web.Request) -> web.Response:
        return web.json_response({"choices": []}, status=self.chat)


@pytest.fixture
async def server() -> AsyncIterator[_Models]:
    models = await _Models().start()
    yield models
    assert models.runner is not None
    await models.runner.cleanup()


async def probe(url: str, name: str, upstream_model: str | None = None, kind: str = "models") -> str | None:
    engine = UpstreamEngine(UpstreamSpec(name=name, base_url=url, upstream_model=upstream_model))
    await engine.start()
    try:
        return await engine.probe(2.0, kind)
    finally:
        await engine.close()


async def test_a_listed_model_id_is_healthy(server: _Models) -> None:
    assert await probe(server.url, "qwen", "qwen/Qwen2.5-7B") is None
    assert await probe(server.url, "qwen/Qwen2.5-7B") is None  # no upstream_model: the public name is asked for
    assert await probe(server.url, "llama3") is None  # Ollama's implicit :latest


async def test_a_model_id_the_upstream_does_not_list_is_down_with_what_it_lists(server: _Models) -> None:
    assert await probe(server.url, "smol") == (
        "the upstream does not serve model 'smol'; it lists: qwen/Qwen2.5-7B, llama3:latest")
    assert await probe(server.url, "smol", "qwen/Qwen2.5-72B") == (
        "the upstream does not serve model 'qwen/Qwen2.5-72B'; it lists: qwen/Qwen2.5-7B, llama3:latest")


@pytest.mark.parametrize("body", [{"ok": True}, {"data": "nope"}, {"data": [{"name": "x"}]}, [1, 2],
                                  "<html>502 Bad Gateway</html>"], ids=["no-data", "data-a-string",
                                                                        "entries-without-id", "a-list", "html"])
async def test_a_200_that_is_not_a_model_list_is_down(server: _Models, body: Any) -> None:
    server.body = body
    assert await probe(server.url, "qwen/Qwen2.5-7B") == "GET /models answered 200 without a model list"


async def test_an_error_status_and_an_unreachable_upstream_are_down(server: _Models) -> None:
    server.status = 503
    assert await probe(server.url, "qwen/Qwen2.5-7B") == "GET /models answered 503"
    reason = await probe("http://127.0.0.1:9/v1", "qwen/Qwen2.5-7B")
    assert reason is not None and reason.startswith("the upstream is unreachable (")


async def test_the_completion_check_names_the_status(server: _Models) -> None:
    assert await probe(server.url, "anything", kind="completion") is None
    server.chat = 500
    reason = await probe(server.url, "m", "up-model", kind="completion")
    assert reason == "a 1-token completion of 'up-model' answered 500"


async def test_an_engine_not_started_is_down() -> None:
    engine = UpstreamEngine(UpstreamSpec(name="m", base_url="http://127.0.0.1:9/v1"))
    assert await engine.probe(1.0, "models") == "the upstream client is not started"
