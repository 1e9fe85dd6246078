"""What API keys + rate limits + the audit log cost per request, and how fast the audit writer is.

Two real servers with the same instant fake model: ``off`` (``--auth none``, ``audit.enabled: false``) and
``on`` (``auth: keys``, a key with generous rpm/tpm limits so the limiter really counts, audit on SQLite).
Closed-loop load at concurrency 1 and 16, blocking and streaming, alternating between the two servers in
rounds so both see the same machine; reports p50/p99 latency and the added p50.  Then the audit writer
alone: rows/s into SQLite from many concurrent writers.  Table on stdout, JSON in ``bench/results/access.json``.

    python bench/access.py                 # about 2 minutes
    python bench/access.py --requests 400 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.process import ADMIN_KEY, ServerProcess  # noqa: E402  (the same launcher the e2e tests use)

CONFIG = """
audit: {{enabled: {audit}}}
models:
  - {{name: echo, path: unused, engine: fake, fake_reply: "one two three four five six seven eight nine ten
      eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"}}
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one(client: httpx.AsyncClient, streaming: bool) -> float:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": streaming}
    started = time.perf_counter()
    if streaming:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_raw():
                pass
            assert r.status_code == 200, r.status_code
    else:
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
    return (time.perf_counter() - started) * 1000


async def load(url: str, headers: dict[str, str], concurrency: int, requests: int, streaming: bool) -> list[float]:
    latencies: list[float] = []
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:
        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                latencies.append(await one(client, streaming))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def audit_writer_rate(rows: int, writers: int) -> dict[str, float]:
    from inhouse.audit.record import AuditRecord
    from inhouse.audit.writer import AuditWriter
    from inhouse.storage.database import Database

    with tempfile.TemporaryDirectory() as folder:
        db = Database(f"sqlite:///{folder}/bench.db")
        db.migrate()
        writer = AuditWriter(db)
        writer.start()

        async def run() -> float:
            per = rows // writers

            async def client(w: int) -> None:
                for i in range(per):
                    await writer.write(AuditRecord(at=time.time(), request_id=f"r{w}-{i}", method="POST",
                                                   path="/v1/chat/completions", status=200, latency_ms=1.0,
                                                   key_id="key_x", model="m", prompt_tokens=10,
                                                   completion_tokens=20))
            started = time.perf_counter()
            await asyncio.gather(*(client(w) for w in range(writers)))
            return time.perf_counter() - started

        seconds = asyncio.run(run())
        writer.close()
        db.close()
    return {"rows": rows, "writers": writers, "seconds": seconds, "rows_per_s": rows / seconds,
            "batches": writer.batches}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300, help="requests per level per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per level")
    p.add_argument("--audit-rows", type=int, default=20000)
    p.add_argument("--on-without-audit", action="store_true", help="the 'on' server without the audit log "
                   "(to split the cost of auth+limits from that of the audit)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "access.json")
    args = p.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="inhouse-bench-access-"))
    cache = ROOT / ".cache"
    servers: dict[str, ServerProcess] = {}
    for mode, audit in (("off", "false"), ("on", "false" if args.on_without_audit else "true")):
        cfg = logs / f"{mode}.yaml"
        cfg.write_text(CONFIG.format(audit=audit), encoding="utf-8")
        extra = ["--log-level", "warning"]
        servers[mode] = ServerProcess(["--config", str(cfg), *extra], cache, logs / f"{mode}.log",
                                      auth=mode == "on", state_dir=logs / f"state-{mode}").start()
    try:
        created = httpx.post(servers["on"].url + "/admin/keys", json={"name": "bench", "rpm": 10**8, "tpm": 10**10},
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
        headers = {"on": {"Authorization": f"Bearer {created['secret']}"}, "off": {}}
        results: dict[str, Any] = {}
        rows = []
        for streaming in (False, True):
            for concurrency in (1, 16):
                label = f"c={concurrency} {'stream' if streaming else 'blocking'}"
                samples: dict[str, list[float]] = {"off": [], "on": []}
                for mode in ("off", "on"):  # warm-up
                    asyncio.run(load(servers[mode].url, headers[mode], concurrency, 50, streaming))
                for _ in range(args.rounds):
                    for mode in ("off", "on"):
                        samples[mode] += asyncio.run(load(servers[mode].url, headers[mode], concurrency,
                                                          args.requests, streaming))
                p50 = {m: statistics.median(v) for m, v in samples.items()}
                p99 = {m: percentile(v, 0.99) for m, v in samples.items()}
                results[label] = {"p50_ms": p50, "p99_ms": p99, "added_p50_ms": p50["on"] - p50["off"],
                                  "requests": {m: len(v) for m, v in samples.items()}}
                rows.append((label, p50["off"], p50["on"], p50["on"] - p50["off"], p99["off"], p99["on"]))
                print(f"{label}: off p50 {p50['off']:.3f} ms, on p50 {p50['on']:.3f} ms", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    writer = audit_writer_rate(args.audit_rows, 64)
    print()
    print(f"{'load':<18} {'off p50':>9} {'on p50':>9} {'added p50':>10} {'off p99':>9} {'on p99':>9}")
    for label, off, on, added, off99, on99 in rows:
        print(f"{label:<18} {off:>7.3f}ms {on:>7.3f}ms {added:>+8.3f}ms {off99:>7.3f}ms {on99:>7.3f}ms")
    print(f"\naudit writer (SQLite WAL, synchronous=NORMAL, 64 concurrent writers): "
          f"{writer['rows_per_s']:.0f} rows/s ({writer['rows']} rows in {writer['batches']} batches)")
    added = results["c=1 blocking"]["added_p50_ms"]
    checks = [
        ("c=1 blocking: auth+limits+audit add < 0.3 ms p50", added, added < 0.3),
        ("audit writer >= 2000 rows/s on SQLite", writer["rows_per_s"], writer["rows_per_s"] >= 2000),
    ]
    for target, value, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {target}  (measured {value:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"loads": results, "audit_writer": writer, "cpu_count": os.cpu_count(),
                                    "targets": [{"target": t, "value": v, "pass": ok} for t, v, ok in checks]},
                                   indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}; server logs in {logs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
