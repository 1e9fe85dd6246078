"""``inhouse bench``: a small engine benchmark of any model — a running server's over HTTP, or a local checkpoint
loaded in this process — at one or more concurrencies; a table, or JSON with ``--json``.

    inhouse bench --url http://127.0.0.1:8000 --model smollm2-135m-instruct --key sk-...
    inhouse bench --path ./my-model --engine transformers --concurrency 1,4,8 --requests 16

Owns the flags, the target's lifecycle (an HTTP client, or an engine built, started and closed here) and the
report; ``inhouse.cli.bench_load`` measures.  Exit 1 when any request failed, 2 when the target cannot be used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from inhouse.cli.bench_load import Level, Send, closed_loop, engine_sender, http_sender, summarize
from inhouse.cli.table import render_table

__all__ = ["add_parser", "run"]


def _levels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give concurrencies as 1,4,8") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each concurrency is 1 or more")
    return levels


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("bench", help="measure tokens/s and time to first token of a model, on a running "
                            "server (--url) or loaded here (--path)")
    p.add_argument("--url", default=os.environ.get("INHOUSE_URL", "http://127.0.0.1:8000"),
                   help="a running OpenAI-compatible server (default $INHOUSE_URL or http://127.0.0.1:8000)")
    p.add_argument("--key", default=os.environ.get("INHOUSE_API_KEY"), help="its API key (default $INHOUSE_API_KEY)")
    p.add_argument("--model", help="the model to measure (default: the server's first chat model; with --path, "
                   "the name to give it)")
    p.add_argument("--path", help="measure this checkpoint (HF directory, .gguf file or builtin:NAME) loaded in this "
                   "process instead of a server")
    p.add_argument("--engine", choices=["auto", "transformers", "vllm"], default="auto", help="with --path")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="with --path")
    p.add_argument("--device", default="auto", help="with --path: cpu, cuda, cuda:1 ...")
    p.add_argument("--cache-dir", type=Path, help="with --path: where a .gguf file's conversion is cached")
    p.add_argument("--concurrency", type=_levels, default=[1, 4], metavar="N[,N...]",
                   help="requests in flight at once, one level each (default 1,4)")
    p.add_argument("--requests", type=int, default=8, help="requests per level (default 8)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens each request generates (default 32)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let a request end at the model's end-of-sequence (default: always --max-tokens tokens; "
                   "some servers refuse ignore_eos)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    p.add_argument("--json", action="store_true", help="print JSON: {target, levels: [...]}")
    p.set_defaults(run=run)


class TargetError(Exception):
    """The target cannot be measured (no server there, no such model, the checkpoint does not load)."""


async def _measure(send: Send, args: argparse.Namespace) -> list[Level]:
    levels = []
    for concurrency in args.concurrency:
        samples, wall = await closed_loop(send, max(args.requests, concurrency), concurrency)
        levels.append(summarize(concurrency, samples, wall))
    return levels


async def _over_http(args: argparse.Namespace) -> tuple[dict[str, Any], list[Level]]:
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    most = max(args.concurrency)
    limits = httpx.Limits(max_connections=most + 2, max_keepalive_connections=most + 2)
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout, connect=10.0)) as client:
        model = args.model or await _first_chat_model(client)
        target = {"kind": "server", "url": args.url, "model": model}
        return target, await _measure(http_sender(client, model, args.max_tokens, args.ignore_eos), args)


async def _first_chat_model(client: httpx.AsyncClient) -> str:
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise TargetError(f"cannot reach {client.base_url}: {exc}") from None
    if response.status_code != 200:
        raise TargetError(f"GET {client.base_url}/v1/models answered {response.status_code}: {response.text[:300]} "
                          "(a key? --key or $INHOUSE_API_KEY)")
    cards = response.json().get("data") or []
    chat = [c["id"] for c in cards if "chat" in (c.get("capabilities") or ["chat"])]
    if not chat:
        raise TargetError(f"{client.base_url} serves no chat model; name one with --model")
    return str(chat[0])


async def _in_process(args: argparse.Namespace) -> tuple[dict[str, Any], list[Level]]:
    from inhouse.config import ConfigError, default_cache_dir, model_spec
    from inhouse.engine.base import Generator, ModelLoadError
    from inhouse.engine.factory import build_engine

    path = args.path if args.path.startswith("builtin:") else str(Path(args.path).expanduser().resolve())
    name = args.model or Path(args.path.removeprefix("builtin:")).stem
    try:
        spec = model_spec(name=name, path=path, engine=args.engine, dtype=args.dtype, device=args.device,
                          max_num_seqs=max(args.concurrency), max_waiting=max(args.requests, 16))
    except ValueError as exc:
        raise TargetError(f"--path {args.path}: {exc}") from None
    engine = build_engine(spec, args.cache_dir or default_cache_dir())
    try:
        try:
            await engine.start()
        except (ModelLoadError, ConfigError, OSError, ValueError, ImportError, RuntimeError) as exc:
            raise TargetError(f"--path {args.path}: {exc}") from None
        if not isinstance(engine, Generator):
            raise TargetError(f"--path {args.path}: not a text generator")
        target = {"kind": "in-process", "path": path, "model": name, "engine": engine.info.kind,
                  "device": engine.info.device, "dtype": engine.info.dtype}
        return target, await _measure(engine_sender(engine, args.max_tokens, args.ignore_eos), args)
    finally:
        await engine.close()


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.max_tokens < 1:
        print("inhouse: --requests and --max-tokens are 1 or more", file=sys.stderr)
        return 2
    if args.path:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from inhouse.cli.logs import setup_logging
        from inhouse.engine.progress import quiet_library_bars

        setup_logging("warning" if args.json else "info", "text")
        quiet_library_bars()
    try:
        target, levels = asyncio.run(_in_process(args) if args.path else _over_http(args))
    except TargetError as exc:
        print(f"inhouse: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"target": target, "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
                          "levels": [asdict(level) for level in levels]}, ensure_ascii=False))
    else:
        _print(target, levels, args.max_tokens)
    failed = [level for level in levels if level.errors]
    for level in failed:
        print(f"inhouse: {level.errors} of {level.requests} requests failed at concurrency {level.concurrency}; "
              f"first: {level.first_error}", file=sys.stderr)
    return 1 if failed else 0


def _print(target: dict[str, Any], levels: list[Level], max_tokens: int) -> None:
    where = target.get("url") or f"{target['path']} ({target['engine']}, {target['device']}, {target['dtype']})"
    print(f"model {target['model']} at {where}, {max_tokens} tokens per request")
    rows = [[lv.concurrency, lv.requests, lv.errors, lv.tokens_per_s, lv.ttft_p50_ms, lv.ttft_p99_ms, lv.itl_p50_ms,
             lv.latency_p50_s, lv.wall_s] for lv in levels]
    print(render_table(["CONCURRENCY", "REQUESTS", "ERRORS", "TOK/S", "TTFT P50 MS", "TTFT P99 MS", "ITL P50 MS",
                        "LATENCY P50 S", "WALL S"], rows))
