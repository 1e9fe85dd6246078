"""Prefix cache: time to first token of a knowledge-assistant prompt, with the transformers engine's cache on and off.

In-process ``LocalEngine`` on the embedded SmolLM2-135M-Instruct (bf16; ``--model``/``--dtype`` for another).
Each round builds a new ~2,000-token context (a system prompt plus "retrieved" passages, from repeated text)
and asks four different questions over it, one after the other (greedy, 8 new tokens each), as a Dify
knowledge assistant does.  Arms alternate round by round so both see the same machine.  Reports the TTFT of
the first question (the cache cannot help) and the p50 of the later ones (the repeated context), per arm,
their ratio (target <= 0.3), and whether both arms gave the same answers (exit status 1 when they did not).
The same target over HTTP, against vLLM too, is ``bench/workload.py``'s knowledge case; this one leaves the
server out and checks the answers.  It owns the context, the questions and the two arms; the table, the
target line and the JSON (``bench/results/prefix_cache.json``) come from ``bench/common/report.py``.

    python bench/prefix_cache.py --rounds 3
    python bench/prefix_cache.py --smoke      # one short round: does it run?
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import local, machine, report  # noqa: E402

__all__ = ["main", "measure"]

TARGET_RATIO = 0.3
SYSTEM = ("You are the support assistant of Acme Logistics. Answer only from the context below. If the answer is "
          "not in the context, say you do not know. Quote the passage you used.")
PASSAGE = ("Passage {i} (handbook section {i}): parcels shipped from warehouse {w} leave on weekdays at {h}:00; "
           "a delayed parcel is re-routed through hub {hub} and the customer is told by e-mail within {d} hours. "
           "Refunds for parcels lost in section {i} are approved by the regional manager after {d} working days. ")
QUESTIONS = ("When do parcels leave warehouse 3?", "Who approves refunds for lost parcels?",
             "How is a customer told about a delay?", "Which hub re-routes delayed parcels from section 7?")
ARMS = ("on", "off")


def context(round_: int, tokens: int, tokenizer: Any) -> str:
    """The system prompt and passages of round ``round_`` (its own numbers), at least ``tokens`` tokens long."""
    text, i = SYSTEM + "\n\nContext:\n", 0
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += PASSAGE.format(i=i + 100 * round_, w=i % 9, h=6 + i % 12, hub=chr(65 + (i + round_) % 26),
                               d=2 + i % 5)
        i += 1
    return text


async def ttft(engine: Any, system: str, question: str, request_id: str) -> tuple[float, str]:
    """One question over ``system``, greedy, 8 new tokens: seconds to the first token, and the answer."""
    from inhouse.engine.base import GenerateRequest, SamplingParams

    messages = ({"role": "system", "content": system}, {"role": "user", "content": question})
    request = GenerateRequest(request_id, SamplingParams(max_tokens=8, temperature=0.0), messages=messages)
    start = time.perf_counter()
    [generation] = await engine.submit([request])
    first: float | None = None
    text = ""
    async for delta in generation:
        first = first if first is not None else time.perf_counter() - start
        text += delta.text
    assert first is not None
    return first, text


async def measure(model: str, dtype: str, cache_dir: Path, rounds: int, tokens: int,
                  wait_quiet_s: float = 0.0) -> dict[str, Any]:
    """Both arms over ``rounds`` rounds; the JSON's numbers (TTFTs in seconds)."""
    first: dict[str, list[float]] = {"on": [], "off": []}
    later: dict[str, list[float]] = {"on": [], "off": []}
    answers: dict[str, list[str]] = {"on": [], "off": []}
    prompt_tokens = 0
    async with contextlib.AsyncExitStack() as stack:
        engines = {arm: await stack.enter_async_context(local.engine(f"smol-{arm}", model, dtype, cache_dir,
                                                                    max_num_seqs=4, prefix_cache=arm == "on"))
                   for arm in ARMS}
        tokenizer = local.tokenizer(engines["on"])
        for r in range(rounds):
            system = context(r, tokens, tokenizer)
            prompt_tokens = len(tokenizer(system)["input_ids"])
            machine.wait_for_quiet(wait_quiet_s)
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                for q, question in enumerate(QUESTIONS):
                    seconds, text = await ttft(engines[arm], system, question, f"{arm}-{r}-{q}")
                    (first if q == 0 else later)[arm].append(seconds)
                    answers[arm].append(text)
        stats = engines["on"].stats()
    result: dict[str, Any] = {
        "model": model, "dtype": dtype, "context_tokens": prompt_tokens, "rounds": rounds,
        "first_ttft_p50_s": {arm: statistics.median(v) for arm, v in first.items()},
        "later_ttft_p50_s": {arm: statistics.median(v) for arm, v in later.items()},
        "same_answers": answers["on"] == answers["off"],
        "prefix_cache_hit_tokens": stats.prefix_cache_hit_tokens,
        "prefix_cache_miss_tokens": stats.prefix_cache_miss_tokens,
    }
    result["later_ratio_on_over_off"] = result["later_ttft_p50_s"]["on"] / result["later_ttft_p50_s"]["off"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=2000, help="context length in tokens (about)")
    local.add_model_flags(p)
    report.add_quiet_flags(p, retries=False)
    report.add_flags(p, "prefix_cache")
    args = p.parse_args(argv)
    if args.smoke:  # one round over a 300-token context
        args.rounds, args.tokens, args.wait_quiet = 1, 300, 0.0
    started = report.Started()
    result = asyncio.run(measure(args.model, args.dtype, args.cache_dir, args.rounds, args.tokens, args.wait_quiet))
    if args.smoke:
        print(report.SMOKE)
    rows = [[arm, report.ms(result["first_ttft_p50_s"][arm]), report.ms(result["later_ttft_p50_s"][arm])]
            for arm in ("off", "on")]
    print(report.table(["prefix cache", "first TTFT p50", "later TTFT p50"], rows,
                       title=f"context {result['context_tokens']} tokens, {args.rounds} rounds x {len(QUESTIONS)} "
                             f"questions, {args.model} {args.dtype}"))
    check = report.check(f"later-question TTFT with prefix cache <= {TARGET_RATIO}x without",
                         result["later_ratio_on_over_off"], lambda v: v <= TARGET_RATIO, lambda v: f"{v:.3f}x",
                         TARGET_RATIO)
    print(f"{check.line()}\nsame answers in both arms: {result['same_answers']}")
    report.write(report.out_path("prefix_cache", args.out, args.smoke),
                 {"meta": started.meta(smoke=args.smoke), **result, "targets": [check.to_json()]})
    return 0 if result["same_answers"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
