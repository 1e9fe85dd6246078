"""Decode-step benchmark: the local engine's ModelRunner against HF ``model.generate`` in one process.

Owns one measurement of the model step itself, with no scheduler, sampler or HTTP: for each batch size it
prefills B chat prompts (about 30-60 tokens each) into the engine's KV tiers and runs greedy decode steps, timing
the prefill and every step; in the same run, and alternating with it, HF ``model.generate`` on a separately
loaded stock model (sdpa, the same batch left-padded, ``min_new_tokens = max_new_tokens``) is timed the same
way as the "raw loop" reference.  Each timed run also records how many cores other processes used meanwhile,
since a busy 2-core machine distorts everything.

It then checks exactness: the runner's greedy tokens for the largest batch, and for each prompt run alone,
against ``model.generate`` on each prompt alone, up to generate's first stop token, in bfloat16 and in
float32.  In float32 they must be equal, and so must a lone prompt's in bfloat16.  In a bfloat16 batch
near-ties flip, so the check also reports how often ``generate`` on the padded batch differs from
``generate`` alone: the noise floor to compare with.  Prints tables and writes
``bench/results/decode_step.json``.  CPU contention and the report come from ``bench/common``.

    python bench/decode_step.py                          # B = 1, 8, 32; 128 steps; 3 repeats
    python bench/decode_step.py --batch-sizes 8 --repeats 1 --no-check
    python bench/decode_step.py --wait-quiet 60            # wait up to 60 s for an idle machine per run
    python bench/decode_step.py --smoke                  # B = 1, 2; 4 steps; 1 repeat; 4 tokens checked
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import StoppingCriteria

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, report  # noqa: E402
from inhouse.config import TransformersSpec  # noqa: E402
from inhouse.engine.local.attention import register  # noqa: E402
from inhouse.engine.local.attention_kernel import AttentionKernel  # noqa: E402
from inhouse.engine.local.kv_tiers import KVTiers  # noqa: E402
from inhouse.engine.local.linear_kernel import LinearKernel  # noqa: E402
from inhouse.engine.local.loader import LoadedModel, load_model  # noqa: E402
from inhouse.engine.local.runner import ModelRunner  # noqa: E402

__all__ = ["QUESTIONS", "main"]

MODEL_PATH = "builtin:smollm2-135m-instruct"
NO_HTTP = "in one process, no server: auth and the audit log do not apply"

# User turns of 5-30 tokens; with SmolLM2's system prompt each chat prompt is about 30-60 tokens.
QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about autumn rain on a city street.",
    "Explain the difference between a process and a thread, with one concrete example of each.",
    "How does compound interest work? Walk me through 1,000 dollars at 5 percent over ten years.",
    "List three colors that go well with navy blue.",
    "My sourdough bread keeps coming out dense and flat. What are the most likely causes?",
    "Why is the sky blue during the day but red at sunset?",
    "Give me a simple dinner recipe with chicken, rice, spinach and garlic.",
    "What is a REST API, in plain language?",
    "Suggest five ideas for a birthday party for a seven-year-old who loves dinosaurs and space.",
    "How do I reverse a list in Python?",
    "Draft a polite message to my landlord asking when the broken heating will be repaired.",
    "What should I check before buying a used car from a private seller?",
    "Summarize the plot of Romeo and Juliet for a twelve-year-old.",
    "How should a complete beginner build up to running a 5k?",
    "Explain how vaccines train the immune system.",
    "What are the main pros and cons of renting versus buying a home?",
    "Translate 'good morning, how are you?' into Spanish and German.",
    "My Python script runs out of memory reading a large CSV file. What can I do?",
    "Compare electric cars and hybrid cars for a family that drives 40 kilometres a day.",
    "How do I politely decline a meeting invitation from a senior colleague?",
    "What were the main causes of the French Revolution?",
    "Suggest a weekly study plan for learning Spanish in thirty minutes a day.",
    "What does a product manager do day to day?",
    "My tomato plants have yellow leaves at the bottom. What might be wrong?",
    "Explain the rules of castling in chess.",
    "Write a short product description for a stainless steel water bottle.",
    "What is the difference between weather and climate?",
    "How do noise-cancelling headphones work?",
    "Give me a ten-minute morning stretching routine for someone who sits at a desk all day.",
    "How can I explain fractions to a child who finds them confusing?",
    "Tell me briefly about the history of the printing press.",
)


@dataclass(eq=False)
class _Row:
    """What ModelRunner and KVTiers read of a sequence: its prompt, its outputs so far, its length, its last token,
    its tier and slot; no cached prefix, no adapter."""

    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    tier: int = -1
    slot: int = -1
    cached: int = 0
    adapter: str | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]


@dataclass
class Timing:
    """One timed generation of ``steps`` tokens for a batch."""

    prefill_s: float
    step_s: list[float]
    tokens: list[list[int]]


class _StepClock(StoppingCriteria):
    """Stamps the wall clock after each token of ``model.generate``; never stops generation."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- set-up


