"""The limit: a raw batched decode loop over the model, with no HTTP and no scheduler.

Owns one measurement: HF ``model.generate`` on a left-padded batch of chat prompts, greedy, with
``min_new_tokens = max_new_tokens`` so every row yields exactly that many tokens (bf16, sdpa).  A stopping
criterion that never stops records the wall clock after each decoding step; the first stamp is the prefill
(time to first token), the gaps after it are the inter-token latencies.  Prints one JSON object per batch on
stdout and nothing else there; it must not know about servers or the report.

    python bench/baselines/raw_loop.py --model DIR --batch 8 --batches 2 --prompts prompts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria

__all__ = ["run_batch"]


class _StepClock(StoppingCriteria):
    """Stamps the time each decoding step finishes; never stops generation."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def run_batch(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], new_tokens: int) -> dict[str, Any]:
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    clock = _StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            stopping_criteria=[clock], pad_token_id=tokenizer.pad_token_id,
        )
    end = time.perf_counter()
    generated = int(out.shape[1] - batch["input_ids"].shape[1])
    return {
        "batch": len(conversations),
        "prompt_tokens": [int(n) for n in batch["attention_mask"].sum(dim=1)],
        "output_tokens": generated * len(conversations),
        "prefill_s": clock.stamps[0] - start,
        "step_s": [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)],
        "wall_s": end - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local HF checkpoint directory")
    parser.add_argument("--prompts", type=Path, required=True, help="JSON list of conversations (message lists)")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--batches", type=int, default=1, help="batches measured, one after another")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--warmup-tokens", type=int, default=16, help="new tokens of the unmeasured warm-up batch")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, attn_implementation="sdpa", local_files_only=True
    ).eval()  # type: ignore[no-untyped-call]
    conversations: list[list[dict[str, str]]] = json.loads(args.prompts.read_text(encoding="utf-8"))

    def take(i: int) -> list[list[dict[str, str]]]:
        return [conversations[(i * args.batch + j) % len(conversations)] for j in range(args.batch)]

    run_batch(model, tokenizer, take(0), args.warmup_tokens)
    for i in range(args.batches):
        print(json.dumps(run_batch(model, tokenizer, take(i), args.max_new_tokens)), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
