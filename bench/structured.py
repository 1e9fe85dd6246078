"""Structured output: what constrained decoding (``response_format`` json_schema) costs the transformers engine.

Serves the embedded SmolLM2-135M-Instruct (bf16) with ``inhouse serve --auth none`` (audit off, the chat
model alone) and drives it with the same ticket-triage chat requests, 8 at a time, in two arms: ``free``
(no ``response_format``, ``ignore_eos`` and a fixed ``max_tokens``, so every answer has exactly that many
tokens) and ``json_schema`` (a realistic schema: typed fields, an enum, a bounded array; the answer ends
when its JSON is complete).  Arms alternate in rounds so both see the same machine.  Reports output tokens/s
(from ``usage``), TTFT p50, the constrained/free ratio (target >= 0.85x), the constrained answers' mean
length and how many of them parse and validate against the schema; and the grammar compile time, measured
in-process with ``inhouse.engine.local.grammar.Grammars`` on SmolLM2's own tokenizer: ``constraint()`` for a
schema never seen (compile + matcher) and for a cached one (matcher only).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import engine  # noqa: E402
from bench.common import load, machine, report, servers  # noqa: E402

SERVED_NAME = "smollm2-135m-instruct"
BUILTIN_MODEL = "builtin:smollm2-135m-instruct"
TARGET_RATIO = 0.85

# A support-ticket triage record: strings (bounded), an enum, an integer range, a boolean, a bounded array.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "category": {"type": "string", "enum": ["billing", "technical", "account", "shipping", "other"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "urgent": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "customer_mood": {"type": "string", "enum": ["angry", "neutral", "happy"]},
    },
    "required": ["title", "category", "priority", "urgent", "tags", "customer_mood"],
    "additionalProperties": False,
}

SYSTEM = ("You triage customer support tickets. Answer with one JSON object with the fields title (a short "
          "summary), category (billing, technical, account, shipping or other), priority (1 to 5), urgent "
          "(true or false), tags (up to three keywords) and customer_mood (angry, neutral or happy).")

TICKETS = (
    "I was charged twice for my March subscription. Please refund the second payment, it's the third time this "
    "happens!",
    "The mobile app crashes every time I open the settings page on my Android phone since yesterday's update.",
    "How do I change the email address on my account? I no longer have access to the old one.",
    "My parcel was supposed to arrive on Monday and the tracking page still says 'label created'.",
    "Thanks for the quick fix last week, everything works now. Could you add a dark mode to the dashboard?",
    "Our whole team cannot log in since 9am, we get 'invalid token' errors. We have a client demo in an hour.",
    "The invoice PDF shows the wrong VAT number for our company. We need a corrected invoice for accounting.",
    "I'd like to close my account and have all my personal data deleted, as is my right under GDPR.",
    "The export to CSV cuts off after 10,000 rows. Is there a limit, and can it be raised for paid plans?",
    "The box arrived crushed and two of the glasses inside were broken. I want a replacement, not a voucher.",
    "Password reset emails never arrive, I checked the spam folder. I have been locked out for two days.",
    "Can I switch from monthly to yearly billing in the middle of a period, and do I get the discount?",
)


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TICKETS[i % len(TICKETS)]}]


def response_format(schema: dict[str, Any], name: str = "ticket") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


# ---------------------------------------------------------------------------------------------- validation


def schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """What is wrong with ``value`` under the subset of JSON Schema that ``SCHEMA`` uses (jsonschema is not
    installed here): type, enum, required, additionalProperties: false, maxLength, minimum/maximum, maxItems."""
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool}
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{where}: not an integer"]
    elif kind in types and not isinstance(value, types[kind]):
        return [f"{where}: not {kind}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in enum")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(f"{where}: longer than {schema['maxLength']}")
    if ("minimum" in schema and value < schema["minimum"]) or ("maximum" in schema and value > schema["maximum"]):
        errors.append(f"{where}: {value} out of range")
    if kind == "object":
        props = schema.get("properties", {})
        errors += [f"{where}.{k}: missing" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{where}.{k}: not allowed" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{where}.{k}")
    if kind == "array":
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: more than {schema['maxItems']} items")
        for n, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{where}[{n}]")
    return errors


def answer_error(content: str, schema: dict[str, Any]) -> str | None:
    try:
        value = json.loads(content)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc}): {content[:120]!r}"
    errors = schema_errors(value, schema)
    return "; ".join(errors) or None


# ---------------------------------------------------------------------------------------------- arms


@dataclass
class Attempt:
    """One arm's closed loop in one round (what ``machine.least_disturbed`` compares)."""

    run: load.Run
    others_cores: float | None = None
    attempts: int = 1


