"""Gateway overhead: a fast mock upstream, reached directly, through inhouse, and through a bare aiohttp proxy.

inhouse runs with what production runs: API-key auth (a key with rpm/tpm limits), the audit log on SQLite,
the upstream engine.  The floor is ``baselines/aiohttp_proxy.py`` (no auth, no parsing, no audit).  The
gateway process under test is pinned to one core (``taskset``), the mock and the load generator to the
other.  Closed-loop load at concurrency 1, 16 and 64, blocking and 20-chunk streams; reports p50/p99
latency, the p50 added over direct, the gateway's CPU ms per request (from /proc), req/s and RSS.
Table on stdout, JSON in ``bench/results/gateway.json``.  Servers, load and report come from ``bench/common``.

    python bench/gateway.py                    # about 3 minutes
    python bench/gateway.py --requests 2000
    python bench/gateway.py --smoke            # a few requests per level: does every target answer?
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import operator
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load, machine, report, servers  # noqa: E402

BASELINES = Path(__file__).resolve().parent / "baselines"
OURS, FLOOR = "inhouse (auth+limits+audit)", "aiohttp proxy (floor)"
AUTH = "inhouse runs as in production: auth: keys (a key with rpm/tpm limits), the audit log on SQLite"
Target = tuple[servers.Running, dict[str, str], int | None]  # the server, request headers, pid to watch


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


@contextlib.contextmanager
def targets(logs: Path) -> Iterator[dict[str, Target]]:
    """The mock upstream, the floor proxy and inhouse in front of the mock: name -> (server, headers, pid)."""
    with contextlib.ExitStack() as stack:
        mock = stack.enter_context(servers.peer(
            lambda port: [*pinned(0), sys.executable, str(BASELINES / "mock_upstream.py"), "--port", str(port)],
            logs / "mock.log", ready_path="/v1/models", ready_timeout=60))
        proxy = stack.enter_context(servers.peer(
            lambda port: [*pinned(1), sys.executable, str(BASELINES / "aiohttp_proxy.py"), "--port", str(port),
                          "--upstream", mock.url], logs / "proxy.log", ready_path=None, ready_timeout=60))
        config = servers.inhouse_config(logs / "inhouse.yaml", models=[
            {"name": "mock", "engine": "upstream", "base_url": f"{mock.url}/v1"}])
        gateway = stack.enter_context(servers.inhouse(["--config", str(config), "--log-level", "warning"],
                                                      logs / "inhouse.log", auth="keys"))
        if pinned(1):  # pin the running server to core 1 as well
            subprocess.run(["taskset", "-acp", "1", str(gateway.pid)], capture_output=True, check=False)
        key = servers.create_key(gateway)
        yield {"direct": (mock, {}, None), FLOOR: (proxy, {}, proxy.pid),
               OURS: (gateway, {"Authorization": f"Bearer {key}"}, gateway.pid)}


def measure(by_name: dict[str, Target], requests: int, warmup: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for stream in (False, True):
        body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        for concurrency in (1, 16, 64):
            n = requests // 3 if concurrency == 1 else requests
            for name, (server, headers, pid) in by_name.items():
                asyncio.run(load.run_aiohttp(server.url, body, warmup, concurrency, headers)).check(name)
                before = machine.process_stats(pid) if pid else None
                result = asyncio.run(load.run_aiohttp(server.url, body, n, concurrency, headers))
                after = machine.process_stats(pid) if pid else None
                latencies = result.check(f"{name} c={concurrency}").latencies_ms()
                row = {"target": name, "stream": stream, "concurrency": concurrency, "requests": n,
                       "p50_ms": load.percentile(latencies, 50), "p99_ms": load.percentile(latencies, 99),
                       "req_s": n / result.wall_s,
                       "cpu_ms_per_req": (after[0] - before[0]) * 1000 / n if before and after else None,
                       "rss_mb": after[1] / 2**20 if after else None}
                rows.append(row)
                print(f"{'stream' if stream else 'blocking'} c={concurrency} {name}: p50 {row['p50_ms']:.2f} ms, "
                      f"{row['req_s']:.0f} req/s", flush=True)
    direct = {(r["stream"], r["concurrency"]): r["p50_ms"] for r in rows if r["target"] == "direct"}
    for r in rows:
        r["added_p50_ms"] = r["p50_ms"] - direct[(r["stream"], r["concurrency"])]
    return rows


def checks(rows: list[dict[str, Any]]) -> list[report.Check]:
    def pick(target: str, stream: bool, c: int) -> dict[str, Any]:
        return next(r for r in rows if r["target"] == target and r["stream"] == stream and r["concurrency"] == c)

    ours_cpu, floor_cpu = pick(OURS, False, 16)["cpu_ms_per_req"], pick(FLOOR, False, 16)["cpu_ms_per_req"]
    cpu_ratio = ours_cpu / floor_cpu if ours_cpu is not None and floor_cpu else None
    return [report.check(target, value, functools.partial(operator.ge, bound), lambda v: f"{v:.2f}", bound=bound)
            for target, value, bound in (
                ("added p50 <= 1.5 ms, blocking c=1", pick(OURS, False, 1)["added_p50_ms"], 1.5),
                ("added p50 <= 2.5 ms, 20-chunk stream c=1", pick(OURS, True, 1)["added_p50_ms"], 2.5),
                ("gateway CPU <= 1 ms per blocking request (c=16)", ours_cpu, 1.0),
                ("CPU per request <= 4x the floor's (blocking c=16)", cpu_ratio, 4.0))]


def render(rows: list[dict[str, Any]], smoke: bool) -> str:
    def ms(v: float | None, sign: str = "") -> str:
        return "-" if v is None else f"{v:{sign}.2f}ms"

    head = ["load", "target", "p50", "p99", "added p50", "CPU/req", "req/s", "RSS"]
    cells = [[f"{'20-chunk' if r['stream'] else 'blocking'} c={r['concurrency']}", r["target"], ms(r["p50_ms"]),
              ms(r["p99_ms"]), ms(r["added_p50_ms"], "+"), ms(r["cpu_ms_per_req"]), f"{r['req_s']:.0f}",
              "-" if r["rss_mb"] is None else f"{r['rss_mb']:.0f}MB"] for r in rows]
    return report.table(head, cells, title=f"{report.SMOKE}\n{AUTH}" if smoke else AUTH, left=2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="requests per level (c=1 uses a third)")
    report.add_flags(p, "gateway")
    args = p.parse_args()
    requests, warmup = (6, 5) if args.smoke else (args.requests, 50)
    started = report.Started()
    logs = servers.log_dir("gateway")
    try:
        with targets(logs) as by_name:
            rows = measure(by_name, requests, warmup)
    except load.LoadError as exc:
        print(f"FAILED: {exc}\nlogs in {logs}", flush=True)
        return 1
    found = checks(rows)
    print()
    print(render(rows, args.smoke))
    print()
    print("\n".join(check.line() for check in found))
    report.write(report.out_path("gateway", args.out, args.smoke), {
        "meta": started.meta(logs, auth=AUTH, smoke=args.smoke, requests=requests),
        "rows": rows, "targets": [check.to_json() for check in found]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
