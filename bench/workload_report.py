"""The report of ``bench/workload.py``: one table per workload and issue 15's targets as PASS/FAIL/N/A checks.

Owns ``Results`` (contender -> workload -> variant -> ``Phase``), the columns of each workload's table
(``render``), the targets (``targets``) and the bound on inhouse's peak RSS (``rss_bound``: vLLM's KV space +
the weights as served + 1 GiB).  It must not measure or start anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench import engine
from bench.common import report
from bench.workload_cases import Phase

__all__ = ["Results", "render", "rss_bound", "targets"]

GIB = 1 << 30

Results = dict[str, dict[str, dict[str, Phase]]]  # contender -> workload -> variant -> phase


def _get(results: Results, key: str, workload: str, variant: str) -> Phase | None:
    return results.get(key, {}).get(workload, {}).get(variant)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _times(value: float) -> str:
    return f"{value:.2f}x"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def rss_bound(model: Path) -> float:
    """vLLM's configured KV space + the weights as served (bf16: 2 bytes a parameter) + 1 GiB, in bytes.

    The parameters are counted from the safetensors headers: the converted checkpoint is stored in float32.
    """
    parameters = 0
    for path in model.glob("*.safetensors"):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        parameters += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return float(int(engine.VLLM_ENV["VLLM_CPU_KVCACHE_SPACE"]) * GIB + 2 * parameters + GIB)


def targets(results: Results, model: Path) -> list[report.Check]:
    """Issue 15's bar; N/A where a contender or workload was not run."""
    def phase(key: str, workload: str, variant: str) -> Phase | None:
        return _get(results, key, workload, variant)

    def tok_s(p: Phase | None) -> float | None:
        return p.level.tok_s if p else None

    def ttft(p: Phase | None) -> float | None:
        return p.level.ttft_p50_s if p else None

    def extra(p: Phase | None, name: str) -> float | None:
        return p.extra.get(name) if p else None

    checks = []
    for workload in ("rag", "multiturn"):
        for variant in ("closed", "open"):
            ours, bare = phase("inhouse", workload, variant), phase("vllm", workload, variant)
            checks.append(report.check(f"{workload} {variant}: inhouse tok/s >= 1.0x vllm",
                                       _ratio(tok_s(ours), tok_s(bare)), lambda v: v >= 1.0, _times, bound=1.0))
            checks.append(report.check(f"{workload} {variant}: inhouse TTFT p50 <= vllm's",
                                       _ratio(ttft(ours), ttft(bare)), lambda v: v <= 1.0, _times, bound=1.0))
    checks.append(report.check("multiturn closed: TTFT p50 with prefix cache <= 0.3x without",
                               _ratio(ttft(phase("inhouse", "multiturn", "closed")),
                                      ttft(phase("inhouse-nopc", "multiturn", "closed"))),
                               lambda v: v <= 0.3, _times, bound=0.3))
    checks.append(report.check("knowledge (repeated context): later-question TTFT with prefix cache <= 0.3x without",
                               _ratio(extra(phase("inhouse", "knowledge", "run"), "later_ttft_p50_s"),
                                      extra(phase("inhouse-nopc", "knowledge", "run"), "later_ttft_p50_s")),
                               lambda v: v <= 0.3, _times, bound=0.3))
    checks.append(report.check("knowledge: inhouse later-question TTFT <= 1.0x vllm's warm TTFT",
                               _ratio(extra(phase("inhouse", "knowledge", "run"), "later_ttft_p50_s"),
                                      extra(phase("vllm", "knowledge", "run"), "later_ttft_p50_s")),
                               lambda v: v <= 1.0, _times, bound=1.0))
    checks.append(report.check("cold prefill: inhouse TTFT <= 1.2x vllm's",
                               _ratio(ttft(phase("inhouse", "cold", "run")), ttft(phase("vllm", "cold", "run"))),
                               lambda v: v <= 1.2, _times, bound=1.2))
    for variant in ("closed", "open"):
        p = phase("inhouse", "mixed", variant)
        checks.append(report.check(f"mixed {variant}: inhouse streams' ITL p99 <= 3x their p50",
                                   _ratio(p.level.itl_p99_s, p.level.itl_p50_s) if p else None,
                                   lambda v: v <= 3.0, _times, bound=3.0))
    peaks = [p.peak_rss for p in results.get("inhouse", {}).get("rag", {}).values() if p.peak_rss is not None]
    bound = rss_bound(model)
    checks.append(report.check(f"rag: inhouse peak RSS <= vLLM KV space + weights + 1 GiB ({_gib(bound)})",
                               float(max(peaks)) if peaks else None, lambda v: v <= bound, _gib, bound=bound))
    checks.append(report.check("no regression on bench/engine.py's levels (not measured here: run bench/engine.py)",
                               None, lambda _v: True))
    return checks


