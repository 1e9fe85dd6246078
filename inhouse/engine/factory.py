"""Builds the engine a ModelSpec asks for.  The one place that maps ``engine:`` names to classes."""

from __future__ import annotations

from pathlib import Path

from inhouse.config import ModelSpec
from inhouse.engine.base import Engine

__all__ = ["build_engine"]


def build_engine(spec: ModelSpec, cache_dir: Path) -> Engine:
    if spec.engine == "fake":
        from inhouse.engine.fake import FakeEngine

        return FakeEngine(spec)
    from inhouse.engine.local.engine import LocalEngine

    return LocalEngine(spec, cache_dir)
