"""What API keys + rate limits + the audit log cost per request, and how fast the audit writer is.

Two real servers with the same instant fake model: ``off`` (``--auth none``, ``audit.enabled: false``) and
``on`` (``auth: keys``, a key with generous rpm/tpm limits so the limiter really counts, audit on SQLite).
Closed-loop load at concurrency 1 and 16, blocking and streaming, alternating between the two servers in
rounds so both see the same machine; reports p50/p99 latency and the added p50.  Then the audit writer
alone: rows/s into SQLite from many concurrent writers, and the metrics alone: what recording one call costs
(the metrics sink on the call's end plus the router's admission event), in microseconds.  Table on stdout,
JSON in ``bench/results/access.json``.  Servers, load and report come from ``bench/common``.

    python bench/access.py                 # about 2 minutes
    python bench/access.py --requests 400 --rounds 5
    python bench/access.py --smoke         # a few requests per level: do both servers answer?
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load, report, servers  # noqa: E402

REPLY = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen twenty")
AUTH = ("off: --auth none, audit.enabled: false; on: auth: keys with a key whose rpm/tpm limits are counted, "
        "the audit log on SQLite{}")


def measure(server: servers.Running, headers: dict[str, str], concurrency: int, requests: int,
            streaming: bool) -> list[float]:
    """Latencies (ms) of ``requests`` chat calls to the fake model; every one must succeed."""
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": streaming}
    result = asyncio.run(load.run(server.url, [body] * requests, concurrency, headers=headers,
                                  send=functools.partial(load.request, stream=streaming)))
    return result.check(f"{server.log_path.stem} c={concurrency}").latencies_ms()


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


def metrics_cost(calls: int) -> dict[str, float]:
    """Microseconds per call of what the metrics record on the hot path: the sink on the call's end (a streamed
    chat with tokens, TTFT and inter-token latency) and the router's queue-time observation."""
    from inhouse.audit.record import AuditRecord
    from inhouse.metrics import Metrics
    from inhouse.server.sinks import MetricsSink, RouteTemplates

    metrics = Metrics()
    sink = MetricsSink(metrics, RouteTemplates(["/v1/chat/completions", "/v1/models/{model_id:path}"]),
                       lambda name: True)
    records = [AuditRecord(at=time.time(), request_id=f"r{i}", method="POST", path="/v1/chat/completions",
                           status=200, latency_ms=120.0 + i % 50, model="echo", served_model="echo",
                           deployment="echo", prompt_tokens=12, completion_tokens=20, ttft_ms=15.0 + i % 7,
                           stream=True) for i in range(1000)]

    async def run() -> tuple[float, float]:
        for record in records[:100]:  # warm: the labelled children exist, as on a server that has answered once
            await sink(record)
        started = time.perf_counter()
        for i in range(calls):
            await sink(records[i % 1000])
        sink_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(calls):
            metrics.admitted("echo", 0.0001)
        return sink_seconds, time.perf_counter() - started

    sink_seconds, router_seconds = asyncio.run(run())
    return {"calls": calls, "sink_us": sink_seconds / calls * 1e6, "router_us": router_seconds / calls * 1e6,
            "total_us": (sink_seconds + router_seconds) / calls * 1e6}