@dataclass
class Arm:
    """An arm over all rounds: totals, TTFTs, and for the constrained arm the validity of its answers."""

    name: str
    requests: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    ttfts_s: list[float] = field(default_factory=list)
    gaps_s: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    finish_reasons: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    valid: int = 0
    invalid: list[str] = field(default_factory=list)
    others_cores: list[float | None] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)

    @property
    def tok_s(self) -> float | None:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else None

    @property
    def ttft_p50_s(self) -> float | None:
        return load.percentile(self.ttfts_s, 50)

    @property
    def itl_p50_s(self) -> float | None:
        return load.percentile(self.gaps_s, 50)

    @property
    def mean_tokens(self) -> float | None:
        return sum(self.lengths) / len(self.lengths) if self.lengths else None

    def add(self, attempt: Attempt, schema: dict[str, Any] | None) -> None:
        self.requests += len(attempt.run.samples)
        self.wall_s += attempt.run.wall_s
        self.others_cores.append(attempt.others_cores)
        self.attempts.append(attempt.attempts)
        for s in attempt.run.samples:
            if s.error is not None:
                self.errors.append(s.error)
                continue
            self.output_tokens += s.output_tokens
            self.lengths.append(s.output_tokens)
            if s.ttft_s is not None:
                self.ttfts_s.append(s.ttft_s)
            self.gaps_s += s.gaps_s
            key = s.finish_reason or "-"
            self.finish_reasons[key] = self.finish_reasons.get(key, 0) + 1
            if schema is not None:
                problem = answer_error(s.content, schema)
                if problem is None:
                    self.valid += 1
                else:
                    self.invalid.append(problem)

    def to_json(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k != "gaps_s"}  # thousands of gaps: their p50 only
        return {**fields, "tok_s": self.tok_s, "ttft_p50_s": self.ttft_p50_s,
                "itl_p50_s": self.itl_p50_s, "mean_tokens": self.mean_tokens}