@dataclass
class Models:
    """The same checkpoint twice: one for the engine's runner, one stock copy for ``generate``."""

    ours: LoadedModel
    stock: Any
    pad_id: int


def load(dtype: Literal["bfloat16", "float32"], model: str = MODEL_PATH, cache_dir: Path = ROOT / ".cache") -> Models:
    spec = TransformersSpec(name="bench", path=model, dtype=dtype)
    ours = load_model(spec, cache_dir, register())
    stock = load_model(spec, cache_dir, "sdpa").model
    return Models(ours, stock, int(ours.tokenizer.pad_token_id))


def prompts(tokenizer: Any, count: int) -> list[list[int]]:
    chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(count)]
    return [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
            for c in chats]


def new_runner(loaded: LoadedModel, linear: bool = True) -> ModelRunner:
    """The engine's runner over KV tiers as the engine builds them, with the compiled attention where it runs
    (bf16 on a CPU with AVX512-BF16) and, unless ``linear`` is False, the compiled linear layers where they run (no
    AMX too), as the engine does; no LoRA."""
    tiers: KVTiers[_Row] = KVTiers.for_model(loaded)
    kernel = AttentionKernel.load()[0] if loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu" else None
    linear_kernel = LinearKernel.load()[0] if linear and loaded.dtype == torch.bfloat16 else None
    return ModelRunner(loaded.model, tiers, loaded.device, kernel=kernel, linear_kernel=linear_kernel)


# ---------------------------------------------------------------------------------------------- contenders


def run_ours(runner: ModelRunner, batch: list[list[int]], steps: int) -> Timing:
    """Greedy-decode ``steps`` tokens per row with the engine's runner (prefill gives the first token); each step
    sizes the tiers first, as the scheduler does, and is timed with that."""
    rows = [_Row(list(ids)) for ids in batch]
    start = time.perf_counter()
    for row in rows:
        runner.tiers.place(row, len(row.prompt_ids) + 1)
    logits = runner.prefill(rows)
    _append_argmax(rows, logits)
    prefill = time.perf_counter() - start
    step_s = []
    for _ in range(steps - 1):
        start = time.perf_counter()
        running = runner.tiers.prepare_decode()
        _append_argmax(running, runner.decode(running))
        step_s.append(time.perf_counter() - start)
    for row in rows:
        runner.tiers.remove(row)
    return Timing(prefill, step_s, [r.output_ids for r in rows])


def _append_argmax(rows: list[_Row], logits: torch.Tensor) -> None:
    for row, token in zip(rows, logits.argmax(dim=-1).tolist(), strict=True):
        row.output_ids.append(token)


def run_generate(model: Any, pad_id: int, batch: list[list[int]], steps: int, to_the_end: bool = True) -> Timing:
    """Greedy ``model.generate`` on the left-padded batch, timed per token.

    ``to_the_end`` forbids stop tokens until ``steps`` tokens (for timing); without it generation ends at
    the first stop token, as a plain greedy decode would (for the exactness check).
    """
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    clock = _StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=steps,
            min_new_tokens=steps if to_the_end else 0, do_sample=False, pad_token_id=pad_id,
            stopping_criteria=[clock],
        )
    stamps = clock.stamps
    step_s = [b - a for a, b in itertools.pairwise(stamps)]
    return Timing(stamps[0] - start, step_s, out[:, width:].tolist())


# ---------------------------------------------------------------------------------------------- speed


@dataclass
class SpeedRow:
    contender: str
    batch: int
    prefill_ms: float
    step_ms: float
    tokens_per_s: float
    repeats: int
    others_cores: float  # median over the timed runs


def measure_speed(models: Models, sizes: list[int], steps: int, repeats: int, quiet_s: float) -> list[SpeedRow]:
    """Alternate ours and generate per batch size and repeat, so both see the same machine noise."""
    runner = new_runner(models.ours)
    contenders: dict[str, Callable[[list[list[int]], int], Timing]] = {
        "inhouse": lambda batch, n: run_ours(runner, batch, n),
        "generate": lambda batch, n: run_generate(models.stock, models.pad_id, batch, n),
    }
    rows = []
    for size in sizes:
        batch = prompts(models.ours.tokenizer, size)
        samples: dict[str, list[tuple[Timing, float]]] = {name: [] for name in contenders}
        for run in contenders.values():
            run(batch, 8)  # warm-up: kernels and cache capacity for this shape
        for _ in range(repeats):
            for name, run in contenders.items():
                machine.wait_for_quiet(quiet_s, sample_s=2.0)
                before = machine.cpu_snapshot()
                timing = run(batch, steps)
                samples[name].append((timing, machine.others_cores(before, machine.cpu_snapshot()) or 0.0))
            runner.tiers.shrink()
        rows += [_summarize(name, size, runs) for name, runs in samples.items()]
    return rows


