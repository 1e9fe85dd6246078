"""Linear layers: the compiled kernel (``inhouse/engine/local/linear_kernel.py``) against oneDNN's packed matmul.

In one process, on SmolLM2-135M's shapes (hidden 576, MLP 1536, 9 query and 3 kv heads of 64, vocabulary 49,152):
for each row count (a decode step's 1-32 rows, a prompt's chunk of 128-2,000), the time of one decoder layer's
four products (q/k/v stacked, o, gate/up stacked, down) and of the vocabulary head, each way.  As in a real step,
the weights come from memory, not the cache: each layer's products run over ``--layers`` different weight copies
in turn (30, as the model has), after a 64 MB write that evicts the last level cache.  The two ways alternate
repeat by repeat, so both see the same machine; medians are reported with their ratio (kernel / oneDNN: below 1
is faster).  Both run with PyTorch's threads.  Prints a table and writes ``bench/results/linear_layers.json``.

Needs a CPU where the kernel runs (AVX512-BF16, no AMX); elsewhere it says why and exits with status 1.

    python bench/linear_layers.py
    python bench/linear_layers.py --rows 1,8,32 --repeats 9
    python bench/linear_layers.py --smoke      # two row counts, two copies: does it run?
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import report  # noqa: E402
from inhouse.engine.local.linear_kernel import LinearKernel  # noqa: E402

__all__ = ["SHAPES", "main"]

# (name, outputs, inputs, per layer?) of SmolLM2-135M-Instruct's linear layers, siblings stacked as the engine does
SHAPES: tuple[tuple[str, int, int, bool], ...] = (
    ("q/k/v", 960, 576, True), ("o", 576, 576, True), ("gate/up", 3072, 576, True), ("down", 576, 1536, True),
    ("vocabulary head", 49152, 576, False),
)
NO_HTTP = "in one process, no server: auth and the audit log do not apply"


def _ways(kernel: LinearKernel, weight: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    packed, reordered = kernel.pack(weight), torch.ops.mkldnn._reorder_linear_weight(weight)
    return {
        "kernel": lambda x: kernel.forward(x, packed, None),
        "onednn": lambda x: torch.ops.mkldnn._linear_pointwise(x, reordered, None, "none", [], ""),
    }


def measure(kernel: LinearKernel, rows: list[int], copies: int, repeats: int) -> list[dict[str, Any]]:
    """Per row count: seconds of one layer's four products and of the vocabulary head, each way (medians)."""
    generator = torch.Generator().manual_seed(0)
    weights = {name: [(torch.randn(out, inner, generator=generator) / inner**0.5).to(torch.bfloat16)
                      for _ in range(copies if per_layer else 1)] for name, out, inner, per_layer in SHAPES}
    ways = {name: [_ways(kernel, w) for w in ws] for name, ws in weights.items()}
    evict = torch.empty(64 * 2**20, dtype=torch.uint8)
    out = []
    for m in rows:
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(repeats):
            for way in ("onednn", "kernel"):
                for name, _out, inner, _per_layer in SHAPES:
                    x = torch.randn(m, inner, generator=generator).to(torch.bfloat16)
                    ways[name][0][way](x)  # warm: first call's set-up is not what a step pays
                    evict.add_(1)
                    started = time.perf_counter()
                    for copy in ways[name]:
                        copy[way](x)
                    times.setdefault((name, way), []).append((time.perf_counter() - started) / len(ways[name]))
        row: dict[str, Any] = {"rows": m}
        for way in ("onednn", "kernel"):
            row[f"layer_{way}_s"] = sum(statistics.median(times[(n, way)]) for n, _o, _i, per in SHAPES if per)
            row[f"head_{way}_s"] = statistics.median(times[("vocabulary head", way)])
            for name, *_ in SHAPES:
                row.setdefault("shapes", {}).setdefault(name, {})[way] = statistics.median(times[(name, way)])
        row["layer_ratio"] = row["layer_kernel_s"] / row["layer_onednn_s"]
        row["head_ratio"] = row["head_kernel_s"] / row["head_onednn_s"]
        out.append(row)
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,8,16,32,128,512,2000", help="comma-separated row counts")
    parser.add_argument("--layers", type=int, default=30, help="weight copies each product runs over (the model's "
                                                                "layers), so weights come from memory")
    parser.add_argument("--repeats", type=int, default=7)
    report.add_flags(parser, "linear_layers")
    args = parser.parse_args(argv)
    rows, copies, repeats = [int(r) for r in args.rows.split(",")], args.layers, args.repeats
    if args.smoke:
        rows, copies, repeats = [1, 8], 2, 2
    kernel, why = LinearKernel.load()
    if kernel is None:
        print(f"the linear kernel does not run here: {why}")
        return 1
    started = report.Started()
    with torch.inference_mode():
        results = measure(kernel, rows, copies, repeats)
    print(report.table(
        ["rows", "layer oneDNN", "layer kernel", "kernel/oneDNN", "head oneDNN", "head kernel", "kernel/oneDNN"],
        [[str(r["rows"]), _ms(r["layer_onednn_s"]), _ms(r["layer_kernel_s"]), f"{r['layer_ratio']:.2f}x",
          _ms(r["head_onednn_s"]), _ms(r["head_kernel_s"]), f"{r['head_ratio']:.2f}x"] for r in results],
        title=f"linear layers, SmolLM2-135M shapes, bf16, {torch.get_num_threads()} threads, weights from memory "
              f"({copies} copies), medians of {repeats} ({NO_HTTP})"))
    path = report.out_path("linear_layers", args.out, args.smoke)
    report.write(path, {"meta": started.meta(smoke=args.smoke, threads=torch.get_num_threads(), copies=copies,
                                             repeats=repeats, how=NO_HTTP), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