def bodies(arm: str, count: int, free_tokens: int, json_tokens: int, offset: int = 0) -> list[dict[str, Any]]:
    common = {"model": SERVED_NAME, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    if arm.startswith("free"):
        extra: dict[str, Any] = {"max_tokens": free_tokens, "ignore_eos": True}
    else:
        extra = {"max_tokens": json_tokens, "response_format": response_format(SCHEMA)}
    return [{**common, **extra, "messages": messages(offset + i)} for i in range(count)]


# ---------------------------------------------------------------------------------------------- compile time


def compile_times(model: Path, count: int) -> dict[str, Any]:
    """``Grammars.constraint()`` in this process on SmolLM2's tokenizer: fresh schemas, then the same again."""
    from transformers import AutoConfig, AutoTokenizer

    from inhouse.engine.answer_schema import answer_schema
    from inhouse.engine.base import GenerateRequest, SamplingParams
    from inhouse.engine.local.grammar import Grammars

    tokenizer = AutoTokenizer.from_pretrained(model)
    config = AutoConfig.from_pretrained(model)
    vocab = int(config.vocab_size)
    stop_ids = frozenset(i for i in [tokenizer.eos_token_id] if i is not None)
    t0 = time.perf_counter()
    grammars = Grammars(tokenizer, vocab, stop_ids)
    setup_s = time.perf_counter() - t0

    def variant(n: int) -> dict[str, Any]:  # a distinct schema text: one property renamed
        props = dict(SCHEMA["properties"])
        props[f"title_{n}"] = props.pop("title")
        required = [f"title_{n}" if k == "title" else k for k in SCHEMA["required"]]
        return {**SCHEMA, "properties": props, "required": required}

    formats = [answer_schema(GenerateRequest(f"c{n}", SamplingParams(), prompt="x",
                                             response_format=response_format(variant(n), f"ticket_{n}")), None)
               for n in range(count)]
    fresh, cached = [], []
    for rf in formats:
        t = time.perf_counter()
        grammars.constraint(rf)
        fresh.append(time.perf_counter() - t)
    for rf in formats:
        t = time.perf_counter()
        grammars.constraint(rf)
        cached.append(time.perf_counter() - t)
    return {"method": "in-process Grammars.constraint() on SmolLM2's tokenizer (its vocab from config.json, "
                      "EOS as stop id), distinct schemas = SCHEMA with the title property renamed",
            "schemas": count, "grammars_setup_s": setup_s, "fresh_s": fresh, "cached_s": cached,
            "fresh_p50_s": load.percentile(fresh, 50), "cached_p50_s": load.percentile(cached, 50),
            "fresh_max_s": max(fresh), "cached_max_s": max(cached)}


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, help="requests per arm and round (default 24; --smoke: 8)")
    p.add_argument("--rounds", type=int, help="rounds of free then json_schema (default 2; --smoke: 1)")
    p.add_argument("--max-tokens", type=int, default=96, help="the free arm's exact answer length (ignore_eos)")
    p.add_argument("--json-max-tokens", type=int, default=256,
                   help="the constrained arm's max_tokens: room enough for the JSON to complete")
    p.add_argument("--schemas", type=int, help="distinct schemas compiled in-process (default 20; --smoke: 3)")
    p.add_argument("--level-timeout", type=float, default=600.0, help="seconds before an arm's loop is cut short")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    report.add_quiet_flags(p)
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache", help="inhouse cache (converted checkpoint)")
    report.add_flags(p, "structured")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 when a request failed or a constrained answer is not valid under the schema."""
    servers.stop_on_signals()
    args = parse_args(argv)
    requests = args.requests or (8 if args.smoke else 24)
    rounds = args.rounds or (1 if args.smoke else 2)
    n_schemas = args.schemas or (3 if args.smoke else 20)
    model = engine.model_dir(args.cache_dir)
    env = servers.offline_env(args.cache_dir)
    started = report.Started()
    logs = servers.log_dir("structured")
    print(f"model {model}\nlogs {logs}\n{servers.NO_AUTH}", flush=True)

    compiled = compile_times(model, n_schemas)
    print(f"[compile] {n_schemas} schemas: fresh p50 {report.ms(compiled['fresh_p50_s'])}, "
          f"cached p50 {report.ms(compiled['cached_p50_s'])}, Grammars() {report.ms(compiled['grammars_setup_s'])}",
          flush=True)

    config = servers.inhouse_config(
        logs / "inhouse.yaml", audit={"enabled": False},
        models=[{"name": SERVED_NAME, "engine": "transformers", "path": BUILTIN_MODEL, "dtype": "bfloat16"}])
    # json_schema first in each round: the matched free arm's max_tokens is its mean answer length so far
    arms = {"json_schema": Arm("json_schema"), "free": Arm("free"), "free_matched": Arm("free_matched")}
    matched: list[int] = []
    command = ""
    with servers.inhouse(["--config", str(config), "--log-level", "warning"], logs / "inhouse.log", auth="none",
                         cache_dir=args.cache_dir.resolve(), env=env, ready_timeout=args.ready_timeout) as server:
        command = server.command
        print(f"[inhouse] ready: {command}", flush=True)
        # warm-up: one of each (the constrained one also compiles and caches the schema's grammar)
        warm = [*bodies("free", 1, 16, 0, offset=3), *bodies("json_schema", 1, 0, args.json_max_tokens, offset=3)]
        warmed = asyncio.run(load.run(server.url, warm, 1, send=load.chat_stream, timeout_s=args.level_timeout))
        if warmed.errors:
            raise SystemExit(f"warm-up failed: {warmed.errors[0]}\nlog tail:\n{server.log_tail()}")

        def attempt(arm: str, offset: int) -> Attempt:
            free_tokens = matched[-1] if arm == "free_matched" else args.max_tokens
            sent = bodies(arm, requests, free_tokens, args.json_max_tokens, offset)
            before = machine.cpu_snapshot(server.pid)
            run = asyncio.run(load.run(server.url, sent, args.concurrency, send=load.chat_stream,
                                       timeout_s=args.level_timeout))
            return Attempt(run, machine.others_cores(before, machine.cpu_snapshot(server.pid)))

        for r in range(rounds):
            for name in arms:
                if name == "free_matched":
                    matched.append(max(1, round(arms["json_schema"].mean_tokens or args.max_tokens)))

                def say(a: Attempt, name: str = name, r: int = r) -> None:
                    level = load.summarize(args.concurrency, a.run)
                    others = "-" if a.others_cores is None else f"{a.others_cores:.2f}"
                    print(f"[{name}] round {r + 1}: {level.tok_s:.1f} tok/s, {level.tokens_per_request:.1f} "
                          f"tokens/answer over {level.wall_s:.1f}s, others used {others} cores"
                          + (f", {len(level.errors)} errors: {level.errors[0]}" if level.errors else ""), flush=True)

                best = machine.least_disturbed(functools.partial(attempt, name, r * requests), args.retries,
                                               args.wait_quiet, say)
                arms[name].add(best, SCHEMA if name == "json_schema" else None)

    free, same, constrained = arms["free"], arms["free_matched"], arms["json_schema"]

    def vs(other: Arm) -> float | None:
        return constrained.tok_s / other.tok_s if constrained.tok_s and other.tok_s else None

    ratio, matched_ratio = vs(free), vs(same)
    # per decode step, free of answer length (prefill's share and a shrinking batch's tail): free ITL / json ITL
    itl_ratio = (free.itl_p50_s / constrained.itl_p50_s
                 if free.itl_p50_s and constrained.itl_p50_s else None)
    checks = [
        report.check(f"json_schema tok/s >= {TARGET_RATIO}x free tok/s (free: {args.max_tokens} tokens) at "
                     f"concurrency {args.concurrency}", ratio,
                     lambda v: v >= TARGET_RATIO, lambda v: f"{v:.2f}x", TARGET_RATIO),
        report.check(f"json_schema tok/s >= {TARGET_RATIO}x free tok/s at the same answer length "
                     f"(free_matched: {'/'.join(map(str, matched))} tokens)", matched_ratio,
                     lambda v: v >= TARGET_RATIO, lambda v: f"{v:.2f}x", TARGET_RATIO),
        report.check("every json_schema answer parses and validates", constrained.valid,
                     lambda v: v == constrained.requests and not constrained.errors,
                     lambda v: f"{v:.0f}/{constrained.requests}", constrained.requests),
    ]

    def others(arm: Arm) -> str:
        known = [o for o in arm.others_cores if o is not None]
        return "-" if not known else "/".join(f"{o:.2f}" for o in known)

    rows = []
    for arm in (free, same, constrained):
        rows.append([
            arm.name, str(arm.requests), f"{arm.tok_s:.1f}" if arm.tok_s else "-", report.ms(arm.ttft_p50_s),
            report.ms(arm.itl_p50_s),
            f"{arm.mean_tokens:.1f}" if arm.mean_tokens is not None else "-",
            ",".join(f"{k}:{v}" for k, v in sorted(arm.finish_reasons.items())),
            "" if arm is constrained or constrained.tok_s is None or not arm.tok_s
            else f"{constrained.tok_s / arm.tok_s:.2f}x",
            f"{arm.valid}/{arm.requests}" if arm is constrained else "",
            str(len(arm.errors)), others(arm), "/".join(map(str, arm.attempts)),
        ])
    title = (f"{'SMOKE: ' + report.SMOKE + chr(10) if args.smoke else ''}"
             f"SmolLM2-135M-Instruct bf16, transformers engine, concurrency {args.concurrency}, {rounds} round(s) "
             f"x {requests} requests per arm; free: max_tokens {args.max_tokens} + ignore_eos; free_matched: the same "
             f"with max_tokens = json_schema's mean answer so far; json_schema: max_tokens {args.json_max_tokens}, "
             f"ends when the JSON completes\n{servers.NO_AUTH}")
    print()
    head = ["arm", "requests", "tok/s", "TTFT p50", "ITL p50", "tokens/answer", "finish", "json/this", "valid",
            "errors", "others", "tries"]
    print(report.table(head, rows, title=title))
    print("others = CPU cores busy with processes outside this run during each round (above "
          f"{machine.BUSY_CORES} the round is not to be trusted)")
    print(f"grammar compile ({compiled['method']}): fresh schema p50 {report.ms(compiled['fresh_p50_s'])} "
          f"(max {report.ms(compiled['fresh_max_s'])}), cached p50 {report.ms(compiled['cached_p50_s'])} "
          f"(max {report.ms(compiled['cached_max_s'])}) over {n_schemas} schemas; "
          f"Grammars() setup {report.ms(compiled['grammars_setup_s'])}")
    if itl_ratio is not None:
        print(f"per decode step: free ITL p50 / json_schema ITL p50 = {itl_ratio:.2f}x (the tok/s ratio against "
              f"{args.max_tokens}-token answers also carries the prefill's larger share in shorter answers)")
    for problem in constrained.invalid[:5]:
        print(f"  invalid: {problem}")
    print()
    for c in checks:
        print(c.line())
    report.write(report.out_path("structured", args.out, args.smoke), {
        "meta": started.meta(logs, model_dir=str(model), command=command, auth=servers.NO_AUTH, smoke=args.smoke,
                             concurrency=args.concurrency, rounds=rounds, requests_per_arm_round=requests,
                             free_max_tokens=args.max_tokens, json_max_tokens=args.json_max_tokens),
        "schema": SCHEMA,
        "arms": {name: arm.to_json() for name, arm in arms.items()},
        "ratio": ratio,
        "matched_ratio": matched_ratio,
        "matched_max_tokens": matched,
        "itl_ratio": itl_ratio,
        "compile": compiled,
        "targets": [c.to_json() for c in checks],
    })
    broken = bool(free.errors or same.errors or constrained.errors or constrained.invalid)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
