"""Time to first token of a knowledge-assistant prompt, with the transformers engine's prefix cache on and off.

In-process ``LocalEngine`` on the embedded SmolLM2-135M-Instruct (bf16).  Each round builds a new ~2,000-token
context (a system prompt plus "retrieved" passages, from repeated text) and asks four different questions over
it, one after the other (greedy, 8 new tokens each), as a Dify knowledge assistant does.  Arms alternate round
by round so both see the same machine.  Reports the TTFT of the first question (the cache cannot help) and the
p50 of the later ones (the repeated context), per arm, their ratio (target <= 0.3), and whether both arms gave
the same answers.  Usage: ``python scripts/prefix_cache_ttft.py [--rounds 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inhouse.config import TransformersSpec  # noqa: E402
from inhouse.engine.base import GenerateRequest, SamplingParams  # noqa: E402
from inhouse.engine.local.engine import LocalEngine  # noqa: E402

SYSTEM = ("You are the support assistant of Acme Logistics. Answer only from the context below. If the answer is "
          "not in the context, say you do not know. Quote the passage you used.")
PASSAGE = ("Passage {i} (handbook section {i}): parcels shipped from warehouse {w} leave on weekdays at {h}:00; "
           "a delayed parcel is re-routed through hub {hub} and the customer is told by e-mail within {d} hours. "
           "Refunds for parcels lost in section {i} are approved by the regional manager after {d} working days. ")
QUESTIONS = ("When do parcels leave warehouse 3?", "Who approves refunds for lost parcels?",
             "How is a customer told about a delay?", "Which hub re-routes delayed parcels from section 7?")


def context(round_: int, tokens: int, tokenizer: Any) -> str:
    text, i = SYSTEM + "\n\nContext:\n", 0
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += PASSAGE.format(i=i + 100 * round_, w=i % 9, h=6 + i % 12, hub=chr(65 + (i + round_) % 26),
                               d=2 + i % 5)
        i += 1
    return text


async def ttft(engine: LocalEngine, system: str, question: str, request_id: str) -> tuple[float, str]:
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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2000, help="context length in tokens (about)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cache_dir = Path(os.environ.get("INHOUSE_TEST_CACHE", ROOT / ".cache"))
    engines = {}
    for arm, on in (("on", True), ("off", False)):
        spec = TransformersSpec(name=f"smol-{arm}", path="builtin:smollm2-135m-instruct", dtype="bfloat16",
                                max_num_seqs=4, prefix_cache=on)
        engines[arm] = LocalEngine(spec, cache_dir)
        await engines[arm].start()
    loaded = engines["on"]._loaded
    assert loaded is not None
    first: dict[str, list[float]] = {"on": [], "off": []}
    later: dict[str, list[float]] = {"on": [], "off": []}
    answers: dict[str, list[str]] = {"on": [], "off": []}
    prompt_tokens = 0
    for r in range(args.rounds):
        system = context(r, args.tokens, loaded.tokenizer)
        prompt_tokens = len(loaded.tokenizer(system)["input_ids"])
        for arm in ("on", "off") if r % 2 == 0 else ("off", "on"):
            for q, question in enumerate(QUESTIONS):
                seconds, text = await ttft(engines[arm], system, question, f"{arm}-{r}-{q}")
                (first if q == 0 else later)[arm].append(seconds)
                answers[arm].append(text)
    stats = engines["on"].stats()
    for engine in engines.values():
        await engine.close()
    result = {
        "model": "smollm2-135m-instruct", "dtype": "bfloat16", "context_tokens": prompt_tokens,
        "rounds": args.rounds, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "first_ttft_p50_s": {arm: statistics.median(v) for arm, v in first.items()},
        "later_ttft_p50_s": {arm: statistics.median(v) for arm, v in later.items()},
        "same_answers": answers["on"] == answers["off"],
        "prefix_cache_hit_tokens": stats.prefix_cache_hit_tokens,
        "prefix_cache_miss_tokens": stats.prefix_cache_miss_tokens,
    }
    result["later_ratio_on_over_off"] = result["later_ttft_p50_s"]["on"] / result["later_ttft_p50_s"]["off"]
    print(f"context {prompt_tokens} tokens, {args.rounds} rounds x {len(QUESTIONS)} questions, SmolLM2 bf16")
    print(f"{'arm':<5}{'first TTFT p50':>16}{'later TTFT p50':>16}")
    for arm in ("off", "on"):
        print(f"{arm:<5}{result['first_ttft_p50_s'][arm]:>15.3f}s{result['later_ttft_p50_s'][arm]:>15.3f}s")
    print(f"later on/off: {result['later_ratio_on_over_off']:.3f} (target <= 0.3); "
          f"same answers: {result['same_answers']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
