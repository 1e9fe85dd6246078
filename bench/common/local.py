"""inhouse's transformers engine in-process, for a benchmark that measures one engine setting with no server between.

Owns the flags that choose the model (``--model``, by default the embedded SmolLM2-135M-Instruct; ``--dtype``;
``--cache-dir``), ``engine(...)``: a started ``LocalEngine`` with the given model settings, closed when the
block ends, and ``tokenizer(engine)``, the Hugging Face tokenizer it loaded (to size prompts in its tokens).
It imports inhouse's engine only when called; it must not measure, print or start servers.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inhouse.engine.local.engine import LocalEngine

__all__ = ["BUILTIN_MODEL", "add_model_flags", "engine", "tokenizer"]

BUILTIN_MODEL = "builtin:smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[2]


def add_model_flags(parser: argparse.ArgumentParser, dtype: str = "bfloat16") -> None:
    """``--model``, ``--dtype`` and ``--cache-dir``, worded the same in every in-process benchmark."""
    parser.add_argument("--model", default=BUILTIN_MODEL, help="the model's path (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default=dtype, choices=["auto", "float32", "bfloat16", "float16"],
                        help=f"the engine's dtype (default {dtype})")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache", help="inhouse cache (converted checkpoint)")


@contextlib.asynccontextmanager
async def engine(name: str, model: str, dtype: str, cache_dir: Path, **settings: Any) -> AsyncIterator[LocalEngine]:
    """A started ``LocalEngine`` named ``name`` on ``model`` with the other model ``settings``; closed afterwards."""
    from inhouse.config import TransformersSpec
    from inhouse.engine.local.engine import LocalEngine

    spec = TransformersSpec.model_validate({"name": name, "path": model, "dtype": dtype, **settings})
    started = LocalEngine(spec, cache_dir)
    await started.start()
    try:
        yield started
    finally:
        await started.close()


def tokenizer(started: LocalEngine) -> Any:
    """The tokenizer the engine loaded: ``tokenizer(text)["input_ids"]``."""
    loaded = started._loaded
    assert loaded is not None, "the engine is not started"
    return loaded.tokenizer
