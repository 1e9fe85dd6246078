"""Chunked prefill: how long a running stream waits for its next token while a ~3,000-token prompt arrives, with
``prefill_chunk_tokens`` and without.

In-process ``LocalEngine`` on the embedded SmolLM2-135M-Instruct (bf16; ``--model``/``--dtype`` for another),
prefix cache off.  A stream decodes greedily (``--stream-tokens``, ``ignore_eos``); once it runs, a long prompt
arrives.  Reports, per arm (``prefill_chunk_tokens`` 0, then ``--chunk``), the stream's longest gap between two
tokens while the long prompt is prefilled, the long prompt's TTFT, and whether both arms gave the same answers
(exit status 1 when they did not).  ``bench/workload.py``'s mixed case measures the same stall over HTTP, as
the streams' ITL p99, without switching chunking off.  It owns the long prompt and the two arms; the table and
the JSON (``bench/results/chunked_prefill.json``) come from ``bench/common/report.py``.

    python bench/chunked_prefill.py --chunk 512 --tokens 3000
    python bench/chunked_prefill.py --smoke    # a short prompt and stream: does it run?
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import local, machine, report  # noqa: E402

__all__ = ["arm", "main"]

SENTENCE = "Parcels from warehouse {i} leave at {h}:00 and delays are reported within {d} hours. "


def long_text(tokens: int, tokenizer: Any) -> str:
    """Sentences about parcels until at least ``tokens`` tokens."""
    text, i = "", 0
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += SENTENCE.format(i=i, h=6 + i % 12, d=2 + i % 5)
        i += 1
    return text


async def arm(model: str, dtype: str, chunk: int, tokens: int, stream_tokens: int,
              cache_dir: Path) -> tuple[float, float, str, str]:
    """One engine with ``prefill_chunk_tokens=chunk``: (the stream's longest gap while the long prompt is
    prefilled, the long prompt's TTFT, the stream's answer, the long prompt's answer)."""
    from inhouse.engine.base import GenerateRequest, SamplingParams

    async with local.engine("smol", model, dtype, cache_dir, max_num_seqs=4, prefix_cache=False,
                            prefill_chunk_tokens=chunk, context_length=8192) as engine:
        text = long_text(tokens, local.tokenizer(engine))
        greedy = SamplingParams(max_tokens=stream_tokens, temperature=0.0, ignore_eos=True)
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
    return gap, first[0] - start, out, "".join(late_text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunk", type=int, default=512, help="prefill_chunk_tokens of the chunked arm")
    p.add_argument("--tokens", type=int, default=3000, help="the long prompt's length in tokens (about)")
    p.add_argument("--stream-tokens", type=int, default=400, help="new tokens of the running stream")
    local.add_model_flags(p)
    report.add_quiet_flags(p, retries=False)
    report.add_flags(p, "chunked_prefill")
    args = p.parse_args(argv)
    if args.smoke:  # a 300-token prompt in chunks of 128 beside a 64-token stream
        args.chunk, args.tokens, args.stream_tokens, args.wait_quiet = 128, 300, 64, 0.0
    started = report.Started()
    arms = {}
    for chunk in (0, args.chunk):
        machine.wait_for_quiet(args.wait_quiet)
        arms[chunk] = asyncio.run(arm(args.model, args.dtype, chunk, args.tokens, args.stream_tokens, args.cache_dir))
    same = arms[0][2:] == arms[args.chunk][2:]
    if args.smoke:
        print(report.SMOKE)
    rows = [[str(chunk), report.ms(gap), report.ms(ttft)] for chunk, (gap, ttft, _, _) in arms.items()]
    print(report.table(["prefill_chunk_tokens", "stream: longest gap", "long prompt TTFT"], rows,
                       title=f"a {args.tokens}-token prompt arrives while a stream decodes "
                             f"({args.model} {args.dtype})"))
    print(f"same answers: {same}")
    report.write(report.out_path("chunked_prefill", args.out, args.smoke), {
        "meta": started.meta(smoke=args.smoke), "model": args.model, "dtype": args.dtype, "tokens": args.tokens,
        "stream_tokens": args.stream_tokens,
        "arms": {str(chunk): {"prefill_chunk_tokens": chunk, "longest_gap_s": gap, "long_ttft_s": ttft}
                 for chunk, (gap, ttft, _, _) in arms.items()},
        "same_answers": same})
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
