"""Engines turn a GenerateRequest into a stream of Deltas.  See ``base.py`` for the seam."""

from inhouse.engine.base import (
    Delta,
    Engine,
    EngineInfo,
    EngineStats,
    GenerateRequest,
    Generation,
    SamplingParams,
    TokenLogprob,
)

__all__ = [
    "Delta",
    "Engine",
    "EngineInfo",
    "EngineStats",
    "GenerateRequest",
    "Generation",
    "SamplingParams",
    "TokenLogprob",
]