def _summarize(name: str, size: int, runs: list[tuple[Timing, float]]) -> SpeedRow:
    step = statistics.median(s for timing, _ in runs for s in timing.step_s)
    prefill = statistics.median(timing.prefill_s for timing, _ in runs)
    others = statistics.median(cores for _, cores in runs)
    return SpeedRow(name, size, prefill * 1e3, step * 1e3, size / step, len(runs), others)


# ---------------------------------------------------------------------------------------------- exactness


@dataclass
class CheckRow:
    """Rows whose greedy tokens differ from ``generate`` on that prompt alone, and where they first do."""

    dtype: str
    contender: str
    batch: int
    tokens: int
    first_divergence: dict[int, int]


def check_exact(models: Models, size: int, tokens: int) -> list[CheckRow]:
    """The runner (on the batch, and on each prompt alone), and ``generate`` on the padded batch, against
    ``generate`` on each prompt alone.

    ``generate`` alone stops at its first stop token; tokens after it are not compared.
    """
    batch = prompts(models.ours.tokenizer, size)
    alone = [run_generate(models.stock, models.pad_id, [ids], tokens, to_the_end=False).tokens[0] for ids in batch]
    lone = new_runner(models.ours)
    candidates = {
        "inhouse": run_ours(new_runner(models.ours), batch, tokens).tokens,
        "inhouse-alone": [run_ours(lone, [ids], tokens).tokens[0] for ids in batch],
        "generate-batched": run_generate(models.stock, models.pad_id, batch, tokens, to_the_end=False).tokens,
    }
    dtype = str(models.ours.dtype).removeprefix("torch.")
    return [CheckRow(dtype, name, size, tokens, _divergence(got, alone)) for name, got in candidates.items()]


def _divergence(got: list[list[int]], expected: list[list[int]]) -> dict[int, int]:
    found = {}
    for row, (ours, reference) in enumerate(zip(got, expected, strict=True)):
        at = next((j for j, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b), None)
        if at is not None:
            found[row] = at
    return found


# ---------------------------------------------------------------------------------------------- report


def print_speed(rows: list[SpeedRow], smoke: bool) -> None:
    by_key = {(r.contender, r.batch): r for r in rows}
    cells = []
    for size in sorted({r.batch for r in rows}):
        reference = by_key[("generate", size)]
        for name in ("inhouse", "generate"):
            row = by_key[(name, size)]
            cells.append([str(size), name, f"{row.prefill_ms:.1f}", f"{row.step_ms:.2f}", f"{row.tokens_per_s:.1f}",
                          f"{row.tokens_per_s / reference.tokens_per_s:.2f}x", f"{row.others_cores:.2f}"])
    head = ["B", "contender", "prefill ms", "decode ms/step", "tok/s", "vs generate", "others cores"]
    title = f"{report.SMOKE}\n{NO_HTTP}" if smoke else NO_HTTP
    print(report.table(head, cells, title=title, left=2))


def print_checks(rows: list[CheckRow]) -> None:
    for row in rows:
        found = row.first_divergence
        verdict = "all equal" if not found else f"{len(found)} differ (row: first differing token) {found}"
        print(f"exactness {row.dtype:>8} {row.contender:<16} B={row.batch} first {row.tokens} tokens "
              f"vs generate alone: {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL_PATH, help="the model's path (default: the embedded SmolLM2)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache", help="inhouse cache (converted checkpoint)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender and batch size")
    parser.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared per sequence")
    parser.add_argument("--no-check", action="store_true", help="skip the exactness check")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each timed run, wait up to this long for other processes to go idle")
    report.add_flags(parser, "decode_step")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.steps, args.repeats, args.check_tokens = "1,2", 4, 1, 4
    started = report.Started()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    models = load("bfloat16", args.model, args.cache_dir)
    speed = measure_speed(models, sizes, args.steps, args.repeats, args.wait_quiet)
    print_speed(speed, args.smoke)
    checks: list[CheckRow] = []
    if not args.no_check:
        dtypes: tuple[Literal["bfloat16", "float32"], ...] = ("bfloat16", "float32")
        for dtype in dtypes:
            checks += check_exact(load(dtype, args.model, args.cache_dir), max(sizes), args.check_tokens)
        print_checks(checks)

    report.write(report.out_path("decode_step", args.out, args.smoke), {
        "meta": started.meta(auth=NO_HTTP, smoke=args.smoke),
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "speed": [asdict(r) for r in speed],
        "exactness": [asdict(r) for r in checks],
    })


if __name__ == "__main__":
    main()
