"""Builds the engine a ModelSpec asks for.  The one place that maps ``engine:`` names to classes.

``auto`` is the AutoEngine (vLLM, falling back to transformers) when vLLM is installed, else the
transformers engine; the choice is logged.  A vision-language checkpoint (``inhouse.engine.vision.detect``) under
``auto`` or ``transformers`` gets the vision engine; ``engine: vllm`` stays vLLM (text only).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from inhouse.config import (
    AdapterSpec,
    AutoSpec,
    ConfigError,
    FakeSpec,
    ModelSpec,
    SentenceTransformersSpec,
    TransformersSpec,
    UpstreamSpec,
    VllmSpec,
)
from inhouse.engine.base import Engine

__all__ = ["build_engine", "build_engines"]

log = logging.getLogger("inhouse.engine")


def build_engines(specs: Iterable[ModelSpec], cache_dir: Path) -> list[tuple[ModelSpec, Engine]]:
    """Every model's engine; an adapter model's serves through its base's engine (one engine per base)."""
    specs = list(specs)
    built: dict[int, Engine] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, AdapterSpec):
            built[i] = build_engine(spec, cache_dir)
    for i, spec in enumerate(specs):
        if isinstance(spec, AdapterSpec):
            built[i] = adapter_engine(spec, [(s, built[j]) for j, s in enumerate(specs) if j in built])
    return [(spec, built[i]) for i, spec in enumerate(specs)]


def adapter_engine(spec: AdapterSpec, engines: Iterable[tuple[ModelSpec, Engine]]) -> Engine:
    """The engine serving adapter ``spec`` over its base's (transformers) engine among ``engines``."""
    from inhouse.engine.adapter import AdapterEngine
    from inhouse.engine.local.engine import LocalEngine

    base = next((e for s, e in engines if s.name == spec.base and isinstance(e, LocalEngine)), None)
    if base is None:
        raise ConfigError(f"adapter {spec.name!r}: base {spec.base!r} is not a transformers model served here")
    return AdapterEngine(spec, base)


def build_engine(spec: ModelSpec, cache_dir: Path, served: Iterable[tuple[ModelSpec, Engine]] = ()) -> Engine:
    """``spec``'s engine; an adapter's is over its base's engine among ``served`` (the models being served)."""
    if isinstance(spec, AdapterSpec):
        return adapter_engine(spec, served)
    if isinstance(spec, AutoSpec | TransformersSpec):
        from inhouse.engine.vision.detect import is_vision_checkpoint

        if is_vision_checkpoint(spec):
            from inhouse.engine.vision.engine import VisionEngine

            log.info("model %s: a vision-language checkpoint → the transformers vision engine", spec.name)
            return VisionEngine(spec, cache_dir)
    if isinstance(spec, AutoSpec):
        from inhouse.engine.vllm import vllm_available

        if vllm_available():
            from inhouse.engine.auto import AutoEngine

            log.info("model %s: engine auto → vllm (transformers if vLLM refuses the model)", spec.name)
            return AutoEngine(spec, cache_dir)
        log.info("model %s: engine auto → transformers (vLLM is not installed)", spec.name)
    elif isinstance(spec, UpstreamSpec):
        from inhouse.engine.upstream import UpstreamEngine

        return UpstreamEngine(spec)
    elif isinstance(spec, SentenceTransformersSpec):
        from inhouse.engine.encoder.engine import EncoderEngine

        return EncoderEngine(spec, cache_dir)
    elif isinstance(spec, FakeSpec):
        from inhouse.engine.fake import FakeEngine

        return FakeEngine(spec)
    elif isinstance(spec, VllmSpec):
        from inhouse.engine.vllm import VllmEngine

        return VllmEngine(spec, cache_dir)
    from inhouse.engine.local.engine import LocalEngine

    return LocalEngine(spec, cache_dir)
