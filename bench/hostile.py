"""What a hostile neighbour costs everyone else: small requests beside megabyte prompts, and cheap refusals.

Serves the embedded SmolLM2-135M-Instruct (its real 49k-token tokenizer) and measures, with this checkout
and optionally another revision (``--before REF``, run from a temporary git worktree) on the same machine
in one run:

- ``small alone``: p50/p99 latency of short chat requests (1 new token), two at a time;
- ``small beside 1 MB``: the same while two other clients keep sending 1 MB prompts (each refused with
  400 ``context_length_exceeded``), and how long those refusals take;
- ``queue-full refusal``: the latency of a 429 for a 36k-character prompt while the engine's only slot is
  held (``--max-num-seqs 1 --max-waiting 0``): a refusal should not pay for tokenizing.

Table on stdout, JSON in ``bench/results/hostile.json``.

    python bench/hostile.py                       # this checkout only, about 1 minute
    python bench/hostile.py --before HEAD~1       # and the given revision, side by side
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.process import ServerProcess  # noqa: E402  (the same launcher the e2e tests use)

MODEL = "smollm2-135m-instruct"
BIG = "你好 hello world " * 64_000  # about 1 MB of UTF-8


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


async def timed(client: httpx.AsyncClient, body: dict[str, Any], expect: int) -> float:
    started = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == expect, (r.status_code, r.text[:300])
    return (time.perf_counter() - started) * 1000


def chat(content: str, max_tokens: int = 1) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}


async def small_requests(client: httpx.AsyncClient, count: int) -> list[float]:
    out: list[float] = []

    async def worker(n: int) -> None:
        for i in range(n):
            out.append(await timed(client, chat(f"Say one word about the number {i}."), 200))

    await asyncio.gather(worker(count // 2), worker(count - count // 2))
    return out


async def neighbours(url: str, count: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await small_requests(client, 4)  # warm
        alone = await small_requests(client, count)
        refusals: list[float] = []
        stop = asyncio.Event()

        async def hostile() -> None:
            while not stop.is_set():
                refusals.append(await timed(client, chat(BIG), 400))

        attackers = [asyncio.create_task(hostile()) for _ in range(2)]
        await asyncio.sleep(0.5)
        beside = await small_requests(client, count)
        stop.set()
        await asyncio.gather(*attackers)
    return {"small_alone": alone, "small_beside_1mb": beside, "refusal_1mb": refusals}


async def queue_full(url: str, count: int) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        holder = asyncio.create_task(client.post("/v1/chat/completions", json={
            **chat("Count from one to a thousand.", 400), "ignore_eos": True}))
        await asyncio.sleep(1.0)
        prompt = "hello world " * 3000  # 36k characters, 6k tokens: fits the 8k window
        refusals = [await timed(client, chat(prompt), 429) for _ in range(count)]
        holder.cancel()
    return refusals


def measure(label: str, cwd: Path, cache_dir: Path, logs: Path, count: int) -> dict[str, Any]:
    print(f"measuring {label} ({cwd})", file=sys.stderr)
    result: dict[str, Any] = {}
    with ServerProcess(["--dtype", "bfloat16", "--engine", "transformers"], cache_dir, logs / f"{label}.log",
                       ready_timeout=600, cwd=cwd) as server:
        result.update(asyncio.run(neighbours(server.url, count)))
    with ServerProcess(["--dtype", "bfloat16", "--engine", "transformers", "--max-num-seqs", "1",
                        "--max-waiting", "0"], cache_dir, logs / f"{label}-full.log", ready_timeout=600,
                       cwd=cwd) as server:
        result["refusal_queue_full"] = asyncio.run(queue_full(server.url, 20))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="another revision to measure first (a git ref)")
    parser.add_argument("--requests", type=int, default=40, help="small requests per phase")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hostile.json")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
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
            results[label] = measure(label.split()[0], cwd, args.cache_dir, logs, args.requests)
    finally:
        if args.before:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(logs / "before")],
                           capture_output=True)
    rows = [("small alone p50 / p99 (ms)", "small_alone"), ("small beside 1 MB p50 / p99 (ms)", "small_beside_1mb"),
            ("1 MB refusal p50 / p99 (ms)", "refusal_1mb"), ("queue-full 429 p50 / p99 (ms)", "refusal_queue_full")]
    width = max(len(label) for label, _ in rows)
    print(f"\n{'':<{width}}  " + "  ".join(f"{label:>22}" for label in results))
    for label, key in rows:
        cells = [f"{percentile(r[key], 0.5):9.1f} / {percentile(r[key], 0.99):8.1f}" for r in results.values()]
        print(f"{label:<{width}}  " + "  ".join(f"{c:>22}" for c in cells))
    summary = {label: {key: {"p50": percentile(r[key], 0.5), "p99": percentile(r[key], 0.99), "n": len(r[key]),
                             "median": statistics.median(r[key]) if r[key] else None}
                       for _, key in rows} for label, r in results.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": {"requests": args.requests, "logs": str(logs)}, "results": summary},
                                   indent=2), encoding="utf-8")
    print(f"\nwritten to {args.out}; server logs in {logs}")


if __name__ == "__main__":
    main()
