"""How long a running stream waits for its next token while a ~3,000-token prompt arrives, with chunked prefill
(``prefill_chunk_tokens``) and without.

In-process ``LocalEngine`` on the embedded SmolLM2-135M-Instruct (bf16), prefix cache off.  A stream decodes
greedily; once it runs, a long prompt arrives.  Reports, per arm, the stream's longest gap between two tokens
while the long prompt is prefilled, the long prompt's TTFT, and whether both arms gave the same answers.
Usage: ``python scripts/chunked_prefill_gap.py [--chunk 512] [--tokens 3000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inhouse.config import TransformersSpec  # noqa: E402
from inhouse.engine.base import GenerateRequest, SamplingParams  # noqa: E402
from inhouse.engine.local.engine import LocalEngine  # noqa: E402

SENTENCE = "Parcels from warehouse {i} leave at {h}:00 and delays are reported within {d} hours. "


async def arm(chunk: int, tokens: int, cache_dir: Path) -> tuple[float, float, str, str]:
    spec = TransformersSpec(name="smol", path="builtin:smollm2-135m-instruct", dtype="bfloat16", max_num_seqs=4,
                            prefix_cache=False, prefill_chunk_tokens=chunk, context_length=8192)
    engine = LocalEngine(spec, cache_dir)
    await engine.start()
    assert engine._loaded is not None
    text, i = "", 0
    while len(engine._loaded.tokenizer(text)["input_ids"]) < tokens:
        text += SENTENCE.format(i=i, h=6 + i % 12, d=2 + i % 5)
        i += 1
    greedy = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    [stream] = await engine.submit([GenerateRequest("stream", greedy, prompt="Tell me a long story.")])
    tokens_in = aiter(stream)
    out = (await anext(tokens_in)).text
    long_request = GenerateRequest("long", SamplingParams(max_tokens=8, temperature=0.0), prompt=text)
    start = time.perf_counter()
    [late] = await engine.submit([long_request])
    first: list[float] = []
    late_text: list[str] = []

    async def read_late() -> None:
        async for delta in late:
            if not first:
                first.append(time.perf_counter())
            late_text.append(delta.text)

    reader = asyncio.create_task(read_late())
    last, gap = time.perf_counter(), 0.0
    async for delta in tokens_in:
        now = time.perf_counter()
        if not first or now <= first[0] + 0.5:  # while the long prompt is prefilled
            gap = max(gap, now - last)
        last = now
        out += delta.text
    await reader
    await engine.close()
    return gap, first[0] - start, out, "".join(late_text)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=3000)
    args = parser.parse_args()
    cache_dir = Path(os.environ.get("INHOUSE_TEST_CACHE", ROOT / ".cache"))
    results = {}
    for chunk in (0, args.chunk):
        results[chunk] = await arm(chunk, args.tokens, cache_dir)
    print(f"a {args.tokens}-token prompt arrives while a stream decodes (SmolLM2 bf16, 2 cores, "
          f"load average {os.getloadavg()[0]:.1f})")
    print(f"{'prefill_chunk_tokens':<22}{'stream: longest gap':>20}{'long prompt TTFT':>18}")
    for chunk, (gap, ttft, _, _) in results.items():
        print(f"{chunk:<22}{gap:>19.2f}s{ttft:>17.2f}s")
    same = results[0][2:] == results[args.chunk][2:]
    print(f"same answers: {same}")


if __name__ == "__main__":
    asyncio.run(main())
