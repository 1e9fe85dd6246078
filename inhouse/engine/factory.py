"""Builds the engine a ModelSpec asks for.  The one place that maps ``engine:`` names to classes.

``auto`` picks vLLM when it is installed, else the transformers engine, and says so in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path

from inhouse.config import ModelSpec
from inhouse.engine.base import Engine

__all__ = ["build_engine"]

log = logging.getLogger("inhouse.engine")


def build_engine(spec: ModelSpec, cache_dir: Path) -> Engine:
    kind = spec.engine
    if kind == "auto":
        from inhouse.engine.vllm import vllm_available

        kind = "vllm" if vllm_available() else "transformers"
        log.info("model %s: engine auto → %s", spec.name, kind)
    if kind == "fake":
        from inhouse.engine.fake import FakeEngine

        return FakeEngine(spec)
    if kind == "vllm":
        from inhouse.engine.vllm import VllmEngine

        return VllmEngine(spec, cache_dir)
    from inhouse.engine.local.engine import LocalEngine

    return LocalEngine(spec, cache_dir)