def compare(running: dict[str, servers.Running], headers: dict[str, dict[str, str]], requests: int, rounds: int,
            warmup: int) -> tuple[dict[str, Any], list[list[str]]]:
    """Each load on ``off`` and ``on`` in alternating rounds: the JSON of every load and the table's rows."""
    results: dict[str, Any] = {}
    rows = []
    for streaming in (False, True):
        for concurrency in (1, 16):
            label = f"c={concurrency} {'stream' if streaming else 'blocking'}"
            samples: dict[str, list[float]] = {"off": [], "on": []}
            for mode in ("off", "on"):  # warm-up
                measure(running[mode], headers[mode], concurrency, warmup, streaming)
            for _ in range(rounds):
                for mode in ("off", "on"):
                    samples[mode] += measure(running[mode], headers[mode], concurrency, requests, streaming)
            p50 = {m: load.percentile(v, 50) or 0.0 for m, v in samples.items()}
            p99 = {m: load.percentile(v, 99) or 0.0 for m, v in samples.items()}
            results[label] = {"p50_ms": p50, "p99_ms": p99, "added_p50_ms": p50["on"] - p50["off"],
                              "requests": {m: len(v) for m, v in samples.items()}}
            rows.append([label, f"{p50['off']:.3f} ms", f"{p50['on']:.3f} ms", report.signed_ms(p50["on"] - p50["off"]),
                         f"{p99['off']:.3f} ms", f"{p99['on']:.3f} ms"])
            print(f"{label}: off p50 {p50['off']:.3f} ms, on p50 {p50['on']:.3f} ms", flush=True)
    return results, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300, help="requests per level per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per level")
    p.add_argument("--audit-rows", type=int, default=20000)
    p.add_argument("--metric-calls", type=int, default=200000, help="calls recorded for the metrics cost")
    p.add_argument("--on-without-audit", action="store_true", help="the 'on' server without the audit log "
                   "(to split the cost of auth+limits from that of the audit)")
    report.add_flags(p, "access")
    args = p.parse_args()
    if args.smoke:
        args.requests, args.rounds, args.audit_rows, args.metric_calls = 5, 1, 640, 5000
    auth = AUTH.format(" off (--on-without-audit)" if args.on_without_audit else "")
    started = report.Started()
    logs = servers.log_dir("access")
    try:
        with contextlib.ExitStack() as stack:
            running: dict[str, servers.Running] = {}
            for mode, audit in (("off", False), ("on", not args.on_without_audit)):
                config = servers.inhouse_config(logs / f"{mode}.yaml", audit={"enabled": audit}, models=[
                    {"name": "echo", "path": "unused", "engine": "fake", "fake_reply": REPLY}])
                running[mode] = stack.enter_context(servers.inhouse(
                    ["--config", str(config), "--log-level", "warning"], logs / f"{mode}.log",
                    auth="keys" if mode == "on" else "none"))
            headers = {"on": {"Authorization": f"Bearer {servers.create_key(running['on'])}"}, "off": {}}
            results, rows = compare(running, headers, args.requests, args.rounds, 5 if args.smoke else 50)
    except load.LoadError as exc:
        print(f"FAILED: {exc}\nserver logs in {logs}", flush=True)
        return 1
    writer = audit_writer_rate(args.audit_rows, 64)
    recording = metrics_cost(args.metric_calls)
    print()
    print(report.table(["load", "off p50", "on p50", "added p50", "off p99", "on p99"], rows,
                       title=f"{report.SMOKE}\n{auth}" if args.smoke else auth))
    print(f"\naudit writer (SQLite WAL, synchronous=NORMAL, 64 concurrent writers): "
          f"{writer['rows_per_s']:.0f} rows/s ({writer['rows']} rows in {writer['batches']} batches)")
    print(f"metrics per call: {recording['total_us']:.2f} us (call-end sink {recording['sink_us']:.2f} us, "
          f"router queue time {recording['router_us']:.2f} us; {recording['calls']} calls)")
    added = results["c=1 blocking"]["added_p50_ms"]
    checks = [
        report.check("c=1 blocking: auth+limits+audit add < 0.3 ms p50", added, lambda v: v < 0.3, bound=0.3),
        report.check("audit writer >= 2000 rows/s on SQLite", writer["rows_per_s"], lambda v: v >= 2000,
                     bound=2000),
        report.check("metrics: recording a call costs < 10 us", recording["total_us"], lambda v: v < 10, bound=10),
    ]
    print("\n".join(check.line() for check in checks))
    report.write(report.out_path("access", args.out, args.smoke), {
        "meta": started.meta(logs, auth=auth, smoke=args.smoke, requests=args.requests, rounds=args.rounds),
        "loads": results, "audit_writer": writer, "metrics": recording, "cpu_count": os.cpu_count(),
        "targets": [check.to_json() for check in checks]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
