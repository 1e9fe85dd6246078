"""The floor for bench/gateway.py: a minimal aiohttp passthrough proxy (no auth, no parsing, no audit)."""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web


def build(upstream: str) -> web.Application:
    session: dict[str, aiohttp.ClientSession] = {}

    async def start(app: web.Application) -> None:
        session["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))

    async def stop(app: web.Application) -> None:
        await session["s"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with session["s"].post(upstream + request.path, data=body,
                                     headers={"Content-Type": "application/json"}) as up:
            response = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers["Content-Type"]})
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.add_routes([web.post("/v1/chat/completions", proxy)])
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    web.run_app(build(args.upstream), host="127.0.0.1", port=args.port, print=None, access_log=None)
