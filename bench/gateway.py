"""Gateway overhead: a fast mock upstream, reached directly, through inhouse, and through a bare aiohttp proxy.

inhouse runs with what production runs: API-key auth (a key with rpm/tpm limits), the audit log on SQLite,
the upstream engine.  The floor is ``baselines/aiohttp_proxy.py`` (no auth, no parsing, no audit).  The
gateway process under test is pinned to one core (``taskset``), the mock and the load generator to the
other.  Closed-loop load at concurrency 1, 16 and 64, blocking and 20-chunk streams; reports p50/p99
latency, the p50 added over direct, the gateway's CPU ms per request (from /proc), req/s and RSS.
Table on stdout, JSON in ``bench/results/gateway.json``.

    python bench/gateway.py                    # about 3 minutes
    python bench/gateway.py --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.process import ADMIN_KEY, ServerProcess, free_port  # noqa: E402

BASELINES = Path(__file__).resolve().parent / "baselines"


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


def wait_up(url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up"
        time.sleep(0.1)


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of a process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


async def load(url: str, headers: dict[str, str], concurrency: int, requests: int, stream: bool) -> tuple[
        list[float], float]:
    body = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    latencies: list[float] = []
    remaining = requests
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={**headers, "Content-Type": "application/json"}) \
            as session:
        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                async with session.post(url + "/v1/chat/completions", data=body) as r:
                    await r.read()
                    assert r.status == 200, r.status
                latencies.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return latencies, wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="requests per level (c=1 uses a third)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    args = p.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="inhouse-bench-gateway-"))
    mock_port, proxy_port = free_port(), free_port()
    procs = [subprocess.Popen([*pinned(0), sys.executable, str(BASELINES / "mock_upstream.py"), "--port",
                               str(mock_port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
    mock = f"http://127.0.0.1:{mock_port}"
    wait_up(mock + "/v1/models")
    procs.append(subprocess.Popen([*pinned(1), sys.executable, str(BASELINES / "aiohttp_proxy.py"), "--port",
                                   str(proxy_port), "--upstream", mock], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.STDOUT))
    proxy = f"http://127.0.0.1:{proxy_port}"
    config = logs / "inhouse.yaml"
    config.write_text(f'models: [{{name: mock, engine: upstream, base_url: "{mock}/v1"}}]\n', encoding="utf-8")
    gateway = ServerProcess(["--config", str(config), "--log-level", "warning"], ROOT / ".cache",
                            logs / "inhouse.log", auth=True, state_dir=logs / "state")
    gateway.start()
    # pin the running server to core 1 as well
    if pinned(1):
        assert gateway.proc is not None
        subprocess.run(["taskset", "-acp", "1", str(gateway.proc.pid)], capture_output=True, check=False)
    key = httpx.post(gateway.url + "/admin/keys", json={"name": "bench", "rpm": 10**8, "tpm": 10**10},
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["secret"]
    targets: dict[str, tuple[str, dict[str, str], int | None]] = {
        "direct": (mock, {}, None),
        "aiohttp proxy (floor)": (proxy, {}, procs[1].pid),
        "inhouse (auth+limits+audit)": (gateway.url, {"Authorization": f"Bearer {key}"},
                                        gateway.proc.pid if gateway.proc else None),
    }
    rows: list[dict[str, Any]] = []
    try:
        for stream in (False, True):
            for concurrency in (1, 16, 64):
                n = args.requests // 3 if concurrency == 1 else args.requests
                for name, (url, headers, pid) in targets.items():
                    asyncio.run(load(url, headers, concurrency, 50, stream))  # warm-up
                    before = proc_stats(pid) if pid else None
                    latencies, wall = asyncio.run(load(url, headers, concurrency, n, stream))
                    after = proc_stats(pid) if pid else None
                    row = {"target": name, "stream": stream, "concurrency": concurrency, "requests": n,
                           "p50_ms": statistics.median(latencies),
                           "p99_ms": sorted(latencies)[int(0.99 * (len(latencies) - 1))],
                           "req_s": n / wall,
                           "cpu_ms_per_req": (after[0] - before[0]) * 1000 / n if before and after else None,
                           "rss_mb": after[1] / 2**20 if after else None}
                    rows.append(row)
                    print(f"{'stream' if stream else 'blocking'} c={concurrency} {name}: p50 {row['p50_ms']:.2f} ms, "
                          f"{row['req_s']:.0f} req/s", flush=True)
    finally:
        gateway.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    direct = {(r["stream"], r["concurrency"]): r["p50_ms"] for r in rows if r["target"] == "direct"}
    for r in rows:
        r["added_p50_ms"] = r["p50_ms"] - direct[(r["stream"], r["concurrency"])]
    print()
    head = f"{'load':<16} {'target':<28} {'p50':>8} {'p99':>8} {'added p50':>10} {'CPU/req':>9} {'req/s':>7} {'RSS':>7}"
    print(head)
    for r in rows:
        load_name = f"{'20-chunk' if r['stream'] else 'blocking'} c={r['concurrency']}"
        cpu = f"{r['cpu_ms_per_req']:.2f}ms" if r["cpu_ms_per_req"] is not None else "-"
        rss = f"{r['rss_mb']:.0f}MB" if r["rss_mb"] is not None else "-"
        print(f"{load_name:<16} {r['target']:<28} {r['p50_ms']:>6.2f}ms {r['p99_ms']:>6.2f}ms "
              f"{r['added_p50_ms']:>+8.2f}ms {cpu:>9} {r['req_s']:>7.0f} {rss:>7}")

    def pick(target: str, stream: bool, c: int) -> dict[str, Any]:
        return next(r for r in rows if r["target"] == target and r["stream"] == stream and r["concurrency"] == c)

    ours, floor = "inhouse (auth+limits+audit)", "aiohttp proxy (floor)"
    cpu_ratio = pick(ours, False, 16)["cpu_ms_per_req"] / pick(floor, False, 16)["cpu_ms_per_req"]
    checks = [
        ("added p50 <= 1.5 ms, blocking c=1", pick(ours, False, 1)["added_p50_ms"], 1.5),
        ("added p50 <= 2.5 ms, 20-chunk stream c=1", pick(ours, True, 1)["added_p50_ms"], 2.5),
        ("gateway CPU <= 1 ms per blocking request (c=16)", pick(ours, False, 16)["cpu_ms_per_req"], 1.0),
        ("CPU per request <= 4x the floor's (blocking c=16)", cpu_ratio, 4.0),
    ]
    print()
    for target, value, bound in checks:
        print(f"{'PASS' if value <= bound else 'FAIL'}  {target}  (measured {value:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "targets": [{"target": t, "value": v, "bound": b, "pass": v <= b}
                                                             for t, v, b in checks]}, indent=2) + "\n")
    print(f"\nwrote {args.out}; logs in {logs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
