"""Builds the engine a ModelSpec asks for.  The one place that maps ``engine:`` names to classes.

``auto`` is the AutoEngine (vLLM, falling back to transformers) when vLLM is installed, else the
transformers engine; the choice is logged.  A vision-language checkpoint (``inhouse.engine.vision.detect``) under
``auto`` or ``transformers`` gets the vision engine; ``engine: vllm`` stays vLLM (text only).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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
            adapters = [Path(a.adapter) for a in specs if isinstance(a, AdapterSpec) and a.base == spec.name
                        and a.adapter is not None]
            built[i] = build_engine(spec, cache_dir, adapters=adapters)
    for i, spec in enumerate(specs):
        if isinstance(spec, AdapterSpec):
            built[i] = adapter_engine(spec, [(s, built[j]) for j, s in enumerate(specs) if j in built])
    return [(spec, built[i]) for i, spec in enumerate(specs)]


def adapter_engine(spec: AdapterSpec, engines: Iterable[tuple[ModelSpec, Engine]]) -> Engine:
    """The engine serving adapter ``spec`` among ``engines``: over its base's engine (transformers, vLLM, auto), or,
    over an upstream base, an upstream engine of its own asking the upstream for ``spec.upstream_model``."""
    from inhouse.engine.adapter import AdapterEngine, LoraHost

    found = next(((s, e) for s, e in engines if s.name == spec.base), None)
    if found is not None and isinstance(found[0], UpstreamSpec) and spec.upstream_model is not None:
        from inhouse.engine.upstream import UpstreamEngine

        return UpstreamEngine(upstream_adapter_spec(spec, found[0]))
    if found is None or not isinstance(found[1], LoraHost) or spec.adapter is None:
        raise ConfigError(f"adapter {spec.name!r}: base {spec.base!r} is not a model served here that serves LoRA "
                          "adapters (transformers, vllm, auto or upstream)")
    return AdapterEngine(spec, found[1])


def upstream_adapter_spec(spec: AdapterSpec, base: UpstreamSpec) -> UpstreamSpec:
    """The upstream model an adapter over an upstream base is: the base's connection, the adapter's name and
    model options, and ``upstream_model`` its name on the upstream."""
    own: dict[str, Any] = {k: getattr(spec, k) for k in ("name", "fallbacks", "version", "smoke", "deployment")
           if k in spec.model_fields_set or k == "name"}
    return base.model_copy(update={**own, "upstream_model": spec.upstream_model})


def build_engine(spec: ModelSpec, cache_dir: Path, served: Iterable[tuple[ModelSpec, Engine]] = (),
                 adapters: Sequence[Path] = ()) -> Engine:
    """``spec``'s engine; an adapter's is over its base's engine among ``served`` (the models being served).
    ``adapters``: the LoRA adapter directories over ``spec`` (a vLLM engine starts with LoRA for them); default:
    those of the adapter models over it among ``served`` (a swapped-in base serves them on)."""
    served = list(served)
    if isinstance(spec, AdapterSpec):
        return adapter_engine(spec, served)
    adapters = adapters or [Path(s.adapter) for s, _ in served
                            if isinstance(s, AdapterSpec) and s.base == spec.name and s.adapter is not None]
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
            return AutoEngine(spec, cache_dir, adapters)
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

        return VllmEngine(spec, cache_dir, adapters)
    from inhouse.engine.local.engine import LocalEngine

    return LocalEngine(spec, cache_dir)
