"""Builds the engine a ModelSpec asks for.  The one place that maps ``engine:`` names to classes.

``auto`` is the AutoEngine (vLLM, falling back to transformers) when vLLM is installed, else the
transformers engine; the choice is logged.  A vision-language checkpoint (``inhouse.engine.vision.detect``) under
``auto`` or ``transformers`` gets the vision engine; ``engine: vllm`` stays vLLM (text only).
"""

from __future__ import annotations

import logging
from pathlib import Path

from inhouse.config import (
    AutoSpec,
    FakeSpec,
    ModelSpec,
    SentenceTransformersSpec,
    TransformersSpec,
    UpstreamSpec,
    VllmSpec,
)
from inhouse.engine.base import Engine

__all__ = ["build_engine"]

log = logging.getLogger("inhouse.engine")


def build_engine(spec: ModelSpec, cache_dir: Path) -> Engine:
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
