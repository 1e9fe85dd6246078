"""Vision requests at once: what batching image requests in one ``generate`` call buys the vision engine.

In-process ``VisionEngine`` on a random Qwen2-VL shaped like SmolLM2-135M in its text half (hidden 576, 9 heads,
``--layers`` layers; the tiny test tokenizer, so a small vocabulary) with a small vision tower, images resized to
112×112 (196 image tokens each).  ``--streams`` clients send one image request each at the same moment (separate
submits, greedy, ``ignore_eos``, ``--max-tokens`` new tokens), in two arms: ``serial`` (``max_num_seqs: 1``: one
request per ``generate`` call, as the engine ran before batching) and ``batched`` (``max_num_seqs: streams``).
Arms alternate in rounds; the best round of each is kept.  Reports output tokens/s per arm, the batched/serial
ratio, the largest batch seen, and whether both arms gave the same answers.
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
from bench.common import machine, report  # noqa: E402

COLORS = ["red", "navy", "olive", "teal", "white", "maroon", "gray", "purple"]


def requests(streams: int, max_tokens: int) -> list[Any]:
    from PIL import Image

    from inhouse.engine.base import GenerateRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out = []
    for i in range(streams):
        color = COLORS[i % len(COLORS)]
        messages = ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
                                                 {"type": "text", "text": "Describe this picture."}]},)
        out.append(GenerateRequest(f"v{time.monotonic_ns()}-{i}", sampling, messages=messages,
                                   images=(Image.new("RGB", (160 + 8 * i, 120), color),)))
    return out


async def run_arm(engine: Any, streams: int, max_tokens: int) -> dict[str, Any]:
    async def one(request: Any) -> tuple[str, int]:
        [generation] = await engine.submit([request])
        deltas = [delta async for delta in generation]
        return "".join(d.text for d in deltas), sum(d.token_count for d in deltas)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in requests(streams, max_tokens)))
    wall = time.perf_counter() - started
    tokens = sum(n for _, n in results)
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "answers": [t for t, _ in results]}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from inhouse.config import default_cache_dir, model_spec
    from inhouse.engine.vision.engine import VisionEngine
    from tests.tiny_vlm import build_tiny_qwen2_vl

    cache_dir = args.cache_dir or default_cache_dir()
    path = build_tiny_qwen2_vl(cache_dir / f"bench-qwen2-vl-h576-l{args.layers}", hidden=576, layers=args.layers,
                               max_side=112)
    engines = {name: VisionEngine(model_spec(name=name, path=str(path), dtype=args.dtype, max_num_seqs=size,
                                             max_waiting=args.streams), cache_dir)
               for name, size in (("serial", 1), ("batched", args.streams))}
    best: dict[str, dict[str, Any]] = {}
    try:
        for engine in engines.values():
            await engine.start()
            await run_arm(engine, args.streams, 4)  # warm-up
        for r in range(args.rounds):
            for name, engine in engines.items():
                machine.wait_for_quiet(args.wait_quiet)
                result = await run_arm(engine, args.streams, args.max_tokens)
                print(f"[{name}] round {r + 1}: {result['tok_s']:.1f} tok/s ({result['tokens']} tokens in "
                      f"{result['wall_s']:.1f}s)", flush=True)
                if name not in best or result["tok_s"] > best[name]["tok_s"]:
                    best[name] = result
        largest = engines["batched"].largest_batch
    finally:
        for engine in engines.values():
            await engine.close()
    same = best["serial"]["answers"] == best["batched"]["answers"]
    for arm in best.values():
        arm.pop("answers")
    return {"arms": best, "largest_batch": largest, "same_answers": same}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--wait-quiet", type=float, default=30.0, help="seconds to wait for an idle CPU before an arm")
    p.add_argument("--cache-dir", type=Path, default=None)
    report.add_flags(p, "vision")
    args = p.parse_args(argv)
    started = report.Started()
    if args.smoke:  # 2 streams x 4 tokens, 2 layers, one round: about 20 s
        args.streams, args.max_tokens, args.layers, args.rounds, args.wait_quiet = 2, 4, 2, 1, 0.0
    out = report.out_path("vision", args.out, args.smoke)
    result = asyncio.run(bench(args))
    arms = result["arms"]
    serial = arms["serial"]["tok_s"]
    rows = [[name, f"{a['tok_s']:.1f}", f"{a['wall_s']:.2f}", f"{a['tok_s'] / serial:.2f}x"]
            for name, a in arms.items()]
    print(report.table(["arm", "tok/s", "wall s", "vs serial"], rows,
                       title=f"random Qwen2-VL (text 576 x {args.layers} layers, {args.dtype}), {args.streams} "
                             f"concurrent image requests x {args.max_tokens} tokens"))
    print(f"largest batch: {result['largest_batch']}; same answers in both arms: {result['same_answers']}")
    report.write(out, {"meta": started.meta(smoke=args.smoke), "streams": args.streams,
                       "max_tokens": args.max_tokens, "layers": args.layers, "dtype": args.dtype, **result})
    return 0 if result["same_answers"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
