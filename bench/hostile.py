"""What a hostile neighbour costs everyone else: small requests beside megabyte prompts, and cheap refusals.

Serves the embedded SmolLM2-135M-Instruct (its real 49k-token tokenizer) and measures, with this checkout
and optionally another revision (``--before REF``, run from a temporary git worktree) on the same machine
in one run:

- ``small alone``: p50/p99 latency of short chat requests (1 new token), two at a time;
- ``small beside 1 MB``: the same while two other clients keep sending 1 MB prompts (each refused with
  400 ``context_length_exceeded``), and how long those refusals take;
- ``queue-full refusal``: the latency of a 429 for a 36k-character prompt while the engine's only slot is
  held (``--max-num-seqs 1 --max-waiting 0``): a refusal should not pay for tokenizing.

Table on stdout, JSON in ``bench/results/hostile.json``.  Servers, load and report come from ``bench/common``.

    python bench/hostile.py                       # this checkout only, about 1 minute
    python bench/hostile.py --before HEAD~1       # and the given revision, side by side
    python bench/hostile.py --smoke               # a few requests per phase: does it answer as expected?
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load, report, servers  # noqa: E402

MODEL = "smollm2-135m-instruct"
BIG = "你好 hello world " * 64_000  # about 1 MB of UTF-8
ENGINE = ["--dtype", "bfloat16", "--engine", "transformers"]
AUTH = ("inhouse runs with --auth none (no keys) and the audit log on (SQLite in a temporary state directory), "
        "as in the runs of bench/README.md")
ROWS = [("small alone p50 / p99 (ms)", "small_alone"), ("small beside 1 MB p50 / p99 (ms)", "small_beside_1mb"),
        ("1 MB refusal p50 / p99 (ms)", "refusal_1mb"), ("queue-full 429 p50 / p99 (ms)", "refusal_queue_full")]


def chat(content: str, max_tokens: int = 1) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}


async def small_requests(client: httpx.AsyncClient, count: int) -> list[float]:
    """Latencies (ms) of ``count`` one-token chats, two at a time."""
    result = await load.closed_loop(
        lambda i: load.request(client, chat(f"Say one word about the number {i}.")), count, 2)
    return result.check("small requests").latencies_ms()


async def neighbours(url: str, count: int) -> dict[str, list[float]]:
    async with load.http_client(url, 4) as client:
        await small_requests(client, 4)  # warm
        alone = await small_requests(client, count)
        refusals: list[load.Sample] = []
        stop = asyncio.Event()

        async def hostile() -> None:
            while not stop.is_set():
                refusals.append(await load.request(client, chat(BIG), expect=400))

        attackers = [asyncio.create_task(hostile()) for _ in range(2)]
        await asyncio.sleep(0.5)
        beside = await small_requests(client, count)
        stop.set()
        await asyncio.gather(*attackers)
    refused = load.Run(refusals, 0.0).check("1 MB prompts").latencies_ms()
    return {"small_alone": alone, "small_beside_1mb": beside, "refusal_1mb": refused}


async def queue_full(url: str, count: int) -> list[float]:
    async with load.http_client(url, 2) as client:
        holder = asyncio.create_task(client.post(load.CHAT, json={
            **chat("Count from one to a thousand.", 400), "ignore_eos": True}))
        await asyncio.sleep(1.0)
        prompt = "hello world " * 3000  # 36k characters, 6k tokens: fits the 8k window
        result = await load.closed_loop(lambda _i: load.request(client, chat(prompt), expect=429), count, 1)
        holder.cancel()
    return result.check("queue-full refusals").latencies_ms()


def measure(label: str, cwd: Path, cache_dir: Path, logs: Path, count: int, refusals: int) -> dict[str, Any]:
    print(f"measuring {label} ({cwd})", file=sys.stderr)
    result: dict[str, Any] = {}
    with servers.inhouse(ENGINE, logs / f"{label}.log", cache_dir=cache_dir, cwd=cwd, ready_timeout=600) as server:
        result.update(asyncio.run(neighbours(server.url, count)))
    with servers.inhouse([*ENGINE, "--max-num-seqs", "1", "--max-waiting", "0"], logs / f"{label}-full.log",
                         cache_dir=cache_dir, cwd=cwd, ready_timeout=600) as server:
        result["refusal_queue_full"] = asyncio.run(queue_full(server.url, refusals))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="another revision to measure first (a git ref)")
    parser.add_argument("--requests", type=int, default=40, help="small requests per phase")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    report.add_flags(parser, "hostile")
    args = parser.parse_args()
    requests, refusals = (4, 3) if args.smoke else (args.requests, 20)
    started = report.Started()
    logs = servers.log_dir("hostile")
    contenders: list[tuple[str, Path]] = []
    if args.before:
        tree = logs / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True,
                       capture_output=True)
        contenders.append((f"before ({args.before})", tree))
    contenders.append(("this checkout", ROOT))
    results: dict[str, Any] = {}
    try:
        for label, cwd in contenders:
            results[label] = measure(label.split()[0], cwd, args.cache_dir, logs, requests, refusals)
    except load.LoadError as exc:
        print(f"FAILED: {exc}\nserver logs in {logs}", flush=True)
        return 1
    finally:
        if args.before:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(logs / "before")],
                           capture_output=True)
    summary = {label: {key: {"p50": load.percentile(r[key], 50), "p99": load.percentile(r[key], 99),
                             "n": len(r[key]), "median": load.percentile(r[key], 50)}
                       for _, key in ROWS} for label, r in results.items()}
    cells = [[name, *(f"{s[key]['p50'] or 0:9.1f} / {s[key]['p99'] or 0:8.1f}" for s in summary.values())]
             for name, key in ROWS]
    print()
    print(report.table(["", *summary], cells, title=f"{report.SMOKE}\n{AUTH}" if args.smoke else AUTH))
    report.write(report.out_path("hostile", args.out, args.smoke), {
        "meta": started.meta(logs, requests=requests, auth=AUTH, smoke=args.smoke, before=args.before),
        "results": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