def render(table: dict[str, engine.Contender], results: Results, workloads: list[str], failures: dict[str, str],
           skipped: dict[str, str]) -> str:
    out = []
    for workload in workloads:
        rows = []
        for key in results:
            for p in results[key].get(workload, {}).values():
                lv = p.level
                others = "-" if lv.others_cores is None else f"{lv.others_cores:.2f}"
                if workload == "knowledge":
                    rows.append([table[key].label, p.variant, report.ms(p.extra.get("first_ttft_p50_s")),
                                 report.ms(p.extra.get("later_ttft_p50_s")),
                                 _times(ratio) if (ratio := p.extra.get("later_over_first")) else "-",
                                 _gib(p.peak_rss), _pct(p.prefix_hit), str(len(lv.errors)), others])
                elif workload == "cold":
                    rows.append([table[key].label, p.variant, report.ms(lv.ttft_p50_s), _gib(p.peak_rss),
                                 _pct(p.prefix_hit), str(len(lv.errors)), others])
                else:
                    long = [report.ms(p.extra.get("long_ttft_p50_s"))] if workload == "mixed" else []
                    rows.append([table[key].label, p.variant, str(lv.requests), f"{lv.tok_s:.1f}",
                                 report.ms(lv.ttft_p50_s), report.ms(lv.ttft_p99_s), report.ms(lv.itl_p50_s),
                                 report.ms(lv.itl_p99_s), *long, _gib(p.peak_rss), _pct(p.prefix_hit),
                                 str(len(lv.errors)), others])
        if workload == "knowledge":
            head = ["contender", "prompt", "first TTFT", "later TTFT p50", "later/first", "peak RSS", "prefix hit",
                    "errors", "others"]
        elif workload == "cold":
            head = ["contender", "prompt", "TTFT p50", "peak RSS", "prefix hit", "errors", "others"]
        else:
            head = ["contender", "variant", "reqs", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
                    *(["long TTFT p50"] if workload == "mixed" else []), "peak RSS", "prefix hit", "errors",
                    "others"]
        out += [report.table(head, rows, title=f"== {workload}: {TITLES[workload]}"), ""]
    out += [f"  {table[key].label}: {table[key].note}" for key in results]
    out += [f"  {table[key].label} skipped: {why}" for key, why in skipped.items()]
    out += [f"  {table[key].label} FAILED: {error}" for key, error in failures.items()]
    out.append("  tok/s = output tokens / wall time; ITL pooled over the run's gaps; peak RSS of the server's process "
               "tree (shared pages counted per process); prefix hit = prompt tokens the prefix cache served, from "
               "the server's /metrics (n/a: it reports none); others = CPU cores busy outside this run.")
    return "\n".join(out)


TITLES = {
    "cold": "cold prefill (a prompt never seen, 2 new tokens, one at a time)",
    "knowledge": "knowledge assistant (one long system+context prompt, then different questions, one at a time)",
    "rag": "RAG (shared system prompt + context from a fixed corpus + a question)",
    "multiturn": "multi-turn (every turn resends the history)",
    "mixed": "mixed (short chats streaming while long prompts arrive; stream numbers, long prompts' TTFT)",
}
